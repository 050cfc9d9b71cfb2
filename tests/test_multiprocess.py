"""Several processes with Accelerate inside (gloo on the CPU): feature_extraction.py and train_diffusion.py started
as 2 processes make what 1 process makes.

Launchers: `torchrun --nproc_per_node 2 script.py --cpu` starts 2 processes; so does `accelerate launch --multi_gpu
--num_processes 2 script.py --cpu` (the script's CPU flag makes them gloo processes). `accelerate launch --cpu
--num_processes 2` starts a single process (Accelerate's multi-CPU mode goes through mpirun), so every test checks
that the scripts report 2 processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(script: str, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / script), *map(str, args)]


def accelerate_launch(script: str, *args) -> list[str]:
    with socket.socket() as probe:  # a free port: never the default 29500 another run may hold
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), str(REPO / script), *map(str, args)]


def single(script: str, *args) -> list[str]:
    return [sys.executable, str(REPO / script), *map(str, args)]


def run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert "terminate called" not in result.stderr  # gloo's abort when a process exits with its group open
    return result.stdout


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_components, frame_root) -> dict:
    """The same frames extracted by 1 process and by 2 (20 frames in 5 shards)."""
    folder = tmp_path_factory.mktemp("multiprocess")
    options = ["--dataroot", frame_root, "--image-size", 32, "--vae", tiny_components["vae"], "--vac",
               tiny_components["vac"], "--shard-size", 4, "--device", "cpu"]
    one = run(single("feature_extraction.py", *options, "--dataset-name", "one"), folder)
    two = run(accelerate_launch("feature_extraction.py", *options, "--dataset-name", "two"), folder)
    return {"folder": folder, "stdout": {"one": one, "two": two}}


def test_two_process_extraction_equals_one_process(extracted):
    stdout, data = extracted["stdout"], extracted["folder"] / "data"
    assert "1 process(es)" in stdout["one"] and "2 process(es)" in stdout["two"]
    # shards 0, 2, 4 (12 frames) in process 0 and shards 1, 3 (8 frames) in process 1
    assert "process 0 of 2: 3 shard(s), 12 frames" in stdout["two"]
    assert "process 1 of 2: 2 shard(s), 8 frames" in stdout["two"]
    assert not (data / "two" / "shards").exists()
    with np.load(data / "one" / "latent.npz") as one, np.load(data / "two" / "latent.npz") as two:
        assert sorted(one.files) == sorted(two.files)
        assert one["latents"].shape == (20, 4, 8, 8)
        for key in one.files:
            if one[key].dtype.kind == "f":
                np.testing.assert_allclose(two[key].astype(np.float32), one[key].astype(np.float32), atol=1e-3)
            else:
                assert np.array_equal(two[key], one[key]), key


TRAIN = ["--data", "data/one/latent.npz", "--net-dimension", 8, "--batch-size", 4, "--warmup-steps", 2,
         "--checkpoint-every", 2, "--keep-checkpoints", 10, "--validate-every", 4, "--log-every", 1, "--cpu"]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "train_loss.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def test_two_process_training_follows_the_one_process_run(extracted):
    """Same global batch of 4, same seed: 1 process, and 2 processes of 2 examples each; both run to step 4 and
    are resumed to step 8 (a run to 4 has another learning-rate schedule than a run to 8)."""
    from safetensors.torch import load_file

    folder = extracted["folder"]
    for name, launch in (("one", single), ("two", torchrun)):
        first = run(launch("train_diffusion.py", *TRAIN, "--run-name", name, "--max-steps", 4), folder)
        resumed = run(launch("train_diffusion.py", *TRAIN, "--run-name", name, "--max-steps", 8, "--resume"), folder)
        assert f"resumed unet_model/{name}/checkpoint-4 at step 4" in resumed
        processes = "1 process(es)" if name == "one" else "2 process(es)"
        assert processes in first and processes in resumed
    one, two = folder / "unet_model" / "one", folder / "unet_model" / "two"
    for run_dir in (one, two):  # one checkpoint per interval, one validation and sample grid per interval
        assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]
        assert [json.loads(line)["step"] for line in (run_dir / "validation.jsonl").read_text().splitlines()] == [4, 8]
        assert sorted(p.name for p in run_dir.glob("samples-*")) == ["samples-0000004.png", "samples-0000008.png"]
        assert not list(run_dir.glob(".*")), "temporaries left behind"
    curve_one, curve_two = losses(one), losses(two)
    assert list(curve_one) == list(curve_two) == list(range(1, 9))
    # The same batches, random draws and learning rates: the same run up to float rounding (the gradients are
    # averaged over 2 processes instead of summed over 4 examples)
    for step in curve_one:
        assert curve_two[step] == pytest.approx(curve_one[step], rel=1e-4), (curve_one, curve_two)
    # The EMA UNets: equal but for a few conv biases just before a GroupNorm, whose gradient is 0 up to rounding
    # noise and which Adam nevertheless moves by up to the learning rate (measured: 85 of 113,500 weights more
    # than 1e-5 apart, at most 2.3e-4; mean difference 5e-8)
    weights = [load_file(str(run_dir / "checkpoint-8" / "unet" / "diffusion_pytorch_model.safetensors"))
               for run_dir in (one, two)]
    difference = np.concatenate([(weights[0][k] - weights[1][k]).abs().flatten().numpy() for k in weights[0]])
    assert difference.mean() < 1e-6 and (difference > 1e-5).mean() < 0.005


def test_a_signal_to_one_process_stops_them_all_with_one_checkpoint(extracted):
    """SIGTERM to process 1 alone: both processes agree to stop after the same step and checkpoint together."""
    import psutil

    folder = extracted["folder"]
    command = torchrun("train_diffusion.py", *TRAIN, "--run-name", "stop", "--max-steps", 100000,
                       "--checkpoint-every", 100000, "--validate-every", 100000)
    launcher = subprocess.Popen(command, cwd=folder, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    run_dir, deadline = folder / "unet_model" / "stop", time.time() + 120
    try:
        while not (run_dir / "train_loss.jsonl").exists() and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        workers = [child for child in psutil.Process(launcher.pid).children(recursive=True)
                   if child.environ().get("RANK") == "1"]
        assert len(workers) == 1, "no process 1"
        workers[0].send_signal(signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:  # a hang: end the launcher and its workers
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert "process 1: SIGTERM: stopping after this step" in stdout, stderr[-3000:]
    checkpoints = [p.name for p in run_dir.glob("checkpoint-*")]
    assert len(checkpoints) == 1, checkpoints
    step = int(checkpoints[0].split("-")[1])
    assert f"stopped at step {step} with checkpoint-{step}" in stdout
    assert max(losses(run_dir)) == step
    assert launcher.returncode != 0  # the workers exit with 143, which torchrun reports as a failure


def test_batch_must_split_evenly(extracted):
    folder = extracted["folder"]
    command = torchrun("train_diffusion.py", *TRAIN, "--run-name", "odd", "--max-steps", 2, "--batch-size", 3)
    result = subprocess.run(command, cwd=folder, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "error: --batch-size 3: must be a multiple of the 2 processes" in result.stderr
    assert f'File "{REPO / "train_diffusion.py"}"' not in result.stderr  # a one-line error, no traceback
