"""Peak memory of video_colorization.py against video length: streaming means a long film needs no more memory
than a short clip.

  python experiments/bench_memory.py               # 300 and 3000 frames at 854x480 (about 12 min here)
  python experiments/bench_memory.py --frames 30 300 --settings "--steps 1"

Each length gets a grayscale 854x480 mp4 (a slow pan over scikit-image photos, two shots), colorized with the
default settings (plus --settings) in a process of its own, whose peak resident memory (ru_maxrss) is read when it
ends. Prints a table and the ratio of the longest to the shortest.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from demo import make_demo_clip
from utils import UserError, run_cli


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", nargs="+", type=int, default=[300, 3000], help="video lengths to compare")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=854)
    parser.add_argument("--settings", default="", help="extra video_colorization.py flags, quoted")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def peak_memory_of_colorization(clip: Path, output: Path, settings: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one video_colorization.py process, read from its own rusage."""
    command = [sys.executable, str(REPO / "video_colorization.py"), "--input", str(clip), "--output", str(output),
               *settings]
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the child
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not every child's maximum
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            log.seek(0)
            raise UserError(f"{clip}: video_colorization.py failed ({log.read().strip().splitlines()[-1]})")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB


def main() -> None:
    args = parse_args()
    if min(args.frames) < 2:
        raise UserError("--frames: each length must be at least 2 (the clip has two shots)")
    settings = shlex.split(args.settings)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for frame_count in sorted(args.frames):
            clip = Path(folder) / f"gray_{frame_count}.mp4"
            make_demo_clip(clip, frame_count, (args.height, args.width), Fraction(30000, 1001))
            peak, seconds = peak_memory_of_colorization(clip, Path(folder) / f"color_{frame_count}.mp4", settings)
            results.append({"frames": frame_count, "peak_rss_mib": peak, "seconds": seconds})
            print(f"{frame_count:6d} frames: peak RSS {peak:7.1f} MiB, {seconds:6.1f} s ({frame_count / seconds:.2f} "
                  f"frames/s)", flush=True)
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    print(f"peak RSS, {results[-1]['frames']} vs {results[0]['frames']} frames: {ratio:.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"size": f"{args.width}x{args.height}", "settings": args.settings,
                                         "results": results, "ratio": ratio, "argv": sys.argv}, indent=1))


if __name__ == "__main__":
    run_cli(main)
