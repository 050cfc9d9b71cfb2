"""The demo clip: a short grayscale video made from photos that ship with scikit-image (nothing is downloaded), and
its colour original, the ground truth evaluate.py scores the demo's output against (`video_colorization.py --demo`,
the app's Demo clip button, bench.py)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from utils import atomic_path, rgb_to_gray
from video_io import VideoWriter


def demo_frames(frame_count: int = 48, size: tuple[int, int] = (360, 640)) -> Iterator[np.ndarray]:
    """Colour frames panning and zooming slowly over two photos that ship with scikit-image (two shots)."""
    import cv2
    from skimage import data

    height, width = size
    per_shot = frame_count // 2
    for photo in (data.coffee(), data.chelsea()):
        photo_height, photo_width = photo.shape[:2]
        for i in range(per_shot):
            zoom = 1.0 - 0.15 * i / per_shot
            crop_h, crop_w = int(photo_height * zoom), int(min(photo_width, photo_height * zoom * width / height))
            top, left = (photo_height - crop_h) // 2, int((photo_width - crop_w) * i / per_shot)
            crop = photo[top : top + crop_h, left : left + crop_w]
            yield cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)


def make_demo_clip(path: Path, frame_count: int = 48, size: tuple[int, int] = (360, 640),
                   fps: Fraction = Fraction(24), original: Path | None = None) -> Path:
    """The demo input: a grayscale version of demo_frames(), streamed to an mp4; with `original`, the colour frames
    too (the ground truth evaluate.py scores the demo's output against)."""
    gray_frames = (np.repeat(rgb_to_gray(frame)[..., None], 3, axis=2) for frame in demo_frames(frame_count, size))
    write_demo_video(path, gray_frames, size, fps)
    if original is not None:
        write_demo_video(original, demo_frames(frame_count, size), size, fps)
    return path


def write_demo_video(path: Path, frames: Iterable[np.ndarray], size: tuple[int, int], fps: Fraction) -> None:
    """A demo file, replaced whole (atomically) on every run: the demo's files are its own, never the user's."""
    height, width = size
    with atomic_path(path, overwrite=True) as temp, VideoWriter(temp, width, height, fps) as writer:
        for frame in frames:
            writer.write(frame)
