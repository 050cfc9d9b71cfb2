"""What limits the colours? Variants of one model's prediction scored on frames held out of training.

  python experiments/probe_limits.py --clips ../shared/data/train/videos/flatten__puff \
      ../shared/data/train/videos/sam2__bedroom --every 10 --json runs/probe/default.json

Each variant colorizes every --every-th frame of each clip independently (no temporal features), recombines the
chroma with the frame's own luma at its native size and is scored by PSNR (metrics.psnr) and colourfulness:
- sample: the default sampler (DDIM, 4 steps); x0: one DDIM step, i.e. the UNet's one-step estimate of the clean
  latent from pure noise (the learned conditional mean); zero-tokens: the sample with the VAC tokens zeroed;
- vac-letterbox / vac-crop: the VAC sees the frame padded or cropped to a square instead of squashed into one;
- size-N: the model run at a working short side of N instead of its own;
- pad-N: the sample with the gray frame mirrored out by N pixels on every side, cropped off after sampling;
- hints-points / hints-regions / hints-full: the sample given hints of the true colour, drawn as in training
  (guidance.point_hints: a few dots; guidance.region_hints: one to three rectangles; or every pixel): how much a
  model trained with --hints uses them;
- oracle-vae: the true chroma through the VAE at the working size (the bound the VAE and working size set);
  oracle-resize: the true chroma down to the working size and back (the bound of the working size alone);
- gray: no chroma.
The edge band: mean Cr (red-difference) error in the outer eighth of the columns, left and right, against the
middle, per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from colorizer import DEFAULT_MODEL, combine, load_colorizer, prepare_gray
from metrics import colorfulness, psnr
from modules import CHROMA_RANGE
from guidance import hint_tensor, point_hints, region_hints
from utils import UserError, choose_device, rgb_to_chroma, rgb_to_gray, run_cli
from video_io import iter_clip_frames

VARIANTS = ("sample", "x0", "zero-tokens", "vac-letterbox", "vac-crop", "size-96", "pad-8", "pad-16", "hints-points",
            "hints-regions", "hints-full", "oracle-vae", "oracle-resize", "gray")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, nargs="+", required=True,
                        help="colour clips (or folders of photos) held out of training")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--every", type=int, default=10, help="score every Nth frame")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the table here")
    return parser.parse_args()


def square_for_vac(gray: torch.Tensor, fit: str) -> torch.Tensor:
    """Bx1xhxw -> a square the VAC sees: the frame padded to a square with mid-gray, or its centre square."""
    height, width = gray.shape[-2:]
    side = max(height, width) if fit == "letterbox" else min(height, width)
    if fit == "letterbox":
        pad_h, pad_w = side - height, side - width
        return F.pad(gray, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.5)
    top, left = (height - side) // 2, (width - side) // 2
    return gray[..., top : top + side, left : left + side]


def true_chroma(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(rgb_to_chroma(f), (size[1], size[0]), interpolation=cv2.INTER_AREA) for f in frames])


def truth_hints(truth: np.ndarray, kind: str, seed: int) -> torch.Tensor:
    """Hints of the true chroma (B x h x w x 2) of one kind, as the UNet's hint input."""
    if kind == "full":
        return hint_tensor(truth, np.ones(truth.shape[:3], np.float32))
    rng = np.random.default_rng(seed)
    draw = point_hints if kind == "points" else region_hints
    chroma, mask = zip(*(draw(t, rng) for t in truth))
    return hint_tensor(np.stack(chroma), np.stack(mask))


