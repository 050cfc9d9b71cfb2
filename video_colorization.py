"""Stage 3: colorize grayscale video -> video_output/<name>_color.mp4 (or a folder of PNG frames).

  python video_colorization.py --input old_film.mp4
  python video_colorization.py --input frames_folder/ --output out_frames/      # lossless PNG frames
  python video_colorization.py --input clips/ --model runs/mine                 # every clip in a folder
  torchrun --nproc_per_node 4 video_colorization.py --input clips/ --output out/ --skip-existing  # 4 processes

Each frame is resized to the model's working size (aspect ratio kept), its chroma is sampled by the latent
diffusion model, upsampled to the input size and recombined with the input's own luminance, so detail and
resolution are the input's. Frames of one shot share their initial noise and the previous frame's colours are
carried along the optical flow, so colours do not flicker; a scene cut starts a new shot.
`--sampler ddpm --steps 1000 --no-shared-noise --propagation 0` reproduces the paper's sampling.

This file is the command line (its flags, the outputs planned and checked before any work, several processes sharing
a folder of clips); the colorization itself is pipeline.py's, shared with the app, bench.py and the experiments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from colorizer import DEFAULT_MODEL, load_colorizer
from demo import make_demo_clip
from pipeline import (BIT_DEPTHS, DEFAULTS, SEGMENT_FRAMES, ColorizationOptions, add_sampling_arguments, colorize_clip,
                      positive_int, take_options)
from utils import UserError, check_writable, choose_device, run_cli, seed_everything
from video_io import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, clip_name, list_clips


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ColorizationOptions]:
    """The command line: what to colorize, where, with which model and device (the namespace), and how (the
    options)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", "--dataroot", dest="input", type=Path,
                        help="a video file, a frame folder, or a folder of videos / frame folders")
    source.add_argument("--demo", action="store_true",
                        help="make a short grayscale clip from scikit-image's photos and colorize it (no download)")
    parser.add_argument("--output", type=Path, help="an .mp4 file, or a folder (PNG frames); "
                        "default: video_output/<name>_color.mp4")
    parser.add_argument("--png", action="store_true", help="write lossless PNG frames instead of mp4 when --output "
                        "names a folder of clips (or is not given)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder or training run folder")
    parser.add_argument("--vae", help="use this VAE instead of the one colorizer.json names (it must be the one the "
                        "model was trained with, e.g. after moving it)")
    parser.add_argument("--vac", help="use this VAC instead of the one colorizer.json names (same rule)")
    add_sampling_arguments(parser)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--crf", type=int, default=DEFAULTS.crf, help="H.264 quality of the output video: lower is "
                        "better and larger; 0 is lossless (the output's luma is then the input's, to within one level)")
    parser.add_argument("--bit-depth", default=DEFAULTS.bit_depth, choices=BIT_DEPTHS,
                        help="bits per sample of the output video (PNG frames: 8 or 16); auto: 10 for inputs of more "
                        "than 8 bits, else 8. 10-bit H.264 does not play in browsers or on most hardware decoders")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    existing.add_argument("--skip-existing", action="store_true", help="keep existing outputs and colorize only the "
                          "clips without one: a killed or failed run over a folder of clips resumes")
    parser.add_argument("--start-over", action="store_true", help="discard the work a killed run kept beside an "
                        "output (.<output>.resume) and colorize its clip from frame 0; without it the same command "
                        "continues where the killed run stopped")
    parser.add_argument("--segment-frames", type=positive_int, default=SEGMENT_FRAMES,
                        help="frames of work kept at a time (rounded up to whole batches): what a killed run redoes "
                        "at most")
    args = parser.parse_args(argv)
    return args, take_options(args)


def output_path(clip: Path, output: Path | None, several: bool, png: bool) -> Path:
    """Without --output: video_output/<name>_color.mp4. For a folder of clips, --output is a folder that gets
    <name>.mp4 (or <name>/ PNG frames with --png): the clip names evaluate.py matches against the ground truth."""
    name = clip_name(clip)
    if output is None:
        return Path("video_output") / (f"{name}_color" if png else f"{name}_color.mp4")
    if several:
        return output / (name if png else f"{name}.mp4")
    return output


