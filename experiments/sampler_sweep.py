"""Quality versus sampling steps for each sampler, on held-out clips: picks the default sampler and step count.

  python experiments/sampler_sweep.py --clips ../shared/data/val --frames 16 --out docs/sampler_sweep.png

Every (sampler, steps) pair colorizes the first --frames frames of each clip (grayscale of the colour frames) with
the same weights, noise and temporal settings, and is scored by metrics.evaluate_clip against the colour frames;
with several --seeds, each setting runs once per seed (one initial noise per shot makes a clip's colours one draw)
and the table gives their mean, and each seed's. Writes a PNG plot and a JSON table.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from colorizer import DEFAULT_MODEL, SAMPLERS, load_colorizer
from metrics import evaluate_clip
from pipeline import ColorizationOptions, colorize_frames, parse_options
from utils import choose_device, run_cli
from video_io import iter_clip_frames, list_clips


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, required=True, help="colour clips (never the training data)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpm++", "unipc", "euler"], choices=SAMPLERS)
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--frames", type=int, default=16, help="first N frames of each clip")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="initial-noise seeds, averaged")
    parser.add_argument("--settings", default="", help="video_colorization.py's other sampling flags (--guidance, "
                        "--saturation, --propagation, ...), quoted")
    parser.add_argument("--out", type=Path, default=Path("docs") / "sampler_sweep.png")
    parser.add_argument("--device", default="auto")
    return parser.parse_args()


def score(colorizer, clips: dict[str, list[np.ndarray]], settings: ColorizationOptions) -> dict:
    per_clip, start = [], time.perf_counter()
    for frames in clips.values():
        output = list(colorize_frames(colorizer, iter(frames), settings, frames[0].shape[:2]))
        per_clip.append(evaluate_clip(iter(output), iter(frames)))
    seconds = time.perf_counter() - start
    frame_count = sum(len(f) for f in clips.values())
    keys = ("psnr", "ssim", "cdc", "colorfulness", "gt_cdc", "gt_colorfulness")
    return {**{k: float(np.mean([r[k] for r in per_clip])) for k in keys}, "seconds_per_frame": seconds / frame_count}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for sampler in sorted({r["sampler"] for r in results}):
        rows = [r for r in results if r["sampler"] == sampler]
        steps = [r["steps"] for r in rows]
        for axis, key in zip(axes, ("psnr", "colorfulness", "cdc")):
            axis.plot(steps, [r[key] for r in rows], marker="o", label=sampler)
    for axis, label in zip(axes, ("PSNR (dB)", "colorfulness", "CDC")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("denoising steps")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    axes[1].axhline(results[0]["gt_colorfulness"], color="gray", linestyle="--", label="ground truth")
    axes[2].axhline(results[0]["gt_cdc"], color="gray", linestyle="--", label="ground truth")
    axes[0].legend()
    axes[1].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main() -> None:
    args = parse_args()
    colorizer = load_colorizer(args.model, choose_device(args.device))
    clips = {clip.name: list(itertools.islice(iter_clip_frames(clip), args.frames)) for clip in list_clips(args.clips)}
    base, results = parse_options(args.settings.split()), []
    for sampler in args.samplers:
        for steps in args.steps:
            per_seed = [score(colorizer, clips, dataclasses.replace(base, sampler=sampler, steps=steps, seed=seed))
                        for seed in args.seeds]
            result = {"sampler": sampler, "steps": steps,
                      **{key: float(np.mean([r[key] for r in per_seed])) for key in per_seed[0]},
                      "per_seed": dict(zip(args.seeds, per_seed))}
            results.append(result)
            seeds = " ".join(f"{r['psnr']:.2f}" for r in per_seed)
            print(f"{sampler:6} {steps:4d} steps: PSNR {result['psnr']:.2f} ({seeds})  SSIM {result['ssim']:.4f}  "
                  f"CF {result['colorfulness']:.1f}  CDC {result['cdc']:.5f}  "
                  f"{result['seconds_per_frame']:.2f} s/frame", flush=True)
    plot(results, args.out)
    table = {"settings": args.settings, "frames": args.frames, "seeds": args.seeds, "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    run_cli(main)
