"""Do painted hints stay local? One red 10x10 dot painted on the left of a real photo (scikit-image's, 384x256), the
frame colorized with and without it: the mean change of chroma (BT.601 Cb and Cr levels, per channel) on the far
(right) half of the frame, and near the dot.

  python experiments/probe_hint_locality.py --model unet_model/default
  python experiments/probe_hint_locality.py --model unet_model/v2 --settings "--steps 4 --saturation 1"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from colorizer import DEFAULT_MODEL, load_colorizer
from guidance import Guide, GuidePropagator
from pipeline import colorize_frames, parse_options
from utils import rgb_to_chroma, rgb_to_gray, run_cli

PHOTOS = ("astronaut", "coffee", "chelsea")
SIZE = (256, 384)
DOT = (slice(100, 110), slice(40, 50))
RED = (-40.0, 80.0)  # Cb, Cr


def painted_dot() -> GuidePropagator:
    chroma, mask = np.zeros((*SIZE, 2), np.float32), np.zeros(SIZE, np.float32)
    chroma[DOT], mask[DOT] = RED, 1.0
    return GuidePropagator([Guide(0, chroma * mask[..., None], mask, mask.copy(), dense=False)])


def main() -> None:
    import cv2
    import torch
    from skimage import data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default="", help="video_colorization.py's sampling flags, quoted (default: its "
                        "defaults)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    colorizer = load_colorizer(args.model, torch.device("cpu"))
    settings = parse_options(args.settings.split())
    for name in PHOTOS:
        photo = cv2.resize(getattr(data, name)(), SIZE[::-1], interpolation=cv2.INTER_AREA)
        gray = np.repeat(rgb_to_gray(photo)[..., None], 3, axis=2)
        plain, hinted = (rgb_to_chroma(next(colorize_frames(colorizer, iter([gray]), settings, SIZE,
                                                            guides))) for guides in (None, painted_dot()))
        change = np.abs(hinted - plain)
        near = change[DOT[0].start - 20 : DOT[0].stop + 20, DOT[1].start - 20 : DOT[1].stop + 20].mean()
        print(f"{name:<10} far half {change[:, SIZE[1] // 2 :].mean():5.2f} levels, near the dot {near:5.2f}")


if __name__ == "__main__":
    run_cli(main)