def plan_outputs(clips: list[Path], args: argparse.Namespace, options: ColorizationOptions) -> list[tuple[Path, Path]]:
    """Each clip with its output, all checked before any work, so a run never stops half-way through a folder on
    an output problem: the format, an existing output (kept unless --overwrite; --skip-existing skips its clip
    later), two clips writing one output, and a folder that cannot be written."""
    several = len(clips) > 1 or (args.input.is_dir() and clips[0] != args.input)
    plan, seen = [], {}
    for clip in clips:
        output = output_path(clip, args.output, several, args.png)
        suffix = output.suffix.lower()
        if suffix in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS and suffix != ".mp4":
            raise UserError(f"{output}: only .mp4 videos or folders of PNG frames are written; use an .mp4 name or a "
                            f"folder name")
        if output.resolve() in seen:
            raise UserError(f"{output}: both {seen[output.resolve()]} and {clip} would be written there; rename one")
        seen[output.resolve()] = clip
        if output.resolve() == clip.resolve():
            raise UserError(f"{output}: is the input itself; choose another --output")
        if output.exists() and not (options.overwrite or args.skip_existing):
            raise UserError(f"{output}: already exists; pass --overwrite to replace it, --skip-existing to keep it, "
                            f"or choose another --output")
        check_writable(output.parent, "an --output")
        plan.append((clip, output))
    return plan


def process_share() -> tuple[int, int, int]:
    """(rank, number of processes, local rank) from the variables torchrun and `accelerate launch` set; (0, 1, 0)
    for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def process_device(name: str, local_rank: int, world: int) -> torch.device:
    """--device, checked; under a launcher, `cuda` (or auto) means each process's own GPU, cuda:<local rank> (more
    processes than GPUs share them), while an explicit cuda:<n> stays as given."""
    device = choose_device(name)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def connect_processes(rank: int, world: int) -> torch.distributed.Store | None:
    """The launcher's key-value store (torchrun's, which `accelerate launch` uses too), where the processes leave
    their failures at the end; None for a single process. No process group: the processes never wait for each
    other during the work."""
    if world == 1:
        return None
    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://", rank, world))
    # A restart by the launcher (--max-restarts) starts a fresh round in the same store.
    return dist.PrefixStore(f"video_colorization/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def gather_failures(store: torch.distributed.Store | None, failures: list[str], rank: int, world: int) -> list[str]:
    """Every process's failed clips for the main process once all processes are done, [] for the others. A
    process that exits with an error makes the launcher stop the others, so only the main process reports, after
    waiting for the rest in short polls (a blocking wait would not see a Ctrl-C or SIGTERM until it ends)."""
    if store is None:
        return failures
    store.set(f"failures/{rank}", json.dumps(failures))
    finished = store.add("finished", 1)
    if rank > 0:
        return []
    while finished < world:
        time.sleep(0.5)
        finished = store.add("finished", 0)
    return [message for other in range(world) for message in json.loads(store.get(f"failures/{other}"))]


def main() -> None:
    args, options = parse_args()
    options.check()
    if args.demo:
        original = Path("video_output") / "demo.mp4"
        args.input = make_demo_clip(Path("video_output") / "demo_gray.mp4", original=original)
        print(f"demo input: {args.input} (its colour original, to score the output against: {original})")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(options.seed)
    clips = list_clips(args.input)
    if (options.reference or options.hints) and len(clips) > 1:
        raise UserError(f"{args.input}: holds {len(clips)} clips, and --reference / --hints colour one clip; pass a "
                        f"single video or frame folder")
    plan = plan_outputs(clips, args, options)  # every process checks every output, so all refuse a bad plan alike
    rank, world, local_rank = process_share()
    device = process_device(args.device, local_rank, world)
    if not args.model.exists():
        raise UserError(f"{args.model}: model folder not found; pass --model runs/<run> (a training run) or a model "
                        f"folder, or restore unet_model/default")
    # Clips rank, rank + N, ... of the sorted list, split before skipping finished ones: the split must not depend
    # on when each process looks at the outputs.
    mine = plan[rank::world]
    todo = [(clip, output) for clip, output in mine if not (args.skip_existing and output.exists())]
    store = connect_processes(rank, world)
    prefix = f"process {rank} of {world}: " if world > 1 else ""
    if world > 1 or len(todo) < len(mine):
        print(f"{prefix}{len(todo)} clip(s) to colorize, {len(mine) - len(todo)} already done, on {device}", flush=True)
    colorizer = load_colorizer(args.model, device, args.vae, args.vac)
    failures = []
    for number, (clip, output) in enumerate(todo, 1):
        try:
            count = colorize_clip(colorizer, clip, output, options, frame_bar=world == 1, start_over=args.start_over,
                                  segment_frames=args.segment_frames)
        except UserError as error:
            if len(plan) == 1 and world == 1:
                raise  # a single clip: its own message is the whole report
            failures.append(str(error))  # reported now and in the summary; the other clips go on
            print(f"{prefix}[{number}/{len(todo)}] failed: {error}", file=sys.stderr, flush=True)
            continue
        print(f"{prefix}[{number}/{len(todo)}] {clip} -> {output} ({count} frames)", flush=True)
    failures = gather_failures(store, failures, rank, world)
    if failures:
        raise UserError(f"{len(failures)} of {len(plan)} clips failed, the others are done: {' | '.join(failures)}; "
                        f"then run again with --skip-existing, which colorizes only the clips without an output")


if __name__ == "__main__":
    run_cli(main)
