"""Where does a keyframe's colour go wrong? The first frame's true colour carried through each clip the way
`video_colorization.py --reference` carries it (guidance.GuidePropagator; no model), scored in the last third of the
clip, where drift has had time to build up.

  python experiments/probe_propagation.py --clips ../shared/data/train/videos/flatten__puff \
      ../shared/data/train/videos/cotracker__bear --json runs/probe/propagation.json

Per clip, over the last third of its frames (chroma error: mean squared Cb/Cr error per pixel):
- held: the share of pixels the carried colour still holds fully (confidence >= 0.99);
- carried: the error in those pixels; rest: the error elsewhere, where the output is the keyframe's palette;
- direct: the held pixels' error with the keyframe's colour warped by one keyframe-to-frame flow instead;
- held error share: the held pixels' part of the clip's whole error (held x carried against (1 - held) x rest);
- oracle: the same, but at each pixel the best of the direct flow's sample and its eight neighbours, picked with the
  truth. Where `carried` is at or below `oracle`, shifting the colour by a pixel anywhere would not help: what
  remains is the truth's own colour changing (light, grading, compression noise) or misalignment beyond a pixel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from flow import reliable_flow, warp
from guidance import GuidePropagator, palette_levels, paste_dense, propagation_size, reference_guide
from utils import UserError, rgb_to_chroma, rgb_to_gray, run_cli
from video_io import iter_clip_frames

HELD = 0.99  # confidence of a pixel the carried colour holds fully
COLUMNS = ("held", "carried", "rest", "direct", "oracle", "held_error_share")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, nargs="+", required=True, help="colour clips (frame folders or videos)")
    parser.add_argument("--json", type=Path, help="write the table here")
    return parser.parse_args()


def squared_chroma_error(chroma: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return ((chroma.astype(np.float32) - truth) ** 2).sum(axis=-1)


def oracle_error(key_chroma: np.ndarray, flow: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per pixel, the least error of the keyframe's colour sampled at the flow's target or one pixel beside it."""
    shifts = [np.float32([dx, dy]) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return np.minimum.reduce([squared_chroma_error(warp(key_chroma, flow + shift), truth) for shift in shifts])


def score_clip(frames: list[np.ndarray]) -> dict[str, float]:
    """The first frame given, the last third of the frames scored (see the module's docstring)."""
    import cv2

    size = propagation_size(*frames[0].shape[:2])
    frames = [cv2.resize(f, (size[1], size[0]), interpolation=cv2.INTER_AREA) for f in frames]
    keyframe = reference_guide(frames[0], 0, size)
    key_gray, key_chroma = keyframe.keyframe
    propagator = GuidePropagator([keyframe])
    first_scored = len(frames) - len(frames) // 3
    rows = []
    for t, frame in enumerate(frames):
        gray = rgb_to_gray(frame)
        dense, _ = propagator.step(t, gray)
        if t < first_scored:
            continue
        truth = rgb_to_chroma(frame).astype(np.float32)
        held = dense.confidence >= HELD
        # the pipeline's paste with the palette in place of the model's colour, so the rest is the palette's alone
        output_error = squared_chroma_error(paste_dense(dense.palette[palette_levels(gray)], dense, gray), truth)
        flow, _ = reliable_flow(key_gray, gray)
        rows.append({"held": float(held.mean()),
                     "carried": mean_where(output_error, held),
                     "rest": mean_where(output_error, ~held),
                     "direct": mean_where(squared_chroma_error(warp(key_chroma, flow), truth), held),
                     "oracle": mean_where(oracle_error(key_chroma, flow, truth), held)})
    clip = {column: float(np.nanmean([row[column] for row in rows])) for column in COLUMNS[:-1]}
    held_error, rest_error = clip["held"] * clip["carried"], (1 - clip["held"]) * np.nan_to_num(clip["rest"])
    clip["held_error_share"] = float(held_error / max(held_error + rest_error, 1e-9))
    return clip


def mean_where(values: np.ndarray, where: np.ndarray) -> float:
    return float(values[where].mean()) if where.any() else float("nan")


def table_line(name: str, row: dict[str, float]) -> str:
    errors = " ".join(f"{row[c]:8.1f}" for c in ("carried", "rest", "direct", "oracle"))
    return f"{name[:32]:<32} {row['held']:5.2f} {errors} {row['held_error_share']:17.2f}"


def main() -> None:
    args = parse_args()
    table = {}
    print(f"{'clip':<32} {'held':>5} {'carried':>8} {'rest':>8} {'direct':>8} {'oracle':>8} {'held error share':>17}")
    for clip in args.clips:
        frames = list(iter_clip_frames(clip))
        if len(frames) < 3:
            raise UserError(f"{clip}: has {len(frames)} frames; the probe scores the last third of at least 3")
        table[str(clip)] = row = score_clip(frames)
        print(table_line(clip.name, row), flush=True)
    mean = {c: float(np.nanmean([row[c] for row in table.values()])) for c in COLUMNS}
    print(table_line("mean", mean))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"clips": table, "mean": mean}, indent=2))


if __name__ == "__main__":
    run_cli(main)
