"""Turn a training checkpoint into a self-contained model folder (what `--model` takes, and what ships as
unet_model/default): the EMA UNet, colorizer.json, copies of the local VAE and VAC it names, and the run's loss logs
up to the checkpoint's step in training/ (for experiments/plot_training.py). The optimizer and training state are
left behind; the UNet is stored in fp16.

  python export_model.py --checkpoint runs/guided/checkpoint-28000 --out unet_model/default --overwrite
  python export_model.py --checkpoint unet_model/default --color-head runs/color/color --vividness 0.5 \
      --saturation 1 --out runs/with_head        # a model folder given a colour head and its sampling defaults
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from colorizer import CONFIG_NAME, resolve_component, resolve_model_folder
from training_log import copy_logs, logs_of
from utils import atomic_path, run_cli


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint-<step>/ or a run folder (newest)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--color-head", type=Path, nargs="+", help="a colour head (train_color_head.py's "
                        "runs/<run>/color) to ship with the model: automatic colorization then takes its colours; "
                        "several: the model takes the mean of their colours")
    parser.add_argument("--vividness", type=float, help="the model's default --vividness")
    parser.add_argument("--saturation", type=float, help="the model's default --saturation")
    parser.add_argument("--head-start", type=int, help="the model's default --head-start")
    parser.add_argument("--heads-lead", action=argparse.BooleanOptionalAction,
                        help="the model's default --heads-lead")
    parser.add_argument("--heads-propagation", type=float,
                        help="the model's default --propagation where its colour heads lead and things move "
                        "(0.99 where nothing moves)")
    parser.add_argument("--head-pool-radius", type=int, help="the colour heads' chroma pooled over the frame on its "
                        "luma, in grid cells (color_head.Decoding; 0: not pooled)")
    parser.add_argument("--head-mode-temperature", type=float, help="the colour heads' chroma never more saturated "
                        "than their distribution's mean annealed to this temperature (color_head.Decoding; 1: no cap)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser.parse_args()


def export(checkpoint: Path, out: Path, overwrite: bool, settings: dict | None = None) -> Path:
    """`settings`: colorizer.json entries to set (a colour head's folder, sampling defaults)."""
    from diffusers import UNet2DConditionModel

    folder = resolve_model_folder(checkpoint)
    config = {**json.loads((folder / CONFIG_NAME).read_text()), **(settings or {})}
    with atomic_path(out, overwrite=overwrite, is_dir=True) as temp:
        # fp16 storage halves the shipped size; load_colorizer computes in float32 whatever the stored precision.
        UNet2DConditionModel.from_pretrained(folder / "unet").half().save_pretrained(temp / "unet")
        for name, key in (("vae", "vae"), ("vac", "vac")):
            source = Path(resolve_component(config[key], folder)) if key in config else None
            if source is not None and source.is_dir():
                shutil.copytree(source, temp / name)
                config[key] = name
        heads = config.get("color_head")
        if heads:
            sources = [heads] if isinstance(heads, str) else heads
            copied = ["color", *(f"color{i}" for i in range(2, len(sources) + 1))]
            for head, name in zip(sources, copied):
                shutil.copytree(resolve_component(head, folder), temp / name)
            config["color_head"] = copied[0] if isinstance(heads, str) else copied
        logs = logs_of(folder)
        if logs == folder:  # a checkpoint: its logs are its run folder's
            logs = folder.parent
        copy_logs(logs, temp / "training", config.get("step"))
        config["exported_from"] = str(folder)
        (temp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


def main() -> None:
    args = parse_args()
    heads = [str(head.resolve()) for head in args.color_head or []]
    settings = {key: value for key, value in (("color_head", (heads[0] if len(heads) == 1 else heads) or None),
                                              ("vividness", args.vividness), ("saturation", args.saturation),
                                              ("head_start", args.head_start), ("heads_lead", args.heads_lead),
                                              ("heads_propagation", args.heads_propagation),
                                              ("head_pool_radius", args.head_pool_radius),
                                              ("head_mode_temperature", args.head_mode_temperature))
                if value is not None}
    source = export(args.checkpoint, args.out, args.overwrite, settings)
    print(f"exported {source} -> {args.out}")


if __name__ == "__main__":
    run_cli(main)