@torch.inference_mode()
def predict(colorizer, variant: str, frames: np.ndarray, seed: int) -> np.ndarray:
    """B x H x W x 3 colour frames -> B x h x w x 2 chroma at some working size (combine upsamples it)."""
    height, width = frames.shape[1:3]
    gray = np.stack([rgb_to_gray(f) for f in frames])
    if variant == "gray":
        return np.zeros((len(frames), 8, 8, 2), np.float32)
    image_size = colorizer.config["image_size"]
    if variant.startswith("size-"):
        colorizer.config["image_size"] = int(variant.split("-")[1])
    try:
        size = colorizer.working_size(height, width)
        small = prepare_gray(gray, size)
        if variant.startswith("oracle"):
            chroma = true_chroma(frames, size)
            if variant == "oracle-resize":
                return chroma
            encoded = colorizer.vae.encode(torch.from_numpy(chroma / CHROMA_RANGE).permute(0, 3, 1, 2).float())
            return colorizer.decode_chroma(encoded.latent_dist.mean * colorizer.vae.config.scaling_factor)
        noise = torch.randn((len(frames), *colorizer.latent_shape(height, width)),
                            generator=torch.Generator().manual_seed(seed))
        tokens, hints = None, None
        if variant.startswith("hints-"):
            hints = truth_hints(true_chroma(frames, size), variant.split("-")[1], seed)
        if variant == "zero-tokens":
            tokens = torch.zeros_like(colorizer.vac(small))
        elif variant.startswith("vac-"):
            tokens = colorizer.vac(square_for_vac(small, variant.split("-")[1]))
        steps = 1 if variant == "x0" else 4
        if variant.startswith("pad-"):
            pad = int(variant.split("-")[1])
            margin = pad // colorizer.downscale
            padded = F.pad(small, (pad,) * 4, mode="reflect")
            noise = F.pad(noise, (margin,) * 4, mode="reflect")
            tokens = colorizer.vac(small)
            latents = colorizer.sample_latents(padded, noise, "ddim", steps, tokens=tokens)
            return colorizer.decode_chroma(latents[..., margin:-margin, margin:-margin])
        vac_size = colorizer.vac_size(height, width)
        vac_gray = prepare_gray(gray, vac_size) if vac_size != size and tokens is None else None
        latents = colorizer.sample_latents(small, noise, "ddim", steps, tokens=tokens, hints=hints, vac_gray=vac_gray)
        return colorizer.decode_chroma(latents)
    finally:
        colorizer.config["image_size"] = image_size


def edge_band(chroma: np.ndarray, frames: np.ndarray) -> dict[str, float]:
    """Mean signed Cr error (prediction - truth) in the outer eighth of the columns on each side and in the middle."""
    import cv2

    truth = np.stack([cv2.resize(rgb_to_chroma(f), (chroma.shape[2], chroma.shape[1]), interpolation=cv2.INTER_AREA)
                      for f in frames])
    error = chroma[..., 1] - truth[..., 1]
    band = max(1, chroma.shape[2] // 8)
    return {"left": float(error[:, :, :band].mean()), "right": float(error[:, :, -band:].mean()),
            "middle": float(error[:, :, band:-band].mean())}


def same_size_groups(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Frames stacked by size: a folder of photos holds several."""
    groups: dict[tuple[int, ...], list[np.ndarray]] = {}
    for frame in frames:
        groups.setdefault(frame.shape, []).append(frame)
    return [np.stack(group) for group in groups.values()]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    colorizer = load_colorizer(args.model, choose_device("cpu"))
    if not colorizer.takes_hints and any(v.startswith("hints-") for v in args.variants):
        raise UserError(f"{args.model}: has no hint input (trained without --hints); leave out the hints-* variants")
    table: dict[str, dict] = {v: {"psnr": [], "colorfulness": []} for v in args.variants}
    bands: dict[str, list[dict]] = {v: [] for v in args.variants if v != "gray"}
    for clip in args.clips:
        picked = list(iter_clip_frames(clip))[:: args.every]
        for frames in same_size_groups(picked):
            for variant in args.variants:
                chroma = predict(colorizer, variant, frames, args.seed)
                outputs = [combine(rgb_to_gray(f), c) for f, c in zip(frames, chroma)]
                table[variant]["psnr"] += [psnr(o, f) for o, f in zip(outputs, frames)]
                table[variant]["colorfulness"] += [colorfulness(o) for o in outputs]
                if variant in bands:
                    bands[variant].append(edge_band(chroma, frames))
        print(f"{clip.name}: {len(picked)} frames", flush=True)
    summary = {v: {k: float(np.mean(values)) for k, values in row.items()} for v, row in table.items()}
    for variant, found in bands.items():
        summary[variant]["edge_cr_error"] = {k: float(np.mean([b[k] for b in found])) for k in found[0]}
    summary["frames"] = len(table[args.variants[0]]["psnr"])
    print(f"{'variant':<15} {'PSNR':>7} {'CF':>6}   mean Cr error: left / middle / right eighth of the columns")
    for variant in args.variants:
        edges = summary[variant].get("edge_cr_error")
        edge_text = " / ".join(f"{edges[k]:+.2f}" for k in ("left", "middle", "right")) if edges else ""
        print(f"{variant:<15} {summary[variant]['psnr']:7.2f} {summary[variant]['colorfulness']:6.1f}   {edge_text}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "clips": [str(c) for c in args.clips],
                                         "every": args.every, "summary": summary}, indent=2))


if __name__ == "__main__":
    run_cli(main)
