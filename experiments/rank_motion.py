"""Ranks colour clips by how hard their motion is for colour carried along the optical flow: a fast-motion dev set.

  python experiments/rank_motion.py --clips ../shared/data/train/videos --json docs/probes/motion_train.json

For each pair of consecutive frames (luma at a short side of --size px): the median flow length as a share of the
short side, and the share of pixels whose flow fails the forward-backward check or leaves the frame
(flow.reliable_flow), which is where a keyframe's carried colour is lost: occlusion, new content, motion the flow
cannot follow. Clips are listed by the mean of that share, hardest first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from flow import reliable_flow, squared_norm
from utils import rgb_to_gray, run_cli
from video_io import iter_clip_frames, list_clips


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, required=True, help="a folder of colour clips (frame folders or videos)")
    parser.add_argument("--size", type=int, default=240, help="short side the flow is computed at")
    parser.add_argument("--json", type=Path, help="write the ranking here")
    return parser.parse_args()


def small_gray(frame: np.ndarray, size: int) -> np.ndarray:
    import cv2

    height, width = frame.shape[:2]
    scale = size / min(height, width)
    return cv2.resize(rgb_to_gray(frame), (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)


def clip_motion(clip: Path, size: int) -> dict:
    """The clip's mean unreliable share and median flow length (as a share of the short side) over its pairs."""
    unreliable, lengths, previous = [], [], None
    for frame in iter_clip_frames(clip):
        gray = small_gray(frame, size)
        if previous is not None:
            flow, reliable = reliable_flow(previous, gray)
            unreliable.append(1.0 - float(reliable.mean()))
            lengths.append(float(np.median(np.sqrt(squared_norm(flow)))) / size)
        previous = gray
    return {"frames": len(unreliable) + 1, "unreliable": float(np.mean(unreliable)),
            "median_flow": float(np.mean(lengths))}


def main() -> None:
    args = parse_args()
    ranking = {clip.name: clip_motion(clip, args.size) for clip in list_clips(args.clips)}
    ranking = dict(sorted(ranking.items(), key=lambda item: -item[1]["unreliable"]))
    print(f"{'clip':40s} frames  unreliable  median flow (share of the short side)")
    for name, row in ranking.items():
        print(f"{name:40s} {row['frames']:6d}  {row['unreliable']:10.3f}  {row['median_flow']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"clips": str(args.clips), "size": args.size, "ranking": ranking}, indent=2))


if __name__ == "__main__":
    run_cli(main)
