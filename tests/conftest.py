"""Shared fixtures and helpers: tiny random components saved to disk, a short real colour clip made from skimage
photos, colorization options, and a script run in this process."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from dataclasses import dataclass
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
    return [np.ascontiguousarray(photo[20 + i : 20 + i + height, 10 + 2 * i : 10 + 2 * i + width])
            for i in range(frame_count)]


def smooth_texture(height: int = 64, width: int = 80, seed: int = 0) -> np.ndarray:
    """A blurred random RGB image: structured enough for optical flow to lock on."""
    import cv2

    noise = np.random.default_rng(seed).uniform(0, 255, (height, width, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0) * 3 - 255, 0, 255).astype(np.uint8)


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
    unet = build_unet(latent_channels=4, downscale=4, token_dim=32, net_dimension=8, sample_size=8)
    unet.save_pretrained(folder / "unet")
    for name in ("vae", "vac"):
        shutil.copytree(tiny_components[name], folder / name)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False)
    config = {"vae": "vae", "vac": "vac", "image_size": 32, "scheduler": dict(scheduler.config)}
    (folder / "colorizer.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hint_model(tiny_model, tmp_path_factory):
    """The tiny model with an (untrained) hint input."""
    import json
    import shutil

    from guidance import HINT_CHANNELS
    from modules import build_unet

    folder = tmp_path_factory.mktemp("hint_model")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    unet = build_unet(4, 4, 32, net_dimension=8, sample_size=8, hint_channels=HINT_CHANNELS)
    unet.save_pretrained(folder / "unet")
    config = json.loads((folder / "colorizer.json").read_text())
    (folder / "colorizer.json").write_text(json.dumps({**config, "hint_channels": 3}))
    return folder


@pytest.fixture(scope="session")
def colour_clip(tmp_path_factory):
    """A colour frame folder, its grayscale version, and a transparent hint image with a red dot."""
    from utils import rgb_to_gray
    from video_io import write_image_rgb

    folder = tmp_path_factory.mktemp("guided")
    frames = panning_clip(8)
    (folder / "clips").mkdir()
    for name, images in (("colour", frames), ("gray", [np.repeat(rgb_to_gray(f)[..., None], 3, 2) for f in frames])):
        (folder / name).mkdir()
        for i, image in enumerate(images):
            write_image_rgb(folder / name / f"{i:05d}.png", image)
        (folder / "clips" / name).symlink_to(folder / name)
    import cv2

    dot = np.zeros((72, 96, 4), np.uint8)
    dot[30:34, 40:44] = (0, 0, 255, 255)  # BGRA: an opaque red square
    cv2.imwrite(str(folder / "dot.png"), dot)
    cv2.imwrite(str(folder / "transparent.png"), np.zeros((72, 96, 4), np.uint8))
    cv2.imwrite(str(folder / "opaque.png"), np.zeros((72, 96, 3), np.uint8))
    (folder / "broken.png").write_bytes(b"not an image")
    return folder, frames


def options(**overrides):
    """pipeline.ColorizationOptions with 2 sampling steps (fast) and `overrides`."""
    from pipeline import ColorizationOptions

    return ColorizationOptions(**{"steps": 2, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Running the scripts


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """The error line; the message must be exactly one line and come without a traceback."""
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("error: "), self.stderr[-3000:]
        return lines[-1]


def script_path(script: str) -> Path:
    """The file of a script named like "video_colorization" or "experiments.probe_limits"."""
    return REPO / f"{script.replace('.', '/')}.py"


def run_main(script: str, *argv, cwd: Path) -> Result:
    """A script run in this process as the command line runs it (its file executed as __main__, so utils.run_cli
    reports its errors; scripts are never imported as modules): its exit code, stdout and stderr."""
    import runpy

    saved = sys.argv, os.getcwd(), list(sys.path), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = [f"{script.replace('.', '/')}.py", *map(str, argv)]
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(str(script_path(script)), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        sys.path[:] = saved[2]  # the experiments put the repo root on it
        for number, handler in saved[3].items():
            signal.signal(number, handler)
    return Result(code, stdout.getvalue(), stderr.getvalue())


def script_parts(script: str) -> dict:
    """A script's top-level names, from its file run as a script that is not __main__ (so nothing runs): for the
    tests of a script's own parts, such as its flags, since scripts are never imported as modules."""
    import runpy

    return runpy.run_path(str(script_path(script)))


def run_ok(*args, cwd: Path) -> Result:
    """run_main for a script named by its file (args[0], like "train_diffusion.py"); it must succeed. In this process:
    a subprocess would spend seconds importing torch and diffusers again for every run."""
    result = run_main(str(args[0]).removesuffix(".py").replace("/", "."), *args[1:], cwd=cwd)
    assert result.code == 0, result.stderr[-2000:]
    return result


def files_under(folder: Path) -> list[str]:
    """Everything under `folder`, hidden temporaries included."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")) if Path(folder).exists() else []


def interrupt_colorize_frames(monkeypatch, after: int) -> None:
    """Make pipeline.colorize_frames raise KeyboardInterrupt (what Ctrl-C, or SIGTERM through utils.run_cli, does)
    once it has yielded `after` frames."""
    import pipeline

    original = pipeline.colorize_frames

    def stopped(*args, **kwargs):
        for i, frame in enumerate(original(*args, **kwargs)):
            if i == after:
                raise KeyboardInterrupt
            yield frame

    monkeypatch.setattr(pipeline, "colorize_frames", stopped)
