"""Helpers shared by the scripts and modules: one-line user errors and the CLI wrapper, safe (atomic) output, colour
spaces, seeding and devices. Frames and videos in and out live in video_io.py, the optical flow in flow.py."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

if TYPE_CHECKING:  # torch is imported where needed: nothing heavy at import time
    import torch


class UserError(Exception):
    """A problem with the user's input: reported as one line, never as a traceback."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that `finally` blocks (temporary files) run on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def first_line(error: Exception) -> str:
    """An exception's first non-empty line (its type's name where it has none): what a one-line UserError quotes of
    a library's error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(), turning UserError into a one-line message and exit code 2, and Ctrl-C or SIGTERM
    into exit code 128 + the signal number (temporary outputs are removed on the way out)."""
    import signal

    with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
        signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        main()
    except UserError as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as error:
        signum = getattr(error, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        end_distributed()


def end_distributed() -> None:
    """Close the process group of a multi-process run (torchrun, accelerate launch) before Python exits: gloo
    aborts a process that exits with its threads still running ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Files and folders


@contextlib.contextmanager
def atomic_path(final: Path, overwrite: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final`; move it onto `final` only if the block succeeds."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise UserError(f"{final}: already exists; pass --overwrite to replace it or choose another output")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        else:
            handle, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
            os.close(handle)
            temp = Path(name)
    except OSError as error:
        raise UserError(f"{final.parent}: cannot write there ({error.strerror}); choose a writable output") from None
    try:
        yield temp
        # mkstemp/mkdtemp create private (0600/0700) paths; the output gets the permissions a plain write would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, (0o777 if temp.is_dir() else 0o666) & ~umask)
        if final.exists():
            discard(final)
        os.replace(temp, final)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp.exists():
            temp.unlink()


def discard(path: Path) -> None:
    """Delete a file or folder so that an interruption never leaves half of it: folders are renamed away first."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temporaries(folder: Path, name: str) -> None:
    """Remove what atomic_path / discard left beside `folder/name` when a run was killed (kill -9, power loss)."""
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.glob(f".{name}.*"):
            if stale.name.endswith((".tmp", ".old")) or ".tmp." in stale.name:
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def check_writable(folder: Path, what: str = "an output folder") -> None:
    """Fail before any long work if `folder` cannot be created or written (it is not created here)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{folder}: cannot be created because {existing} is a file; choose {what} elsewhere")
    try:
        handle, name = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise UserError(f"{folder}: cannot write in {existing} ({error.strerror or error}); choose {what} that is "
                        f"writable or fix its permissions") from None


# ---------------------------------------------------------------------------------------------------------------
# Colour spaces and image geometry


def rgb_to_gray(image: np.ndarray) -> np.ndarray:
    """HxWx3 RGB -> HxW luma of the same type, uint8 or uint16 (ITU-R BT.601, as OpenCV and most grayscale footage
    use)."""
    import cv2

    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> float32 CIE Lab (L in [0, 100], a and b roughly in [-128, 127])."""
    import cv2

    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """float32 CIE Lab -> HxWx3 uint8 RGB (out-of-gamut values clipped)."""
    import cv2

    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_Lab2RGB)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# BT.601 full range, as JPEG and OpenCV's RGB2GRAY: Y = 0.299 R + 0.587 G + 0.114 B.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
CB_SCALE, CR_SCALE = 0.5 / (1 - 0.114), 0.5 / (1 - 0.299)


def rgb_to_chroma(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> HxWx2 float32 (Cb, Cr), BT.601, centred on 0 (gray has zero chroma)."""
    rgb = image.astype(np.float32)
    luma = rgb @ LUMA
    return np.stack([(rgb[..., 2] - luma) * CB_SCALE, (rgb[..., 0] - luma) * CR_SCALE], axis=2)


def luma_chroma_to_rgb(luma: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """HxW luma (uint8, or uint16 at 16-bit scale) + HxWx2 (Cb, Cr) on the 8-bit scale of rgb_to_chroma -> HxWx3
    RGB of the luma's type whose luma is `luma` to within rounding.

    Where the colour would leave the RGB cube, its chroma is scaled down rather than the channels clipped:
    clipping would change the brightness, and the input's brightness is the one thing we know is right."""
    from rgb_kernel import luma_chroma_rgb

    return luma_chroma_rgb(np.ascontiguousarray(luma), np.ascontiguousarray(chroma, dtype=np.float32),
                           float(np.iinfo(luma.dtype).max))


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    import cv2

    height, width = image.shape[:2]
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, size, interpolation=interpolation)


# ---------------------------------------------------------------------------------------------------------------
# Reproducibility and devices


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is missing is a user error."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available; use --device cpu or auto")
    return device
