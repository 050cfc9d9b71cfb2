"""Several processes with Accelerate inside (gloo on the CPU): feature_extraction.py and train_diffusion.py started
as 2 processes make what 1 process makes; so does video_colorization.py over a folder of clips, split between them.

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

from conftest import REPO, panning_clip

pytestmark = pytest.mark.slow  # several processes: minutes in all

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
        assert f"resumed runs/{name}/checkpoint-4 at step 4" in resumed
        processes = "1 process(es)" if name == "one" else "2 process(es)"
        assert processes in first and processes in resumed
    one, two = folder / "runs" / "one", folder / "runs" / "two"
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
    run_dir, deadline = folder / "runs" / "stop", time.time() + 120
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


# ---------------------------------------------------------------------------------------------------------------
# video_colorization.py over a folder of clips: process k of N colorizes clips k, k+N, ...


def colorize(launch, clips: Path, output: Path, model: Path, *extra, cwd: Path) -> subprocess.CompletedProcess:
    command = launch("video_colorization.py", "--input", clips, "--output", output, "--png", "--model", model,
                     "--steps", 1, "--device", "cpu", *extra)
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def write_frames(folder: Path, frames: list[np.ndarray]) -> None:
    from video_io import write_image_rgb

    folder.mkdir()
    for i, frame in enumerate(frames):
        write_image_rgb(folder / f"{i:05d}.png", frame)


def read_outputs(folder: Path) -> dict[str, np.ndarray]:
    """Every output frame under `folder` (clip/00000.png ...), by path; hidden temporaries included."""
    from video_io import read_image_rgb

    return {str(p.relative_to(folder)): read_image_rgb(p) for p in sorted(folder.rglob("*.png"))}


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tiny_model) -> dict:
    """Six 48x64 clips, colorized by 1 process and by 2: a, b, c.mp4, d, e.mp4, f in sorted order, so process 0
    takes a, c.mp4, e.mp4 and process 1 b, d, f. Two are broken, one in each process: c.mp4 lost its second half
    (with its index) and d/00001.png is not an image."""
    from fractions import Fraction

    from video_io import VideoWriter

    folder = tmp_path_factory.mktemp("batch")
    clips = folder / "clips"
    clips.mkdir()
    frames = panning_clip(3, (48, 64))
    for shift, name in enumerate(("a", "b", "d", "f")):
        write_frames(clips / name, [np.roll(frame, 9 * shift, axis=1) for frame in frames])
    (clips / "d" / "00001.png").write_text("not an image\n")
    with VideoWriter(clips / "e.mp4", 64, 48, Fraction(25)) as writer:
        for frame in frames[::-1]:
            writer.write(frame)
    video = (clips / "e.mp4").read_bytes()
    (clips / "c.mp4").write_bytes(video[: len(video) // 2])
    runs = {name: colorize(launch, clips, folder / name, tiny_model, cwd=folder)
            for name, launch in (("one", single), ("two", torchrun))}
    return {"folder": folder, "clips": clips, "model": tiny_model, "runs": runs}


def test_two_processes_colorize_a_folder_as_one_does_and_report_its_bad_clips(batch):
    folder, runs = batch["folder"], batch["runs"]
    for name, result in runs.items():
        assert result.returncode != 0, result.stdout
        assert f'File "{REPO / "video_colorization.py"}"' not in result.stderr  # no traceback of the script
        # one summary line, from the main process, naming both bad clips (one failed in each process) and the fix
        summaries = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(summaries) == 1, result.stderr[-3000:]
        assert summaries[0].startswith("error: 2 of 6 clips failed, the others are done: ")
        assert "c.mp4: cannot be read as a video" in summaries[0]
        assert "d/00001.png: cannot be decoded as an image" in summaries[0]
        assert summaries[0].endswith("run again with --skip-existing, which colorizes only the clips without an output")
        assert "terminate called" not in result.stderr
    assert runs["one"].returncode == 2
    assert "[3/6] failed: " in runs["one"].stderr and "[4/6] failed: " in runs["one"].stderr
    stdout = runs["two"].stdout
    assert "process 0 of 2: 3 clip(s) to colorize, 0 already done, on cpu" in stdout
    assert "process 1 of 2: 3 clip(s) to colorize, 0 already done, on cpu" in stdout
    assert f"process 1 of 2: [3/3] {batch['clips'] / 'f'} -> {folder / 'two' / 'f'} (3 frames)" in stdout
    assert "process 1 of 2: [2/3] failed: " in runs["two"].stderr
    # the good clips, whole; nothing of the bad ones, no temporaries; 2 processes write what 1 process writes
    for name in ("one", "two"):
        assert sorted(p.name for p in (folder / name).iterdir()) == ["a", "b", "e", "f"]
    one, two = read_outputs(folder / "one"), read_outputs(folder / "two")
    assert sorted(one) == sorted(two) and len(one) == 12
    for path in one:
        assert np.array_equal(one[path], two[path]), path


def test_a_rerun_with_skip_existing_colorizes_only_what_is_missing(batch):
    """The bad clips removed and two finished outputs lost (as a killed run loses the clips it had not finished):
    a rerun refuses the existing outputs, unless --skip-existing, which redoes only the lost ones."""
    import shutil

    folder, model = batch["folder"], batch["model"]
    clips, output = folder / "fixed_clips", folder / "resumed"
    shutil.copytree(batch["clips"], clips)
    (clips / "c.mp4").unlink()
    shutil.rmtree(clips / "d")
    shutil.copytree(folder / "two", output)
    for lost in ("b", "e"):
        shutil.rmtree(output / lost)
    kept = mtimes(output)
    refused = colorize(single, clips, output, model, cwd=folder)
    assert refused.returncode == 2 and f"error: {output / 'a'}: already exists; pass --overwrite to replace it, " \
        "--skip-existing to keep it" in refused.stderr
    # a, b, e.mp4, f: process 0 takes a (done) and e.mp4, process 1 b and f (done)
    result = colorize(torchrun, clips, output, model, "--skip-existing", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 2: 1 clip(s) to colorize, 1 already done" in result.stdout
    assert "process 1 of 2: 1 clip(s) to colorize, 1 already done" in result.stdout
    assert {path: mtime for path, mtime in mtimes(output).items() if path in kept} == kept  # untouched
    resumed, first = read_outputs(output), read_outputs(folder / "one")
    assert sorted(resumed) == sorted(first)
    for path in resumed:
        assert np.array_equal(resumed[path], first[path]), path


def test_a_killed_batch_stops_at_once_and_leaves_only_whole_outputs(batch):
    """SIGTERM to the launcher while process 0, done with its clip, waits for process 1, which is in the middle
    of a long clip: both stop on the signal (the waiting one too, not 30 s later by the launcher's SIGKILL), and
    no half output remains."""
    folder = batch["folder"]
    clips, output = folder / "kill_clips", folder / "killed"
    clips.mkdir()
    frame = panning_clip(1, (48, 64))[0]
    write_frames(clips / "a", [frame] * 2)
    write_frames(clips / "b", [frame] * 400)  # seconds of work
    command = torchrun("video_colorization.py", "--input", clips, "--output", output, "--png", "--model",
                       batch["model"], "--steps", 1, "--device", "cpu")
    log = folder / "killed.log"  # a file, read while the processes write it
    with log.open("w") as stdout:
        launcher = subprocess.Popen(command, cwd=folder, env=ENV, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
    deadline = time.time() + 300
    try:
        # process 0 has finished a and waits, and process 1 has begun writing b
        while not ("process 0 of 2: [1/1]" in log.read_text() and list(output.glob(".b.*"))) \
                and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert launcher.poll() is None and not (output / "b").exists(), "the kill came too late"
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert stderr.count("interrupted (SIGTERM)") == 2, stderr[-3000:]
    assert "Unable to shutdown process" not in stderr  # torchrun's SIGKILL, 30 s after a SIGTERM went unheard
    # b's work kept for a rerun (if a segment of it was done), hidden beside where its output will be
    assert [p.name for p in output.iterdir() if p.name != ".b.resume"] == ["a"]
