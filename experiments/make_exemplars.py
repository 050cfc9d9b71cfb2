"""The exemplars the measurements use: for every clip of a folder, its first frame mirrored left-right and
centre-cropped to 80% of each side (correspondence.mirrored_crop), written as <out>/<clip>.png.

  python experiments/make_exemplars.py --clips ../shared/data/val --out runs/exemplars
  for clip in ../shared/data/val/*/; do name=$(basename $clip)
    python video_colorization.py --input $clip --output runs/exemplar_pred/$name --exemplar runs/exemplars/$name.png
  done
  python evaluate.py --pred runs/exemplar_pred --gt ../shared/data/val
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from correspondence import mirrored_crop
from utils import UserError, run_cli
from video_io import clip_name, iter_clip_frames, list_clips, write_image_rgb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, required=True, help="a folder of colour clips")
    parser.add_argument("--out", type=Path, required=True, help="the folder the exemplars go to")
    parser.add_argument("--keep", type=float, default=0.8, help="share of each side the crop keeps")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for clip in list_clips(args.clips):
        first = next(iter_clip_frames(clip), None)
        if first is None:
            raise UserError(f"{clip}: has no frames; remove it or pass another --clips")
        write_image_rgb(args.out / f"{clip_name(clip)}.png", mirrored_crop(first, args.keep))
        print(f"{clip} -> {args.out / clip_name(clip)}.png")


if __name__ == "__main__":
    run_cli(main)
