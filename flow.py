"""Dense optical flow with its reliability mask, and warping along it."""

from __future__ import annotations

import numpy as np



def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image sampled at x + flow(x) (bilinear)."""
    import cv2

    height, width = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x, map_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def reliable_flow(prev_gray: np.ndarray, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flow b with gray(x) ~ prev_gray(x + b(x)), and the mask of pixels where it can be trusted.

    Trusted: the forward flow at x + b(x) brings the pixel back (Sundaram et al. 2010, as in Ruder et al. 2016), so
    occluded and badly matched pixels drop out, and x + b(x) lies inside the frame.
    """
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    backward = dis.calc(gray, prev_gray, None)
    forward_there = warp(dis.calc(prev_gray, gray, None), backward)
    round_trip = np.sum((backward + forward_there) ** 2, axis=2)
    tolerance = 0.01 * (np.sum(backward**2, axis=2) + np.sum(forward_there**2, axis=2)) + 0.5
    height, width = gray.shape
    grid_y, grid_x = np.mgrid[0:height, 0:width]
    target_x, target_y = grid_x + backward[..., 0], grid_y + backward[..., 1]
    inside = (target_x >= 0) & (target_x <= width - 1) & (target_y >= 0) & (target_y <= height - 1)
    return backward, (round_trip <= tolerance) & inside
