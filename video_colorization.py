"""Stage 3: colorize grayscale video -> video_output/<name>_color.mp4 (or a folder of PNG frames).

  python video_colorization.py --input old_film.mp4
  python video_colorization.py --input frames_folder/ --output out_frames/      # lossless PNG frames
  python video_colorization.py --input clips/ --model unet_model/mine          # every clip in a folder

Each frame is resized to the model's working size (aspect ratio kept), its chroma is sampled by the latent
diffusion model, upsampled to the input size and recombined with the input's own luminance, so detail and
resolution are the input's. Frames of one clip share their initial noise, so colours do not flicker from fresh
noise in every frame. `--sampler ddpm --steps 1000` reproduces the paper's sampling.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from colorizer import SAMPLERS, Colorizer, chroma_of, combine, load_colorizer, prepare_gray
from utils import (UserError, VideoWriter, atomic_path, choose_device, iter_clip_frames, list_clips, probe_clip,
                   rgb_to_gray, run_cli, seed_everything, write_image_rgb)

DEFAULT_MODEL = Path(__file__).resolve().parent / "unet_model" / "default"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", "--dataroot", dest="input", type=Path, required=True,
                        help="a video file, a frame folder, or a folder of videos / frame folders")
    parser.add_argument("--output", type=Path, help="an .mp4 file, or a folder (PNG frames); "
                        "default: video_output/<name>_color.mp4")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder or training run folder")
    parser.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per frame")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance on the VAC tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="frames denoised together")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser.parse_args(argv)


def batched(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def colorize_frames(colorizer: Colorizer, frames: Iterator[np.ndarray], args: argparse.Namespace,
                    first_frame_shape: tuple[int, int]) -> Iterator[np.ndarray]:
    """Yield the colorized frames of one clip, streaming in batches of --batch-size."""
    height, width = first_frame_shape
    size = colorizer.working_size(height, width)
    shared_noise = torch.randn(colorizer.latent_shape(height, width), generator=torch.Generator().manual_seed(args.seed))
    for batch in batched(frames, args.batch_size):
        gray = np.stack([rgb_to_gray(frame) for frame in batch])
        noise = shared_noise.expand(len(batch), -1, -1, -1)
        latents = colorizer.sample_latents(prepare_gray(gray, size), noise, args.sampler, args.steps, args.guidance)
        for g, rgb in zip(gray, colorizer.decode_rgb(latents)):
            yield combine(g, chroma_of(rgb))


def default_output(clip: Path, output: Path | None, several: bool) -> Path:
    name = clip.stem if clip.is_file() else clip.name
    if output is None:
        return Path("video_output") / f"{name}_color.mp4"
    return output / f"{name}_color.mp4" if several else output


def colorize_clip(colorizer: Colorizer, clip: Path, output: Path, args: argparse.Namespace) -> int:
    """Colorize one clip into `output` (.mp4 or a PNG folder), written to a temporary path and renamed at the end."""
    info = probe_clip(clip)
    if info.frame_count == 0:
        raise UserError(f"{clip}: has no frames; pass a video with at least one frame")
    written = 0
    as_video = output.suffix.lower() == ".mp4"
    with atomic_path(output, overwrite=args.overwrite, is_dir=not as_video) as temp:
        colorized = colorize_frames(colorizer, iter_clip_frames(clip), args, (info.height, info.width))
        if as_video:
            with VideoWriter(temp, info.width, info.height, info.fps) as writer:
                for frame in colorized:
                    writer.write(frame)
                    written += 1
        else:
            for frame in colorized:
                write_image_rgb(temp / f"{written:05d}.png", frame)
                written += 1
    return written


def main() -> None:
    from tqdm import tqdm

    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    clips = list_clips(args.input)
    device = choose_device(args.device)
    if not args.model.exists():
        raise UserError(f"{args.model}: model folder not found; pass --model unet_model/<run> or restore unet_model/default")
    colorizer = load_colorizer(args.model, device)
    several = len(clips) > 1 or (args.input.is_dir() and clips[0] != args.input)
    for clip in tqdm(clips, desc="clips", disable=len(clips) == 1):
        output = default_output(clip, args.output, several)
        count = colorize_clip(colorizer, clip, output, args)
        print(f"{clip} -> {output} ({count} frames)")


if __name__ == "__main__":
    run_cli(main)
