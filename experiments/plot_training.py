"""Learning curves of a training run: its loss logs, and the held-out scores probe_limits.py measured at its exports.

  python experiments/plot_training.py --run docs/training_logs/guided_to_33000 docs/training_logs/guided2_to_40000 \
      --out docs/training_guided.png \
      --probes "held-out clips" v1=docs/probes/clips_v1.json 10000=docs/probes/clips_10000.json \
      --probes "held-out photos" v1=docs/probes/photos_v1.json 10000=docs/probes/photos_10000.json

--run is a training run folder or an exported model (whose training/ holds the logs up to its step); a run that
went on from another's export (train_diffusion.py --init-from) follows it: `--run <earlier logs> <later run>`, and
the later run's steps count on from the last step of the one before. Each --probes
group is one panel: PSNR of the sampled and the one-step (x0) prediction against the step, the gray input's PSNR
as a dotted line, and NAME=FILE (another model to compare with, named by a label that is not a number) as dashed
lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from training_log import logs_of, read_log
from utils import UserError, run_cli

SCORED_VARIANTS = ("sample", "x0")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, nargs="+", required=True,
                        help="run folder or exported model folder; several: each went on from the one before")
    parser.add_argument("--probes", nargs="+", action="append", default=[], metavar="TITLE STEP=JSON",
                        help="a panel title, then probe_limits.py --json files, each as STEP=FILE or NAME=FILE "
                             "(another model to compare with)")
    parser.add_argument("--smooth", type=int, default=10, help="train-loss lines averaged per plotted point")
    parser.add_argument("--out", type=Path, default=Path("docs/training.png"))
    return parser.parse_args()


def loss_curves(runs: list[Path]) -> tuple[list[dict], list[dict]]:
    """The runs' training and validation logs end to end, each run's steps shifted past the one before's last."""
    train, validation, offset = [], [], 0
    for run in runs:
        folder = logs_of(run)
        paths = [folder / "train_loss.jsonl", folder / "validation.jsonl"]
        for path in paths:
            if not path.exists():
                raise UserError(f"{path}: not found; pass a run folder of train_diffusion.py or a model exported "
                                "from one")
        run_train, run_validation = ([{**e, "step": e["step"] + offset} for e in read_log(path)] for path in paths)
        train, validation = train + run_train, validation + run_validation
        offset = max((e["step"] for e in run_train + run_validation), default=offset)
    return train, validation


def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Means over the trailing `window` values (fewer at the start), so the curve starts at the first step."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def read_probes(title: str, specs: list[str]) -> dict:
    """{"title", "steps": [...], "scores": {variant: [...]}, "gray": float, "compare": (name, {variant: float})}."""
    panel = {"title": title, "steps": [], "scores": {v: [] for v in SCORED_VARIANTS}, "gray": None, "compare": None}
    for spec in specs:
        label, _, file = spec.partition("=")
        if not file or not label:
            raise UserError(f"--probes {title}: '{spec}' is not STEP=FILE or NAME=FILE")
        if not label.isdigit() and panel["compare"] is not None:
            raise UserError(f"--probes {title}: '{spec}' is a second model to compare with; give one NAME=FILE a panel")
        try:
            summary = json.loads(Path(file).read_text())["summary"]
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"{file}: not a probe_limits.py --json file ({error}); make it with probe_limits.py "
                            f"--variants {' '.join(SCORED_VARIANTS)} gray --json {file}") from None
        missing = [v for v in SCORED_VARIANTS if v not in summary]
        if missing:
            raise UserError(f"{file}: has no {', '.join(missing)} scores; rerun probe_limits.py with --variants "
                            f"{' '.join(SCORED_VARIANTS)} gray")
        if "gray" in summary:
            panel["gray"] = summary["gray"]["psnr"]
        if not label.isdigit():
            panel["compare"] = label, {v: summary[v]["psnr"] for v in SCORED_VARIANTS}
            continue
        panel["steps"].append(int(label))
        for variant in SCORED_VARIANTS:
            panel["scores"][variant].append(summary[variant]["psnr"])
    order = np.argsort(panel["steps"])
    panel["steps"] = [panel["steps"][i] for i in order]
    panel["scores"] = {v: [s[i] for i in order] for v, s in panel["scores"].items()}
    return panel


def plot(train: list[dict], validation: list[dict], panels: list[dict], smooth: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 1 + len(panels), figsize=(5.5 * (1 + len(panels)), 4), squeeze=False)
    loss_axis = axes[0][0]
    steps = [e["step"] for e in train]
    loss_axis.plot(steps, moving_mean(np.array([e["loss"] for e in train]), smooth), color="0.6",
                   label=f"training loss (mean of {smooth} logs)")
    loss_axis.plot([e["step"] for e in validation], [e["val_loss"] for e in validation], marker=".",
                   label="validation loss (held-out items)")
    loss_axis.set_yscale("log")
    loss_axis.set_title("loss")
    for axis, panel in zip(axes[0][1:], panels):
        for variant, color in zip(SCORED_VARIANTS, ("C0", "C1")):
            axis.plot(panel["steps"], panel["scores"][variant], marker="o", color=color, label=variant)
            if panel["compare"] is not None:
                name, scores = panel["compare"]
                axis.axhline(scores[variant], color=color, linestyle="--", label=f"{name}, {variant}")
        if panel["gray"] is not None:
            axis.axhline(panel["gray"], color="0.4", linestyle=":", label="gray input")
        axis.set_title(f"{panel['title']}: PSNR (dB)")
    for axis in axes[0]:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main() -> None:
    args = parse_args()
    train, validation = loss_curves(args.run)
    panels = [read_probes(title, specs) for title, *specs in args.probes]
    plot(train, validation, panels, args.smooth, args.out)
    print(f"wrote {args.out}: {len(train)} training and {len(validation)} validation points, up to step "
          f"{max(e['step'] for e in train + validation)}")


if __name__ == "__main__":
    run_cli(main)
