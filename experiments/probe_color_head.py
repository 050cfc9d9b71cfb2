"""What the colour head and the diffusion model each give, over the vividness knob, on clips held out of training.

  python experiments/probe_color_head.py --clips runs/heldout --model runs/v4 --vividness 0 0.5 1 --frames 40 \
      --json docs/probes/color_head_heldout.json --figure docs/probes/color_head_heldout.jpg \
      --curve docs/color_head_curve.png --compare v3=docs/probes/color_head_heldout_v3.json

For every vividness: the head alone (its chroma per frame, on the frame's own luma: no diffusion, no propagation)
and the whole pipeline (the head's chroma as the UNet's hint input, one shot's shared noise, the flow's carry), each
scored against the colour frames; the gray input beside them. A model without a colour head gives the pipeline rows
alone (the baseline). The figure shows one frame per clip: gray | head alone | pipeline | ground truth; the curve,
PSNR against colourfulness over the knob, with other models' tables (--compare) as single points. With --tables, no
clip is run: the curve is drawn from the mean of earlier --json tables (one per seed, say).

  python experiments/probe_color_head.py --tables docs/probes/color_head_heldout_seed{0,1,2}.json \
      --curve docs/color_head_curve.png --compare \
      v3=docs/probes/color_head_heldout_v3_seed0.json,docs/probes/color_head_heldout_v3_seed1.json,docs/probes/color_head_heldout_v3_seed2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from colorizer import DEFAULT_MODEL, Colorizer, combine, load_colorizer, prepare_gray
from metrics import FrechetFeatures, evaluate_clip, frechet_distance, gray_baseline
from pipeline import colorize_frames, parse_options
from utils import choose_device, rgb_to_gray, run_cli
from video_io import iter_clip_frames, list_clips


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, help="colour clips held out of training")
    parser.add_argument("--tables", nargs="+", type=Path, help="instead of running: the mean of these --json tables")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--vividness", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    parser.add_argument("--frames", type=int, default=40, help="first N frames of each clip")
    parser.add_argument("--settings", default="", help="the pipeline's other sampling flags, quoted")
    parser.add_argument("--head-only", action="store_true", help="score the head alone, without the pipeline rows")
    parser.add_argument("--frechet", action="store_true",
                        help="score each row's FD(Lite2) too: its frames over all clips against the ground truth's")
    parser.add_argument("--json", type=Path, help="write the table here")
    parser.add_argument("--figure", type=Path, help="write one frame per clip here (gray | head | pipeline | truth)")
    parser.add_argument("--figure-vividness", type=float, help="the vividness the figure shows (default: the last)")
    parser.add_argument("--curve", type=Path, help="write the PSNR-colourfulness curve over the knob here")
    parser.add_argument("--compare", nargs="*", default=[], metavar="NAME=JSON",
                        help="other models' --json tables, their pipeline rows as points on a dashed line "
                        "(NAME=A,B,...: their mean)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if (args.clips is None) == (args.tables is None) or (args.tables and args.curve is None):
        parser.error("pass --clips (to run) or --tables with --curve (to draw from earlier runs)")
    return args


def mean_table(files: list[Path]) -> dict[str, dict]:
    """The rows of several --json tables, each number the mean over the tables."""
    tables = [json.loads(Path(file).read_text())["rows"] for file in files]
    return {label: {key: float(np.mean([t[label][key] for t in tables])) for key, value in row.items()
                    if isinstance(value, (int, float))} for label, row in tables[0].items()}


def head_alone(colorizer: Colorizer, frames: list[np.ndarray], vividness: float) -> list[np.ndarray]:
    """Each frame coloured by the head's chroma (bilinear to the frame) on its own luma."""
    height, width = frames[0].shape[:2]
    outputs = []
    for start in range(0, len(frames), 8):
        gray = np.stack([rgb_to_gray(f) for f in frames[start : start + 8]])
        head_size = colorizer.head_size(height, width)
        _, _, chroma = colorizer.condition(prepare_gray(gray, colorizer.vac_size(height, width)), vividness,
                                           prepare_gray(gray, head_size) if head_size is not None else None)
        outputs += [combine(g, c) for g, c in zip(gray, chroma.permute(0, 2, 3, 1).cpu().numpy())]
    return outputs


def scored(outputs: dict[str, list[np.ndarray]], clips: dict[str, list[np.ndarray]],
           frechet: tuple[FrechetFeatures, np.ndarray] | None = None) -> dict:
    """A row's means over the clips; with `frechet` (the network and the ground truth's features), its FD(Lite2)."""
    per_clip = {name: evaluate_clip(iter(outputs[name]), iter(frames), name=name) for name, frames in clips.items()}
    keys = ("psnr", "ssim", "colorfulness", "cdc", "gt_colorfulness", "gt_cdc")
    row = {**{key: float(np.mean([r[key] for r in per_clip.values()])) for key in keys},
           "per_clip_psnr": {name: r["psnr"] for name, r in per_clip.items()}}
    if frechet is not None:
        network, truth = frechet
        row["frechet_lite2"] = frechet_distance(np.stack([network(f) for f in itertools.chain(*outputs.values())]),
                                                truth)
    return row


