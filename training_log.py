"""A training run's logs: train_loss.jsonl (the mean loss of every --log-every steps) and validation.jsonl (the
validation loss at every --validate-every steps), one JSON object with its "step" a line. train_diffusion.py writes
them, export_model.py carries them into a model folder's training/, experiments/plot_training.py draws them."""

from __future__ import annotations

import json
from pathlib import Path

from utils import atomic_path

LOG_NAMES = ("train_loss.jsonl", "validation.jsonl")


def logs_of(folder: Path) -> Path:
    """Where a folder's logs are: an exported model keeps them in training/, a run folder holds them itself."""
    return folder / "training" if (folder / "training").is_dir() else folder


def read_log(path: Path, last_step: int | None = None) -> list[dict]:
    """The entries of a log up to `last_step`, skipping a line cut short by a kill."""
    entries = []
    for line in Path(path).read_text().splitlines():
        try:
            entry = json.loads(line)
            step = entry["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if last_step is None or step <= last_step:
            entries.append(entry)
    return entries


def write_log(path: Path, entries: list[dict]) -> None:
    with atomic_path(path, overwrite=True) as temp:
        temp.write_text("".join(json.dumps(entry) + "\n" for entry in entries))


def append_log(path: Path, entry: dict) -> None:
    with open(path, "a") as log:
        log.write(json.dumps(entry) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step`, written after the checkpoint a resumed run starts from (kill -9)."""
    if not path.exists():
        return
    kept = read_log(path, step)
    if len(kept) != len(path.read_text().splitlines()):
        write_log(path, kept)


def copy_logs(source: Path, destination: Path, last_step: int | None) -> None:
    """The logs of `source` (a run folder) up to `last_step`, written into `destination`."""
    for name in LOG_NAMES:
        if (source / name).exists():
            destination.mkdir(parents=True, exist_ok=True)
            write_log(destination / name, read_log(source / name, last_step))
