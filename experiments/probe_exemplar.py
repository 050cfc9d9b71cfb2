"""The whole pipeline with an exemplar: each clip colorized with `--exemplar` = its frame 0 mirrored left-right and
centre-cropped to 80% of each side (issue 29's protocol), through colorize_clip with the command line's defaults,
scored on every frame against the clip itself.

  python experiments/probe_exemplar.py --clips ../shared/data/train/videos/flatten__puff \
      --variants automatic paste=1 paste=0.5

A variant sets correspondence.py's PASTE_FLOOR (`paste`: the least share of the found colour in the output) and
CORRESPONDENCE_SHORT_SIDE (`side`: the matching size), guidance.py's PALETTE_SHARE (`palette`), and the options
ColorizationOptions.register_exemplars (`register`: whether an exemplar that is a reframed frame becomes a keyframe
there), guided_output (`guided`: the output's chroma upsampled by the guided filter where colour was found) and
learned_metric (`metric`: the learned matching metric or plain cosine similarity) and match_keyframes (`match`: with
--keyframe, each frame's colour looked up in the keyframe too), 1 or 0; `automatic` matches nothing. Prints each
variant's mean PSNR, colourfulness, CDC over the truth's and warp error (metrics.py's), and the PSNR per clip.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

import correspondence
import guidance
from colorizer import DEFAULT_MODEL, load_colorizer
from metrics import cdc, colorfulness, psnr, warp_error
from pipeline import ColorizationOptions, colorize_clip
from utils import run_cli
from video_io import iter_clip_frames, write_image_rgb

CONSTANTS = {"paste": (correspondence, "PASTE_FLOOR"), "palette": (guidance, "PALETTE_SHARE"),
             "side": (correspondence, "CORRESPONDENCE_SHORT_SIDE")}
OPTIONS = {"guided": ("guided_output", bool), "register": ("register_exemplars", bool),
           "metric": ("learned_metric", bool), "match": ("match_keyframes", bool)}
COLUMNS = ("psnr", "colourfulness", "cdc_ratio", "warp_error")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, nargs="+", required=True, help="colour clips (frame folders or videos)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--variants", nargs="+", default=["automatic", "paste=0.5"])
    parser.add_argument("--keyframe", action="store_true", help="give frame 0 itself as --reference instead of "
                        "the exemplar (for the `palette` variants)")
    parser.add_argument("--also-exemplar", action="store_true", help="with --keyframe: frame 0 is also given as an "
                        "exemplar, so the correspondence colours beside the flow what the keyframe's carry loses")
    parser.add_argument("--metric-file", type=Path, default=correspondence.METRIC_FILE,
                        help="the learned matching metric (experiments/train_matcher.py's output; default: the "
                        "shipped one): one trained with the scored clips held out")
    parser.add_argument("--propagation", type=float, default=ColorizationOptions.propagation)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the table here")
    return parser.parse_args()


def apply_variant(variant: str) -> tuple[bool, dict]:
    """Set the variant's constants -> (False where it names `automatic`, i.e. no exemplar; the ColorizationOptions
    fields it sets)."""
    items, options = variant.split(","), {}
    for item in items:
        if item != "automatic":
            name, value = item.split("=")
            if name in OPTIONS:
                field, kind = OPTIONS[name]
                options[field] = kind(float(value))
                continue
            module, constant = CONSTANTS[name]
            setattr(module, constant, type(getattr(module, constant))(float(value)))  # an int stays an int
    correspondence.shared_matcher.cache_clear()  # the matcher is built with the settings of the variant
    return "automatic" not in items, options


def colorize(colorizer, clip: Path, folder: Path, options: ColorizationOptions) -> list[np.ndarray]:
    """The clip (colour: the pipeline sees its luma) through colorize_clip into `folder`, read back."""
    colorize_clip(colorizer, clip, folder / "out", options, frame_bar=False)
    outputs = list(iter_clip_frames(folder / "out"))
    shutil.rmtree(folder / "out")
    return outputs


def main() -> None:
    import torch

    args = parse_args()
    torch.set_num_threads(args.threads)
    correspondence.METRIC_FILE = args.metric_file
    colorizer = load_colorizer(args.model, torch.device("cpu"))
    table = {}
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        for variant in args.variants:
            defaults = {setting: getattr(*setting) for setting in CONSTANTS.values()}
            matched, settings = apply_variant(variant)
            rows = {}
            for clip in args.clips:
                frames = list(iter_clip_frames(clip))
                if args.keyframe:
                    write_image_rgb(folder / "key.png", frames[0])
                    options = ColorizationOptions(propagation=args.propagation, reference=[str(folder / "key.png")],
                                                  exemplar=[str(folder / "key.png")] if args.also_exemplar else [],
                                                  **settings)
                else:
                    write_image_rgb(folder / "exemplar.png", correspondence.mirrored_crop(frames[0]))
                    options = ColorizationOptions(propagation=args.propagation,
                                                  exemplar=[str(folder / "exemplar.png")] if matched else [],
                                                  **settings)
                outputs = colorize(colorizer, clip, folder, options)
                rows[clip.name] = {"psnr": float(np.mean([psnr(o, f) for o, f in zip(outputs, frames)])),
                                   "colourfulness": float(np.mean([colorfulness(o) for o in outputs])),
                                   "cdc_ratio": cdc(outputs) / cdc(frames),
                                   "warp_error": float(np.nanmean([warp_error(*pair) for pair in
                                                                   zip(outputs, outputs[1:], frames, frames[1:])]))}
            for setting, value in defaults.items():
                setattr(*setting, value)
            mean = {key: float(np.mean([row[key] for row in rows.values()])) for key in COLUMNS}
            table[variant] = {"clips": rows, "mean": mean}
            print(f"{variant:<24} {mean['psnr']:6.2f} dB, colourfulness {mean['colourfulness']:5.1f}, CDC / truth's "
                  f"{mean['cdc_ratio']:4.2f}, warp error {mean['warp_error']:5.2f}  "
                  + " ".join(f"{row['psnr']:.2f}" for row in rows.values()), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    run_cli(main)
