"""Benchmark the whole colorization pipeline (pipeline.colorize_frames, as video_colorization.py runs it): frames/s,
seconds per frame by stage, peak memory, and (with a ground truth) quality from metrics.py. Each setting runs
--repeats times; the median is reported.

  python bench.py                                   # our defaults on a 854x480 clip made from scikit-image photos
  python bench.py --clip ../shared/data/val/sam2__05_default_juggle --frames 32
  python bench.py --compare                         # + the paper's sampling (DDPM, 1000 steps, independent frames)
  python bench.py --reference                       # guided: the clip's first colour frame is the keyframe
  python bench.py --exemplar                        # exemplar: the first colour frame, mirrored and cropped
  python bench.py --quick                           # CI: checks it works, not how fast

The clip is colour: it is the ground truth, and its grayscale version is what the colorizer sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from colorizer import DEFAULT_MODEL, load_colorizer
from demo import demo_frames
from pipeline import ColorizationOptions, colorize_frames, parse_options
from utils import UserError, choose_device, rgb_to_gray, run_cli
from video_io import iter_clip_frames

PAPER = ColorizationOptions(sampler="ddpm", steps=1000, guidance=1.0, saturation=1.0, shared_noise=False,
                            propagation=0.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--clip", type=Path, help="colour clip (video or frame folder); default: scikit-image photos")
    parser.add_argument("--height", type=int, default=480, help="frames are resized to this height (854x480 default)")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="also run the paper's settings and print the ratio")
    parser.add_argument("--paper-frames", type=int, default=8, help="frames for the (slow) paper settings")
    parser.add_argument("--settings", default="", help="video_colorization.py's sampling flags for our run (--sampler "
                        "... --batch-size), quoted")
    parser.add_argument("--reference", action="store_true",
                        help="time guided colorization: the first colour frame is the keyframe (--reference)")
    parser.add_argument("--exemplar", action="store_true",
                        help="time exemplar colorization (--exemplar): the first colour frame mirrored left-right and "
                        "centre-cropped to 80%% of each side, so only feature correspondence can carry its colours")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI: 4 frames, 1 repeat, 2 steps")
    return parser.parse_args()


def load_clip(args: argparse.Namespace) -> list[np.ndarray]:
    if args.clip is None:
        frames = list(demo_frames(args.frames, (args.height, round(args.height * 854 / 480))))
    else:
        frames = list(itertools.islice(iter_clip_frames(args.clip), args.frames))
    if not frames:
        raise UserError(f"{args.clip}: no frames; pass a colour video or frame folder")
    return [f if f.shape[0] == args.height else resize_to_height(f, args.height) for f in frames]


def resize_to_height(frame: np.ndarray, height: int) -> np.ndarray:
    import cv2

    width = round(frame.shape[1] * height / frame.shape[0])
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)


class StageClock:
    """Accumulates wall time per stage: module forwards through hooks, the rest through `measure`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def hook(self, module: torch.nn.Module, stage: str) -> None:
        module.register_forward_pre_hook(lambda *_: self._started.__setitem__(stage, time.perf_counter()))
        module.register_forward_hook(lambda *_: self.add(stage, time.perf_counter() - self._started[stage]))

    @contextmanager
    def measure(self, stage: str):
        start = time.perf_counter()
        yield
        self.add(stage, time.perf_counter() - start)

    def timed(self, stage: str, frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        iterator = iter(frames)
        while True:
            with self.measure(stage):
                frame = next(iterator, None)
            if frame is None:
                return
            yield frame


def run_once(colorizer, clock: StageClock, gray_frames: list[np.ndarray], settings: ColorizationOptions,
             keyframe: np.ndarray | None, exemplar: np.ndarray | None) -> tuple[float, list]:
    """Colorize the decoded clip (with `keyframe` as frame 0's reference, `exemplar` as --exemplar); returns the wall
    time and the outputs."""
    from correspondence import load_exemplars
    from guidance import GuidePropagator, propagation_size, reference_guide

    start = time.perf_counter()
    guides = exemplars = None
    if keyframe is not None:
        guides = GuidePropagator([reference_guide(keyframe, 0, propagation_size(*keyframe.shape[:2]))])
    if exemplar is not None:
        exemplars = load_exemplars([exemplar], settings.learned_metric)
    outputs = list(clock.timed("colorize (total)", colorize_frames(colorizer, iter(gray_frames), settings,
                                                                   gray_frames[0].shape[:2], guides, exemplars)))
    return time.perf_counter() - start, outputs


def time_codec(frames: list[np.ndarray], clock: StageClock, folder: Path) -> None:
    """Encode the frames to H.264 and decode them again, as the real pipeline does at both ends."""
    from fractions import Fraction

    from video_io import VideoWriter

    path = folder / "bench.mp4"
    with clock.measure("encode video"), \
            VideoWriter(path, frames[0].shape[1], frames[0].shape[0], Fraction(25)) as writer:
        for frame in frames:
            writer.write(frame)
    with clock.measure("decode video"):
        count = sum(1 for _ in iter_clip_frames(path))
    assert count == len(frames)


def bench_setting(name: str, settings: ColorizationOptions, colorizer, color_frames, args) -> dict:
    import tempfile

    from metrics import evaluate_clip

    gray_frames = [np.repeat(rgb_to_gray(f)[..., None], 3, axis=2) for f in color_frames]
    from correspondence import mirrored_crop, shared_matcher

    runs = []
    modules = {"denoise (UNet)": colorizer.unet, "VAC tokens": colorizer.vac, "VAE decode": colorizer.vae.decoder}
    if colorizer.color_heads:  # the backbone's passes feed the VAC's head and the colour heads, not vac()
        modules |= {"VAC backbone": colorizer.vac.backbone,
                    **{f"{name} backbone": backbone for name, backbone in colorizer.head_backbones.items()},
                    **{f"colour head {i + 1}": head for i, head in enumerate(colorizer.color_heads)}}
    if args.exemplar:
        modules["correspondence features"] = shared_matcher(settings.learned_metric).network
    for _ in range(args.repeats):
        clock = StageClock()
        for stage, module in modules.items():
            clock.hook(module, stage)
        keyframe = color_frames[0] if args.reference else None
        exemplar = mirrored_crop(color_frames[0]) if args.exemplar else None
        seconds, outputs = run_once(colorizer, clock, gray_frames, settings, keyframe, exemplar)
        with tempfile.TemporaryDirectory() as folder:
            time_codec(outputs, clock, Path(folder))
        total = seconds + clock.seconds["encode video"] + clock.seconds["decode video"]
        runs.append({"seconds": total, "stages": clock.seconds})
        for module in modules.values():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
    median = statistics.median(r["seconds"] for r in runs)
    stages = {k: statistics.median(r["stages"].get(k, 0.0) for r in runs) / len(color_frames)
              for k in runs[0]["stages"]}
    quality = evaluate_clip(iter(outputs), iter(color_frames))
    return {"setting": name, "flags": " ".join(settings.flags()), "frames": len(color_frames), "median_seconds": median,
            "frames_per_second": len(color_frames) / median, "seconds_per_frame_by_stage": stages,
            "psnr": quality["psnr"], "ssim": quality["ssim"], "cdc": quality["cdc"],
            "colorfulness": quality["colorfulness"],
            "gt_cdc": quality["gt_cdc"], "gt_colorfulness": quality["gt_colorfulness"],
            "all_runs_seconds": [r["seconds"] for r in runs]}


def print_result(result: dict) -> None:
    print(f"\n== {result['setting']}: {result['flags'] or 'defaults'}")
    print(f"{result['frames']} frames at {result['median_seconds']:.2f} s "
          f"(median of {len(result['all_runs_seconds'])}): {result['frames_per_second']:.2f} frames/s")
    for stage, seconds in sorted(result["seconds_per_frame_by_stage"].items(), key=lambda kv: -kv[1]):
        print(f"  {stage:<20} {seconds * 1000:8.1f} ms/frame")
    print(f"  PSNR {result['psnr']:.2f} dB  SSIM {result['ssim']:.4f}  CDC {result['cdc']:.5f} "
          f"(GT {result['gt_cdc']:.5f})  colorfulness {result['colorfulness']:.1f} "
          f"(GT {result['gt_colorfulness']:.1f})")


def main() -> None:
    args = parse_args()
    if args.quick:
        args.frames, args.repeats, args.paper_frames = 4, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    colorizer = load_colorizer(args.model, choose_device(args.device))
    color_frames = load_clip(args)
    ours = parse_options(args.settings.split())
    if args.quick:
        ours = dataclasses.replace(ours, steps=2)
    name = "ours, first frame given" if args.reference else "ours, exemplar" if args.exemplar else "ours"
    results = [bench_setting(name, ours, colorizer, color_frames, args)]
    print_result(results[0])
    if args.compare:
        paper = PAPER if not args.quick else dataclasses.replace(PAPER, steps=3)
        subset = color_frames[: args.paper_frames]
        results.append(bench_setting("paper", paper, colorizer, subset, args))
        print_result(results[1])
        # Quality is compared on the same frames: ours again, on the paper run's subset.
        results.append(bench_setting("ours, paper's frames", ours, colorizer, subset, args))
        print_result(results[2])
        per_frame = [r["median_seconds"] / r["frames"] for r in results]
        print(f"\nspeed-up of ours over the paper's sampling: {per_frame[1] / per_frame[0]:.1f}x per frame; "
              f"PSNR difference on the same {len(subset)} frames: {results[2]['psnr'] - results[1]['psnr']:+.2f} dB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory {peak:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "peak_rss_mib": peak, "argv": sys.argv}, indent=2))


if __name__ == "__main__":
    run_cli(main)
