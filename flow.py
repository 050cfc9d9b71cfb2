"""Dense optical flow with its reliability mask, and warping along it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np


def dense_flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """DIS optical flow (medium preset) f with source(x) ~ target(x + f(x))."""
    import cv2

    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(source, target, None)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image sampled at x + flow(x) (bilinear)."""
    import cv2

    height, width = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x, map_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def squared_norm(vectors: np.ndarray) -> np.ndarray:
    """|v|^2 of HxWx2 vectors (numpy's sum over a last axis of two is many times slower)."""
    return vectors[..., 0] ** 2 + vectors[..., 1] ** 2


def reliable_flow(prev_gray: np.ndarray, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flow b with gray(x) ~ prev_gray(x + b(x)), and the mask of pixels where it can be trusted.

    Trusted: the forward flow at x + b(x) brings the pixel back (Sundaram et al. 2010, as in Ruder et al. 2016), so
    occluded and badly matched pixels drop out, and x + b(x) lies inside the frame.
    """
    # OpenCV releases the GIL: the two directions run side by side (108 -> 59 ms at 854x480 on 2 cores).
    with ThreadPoolExecutor(2) as pool:
        backward, forward = pool.map(dense_flow, (gray, prev_gray), (prev_gray, gray))
    forward_there = warp(forward, backward)
    round_trip = squared_norm(backward + forward_there)
    tolerance = 0.01 * (squared_norm(backward) + squared_norm(forward_there)) + 0.5
    height, width = gray.shape
    target_x = np.arange(width, dtype=np.float32) + backward[..., 0]
    target_y = np.arange(height, dtype=np.float32)[:, None] + backward[..., 1]
    inside = (target_x >= 0) & (target_x <= width - 1) & (target_y >= 0) & (target_y <= height - 1)
    return backward, (round_trip <= tolerance) & inside
