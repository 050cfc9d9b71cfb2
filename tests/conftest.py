"""Shared fixtures: tiny random components saved to disk and a short real colour clip made from skimage photos."""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def panning_clip(frame_count: int = 12, size: tuple[int, int] = (72, 96)) -> list[np.ndarray]:
    """A real colour clip: a crop window sliding slowly across skimage's astronaut photo."""
    import cv2
    from skimage import data

    photo = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    height, width = size
    return [np.ascontiguousarray(photo[20 + i : 20 + i + height, 10 + 2 * i : 10 + 2 * i + width]) for i in range(frame_count)]


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory) -> dict[str, Path]:
    import torch
    from modules import build_vac, build_vae, save_vac

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("components")
    build_vae(widths=(8, 16, 16), image_size=32).save_pretrained(folder / "vae")
    save_vac(build_vac(image_size=32, patch_size=8, hidden_dim=32, layers=1, heads=2), folder / "vac")
    return {"vae": folder / "vae", "vac": folder / "vac"}


@pytest.fixture(scope="session")
def frame_root(tmp_path_factory) -> Path:
    """root/<video>/00000.jpg ...: two short clips."""
    from video_io import write_image_rgb

    root = tmp_path_factory.mktemp("frames")
    for name, frames in (("pan", panning_clip()), ("pan_small", panning_clip(8, (40, 56)))):
        (root / name).mkdir()
        for i, frame in enumerate(frames):
            write_image_rgb(root / name / f"{i:05d}.jpg", frame)
    return root


@pytest.fixture(scope="session")
def gray_video(tmp_path_factory) -> Path:
    """A grayscale H.264 mp4 at 29.97 fps made from the panning clip."""
    from utils import rgb_to_gray
    from video_io import VideoWriter

    path = tmp_path_factory.mktemp("video") / "gray.mp4"
    frames = panning_clip()
    with VideoWriter(path, frames[0].shape[1], frames[0].shape[0], Fraction(30000, 1001)) as writer:
        for frame in frames:
            writer.write(np.repeat(rgb_to_gray(frame)[..., None], 3, axis=2))
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_components, tmp_path_factory) -> Path:
    """A complete model folder with an untrained tiny UNet: enough to exercise every inference code path."""
    import json
    import shutil

    import torch
    from diffusers import DDPMScheduler
    from modules import build_unet

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    build_unet(latent_channels=4, downscale=4, token_dim=32, net_dimension=8, sample_size=8).save_pretrained(folder / "unet")
    for name in ("vae", "vac"):
        shutil.copytree(tiny_components[name], folder / name)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False)
    config = {"vae": "vae", "vac": "vac", "image_size": 32, "scheduler": dict(scheduler.config)}
    (folder / "colorizer.json").write_text(json.dumps(config))
    return folder
