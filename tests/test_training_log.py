"""The run's loss logs: carried into exported models (export_model.py) and drawn as learning curves
(experiments/plot_training.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest


def write_lines(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


@pytest.fixture
def run_with_logs(tiny_model, tmp_path):
    """A run folder: checkpoint-4 (a complete model at step 4) and logs that go on to step 6, cut short by a kill."""
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-4"
    shutil.copytree(tiny_model, checkpoint)
    config = json.loads((checkpoint / "colorizer.json").read_text())
    (checkpoint / "colorizer.json").write_text(json.dumps({**config, "step": 4}))
    losses = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (2, 4, 6)]
    write_lines(run / "train_loss.jsonl", losses + ['{"step": 8, "lo'])
    write_lines(run / "validation.jsonl", [json.dumps({"step": s, "val_loss": 2.0 / s}) for s in (4, 6)])
    return run


def test_an_export_carries_the_run_logs_up_to_its_step_and_a_reexport_keeps_them(run_with_logs, tmp_path):
    from export_model import export
    from training_log import read_log

    export(run_with_logs / "checkpoint-4", tmp_path / "model", overwrite=False)
    logs = tmp_path / "model" / "training"
    assert [e["step"] for e in read_log(logs / "train_loss.jsonl")] == [2, 4]
    assert read_log(logs / "validation.jsonl") == [{"step": 4, "val_loss": 0.5}]
    export(tmp_path / "model", tmp_path / "again", overwrite=False)
    assert (tmp_path / "again" / "training" / "train_loss.jsonl").read_text() == (logs / "train_loss.jsonl").read_text()


def test_moving_mean_averages_the_trailing_window():
    from experiments.plot_training import moving_mean

    assert np.allclose(moving_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])


def probe_file(path, sample: float, x0: float, gray: float = 20.0):
    path.write_text(json.dumps({"summary": {"sample": {"psnr": sample}, "x0": {"psnr": x0}, "gray": {"psnr": gray}}}))
    return path


def test_probes_are_ordered_by_step_and_the_compared_model_is_kept_apart(tmp_path):
    from experiments.plot_training import read_probes
    from utils import UserError

    specs = [f"9={probe_file(tmp_path / 'a.json', 21.0, 22.0)}", f"v1={probe_file(tmp_path / 'd.json', 25.0, 26.0)}",
             f"3={probe_file(tmp_path / 'b.json', 20.5, 21.5)}"]
    panel = read_probes("clips", specs)
    assert panel["steps"] == [3, 9]
    assert panel["scores"] == {"sample": [20.5, 21.0], "x0": [21.5, 22.0]}
    assert panel["compare"] == ("v1", {"sample": 25.0, "x0": 26.0}) and panel["gray"] == 20.0
    with pytest.raises(UserError, match="second model to compare with"):
        read_probes("clips", [*specs, f"v2={tmp_path / 'd.json'}"])


def test_a_probe_without_the_scored_variants_names_the_file_and_the_fix(tmp_path):
    from experiments.plot_training import read_probes
    from utils import UserError

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"summary": {"sample": {"psnr": 20.0}}}))
    with pytest.raises(UserError, match=r"partial\.json: has no x0 scores; rerun probe_limits\.py"):
        read_probes("clips", [f"5={partial}"])
    with pytest.raises(UserError, match="not STEP=FILE"):
        read_probes("clips", [str(partial)])


def test_plot_training_draws_an_exported_model(run_with_logs, tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    from export_model import export

    export(run_with_logs / "checkpoint-4", tmp_path / "model", overwrite=False)
    plot_training, out = str(REPO / "experiments" / "plot_training.py"), tmp_path / "curves.png"
    probe = probe_file(tmp_path / "p.json", 21.0, 22.0)
    result = subprocess.run([sys.executable, plot_training, "--run", str(tmp_path / "model"),
                             "--probes", "held-out clips", f"4={probe}", "--out", str(out)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 training and 1 validation points, up to step 4" in result.stdout
    assert out.stat().st_size > 10_000
    continued = subprocess.run([sys.executable, plot_training, "--run", str(tmp_path / "model"),
                                str(run_with_logs), "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert "5 training and 3 validation points, up to step 10" in continued.stdout  # the second run's 6 is step 10
    missing = subprocess.run([sys.executable, plot_training, "--run", str(tmp_path)],
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "train_loss.jsonl: not found" in missing.stderr
