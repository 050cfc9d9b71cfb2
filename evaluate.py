"""Score colorized videos against their ground truth: PSNR, SSIM, CDC, colorfulness and warp error, plus figures.

    python evaluate.py --pred video_output/foreman.mp4 --gt ../shared/data/val
    python evaluate.py --gt ../shared/data/val --baseline gray

Every metric is computed in float64: the paper's PSNR was taken on uint8 tensors, whose differences wrap modulo 256.
The exact definitions are in DEFINITIONS below (also written into every results.json) and in docs/evaluation.md.
Other scripts import `evaluate_clip` and the metric functions; heavy libraries load only inside functions.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

import flow as motion
import utils
import video_io

PSNR_CAP_DB = 100.0  # identical frames have infinite PSNR; a cap keeps clip means finite and comparable
CDC_DILATIONS = (1, 2, 4)
SAMPLE_FRAMES = 4  # frames shown per clip in the side-by-side figure
SSIM_MIN_SIDE = 7  # scikit-image's default 7x7 window

DEFINITIONS = {
    "psnr": f"float64 RGB, data range 255, per frame then mean over frames; identical frames count as "
            f"{PSNR_CAP_DB:g} dB",
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
    "mean": "clips weigh equally: the mean of the per-clip values",
    "gray baseline": "utils.rgb_to_gray (BT.601 luma) of the ground truth frame, replicated to 3 channels",
}

TABLE_COLUMNS = (  # (key, header, format)
    ("frames", "frames", "{:d}"),
    ("psnr", "PSNR", "{:.3f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("cdc", "CDC", "{:.5f}"),
    ("gt_cdc", "CDC(GT)", "{:.5f}"),
    ("colorfulness", "CF", "{:.2f}"),
    ("gt_colorfulness", "CF(GT)", "{:.2f}"),
    ("colorfulness_gap", "|dCF|", "{:.2f}"),
    ("warp_error", "warp", "{:.3f}"),
    ("gt_warp_error", "warp(GT)", "{:.3f}"),
)
SUMMARY_KEYS = tuple(key for key, _, _ in TABLE_COLUMNS) + ("psnr_capped_frames",)


# ---------------------------------------------------------------------------------------------------------------
# Metrics on single frames and frame pairs


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """PSNR in dB of two RGB frames (data range 255), capped at PSNR_CAP_DB so identical frames stay finite."""
    mse = float(np.mean((pred.astype(np.float64) - gt.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(255.0**2 / mse))


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


def _mean(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN marks 'undefined here'); NaN when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def evaluate_clip(pred_frames: Iterable[np.ndarray], gt_frames: Iterable[np.ndarray], sample_at: Iterable[int] = (),
                  name: str = "clip") -> dict:
    """All metrics of one clip, streaming its frames (only per-frame numbers and histograms are kept).

    Frames are HxWx3 uint8 RGB, matched by order; a prediction of another size is resized to the ground truth.
    Returns the clip means, `per_frame` lists (psnr, ssim, colorfulness, gt_colorfulness), and, when
    `sample_at` names frame indices, `samples`: {index: (pred, gt)} for figures (not JSON-serialisable).
    """
    sample_at = set(sample_at)
    per_frame: dict[str, list[float]] = {"psnr": [], "ssim": [], "colorfulness": [], "gt_colorfulness": []}
    pred_histograms, gt_histograms, warp, gt_warp = [], [], [], []
    samples, resized = {}, False
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
    result = {
        "frames": len(per_frame["psnr"]),
        "psnr": _mean(per_frame["psnr"]),
        "ssim": _mean(per_frame["ssim"]),
        "cdc": cdc_from_histograms(np.stack(pred_histograms)),
        "gt_cdc": cdc_from_histograms(np.stack(gt_histograms)),
        "colorfulness": _mean(per_frame["colorfulness"]),
        "gt_colorfulness": _mean(per_frame["gt_colorfulness"]),
        "warp_error": _mean(warp),
        "gt_warp_error": _mean(gt_warp),
        "psnr_capped_frames": sum(value >= PSNR_CAP_DB for value in per_frame["psnr"]),
        "resized": resized,
        "per_frame": per_frame,
    }
    result["colorfulness_gap"] = abs(result["colorfulness"] - result["gt_colorfulness"])
    if sample_at:
        result["samples"] = samples
    return result


def summarize(clip_results: dict[str, dict]) -> dict:
    """Mean over clips of each metric (clips weigh equally); frame and capped counts are summed."""
    counts = ("frames", "psnr_capped_frames")
    summary = {key: _mean(result[key] for result in clip_results.values()) for key in SUMMARY_KEYS if key not in counts}
    return {key: sum(result[key] for result in clip_results.values()) for key in counts} | summary


# ---------------------------------------------------------------------------------------------------------------
# Matching clips


def clip_name(path: Path) -> str:
    """A video x.mp4 and a frame folder x/ both name the clip x."""
    return path.stem if path.is_file() else path.name


def _clips_by_name(root: Path) -> dict[str, Path]:
    clips: dict[str, Path] = {}
    for path in video_io.list_clips(root):
        name = clip_name(path)
        if name in clips:
            raise utils.UserError(f"{root}: both {clips[name].name} and {path.name} are clip '{name}'; keep one")
        clips[name] = path
    return clips


def match_clips(pred_root: Path | None, gt_root: Path) -> list[tuple[str, Path | None, Path]]:
    """(name, prediction or None, ground truth) per clip: a single clip against a single clip pairs whatever the
    names; otherwise clips pair by name. Without a prediction every ground-truth clip is listed."""
    gt_clips = _clips_by_name(gt_root)
    if pred_root is None:
        return [(name, None, path) for name, path in gt_clips.items()]
    pred_clips = _clips_by_name(pred_root)
    pred_is_clip = list(pred_clips.values()) == [pred_root]
    if pred_is_clip and list(gt_clips.values()) == [gt_root]:
        return [(clip_name(pred_root), pred_root, gt_root)]
    missing = [name for name in pred_clips if name not in gt_clips]
    if missing:
        names = ", ".join(list(gt_clips)[:6]) + (", ..." if len(gt_clips) > 6 else "")
        raise utils.UserError(f"{pred_clips[missing[0]]}: no ground-truth clip named '{missing[0]}' in {gt_root} "
                              f"(it has {names}); rename it to match")
    unmatched = [name for name in gt_clips if name not in pred_clips]
    if unmatched and not pred_is_clip:
        print(f"warning: {pred_root}: no prediction for {len(unmatched)} ground-truth clip(s) "
              f"({', '.join(unmatched)}); their scores are left out of the means", file=sys.stderr)
    return [(name, pred_clips[name], gt_clips[name]) for name in pred_clips]


# ---------------------------------------------------------------------------------------------------------------
# Figures, table and files


def sample_indices(frame_count: int, count: int = SAMPLE_FRAMES) -> list[int]:
    return sorted({round(i) for i in np.linspace(0, max(frame_count - 1, 0), count)})


def save_frames_figure(path: Path, clip: str, samples: dict[str, dict]) -> None:
    """Rows: sampled frames; columns: grayscale input | each prediction | ground truth."""
    indices = sorted(next(iter(samples.values())))
    save_grid_figure(path, clip, [(f"frame {index}", samples, index) for index in indices])


def middle_sample(samples: dict[str, dict]) -> dict[str, dict]:
    """The samples of each method cut to the middle sampled frame: what the overview figure shows of a clip."""
    indices = sorted(next(iter(samples.values())))
    middle = indices[len(indices) // 2]
    return {method: {middle: frames[middle]} for method, frames in samples.items()}


def save_overview_figure(path: Path, samples_by_clip: dict[str, dict]) -> None:
    """One row per clip (its middle sampled frame), so every clip can be looked at in one picture."""
    rows = []
    for clip, samples in samples_by_clip.items():
        (index,) = next(iter(samples.values()))
        rows.append((f"{clip}\nframe {index}", samples, index))
    save_grid_figure(path, "one frame per clip", rows)


def save_grid_figure(path: Path, title: str, rows: list[tuple[str, dict[str, dict], int]]) -> None:
    """Rows of (label, samples {method: {index: (prediction, ground truth)}}, index); columns: grayscale input |
    each prediction | ground truth. Row heights follow each row's frame shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [method for method in rows[0][1] if method != "gray"]
    titles = ["grayscale input", *methods, "ground truth"]
    panel_width = 3.2
    truths = [next(iter(samples.values()))[index][1] for _, samples, index in rows]
    aspects = [truth.shape[0] / truth.shape[1] for truth in truths]
    figure, axes = plt.subplots(len(rows), len(titles), squeeze=False, layout="constrained",
                                gridspec_kw={"height_ratios": aspects},
                                figsize=(panel_width * len(titles), panel_width * sum(aspects) + 0.6))
    for row, ((label, samples, index), truth) in enumerate(zip(rows, truths)):
        images = [np.repeat(utils.rgb_to_gray(truth)[..., None], 3, axis=2)]
        images += [samples[method][index][0] for method in methods] + [truth]
        for col, image in enumerate(images):
            axis = axes[row][col]
            axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[col], fontsize=10)
            if col == 0:
                axis.set_ylabel(label, fontsize=9)
    figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_curves_figure(path: Path, clip: str, results: dict[str, dict]) -> None:
    """Per-frame PSNR and colorfulness over time, every method and the ground truth on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    for method, result in results.items():
        style = "--" if method == "gray" else "-"
        top.plot(result["per_frame"]["psnr"], style, label=f"{method} (mean {result['psnr']:.2f} dB)")
        bottom.plot(result["per_frame"]["colorfulness"], style, label=f"{method} (mean {result['colorfulness']:.1f})")
    gt = next(iter(results.values()))
    bottom.plot(gt["per_frame"]["gt_colorfulness"], "k-", label=f"ground truth (mean {gt['gt_colorfulness']:.1f})")
    top.set_ylabel("PSNR (dB)")
    bottom.set_ylabel("colorfulness")
    bottom.set_xlabel("frame")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    top.set_title(clip)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _format(value: float | int, template: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return template.format(value)


def format_table(results: dict[str, dict[str, dict]], summaries: dict[str, dict]) -> str:
    """One row per clip and method, then the mean rows."""
    headers = ["clip", "method"] + [header for _, header, _ in TABLE_COLUMNS]
    rows = []
    for method, clips in results.items():
        for clip, result in clips.items():
            rows.append([clip, method] + [_format(result[key], template) for key, _, template in TABLE_COLUMNS])
    for method, summary in summaries.items():
        rows.append(["MEAN", method] + [_format(summary[key], template) for key, _, template in TABLE_COLUMNS])
    widths = [max(len(row[i]) for row in rows + [headers]) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [headers] + rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - len(summaries), "-" * len(lines[0]))
    return "\n".join(lines)


def _json_safe(value):
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def write_csv(path: Path, results: dict[str, dict[str, dict]], summaries: dict[str, dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "clip"] + list(SUMMARY_KEYS))
        for method, clips in results.items():
            for clip, result in clips.items():
                writer.writerow([method, clip] + [result[key] for key in SUMMARY_KEYS])
            writer.writerow([method, "MEAN"] + [summaries[method][key] for key in SUMMARY_KEYS])


def deep_metric_status(metric: str, weights: Path | None) -> str:
    """LPIPS and FID need network weights; they are never downloaded, and not computed yet."""
    if weights is None:
        return "skipped: no weights given (never downloaded)"
    if not weights.is_file():
        raise utils.UserError(f"{weights}: no such file; pass the {metric} weights on disk or leave the flag out")
    return f"skipped: {metric} is not implemented yet ({weights} was not read)"


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, help="colorized output: a video, a frame folder, or a folder of clips")
    parser.add_argument("--gt", type=Path, required=True,
                        help="ground truth in the same layouts; clips pair by name (x.mp4 = x/)")
    parser.add_argument("--baseline", choices=sorted(BASELINES),
                        help="also score a baseline as a prediction (a reference row): the grayscale input, or the "
                        "first ground-truth frame's colours carried along the optical flow (flow-reference)")
    parser.add_argument("--out", type=Path, help="output folder (default runs/eval/<prediction name, or 'gray'>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    parser.add_argument("--max-frames", type=int, help="score only the first N frames of each clip (quick runs)")
    parser.add_argument("--lpips-weights", type=Path, help="LPIPS weights on disk (never downloaded)")
    parser.add_argument("--fid-weights", type=Path, help="FID Inception weights on disk (never downloaded)")
    args = parser.parse_args()
    if args.pred is None and args.baseline is None:
        parser.error("pass --pred (a colorized video or folder), --baseline gray, or both")
    if args.max_frames is not None and args.max_frames < 1:
        parser.error("--max-frames must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    skipped = {"lpips": deep_metric_status("LPIPS", args.lpips_weights),
               "fid": deep_metric_status("FID", args.fid_weights)}
    pairs = match_clips(args.pred, args.gt)
    methods = (["prediction"] if args.pred is not None else []) + ([args.baseline] if args.baseline else [])
    out = args.out or Path("runs/eval") / (clip_name(args.pred) if args.pred is not None else args.baseline)

    def frames(path: Path) -> Iterator[np.ndarray]:
        return itertools.islice(video_io.iter_clip_frames(path), args.max_frames)

    results: dict[str, dict[str, dict]] = {method: {} for method in methods}
    overview: dict[str, dict] = {}
    with utils.atomic_path(out, overwrite=args.overwrite, is_dir=True) as folder:
        for clip, pred_path, gt_path in pairs:
            frame_count = min(video_io.probe_clip(gt_path).frame_count, args.max_frames or math.inf)
            samples, clip_results = {}, {}
            for method in methods:
                pred_frames = frames(pred_path) if method == "prediction" else BASELINES[method](frames(gt_path))
                name = f"{pred_path if method == 'prediction' else method + ' baseline'} vs {gt_path}"
                result = evaluate_clip(pred_frames, frames(gt_path), sample_indices(frame_count), name)
                samples[method] = result.pop("samples")
                clip_results[method] = results[method][clip] = result
                print(f"{clip} [{method}]: {result['frames']} frames, PSNR {result['psnr']:.3f} dB", file=sys.stderr)
            save_frames_figure(folder / f"{clip}_frames.png", clip, samples)
            overview[clip] = middle_sample(samples)
            save_curves_figure(folder / f"{clip}_curves.png", clip, clip_results)
        summaries = {method: summarize(clips) for method, clips in results.items()}
        report = {
            "gt": str(args.gt),
            "pred": None if args.pred is None else str(args.pred),
            "max_frames": args.max_frames,
            "definitions": DEFINITIONS,
            "skipped": skipped,
            "methods": {method: {"mean": summaries[method], "clips": results[method]} for method in methods},
        }
        save_overview_figure(folder / "overview.png", overview)
        (folder / "results.json").write_text(json.dumps(_json_safe(report), indent=1) + "\n")
        write_csv(folder / "results.csv", results, summaries)
    print(format_table(results, summaries))
    capped = sum(summary["psnr_capped_frames"] for summary in summaries.values())
    if capped:
        print(f"note: {capped} frame(s) identical to the ground truth; their PSNR counts as {PSNR_CAP_DB:g} dB")
    print("CDC and warp error judge the output alone (a gray video scores well): read them beside the GT columns.")
    print(f"LPIPS {skipped['lpips']}; FID {skipped['fid']}")
    print(f"wrote {out}/results.json, results.csv, overview.png and per-clip *_frames.png, *_curves.png")


if __name__ == "__main__":
    utils.run_cli(main)
