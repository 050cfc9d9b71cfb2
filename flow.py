"""Dense optical flow with its reliability mask, and warping along it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial

import numpy as np

# Warping colour along the flow by luma (warp_matching_luma): a source pixel whose luma is LUMA_SIGMA levels from the
# target pixel's counts e^-1 as much as one that matches. Chosen without val: the first frame's colour carried
# through ten training clips (128 px, no model) scores 35.43 dB warped bilinearly, 35.78 / 35.75 / 35.69 with sigma
# 8 / 16 / 32; on bench.py's 854x480 pan over a photo sigma 8 loses 0.24 dB to bilinear and 16 gains 0.04. End to
# end (default model, first frame given, the four clips training held out): 35.40 -> 35.90 dB.
LUMA_SIGMA = 16.0


# DIS's medium preset searches its 8 px patches down to half the frame's resolution, every 3 px there; at full
# resolution, patches every FULL_RESOLUTION_STRIDE px cost about as much (854x480, one thread: 50 ms against 43).
FULL_RESOLUTION_STRIDE = 6


def dense_flow(source: np.ndarray, target: np.ndarray, refine: bool = True,
               full_resolution: bool = False) -> np.ndarray:
    """DIS optical flow (medium preset) f with source(x) ~ target(x + f(x)); `refine` False skips the preset's
    variational refinement (the patches' flow, densified), which is half its cost; `full_resolution` searches the
    patches down to the frame's own resolution, FULL_RESOLUTION_STRIDE px apart, so that small things moving on
    their own are followed."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    if not refine:
        dis.setVariationalRefinementIterations(0)
    if full_resolution:
        dis.setFinestScale(0)
        dis.setPatchStride(FULL_RESOLUTION_STRIDE)
    return dis.calc(source, target, None)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image sampled at x + flow(x) (bilinear)."""
    return sample_at(image, *flow_targets(flow))


def flow_targets(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points x + flow(x): their HxW float32 x and y coordinates."""
    height, width = flow.shape[:2]
    return (np.arange(width, dtype=np.float32) + flow[..., 0],
            np.arange(height, dtype=np.float32)[:, None] + flow[..., 1])


def sample_at(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """image sampled at the points (x, y) (bilinear; beyond its edges, its edge pixels)."""
    import cv2

    return cv2.remap(image, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def squared_norm(vectors: np.ndarray) -> np.ndarray:
    """|v|^2 of HxWx2 vectors (numpy's sum over a last axis of two is many times slower)."""
    return vectors[..., 0] ** 2 + vectors[..., 1] ** 2


def reliable_flow(prev_gray: np.ndarray, gray: np.ndarray, refine: bool = True,
                  full_resolution: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Flow b with gray(x) ~ prev_gray(x + b(x)), and the mask of pixels where it can be trusted (`refine`,
    `full_resolution`: see dense_flow).

    Trusted: the forward flow at x + b(x) brings the pixel back (Sundaram et al. 2010, as in Ruder et al. 2016), so
    occluded and badly matched pixels drop out, and x + b(x) lies inside the frame.
    """
    return reliable_flows([(prev_gray, gray)], refine, full_resolution)[0]


def reliable_flows(pairs: list[tuple[np.ndarray, np.ndarray]], refine: bool = True,
                   full_resolution: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """reliable_flow of each (prev_gray, gray) pair, all their flows in one pool of two threads: OpenCV releases the
    GIL, so the two directions of a pair run at once (108 -> 59 ms at 854x480 on 2 cores)."""
    sources = [s for prev_gray, gray in pairs for s in (gray, prev_gray)]
    targets = [t for prev_gray, gray in pairs for t in (prev_gray, gray)]
    with ThreadPoolExecutor(2) as pool:
        flows = list(pool.map(partial(dense_flow, refine=refine, full_resolution=full_resolution), sources, targets))
    return [checked_flow(backward, forward) for backward, forward in zip(flows[::2], flows[1::2])]


def checked_flow(backward: np.ndarray, forward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The backward flow and where reliable_flow trusts it, given the forward flow of the same pair."""
    target_x, target_y = flow_targets(backward)
    forward_there = sample_at(forward, target_x, target_y)
    round_trip = squared_norm(backward + forward_there)
    tolerance = 0.01 * (squared_norm(backward) + squared_norm(forward_there)) + 0.5
    height, width = backward.shape[:2]
    inside = (target_x >= 0) & (target_x <= width - 1) & (target_y >= 0) & (target_y <= height - 1)
    return backward, (round_trip <= tolerance) & inside


def warp_matching_luma(image: np.ndarray, flow: np.ndarray, source_luma: np.ndarray,
                       target_luma: np.ndarray) -> np.ndarray:
    """HxWxC float32 image sampled near x + flow(x) from the source pixels whose luma (uint8) is close to the target
    pixel's: colour does not bleed across luma edges, which bilinear warping does a little at every step of a chain
    (a moving object leaves a trail of its colour on the background it uncovers)."""
    import numba  # the compiled kernel: numba, imported here so that importing this module stays light
    import torch

    from luma_warp import luma_weighted_samples

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return luma_weighted_samples(np.ascontiguousarray(image, np.float32), np.ascontiguousarray(flow, np.float32),
                                 np.ascontiguousarray(source_luma, np.uint8),
                                 np.ascontiguousarray(target_luma, np.uint8), weight_of_luma_difference())


@cache
def weight_of_luma_difference() -> np.ndarray:
    """Weight of a source pixel by its absolute luma difference to the target pixel (0-255), never quite zero so
    that a pixel whose neighbours all differ still gets their bilinear mean."""
    return np.exp(-(np.arange(256, dtype=np.float32) / LUMA_SIGMA) ** 2) + np.float32(1e-4)
