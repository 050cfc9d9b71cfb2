"""Resumable clips: a clip's work is kept in segments beside the output, so that the same command after a kill
continues where it stopped and writes what an uninterrupted run writes; a kept state of another run is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, files_under, interrupt_colorize_frames, panning_clip, run_main

SEGMENT = ["--segment-frames", "4", "--batch-size", "2"]  # a segment every two batches


def write_two_shots_with_audio(path: Path) -> None:
    """An mp4 of 14 frames, a scene cut at frame 7, with a sine tone as its audio."""
    import av
    import cv2
    from skimage import data

    coffee = [cv2.resize(data.coffee()[i : i + 300, 4 * i : 4 * i + 400], (64, 48), interpolation=cv2.INTER_AREA)
              for i in range(7)]
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=Fraction(25))
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=44100)
        for frame in panning_clip(7, (48, 64)) + coffee:
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        for k in range(25):
            chunk = av.AudioFrame.from_ndarray((0.3 * np.sin(np.arange(1024) * 0.05 + k)).astype(np.float32)[None],
                                               format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 44100, k * 1024
            out.mux(audio.encode(chunk))
        out.mux(video.encode())
        out.mux(audio.encode())


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shots") / "shots.mp4"
    write_two_shots_with_audio(path)
    return path


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model


def decoded(path: Path) -> list[np.ndarray]:
    from video_io import iter_clip_frames

    return list(iter_clip_frames(path))


def audio_packets(path: Path) -> list[bytes]:
    import av

    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]


def same_frames(a: Path, b: Path) -> bool:
    first, second = decoded(a), decoded(b)
    return len(first) == len(second) > 0 and max(np.abs(x.astype(int) - y).max() for x, y in zip(first, second)) == 0


# Guides and every generator: a keyframe carried backward (its results kept for the frames ahead), fresh noise per
# frame and a stochastic sampler.
GUIDED = ["--reference", "9=KEY", "--no-shared-noise", "--sampler", "ddpm", "--steps", "2"]


# Stopped inside the first segment, at a boundary, inside a later one.
@pytest.mark.parametrize("flags, stop_at", [([], 3), ([], 4), (GUIDED, 9)],
                         ids=["first-segment", "boundary", "keyframe-ddpm-fresh-noise"])
def test_a_stopped_run_resumes_to_the_uninterrupted_output(tmp_path, shots, model, monkeypatch, flags, stop_at):
    import pipeline
    from video_io import write_image_rgb

    key = tmp_path / "key.png"
    write_image_rgb(key, panning_clip(10, (48, 64))[9])
    flags = [flag.replace("KEY", str(key)) for flag in flags]

    def colorize(output: Path, *extra) -> tuple[int, str]:
        result = run_main("video_colorization", "--input", shots, "--output", output, "--model", model,
                          "--steps", "1", *SEGMENT, *flags, *extra, cwd=tmp_path)
        return result.code, result.stderr

    assert colorize(tmp_path / "whole" / "out.mp4")[0] == 0
    original = pipeline.colorize_frames
    interrupt_colorize_frames(monkeypatch, stop_at)
    output = tmp_path / "stopped" / "out.mp4"
    assert colorize(output)[0] == 130
    kept = stop_at // 4 * 4  # the frames of the segments committed before the stop
    assert files_under(output.parent) == ([] if kept == 0 else [".out.mp4.resume", *[
        f".out.mp4.resume/{start:08d}.mp4" for start in range(0, kept, 4)], ".out.mp4.resume/progress.pkl"])
    monkeypatch.setattr(pipeline, "colorize_frames", original)
    code, stderr = colorize(output)
    assert code == 0 and (f"resuming from frame {kept} of 14" in stderr) == (kept > 0)
    assert same_frames(output, tmp_path / "whole" / "out.mp4")
    assert audio_packets(output) == audio_packets(shots)
    assert files_under(output.parent) == ["out.mp4"]


def test_a_kept_state_of_another_run_is_refused(tmp_path, frame_root, model, monkeypatch):
    import pipeline

    def colorize(*extra) -> object:
        return run_main("video_colorization", "--input", frame_root / "pan", "--output", tmp_path / "out",
                        "--model", model, "--steps", "1", *SEGMENT, *extra, cwd=tmp_path)

    assert colorize("--output", tmp_path / "whole").code == 0
    original = pipeline.colorize_frames
    interrupt_colorize_frames(monkeypatch, 6)
    assert colorize().code == 130
    monkeypatch.setattr(pipeline, "colorize_frames", original)
    for extra, changed in ((["--seed", "1"], "settings"), (["--segment-frames", "6"], "settings"),
                           (["--input", frame_root / "pan_small"], "input")):
        result = colorize(*extra)
        assert result.code == 2 and f"{tmp_path / '.out.resume'}: holds the unfinished work of a run with another " \
            f"{changed}" in result.error and "--start-over" in result.error
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.resume" / "progress.pkl").exists()
    result = colorize("--seed", "1", "--start-over")
    assert result.code == 0 and "resuming" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "whole"]
    assert sorted(os.listdir(tmp_path / "out")) == [f"{i:05d}.png" for i in range(12)]


@pytest.mark.slow
def test_a_killed_command_continues_where_it_stopped(tmp_path, shots, model):
    """The real script killed with SIGKILL (nothing of it runs on the way out) at several points, started again
    each time with the same command: the output of an uninterrupted run, its audio, and nothing else beside it."""
    from pipeline import PROGRESS_FILE, resume_folder

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def command(output: Path) -> list[str]:  # 60 steps: a segment takes about 0.9 s on 2 idle cores (20: 0.3 s,
        # when a kill 0.3 s after a commit could land after the last segment), so the waits below fall inside one
        return [sys.executable, str(REPO / "video_colorization.py"), "--input", str(shots), "--output", str(output),
                "--model", str(model), "--steps", "60", *SEGMENT]

    subprocess.run(command(tmp_path / "whole.mp4"), cwd=tmp_path, env=env, check=True, capture_output=True)
    output = tmp_path / "out" / "out.mp4"
    progress = resume_folder(output) / PROGRESS_FILE
    kills = []
    for wait in (0.0, 0.3, 0.0):  # at a segment boundary (as it is committed), then inside a segment
        run = subprocess.Popen(command(output), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        before = progress.stat().st_mtime_ns if progress.exists() else 0
        deadline = time.time() + 300
        while (not progress.exists() or progress.stat().st_mtime_ns == before) and run.poll() is None \
                and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(wait)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert run.returncode == -signal.SIGKILL, "the kill came too late"
        kills.append(sorted(p.name for p in output.parent.iterdir()))
    assert any(len(names) > 1 for names in kills)  # a hidden temporary or the kept work was there
    finished = subprocess.run(command(output), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resuming from frame " in finished.stderr
    assert same_frames(output, tmp_path / "whole.mp4")
    assert audio_packets(output) == audio_packets(shots)
    assert files_under(output.parent) == ["out.mp4"]


def test_long_work_reports_its_progress_in_a_log(tmp_path, frame_root, model):
    """Without a terminal (the bar's place), each segment kept prints the frames done, frames/s and time left."""
    import re

    result = run_main("video_colorization", "--input", frame_root / "pan", "--output", tmp_path / "out.mp4",
                      "--model", model, "--steps", "1", *SEGMENT, cwd=tmp_path)
    assert result.code == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("pan: ")]
    assert len(lines) == 2, result.stderr[-3000:]
    for line, done in zip(lines, (4, 8)):
        assert re.fullmatch(rf"pan: {done} of 12 frames, \d+\.\d\d frames/s, \d\d:\d\d left", line), line
