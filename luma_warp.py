"""The compiled kernel of flow.warp_matching_luma (numba: compiled on first use, cached on disk)."""

import numpy as np
from numba import njit, prange


@njit(cache=True, fastmath=True)
def _sample_pixel(image, flow, source_luma, target_luma, weight_of_difference, y, x, out):
    """out[y, x] (zero on entry) = the mean of image over the four source pixels around x + flow(x), each weighed by
    its bilinear weight and by weight_of_difference[|its luma - the target pixel's luma|]."""
    height, width, channels = image.shape
    at_x = min(max(x + flow[y, x, 0], 0.0), width - 1.0)
    at_y = min(max(y + flow[y, x, 1], 0.0), height - 1.0)
    left, top = int(at_x), int(at_y)
    columns, rows = (left, min(left + 1, width - 1)), (top, min(top + 1, height - 1))
    fraction_x, fraction_y = at_x - left, at_y - top
    luma = np.int32(target_luma[y, x])  # signed: uint8 differences would wrap around
    weights = 0.0
    for i in range(2):
        weight_y = fraction_y if i else 1.0 - fraction_y
        for j in range(2):
            weight = ((fraction_x if j else 1.0 - fraction_x) * weight_y
                      * weight_of_difference[abs(np.int32(source_luma[rows[i], columns[j]]) - luma)])
            for c in range(channels):
                out[y, x, c] += weight * image[rows[i], columns[j], c]
            weights += weight
    for c in range(channels):
        out[y, x, c] /= weights


@njit(parallel=True, cache=True)
def luma_weighted_samples(image: np.ndarray, flow: np.ndarray, source_luma: np.ndarray, target_luma: np.ndarray,
                          weight_of_difference: np.ndarray) -> np.ndarray:
    """HxWxC image warped bilinearly along the flow, each source pixel also weighed by how close its luma is to the
    target pixel's (weight_of_difference, indexed by the absolute difference of two uint8 lumas)."""
    height, width = target_luma.shape
    out = np.zeros_like(image)
    for y in prange(height):
        for x in range(width):
            _sample_pixel(image, flow, source_luma, target_luma, weight_of_difference, y, x, out)
    return out