def run_rows(colorizer: Colorizer, clips: dict[str, list[np.ndarray]], args: argparse.Namespace
             ) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """The table's rows, and the middle frame of each clip in each row."""
    base = parse_options(args.settings.split())
    outputs = {"gray": {name: list(gray_baseline(iter(frames))) for name, frames in clips.items()}}
    for vividness in args.vividness if colorizer.color_heads else [None]:
        if vividness is not None:
            outputs[f"head {vividness}"] = {name: head_alone(colorizer, frames, vividness)
                                            for name, frames in clips.items()}
        if args.head_only:
            continue
        options = dataclasses.replace(base, vividness=vividness)
        outputs[f"pipeline {vividness}"] = {
            name: list(colorize_frames(colorizer, iter(frames), options, frames[0].shape[:2]))
            for name, frames in clips.items()}
    frechet = None
    if args.frechet:
        network = FrechetFeatures()
        frechet = network, np.stack([network(f) for f in itertools.chain(*clips.values())])
    rows = {}
    for label, row_outputs in outputs.items():
        rows[label] = scored(row_outputs, clips, frechet)
        below = sum(rows[label]["per_clip_psnr"][n] < rows["gray"]["per_clip_psnr"][n] for n in clips)
        rows[label]["clips_below_gray"] = int(below)
        print(f"{label:16s} PSNR {rows[label]['psnr']:6.2f}  SSIM {rows[label]['ssim']:.4f}  "
              f"CF {rows[label]['colorfulness']:5.1f} / {rows[label]['gt_colorfulness']:5.1f}  "
              f"CDC {rows[label]['cdc']:.5f} / {rows[label]['gt_cdc']:.5f}  below gray {below}/{len(clips)}"
              f"  FD(Lite2) {rows[label].get('frechet_lite2', float('nan')):.1f}", flush=True)
    middles = {label: {name: frames[len(frames) // 2] for name, frames in row.items()}
               for label, row in outputs.items()}
    return rows, middles


def save_figure(path: Path, middles: dict[str, dict[str, np.ndarray]], clips: dict[str, list[np.ndarray]],
                vividness: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["gray", f"head {vividness}", f"pipeline {vividness}", "truth"]
    columns = [c for c in columns if c in middles or c == "truth"]
    figure, axes = plt.subplots(len(clips), len(columns), figsize=(3 * len(columns), 2.2 * len(clips)), squeeze=False)
    for row, (name, frames) in enumerate(clips.items()):
        for column, label in enumerate(columns):
            image = frames[len(frames) // 2] if label == "truth" else middles[label][name]
            axes[row, column].imshow(image)
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(label)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def save_curve(path: Path, rows: dict[str, dict], compare: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for kind, marker in (("head", "s"), ("pipeline", "o")):
        points = [(float(label.split()[1]), row) for label, row in rows.items()
                  if label.split()[0] == kind and label.split()[1] != "None"]  # None: a model without a head
        if points:
            axis.plot([r["colorfulness"] for _, r in points], [r["psnr"] for _, r in points], marker=marker,
                      label=f"{kind}{' alone' if kind == 'head' else ' (head + diffusion)'}")
            for vividness, row in points:
                axis.annotate(f"{vividness:g}", (row["colorfulness"], row["psnr"]), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
    for spec in compare:
        name, files = spec.split("=", 1)
        points = [row for label, row in mean_table([Path(f) for f in files.split(",")]).items()
                  if label.startswith("pipeline")]
        axis.plot([r["colorfulness"] for r in points], [r["psnr"] for r in points], "D--", label=name)
    gray = rows["gray"]
    axis.axhline(gray["psnr"], color="gray", linestyle=":", label="gray input")
    axis.axvline(gray["gt_colorfulness"], color="gray", linestyle="--", label="ground truth's colourfulness")
    axis.set_xlabel("colourfulness")
    axis.set_ylabel("PSNR (dB)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main() -> None:
    args = parse_args()
    if args.tables:
        save_curve(args.curve, mean_table(args.tables), args.compare)
        return
    torch.manual_seed(0)
    colorizer = load_colorizer(args.model, choose_device(args.device))
    clips = {clip.name: list(itertools.islice(iter_clip_frames(clip), args.frames)) for clip in list_clips(args.clips)}
    rows, middles = run_rows(colorizer, clips, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "frames": args.frames, "settings": args.settings,
                                         "rows": rows}, indent=2))
    if args.figure:
        shown = args.figure_vividness if args.figure_vividness is not None else args.vividness[-1]
        save_figure(args.figure, middles, clips, shown if colorizer.color_heads else None)
    if args.curve:
        save_curve(args.curve, rows, args.compare)


if __name__ == "__main__":
    run_cli(main)
