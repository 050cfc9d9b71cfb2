"""How far does feature correspondence alone carry an exemplar's colour? No model, no flow: each scored frame's
chroma is correspondence.Matcher's match to the exemplar, upsampled to the frame and put under the frame's own luma.

The exemplar is frame 0 mirrored left-right and centre-cropped to 80% of each side (issue 29's protocol, so neither
the flow nor the frame's position can carry the colour); `--keyframe` matches to frame 0 itself instead.

  python experiments/probe_correspondence.py --clips ../shared/data/train/videos/flatten__puff --every 5 \
      --short-side 256 320 --temperature 0.01 0.02 --top-k 4 16

Prints, per setting, the mean PSNR over the clips (each clip's mean over its scored frames) and the gray input's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from correspondence import (CORRESPONDENCE_BACKBONE, CORRESPONDENCE_SHORT_SIDE, TEMPERATURE, TOP_K, Matcher,
                            guided_upsample, load_projection, mirrored_crop)
from metrics import psnr
from utils import luma_chroma_to_rgb, rgb_to_gray, run_cli
from video_io import iter_clip_frames


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, nargs="+", required=True, help="colour clips (frame folders or videos)")
    parser.add_argument("--every", type=int, default=5, help="score every Nth frame")
    parser.add_argument("--backbone", default=CORRESPONDENCE_BACKBONE, help="efficientnet_lite0, 1 or 2 (installed)")
    parser.add_argument("--short-side", type=int, nargs="+", default=[CORRESPONDENCE_SHORT_SIDE])
    parser.add_argument("--temperature", type=float, nargs="+",
                        help=f"default: {TEMPERATURE}, or the learned one with --projection")
    parser.add_argument("--projection", type=Path, help="a learned matching metric (experiments/train_matcher.py)")
    parser.add_argument("--top-k", type=int, nargs="+", default=[TOP_K])
    parser.add_argument("--guided", nargs=2, type=float, action="append", default=[], metavar=("RADIUS", "EPSILON"),
                        help="also score the chroma upsampled by correspondence.guided_upsample with these settings "
                        "(a radius relative to a 480 px short side); repeatable")
    parser.add_argument("--keyframe", action="store_true", help="match to frame 0 itself, not the mirrored crop")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the table here")
    return parser.parse_args()


def score(frames: list[np.ndarray], matcher: Matcher, exemplar: np.ndarray,
          guided: list[tuple[float, float]]) -> dict[str, float]:
    """The mean PSNR of the frames coloured by the match, upsampled bilinearly and by each guided setting."""
    import cv2

    source = matcher.source(exemplar)
    scores: dict[str, list[float]] = {}
    for frame in frames:
        gray = rgb_to_gray(frame)
        chroma, _ = matcher.match(gray[None], [source])
        upsampled = {"bilinear": cv2.resize(chroma[0], (frame.shape[1], frame.shape[0]),
                                            interpolation=cv2.INTER_LINEAR)}
        for radius, epsilon in guided:
            scaled = max(1, round(radius * min(gray.shape) / 480))
            upsampled[f"guided {radius:g} {epsilon:g}"] = guided_upsample(chroma[0], gray, scaled, epsilon)
        for name, found in upsampled.items():
            scores.setdefault(name, []).append(psnr(luma_chroma_to_rgb(gray, found), frame))
    return {name: float(np.mean(values)) for name, values in scores.items()}


def main() -> None:
    import torch

    args = parse_args()
    torch.set_num_threads(args.threads)
    clips = {clip.name: list(iter_clip_frames(clip)) for clip in args.clips}
    gray = np.mean([np.mean([psnr(np.repeat(rgb_to_gray(f)[..., None], 3, 2), f) for f in frames[::args.every]])
                    for frames in clips.values()])
    print(f"gray {gray:.2f}", flush=True)
    matcher = Matcher(args.backbone)
    temperatures = args.temperature or [TEMPERATURE]
    if args.projection:
        matcher.projection, learned_temperature = load_projection(args.projection)
        temperatures = args.temperature or [learned_temperature]
    table = []
    for short_side, temperature, top_k in itertools.product(args.short_side, temperatures, args.top_k):
        matcher.short_side, matcher.temperature, matcher.top_k = short_side, temperature, top_k
        per_clip = {name: score(frames[::args.every], matcher, frames[0] if args.keyframe else mirrored_crop(frames[0]),
                                args.guided) for name, frames in clips.items()}
        for upsampling in next(iter(per_clip.values())):
            row = {"short_side": short_side, "temperature": temperature, "top_k": top_k, "upsampling": upsampling,
                   "clips": {name: scores[upsampling] for name, scores in per_clip.items()}}
            row["psnr"] = float(np.mean(list(row["clips"].values())))
            table.append(row)
            print(f"short side {short_side} temperature {temperature} top-k {top_k} {upsampling}: {row['psnr']:.2f}  "
                  + " ".join(f"{v:.2f}" for v in row["clips"].values()), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gray": float(gray), "settings": table}, indent=2))


if __name__ == "__main__":
    run_cli(main)
