"""bench.py in its short CI mode and experiments/bench_memory.py: they run end to end and report consistent numbers
(not how fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

BENCH_MEMORY = REPO / "experiments" / "bench_memory.py"


def test_bench_quick_compare_reports_speed_and_quality(tiny_model, tmp_path):
    report = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(REPO / "bench.py"), "--model", str(tiny_model), "--quick", "--compare",
                             "--height", "72", "--json", str(report)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "speed-up of ours over the paper's sampling" in result.stdout
    data = json.loads(report.read_text())
    ours, paper = data["results"][0], data["results"][1]
    assert ours["frames"] == 4 and paper["frames"] == 2
    assert paper["flags"].startswith("--sampler ddpm")
    for run in (ours, paper):
        assert abs(run["frames_per_second"] - run["frames"] / run["median_seconds"]) < 1e-9
        assert run["seconds_per_frame_by_stage"]["denoise (UNet)"] > 0
        assert 0 < run["psnr"] < 100 and run["gt_colorfulness"] > 0
    assert data["peak_rss_mib"] > 0


def test_bench_memory_reads_each_runs_own_peak(tiny_model, tmp_path):
    report = tmp_path / "memory.json"
    result = subprocess.run([sys.executable, str(BENCH_MEMORY), "--frames", "12", "4", "--height", "48",
                             "--width", "64", "--settings", f"--model {tiny_model} --steps 1", "--json", str(report)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(report.read_text())
    assert [run["frames"] for run in data["results"]] == [4, 12]
    peaks = [run["peak_rss_mib"] for run in data["results"]]
    assert all(100 < peak < 8192 for peak in peaks)  # a real process's RSS in MiB, not KiB or bytes
    assert abs(data["ratio"] - peaks[1] / peaks[0]) < 1e-9
    assert "peak RSS, 12 vs 4 frames" in result.stdout


def test_bench_memory_reports_a_failing_run_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH_MEMORY), "--frames", "2", "3", "--height", "48",
                             "--width", "64", "--settings", f"--model {tmp_path / 'missing'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "video_colorization.py failed" in result.stderr
