"""How much of a clip's CDC is its output's rounding to 8 bits rather than colour that visibly changes.

  python experiments/probe_cdc_rounding.py --pred runs/val_v9 --gt ../shared/data/val \
      --json docs/probes/cdc_rounding_val_v9.json

CDC (metrics.cdc) compares 256-bin histograms of consecutive frames' RGB channels. Where a clip's colour is smooth
(a low-resolution chroma upsampled, a uniform tint), every pixel of a region rounds the same way, so a drift of a
fraction of a level moves a whole region's mass to the next bin at once; where the chroma varies from pixel to pixel
(a camera's own noise), the same drift moves a few pixels' mass. For each clip, output and ground truth alike:
- `cdc`: the frames as they are;
- `cdc_dither<s>`: the frames rebuilt from their own luma (the ground truth's, which the output keeps) and their own
  chroma plus Gaussian noise of s levels (the same draws for both), so that both round alike; the ratio of the two
  is what is left when rounding no longer tells them apart;
- `cdc_frozen`: the output's first frame's chroma on every frame's luma: the CDC of colour that does not change;
- `gt_cdc_uniform_tint`: each ground-truth frame's mean chroma spread over the whole frame: how far a tint that
  drifts by a fraction of a level moves CDC;
- `tint_step`, `gt_tint_step`: the mean change of the frame's mean chroma from one frame to the next, in levels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from metrics import cdc
from utils import UserError, luma_chroma_to_rgb, rgb_to_chroma, rgb_to_gray, run_cli
from video_io import iter_clip_frames, match_clips


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, required=True, help="the output clips (as evaluate.py takes them)")
    parser.add_argument("--gt", type=Path, required=True, help="the ground-truth clips")
    parser.add_argument("--dither", type=float, nargs="+", default=[0.3, 1.0],
                        help="levels of chroma noise both are rebuilt with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the table here")
    return parser.parse_args()


def rebuilt(lumas: list[np.ndarray], chromas: list[np.ndarray]) -> list[np.ndarray]:
    return [luma_chroma_to_rgb(luma, np.broadcast_to(chroma, luma.shape + (2,)).astype(np.float32))
            for luma, chroma in zip(lumas, chromas)]


def dithered(chromas: list[np.ndarray], sigma: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [chroma + rng.normal(0.0, sigma, chroma.shape).astype(np.float32) for chroma in chromas]


def tint_step(chromas: list[np.ndarray]) -> float:
    means = np.array([chroma.reshape(-1, 2).mean(axis=0) for chroma in chromas])
    return float(np.hypot(*np.diff(means, axis=0).T).mean())


def clip_rounding(pred: Path, gt: Path, dithers: list[float], seed: int) -> dict:
    truth = list(iter_clip_frames(gt))
    output = list(iter_clip_frames(pred))
    if len(output) != len(truth):
        raise UserError(f"{pred}: {len(output)} frames against {len(truth)} in {gt}; pass the output of these clips")
    lumas = [rgb_to_gray(frame) for frame in truth]
    truth_chroma, output_chroma = [rgb_to_chroma(f) for f in truth], [rgb_to_chroma(f) for f in output]
    row = {"gt_cdc": cdc(truth), "cdc": cdc(output)}
    for sigma in dithers:
        row[f"gt_cdc_dither{sigma:g}"] = cdc(rebuilt(lumas, dithered(truth_chroma, sigma, seed)))
        row[f"cdc_dither{sigma:g}"] = cdc(rebuilt(lumas, dithered(output_chroma, sigma, seed)))
    row["cdc_frozen"] = cdc(rebuilt(lumas, [output_chroma[0]] * len(lumas)))
    row["gt_cdc_uniform_tint"] = cdc(rebuilt(lumas, [c.reshape(-1, 2).mean(axis=0) for c in truth_chroma]))
    row["tint_step"], row["gt_tint_step"] = tint_step(output_chroma), tint_step(truth_chroma)
    return row


def main() -> None:
    args = parse_args()
    rows = {clip: clip_rounding(pred, gt, args.dither, args.seed) for clip, pred, gt in match_clips(args.pred, args.gt)}
    ratios = ["cdc", *(f"cdc_dither{s:g}" for s in args.dither)]
    print(f"{'clip':34s} {'GT CDC':>8s} " + " ".join(f"{r + ' / GT':>17s}" for r in ratios)
          + f" {'frozen / GT':>12s} {'GT tint / GT':>13s} {'tint step':>10s} {'GT step':>8s}")
    for clip, row in rows.items():
        print(f"{clip:34s} {row['gt_cdc']:8.5f} " + " ".join(f"{row[r] / row['gt_' + r]:17.2f}" for r in ratios)
              + f" {row['cdc_frozen'] / row['gt_cdc']:12.2f} {row['gt_cdc_uniform_tint'] / row['gt_cdc']:13.2f}"
              + f" {row['tint_step']:10.3f} {row['gt_tint_step']:8.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"pred": str(args.pred), "gt": str(args.gt), "dither": args.dither,
                                         "seed": args.seed, "clips": rows}, indent=2))


if __name__ == "__main__":
    run_cli(main)
