"""Colour from exemplars: colour images of the scene that are not frames of the clip (`--exemplar`).

- Correspondence: each pixel of a grayscale frame takes the colour of the exemplar pixels whose ImageNet-pretrained
  features it resembles. Both are seen in gray (the frame has nothing else) by the frozen EfficientNet-Lite the hybrid
  VAC uses (modules.imagenet_efficientnet); its maps at strides 8 and 16, each L2-normalised, are concatenated at the
  stride-8 grid and projected by a learned metric (unet_model/matcher, trained by experiments/train_matcher.py on
  frame pairs of training clips). A frame position's colour is the softmax-weighted mean (over cosine similarities /
  a temperature, among its top-k matches) of the exemplars' chroma there, as in the non-local matching of Deep
  Exemplar-based Video Colorization (Zhang et al. 2019) and ColorMNet (Yang et al. 2024). No position enters the
  match, so an exemplar may be framed, cropped or mirrored differently from the shot. The found colour is brought to
  the frame's size by the guided filter on the frame's luma.
- Registration: an exemplar that shows what one of the frames shows (reframed, cropped, mirrored) is warped onto that
  frame (best_registration), where guidance.registered_guide makes it a keyframe for the pixels it covers.
- Keyframes matched (--reference, unless --no-match-keyframes): a keyframe is a source too, so colour the optical
  flow lost on the way (fast motion, occlusion, content seen from another side) is found again in it by features,
  as ColorMNet's long-term memory does (Yang et al. 2024); guidance.fuse_sources weighs it against the flow's.

The settings below were chosen on clips held out of training (docs/exemplar.md has the measurements).
"""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modules import BACKBONE_STAGES, for_cpu_inference, imagenet_efficientnet, imagenet_input
from utils import UserError, rgb_to_chroma, rgb_to_gray

CORRESPONDENCE_BACKBONE = "efficientnet_lite0"
MATCHED_STAGES = BACKBONE_STAGES[:2]  # the backbone's maps at strides 8 and 16
CORRESPONDENCE_SHORT_SIDE = 320  # both images are matched at this short side (the stride-8 grid: 40 positions)
TEMPERATURE = 0.05  # of the softmax over cosine similarities
TOP_K = 16  # matches a position averages over
# Confidence: 0 at a best similarity of SIMILARITY_FLOOR, 1 at SIMILARITY_FULL, linear between.
SIMILARITY_FLOOR, SIMILARITY_FULL = 0.5, 0.8
PASTE_FLOOR = 0.5  # the output keeps at least this share of the found colour (see paste_found)
GUIDED_RADIUS, GUIDED_EPSILON = 16, 1e-3  # the guided filter's window (pixels at a 480 px short side), regularisation
METRIC_FILE = Path(__file__).resolve().parent / "unet_model" / "matcher" / "metric.safetensors"
REGISTRATION_INLIERS = 40  # RANSAC inliers an exemplar needs to count as a reframed frame
REGISTRATION_LUMA = 12.0  # mean luma difference (levels) it may have where it lands
REGISTRATION_FRAMES = 16  # frames of the clip it is tried on (evenly spaced, the first among them)


@dataclass
class ColourSource:
    """A colour image prepared for matching: its features (N x C, unit norm) and chroma (N x 2) at the stride-8
    grid, flattened."""

    features: torch.Tensor
    chroma: torch.Tensor


