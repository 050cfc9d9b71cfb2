"""The compiled kernel of utils.luma_chroma_to_rgb (numba: compiled on first use, cached on disk): one pass over the
pixels instead of numpy's dozen full-frame temporaries (at 854x480, 18 ms a frame became about 5). On one thread:
with numba's parallel loop, two processes sharing a folder of clips wrote outputs a level apart from one process's
(tests/test_multiprocess.py), as its thread pool changed how the rest of the process ran."""

import numpy as np
from numba import njit

from utils import CB_SCALE, CR_SCALE, LUMA

# The inverse of utils.rgb_to_chroma: a unit of Cr moves R, a unit of Cb moves B, and G moves so that the luma stays.
RED_PER_CR = np.float32(1 / CR_SCALE)
BLUE_PER_CB = np.float32(1 / CB_SCALE)
GREEN_PER_CR = np.float32(-LUMA[0] / CR_SCALE / LUMA[1])
GREEN_PER_CB = np.float32(-LUMA[2] / CB_SCALE / LUMA[1])


@njit(inline="always")
def _room(level, offset, top):
    """The share of `offset` that keeps `level` + it inside [0, top] (1 or more where all of it does)."""
    if offset > 0:
        return (top - level) / offset
    if offset < 0:
        return -level / offset
    return np.float32(1.0)


@njit(cache=True)
def luma_chroma_rgb(luma: np.ndarray, chroma: np.ndarray, peak: float) -> np.ndarray:
    """HxW luma (uint8, or uint16 up to `peak`) + HxWx2 float32 (Cb, Cr) on the 8-bit scale -> HxWx3 RGB of the luma's
    type, the chroma scaled down where it would leave the RGB cube (see utils.luma_chroma_to_rgb)."""
    height, width = luma.shape
    out = np.empty((height, width, 3), luma.dtype)
    top, gain, zero, half = np.float32(peak), np.float32(peak / 255.0), np.float32(0.0), np.float32(0.5)
    for y in range(height):
        for x in range(width):
            level = np.float32(luma[y, x])
            cb, cr = chroma[y, x, 0] * gain, chroma[y, x, 1] * gain
            red, green, blue = RED_PER_CR * cr, GREEN_PER_CR * cr + GREEN_PER_CB * cb, BLUE_PER_CB * cb
            scale = max(min(np.float32(1.0), _room(level, red, top), _room(level, green, top),
                            _room(level, blue, top)), zero)
            out[y, x, 0] = min(max(level + scale * red + half, zero), top)
            out[y, x, 1] = min(max(level + scale * green + half, zero), top)
            out[y, x, 2] = min(max(level + scale * blue + half, zero), top)
    return out