class Matcher:
    """The frozen backbone and the matching settings; `source(rgb)` prepares a colour image, `match(gray, sources)`
    colours frames from them."""

    def __init__(self, backbone: str = CORRESPONDENCE_BACKBONE, short_side: int = CORRESPONDENCE_SHORT_SIDE,
                 temperature: float = TEMPERATURE, top_k: int = TOP_K, projection: torch.Tensor | None = None):
        self.network = for_cpu_inference(imagenet_efficientnet(backbone, stages=MATCHED_STAGES).requires_grad_(False))
        self.short_side, self.temperature, self.top_k = short_side, temperature, top_k
        self.projection = projection

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Short side `short_side`, both sides multiples of 16 (the coarser map's stride)."""
        scale = self.short_side / min(height, width)
        return max(16, round(height * scale / 16) * 16), max(16, round(width * scale / 16) * 16)

    def features(self, gray: np.ndarray) -> torch.Tensor:
        """BxHxW uint8 luma -> B x C x h/8 x w/8 unit-norm features at the matching size, projected where the matcher
        has a learned projection."""
        return project(self.backbone_features(gray), self.projection)

    @torch.inference_mode()
    def backbone_features(self, gray: np.ndarray) -> torch.Tensor:
        """BxHxW uint8 luma -> B x C x h/8 x w/8: the backbone's maps at strides 8 and 16, each unit norm."""
        import cv2

        height, width = self.input_size(*gray.shape[1:])
        resized = np.stack([cv2.resize(g, (width, height), interpolation=cv2.INTER_AREA) for g in gray])
        batch = imagenet_input(torch.from_numpy(resized).float().unsqueeze(1) / 255.0)
        fine, coarse = (F.normalize(m.contiguous(), dim=1)
                        for m in self.network(batch.contiguous(memory_format=torch.channels_last)))
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([fine, F.normalize(coarse, dim=1)], dim=1) / np.sqrt(2.0)

    def source(self, rgb: np.ndarray) -> ColourSource:
        """A colour image (HxWx3 uint8, any size) -> its features and chroma at the stride-8 grid."""
        return self.coloured_source(rgb_to_gray(rgb), rgb_to_chroma(rgb))

    def coloured_source(self, gray: np.ndarray, chroma: np.ndarray) -> ColourSource:
        """A frame's uint8 luma and its chroma (HxWx2, any size) -> a source (a keyframe as the guides hold it)."""
        features = self.features(gray[None])[0]
        pooled = pooled_chroma(chroma, features.shape[-2:])
        return ColourSource(features.flatten(1).T.contiguous(), torch.from_numpy(pooled.reshape(-1, 2)))

    @torch.inference_mode()
    def match(self, gray: np.ndarray, sources: list[ColourSource]) -> tuple[np.ndarray, np.ndarray]:
        """BxHxW uint8 luma -> the chroma found for each frame (B x h x w x 2) and its confidence (B x h x w, in
        [0, 1]) at the stride-8 grid of the matching size, all sources pooled."""
        features = self.features(gray)
        batch, _, h, w = features.shape
        keys = torch.cat([s.features for s in sources])
        values = torch.cat([s.chroma for s in sources])
        chroma, confidence = torch.empty(batch, h * w, 2), torch.empty(batch, h * w)
        for i, queries in enumerate(features.flatten(2).transpose(1, 2)):  # a frame at a time: hw x N similarities
            chroma[i], best = soft_match(queries, keys, values, self.temperature, self.top_k)
            confidence[i] = ((best - SIMILARITY_FLOOR) / (SIMILARITY_FULL - SIMILARITY_FLOOR)).clamp(0, 1)
        return chroma.reshape(batch, h, w, 2).numpy(), confidence.reshape(batch, h, w).numpy()


def soft_match(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, temperature: float | torch.Tensor,
               top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm queries (n x C) matched to keys (N x C) carrying values (N x 2): each query's softmax-weighted mean
    (cosine similarity / temperature) of its top_k keys' values, and its best similarity (n)."""
    best, index = (queries @ keys.T).topk(min(top_k, len(keys)), dim=-1)
    weights = torch.softmax(best / temperature, dim=-1)
    return (weights.unsqueeze(-1) * values[index]).sum(dim=1), best[:, 0]


def grid_chroma(rgb: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A colour image's chroma (HxWx3 uint8 -> h x w x 2) averaged onto the feature grid."""
    return pooled_chroma(rgb_to_chroma(rgb), grid)


def pooled_chroma(chroma: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Chroma (HxWx2, any size) averaged onto the feature grid (h x w x 2)."""
    import cv2

    return cv2.resize(chroma.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)


def project(features: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """Backbone features, channels in dimension 1 (B x C x ...) -> the learned projection's B x D x ..., unit norm
    (as they are without one)."""
    if projection is None:
        return features
    return F.normalize(torch.einsum("dc,bc...->bd...", projection, features), dim=1)


def load_projection(path: Path) -> tuple[torch.Tensor, float]:
    """A learned matching metric (experiments/train_matcher.py) -> (projection D x C, temperature)."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    return weights["projection"], float(weights["temperature"][0])


class Exemplars:
    """Colour images that are not frames of the clip (`--exemplar`), and the keyframes (with_keyframes), prepared
    once; `colour(gray, size)` finds each frame's colour in them."""

    def __init__(self, images: list[np.ndarray], matcher: Matcher | None = None):
        self.matcher = matcher or Matcher()
        self.sources = [self.matcher.source(rgb) for rgb in images]

    def with_keyframes(self, keyframes: list[tuple[np.ndarray, np.ndarray]]) -> Exemplars:
        """These exemplars and the keyframes (uint8 luma and chroma, as guidance.Guide holds them) as sources."""
        joined = copy(self)
        joined.sources = self.sources + [self.matcher.coloured_source(gray, chroma) for gray, chroma in keyframes]
        return joined

    def colour(self, gray: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """BxHxW uint8 luma -> the chroma found (B x size x 2) and its confidence (B x size), resized to `size`."""
        chroma, confidence = self.matcher.match(gray, self.sources)
        return resized(chroma, size), resized(confidence, size)


def resized(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A batch of images (B x h x w [x C]) bilinearly resized to `size`."""
    import cv2

    return np.stack([cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for image in images])


def load_exemplars(images: list[np.ndarray], learned_metric: bool = True) -> Exemplars | None:
    """--exemplar images (any size and framing; only their colours are used) prepared for matching (see
    shared_matcher), or None without any."""
    return Exemplars(images, shared_matcher(learned_metric)) if images else None


@lru_cache(maxsize=2)
def shared_matcher(learned_metric: bool = True) -> Matcher:
    """One matcher per process: every clip of a folder uses the same backbone (the module's settings as they are
    when it is first asked for), with the metric learned on training clips (its projection and temperature), or
    without it (`learned_metric` False, ColorizationOptions.learned_metric) plain cosine similarity."""
    if not learned_metric:
        return Matcher(CORRESPONDENCE_BACKBONE, CORRESPONDENCE_SHORT_SIDE, TEMPERATURE, TOP_K)
    if not METRIC_FILE.is_file():
        raise UserError(f"{METRIC_FILE}: the exemplar matcher's learned metric is missing; restore it from git "
                        "(git checkout -- unet_model/matcher)")
    projection, temperature = load_projection(METRIC_FILE)
    return Matcher(CORRESPONDENCE_BACKBONE, CORRESPONDENCE_SHORT_SIDE, temperature, TOP_K, projection)


def paste_found(chroma: np.ndarray, found: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """The model's chroma with the exemplars' colour blended in, PASTE_FLOOR + (1 - PASTE_FLOOR) x confidence of it."""
    weight = (PASTE_FLOOR + (1.0 - PASTE_FLOOR) * confidence)[..., None]
    return weight * found + (1.0 - weight) * chroma


def guided_upsample(chroma: np.ndarray, luma: np.ndarray, radius: int = GUIDED_RADIUS,
                    epsilon: float = GUIDED_EPSILON, subsample: int = 1) -> np.ndarray:
    """Coarse chroma (h x w x 2) brought to the luma's size (HxW uint8) by the guided filter (He et al. 2010):
    locally an affine function of the luma, so colour edges follow the frame's own edges, not the match grid's.
    `subsample` s > 1: the affine coefficients are fitted at 1/s of the luma's size and upsampled (the fast guided
    filter, He and Sun 2015), s^2 times fewer pixels to filter, for chroma no finer than that anyway."""
    import cv2

    height, width = luma.shape
    guide = luma.astype(np.float32) / 255.0
    if subsample > 1:
        size = (max(1, round(width / subsample)), max(1, round(height / subsample)))
        fitted_guide = cv2.resize(guide, size, interpolation=cv2.INTER_AREA)
        coarse = cv2.INTER_AREA if chroma.shape[1] > size[0] else cv2.INTER_LINEAR
        fitted_chroma = cv2.resize(chroma, size, interpolation=coarse)
        radius = max(1, round(radius / subsample))
    else:
        fitted_guide, fitted_chroma = guide, cv2.resize(chroma, (width, height), interpolation=cv2.INTER_LINEAR)

    def box(image: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(image, -1, (2 * radius + 1, 2 * radius + 1))

    mean_guide, mean_chroma = box(fitted_guide), box(fitted_chroma)
    variance = box(fitted_guide * fitted_guide) - mean_guide**2
    covariance = box(fitted_guide[..., None] * fitted_chroma) - mean_guide[..., None] * mean_chroma
    slope = covariance / (variance + epsilon)[..., None]
    offset = mean_chroma - slope * mean_guide[..., None]
    slope, offset = box(slope), box(offset)
    if subsample > 1:
        slope, offset = (cv2.resize(a, (width, height), interpolation=cv2.INTER_LINEAR) for a in (slope, offset))
    return slope * guide[..., None] + offset


def upsample_chroma(chroma: np.ndarray, luma: np.ndarray, subsample: int = 1) -> np.ndarray:
    """A frame's chroma at any size brought to its luma's (HxW uint8) by guided_upsample, the window scaled to the
    luma's size."""
    return guided_upsample(chroma, luma, max(1, round(GUIDED_RADIUS * min(luma.shape) / 480)), subsample=subsample)


def mirrored_crop(image: np.ndarray, keep: float = 0.8) -> np.ndarray:
    """The exemplar the measurements use (issue 29's protocol): a frame mirrored left-right and centre-cropped to
    `keep` of each side, so that neither the optical flow nor the frame's layout can carry its colours."""
    height, width = image.shape[:2]
    top, left = round(height * (1 - keep) / 2), round(width * (1 - keep) / 2)
    return np.ascontiguousarray(image[top:height - top, left:width - left][:, ::-1])


# ---------------------------------------------------------------------------------------------------------------
# An exemplar that is nearly one of the frames


def exemplar_keypoints(exemplar: np.ndarray) -> list[tuple[bool, list, np.ndarray]]:
    """SIFT keypoints and descriptors of an exemplar and of its mirror image -> [(mirrored, points, descriptors)],
    those with enough points to register (computed once, then tried on every sampled frame)."""
    import cv2

    sift = cv2.SIFT_create(nfeatures=2000)
    found = []
    for mirrored in (False, True):
        image = np.ascontiguousarray(rgb_to_gray(exemplar[:, ::-1] if mirrored else exemplar))
        points, descriptors = sift.detectAndCompute(image, None)
        if descriptors is not None and len(points) >= REGISTRATION_INLIERS:
            found.append((mirrored, points, descriptors))
    return found


def register(exemplar: np.ndarray, keypoints: list[tuple[bool, list, np.ndarray]],
             gray: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Where an exemplar (HxWx3 uint8, any size; its exemplar_keypoints) shows what a frame (its uint8 luma) shows,
    reframed, cropped, mirrored or from a slightly moved camera: the homography taking the exemplar onto the frame
    (SIFT matches, RANSAC), from the exemplar or its mirror image, whichever fits; None where neither fits well enough
    (REGISTRATION_INLIERS matches, luma within REGISTRATION_LUMA levels where it lands). -> (3x3 homography, mean luma
    difference)."""
    import cv2

    frame_points, frame_descriptors = cv2.SIFT_create(nfeatures=2000).detectAndCompute(gray, None)
    if frame_descriptors is None or len(frame_points) < REGISTRATION_INLIERS:
        return None
    best = None
    width = exemplar.shape[1]
    for mirrored, points, descriptors in keypoints:
        pairs = [m for m, n in (p for p in cv2.BFMatcher().knnMatch(descriptors, frame_descriptors, k=2)
                                if len(p) == 2) if m.distance < 0.75 * n.distance]
        if len(pairs) < REGISTRATION_INLIERS:
            continue
        source = np.float32([points[m.queryIdx].pt for m in pairs])
        target = np.float32([frame_points[m.trainIdx].pt for m in pairs])
        homography, inliers = cv2.findHomography(source, target, cv2.RANSAC, 3.0)
        if homography is None or inliers.sum() < REGISTRATION_INLIERS:
            continue
        if mirrored:  # exemplar pixel x -> mirror pixel width - 1 - x -> frame
            homography = homography @ np.array([[-1, 0, width - 1], [0, 1, 0], [0, 0, 1]], np.float64)
        landed, covered = warp_onto(exemplar, homography, gray.shape)
        if covered.mean() < 0.2:
            continue
        difference = float(np.abs(rgb_to_gray(landed).astype(np.float32) - gray)[covered > 0.5].mean())
        if difference <= REGISTRATION_LUMA and (best is None or difference < best[1]):
            best = (homography, difference)
    return best


def warp_onto(exemplar: np.ndarray, homography: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The exemplar warped onto the frame's grid, and where it covers the frame (HxW float32, 0 or 1, eroded by a few
    pixels so that its resampled border does not count)."""
    import cv2

    warped = cv2.warpPerspective(exemplar, homography, (size[1], size[0]), flags=cv2.INTER_LINEAR)
    covered = cv2.warpPerspective(np.ones(exemplar.shape[:2], np.uint8), homography, (size[1], size[0]),
                                  flags=cv2.INTER_NEAREST)
    return warped, cv2.erode(covered, np.ones((5, 5), np.uint8)).astype(np.float32)


def best_registration(exemplar: np.ndarray,
                      grays: dict[int, np.ndarray]) -> tuple[int, np.ndarray, np.ndarray] | None:
    """An exemplar registered onto the frame it fits best among `grays` (frame index -> uint8 luma at the
    propagation size) -> (that frame's index, the exemplar warped onto it, where it covers it: warp_onto's), or None
    where it fits none (guidance.registered_guide makes a keyframe of it)."""
    keypoints = exemplar_keypoints(exemplar)
    if not keypoints:
        return None
    fits = {index: fit for index, gray in grays.items() if (fit := register(exemplar, keypoints, gray)) is not None}
    if not fits:
        return None
    index = min(fits, key=lambda i: fits[i][1])
    return index, *warp_onto(exemplar, fits[index][0], grays[index].shape)
