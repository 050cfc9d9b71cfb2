"""Trains the colour-distribution head (color_head.py) on the frozen ImageNet backbone -> runs/<run>/color/.

  python train_color_head.py --dataroot ../shared/data/train --run-name color --max-steps 8000
  python train_color_head.py ... --resume          # goes on from runs/<run>/checkpoint.pt
  python train_color_head.py ... --init-head unet_model/v4/color --train-backbone --lr 3e-4
                                                   # a trained head fine-tuned with its backbone

Every photo under the data root and every second frame of its clips (minus --holdout) is cut once to a square of
--item-size and kept in data/<cache>; each step takes random crops of --crop (mirrored half of the time), runs the
frozen backbone on their luma and trains the head with cross-entropy on the soft-encoded chroma of every stride-4
cell (with --train-backbone the backbone trains too, from ImageNet's weights or --init-head's, at --backbone-lr).
Held-out items are scored every --validate-every steps (cross-entropy, and PSNR / colourfulness of the decoded
chroma on the items' own luma at a few vividness settings) into runs/<run>/validation.jsonl, and each scored head is
kept as runs/<run>/color-<step>/, so that a choice among them can be made on held-out data. With --ema-decay the
scored and exported heads (and backbones) are the exponential moving average of the trained weights, which smooths
the wobble from one checkpoint to the next.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from color_head import (OUTPUT_STRIDE, ColorHead, bin_centres, build_color_head, chroma_at, load_color_head,
                        load_head_backbone, save_color_head, soft_targets)
from dataset import gray_batch
from metrics import colorfulness, psnr
from modules import BACKBONES, FrozenBackbone, TunedBackbone
from training_log import LOG_NAMES, append_log, truncate_log
from utils import UserError, atomic_path, luma_chroma_to_rgb, rgb_to_gray, run_cli
from video_io import list_frames, read_image_rgb

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

VIVIDNESS_SCORED = (0.0, 0.5, 1.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataroot", type=Path, default=Path("../shared/data/train"),
                        help="colour photos and frame folders, at any depth")
    parser.add_argument("--run-name", default="color")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where the item cache is kept")
    parser.add_argument("--holdout", nargs="*", default=[],
                        help="folders (relative to --dataroot) kept out of training and scored instead")
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=sorted(BACKBONES))
    parser.add_argument("--item-size", type=int, default=144, help="side of the cached square items")
    parser.add_argument("--crop", type=int, default=128, help="side of the backbone's input (a multiple of 32)")
    parser.add_argument("--bin-step", type=float, default=8.0, help="chroma levels per bin side")
    parser.add_argument("--width", type=int, default=96, help="channels of the head's feature pyramid")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="the head's peak learning rate")
    parser.add_argument("--train-backbone", action="store_true",
                        help="fine-tune the backbone with the head (stored in the head's folder)")
    parser.add_argument("--backbone-lr", type=float, default=1e-4, help="the backbone's peak learning rate")
    parser.add_argument("--init-head", type=Path,
                        help="a trained head's folder to start from (its bins, prior and size); with "
                             "--train-backbone, its backbone weights too where it has its own")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="decay of the moving average of the weights that is scored and exported (0: none, the "
                             "trained weights themselves)")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--max-steps", type=int, default=8000)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--validate-every", type=int, default=500)
    parser.add_argument("--resume", action="store_true", help="go on from the run's checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.crop % 32 or args.crop > args.item_size:
        parser.error(f"--crop {args.crop}: must be a multiple of 32 and at most --item-size {args.item_size}")
    return args


def item_files(root: Path, holdout: list[str]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): every photo, every second frame of a clip; a folder is a clip when its
    frames are named 00000, 00001, ... in order (photos keep their own names)."""
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; pass --dataroot with colour photos or frame folders")
    train, held = [], []
    for folder in sorted({p.parent for p in root.rglob("*") if p.is_file()}):
        frames = list_frames(folder)
        is_clip = bool(frames) and all(f.stem == f"{i:05d}" for i, f in enumerate(frames))
        chosen = frames[::2] if is_clip else frames
        relative = folder.relative_to(root).as_posix()
        held_out = any(relative == h or relative.startswith(h.rstrip("/") + "/") for h in holdout)
        (held if held_out else train).extend(chosen)
    if not train:
        raise UserError(f"{root}: no training images outside --holdout")
    return train, held


def square_item(path: Path, size: int) -> np.ndarray:
    import cv2

    rgb = read_image_rgb(path)
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    resized = cv2.resize(rgb, (max(size, round(w * scale)), max(size, round(h * scale))), interpolation=cv2.INTER_AREA)
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[top : top + size, left : left + size]


def cached_items(files: list[Path], size: int, cache: Path) -> np.ndarray:
    """The items as N x size x size x 3 uint8, read once and kept in `cache` (rebuilt if the file list changed)."""
    names = [str(f) for f in files]
    if cache.exists():
        with np.load(cache) as stored:
            if list(stored["names"]) == names:
                return stored["items"]
    items = np.stack([square_item(f, size) for f in files])
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache, overwrite=True) as temp:
        with open(temp, "wb") as handle:
            np.savez(handle, items=items, names=np.array(names))
    return items


def crops(items: np.ndarray, rng: np.random.Generator, count: int, side: int) -> np.ndarray:
    chosen = items[rng.integers(0, len(items), count)]
    top, left = rng.integers(0, items.shape[1] - side + 1, 2)
    batch = chosen[:, top : top + side, left : left + side]
    return np.ascontiguousarray(batch[:, :, ::-1]) if rng.random() < 0.5 else batch


Backbone = FrozenBackbone | TunedBackbone


def head_logits(head: ColorHead, backbone: Backbone, rgb: np.ndarray) -> torch.Tensor:
    gray = gray_batch(rgb)
    with torch.set_grad_enabled(torch.is_grad_enabled() and isinstance(backbone, TunedBackbone)):
        features = backbone(gray)
    return head(features, gray)


def loss_on(head: ColorHead, backbone: Backbone, rgb: np.ndarray) -> torch.Tensor:
    logits = head_logits(head, backbone, rgb)
    targets = torch.from_numpy(chroma_at(rgb, OUTPUT_STRIDE)).float().reshape(-1, 2)
    log_probability = F.log_softmax(logits, dim=1).permute(0, 2, 3, 1).reshape(-1, len(head.centres))
    return -(soft_targets(targets, head.centres) * log_probability).sum(dim=1).mean()


def corpus_counts(items: np.ndarray, step: float, crop: int) -> torch.Tensor:
    """Soft counts of the training chroma over every bin of the grid (from up to 2,000 items)."""
    sample = items[np.random.default_rng(0).permutation(len(items))[:2000], :crop, :crop]
    chroma = torch.from_numpy(chroma_at(sample, OUTPUT_STRIDE)).float().reshape(-1, 2)
    centres = bin_centres(step)
    # in chunks: every cell's dense soft target at once takes N x Q floats (25 GB for 224 px crops)
    return sum(soft_targets(part, centres).sum(dim=0) for part in chroma.split(200_000))


def validate(head: ColorHead, backbone: Backbone, held: np.ndarray, crop: int) -> dict:
    """Held-out cross-entropy, and per vividness the PSNR and colourfulness of each item recoloured on its own luma
    (gray and ground truth beside them)."""
    import cv2

    head.eval()
    scores: dict[str, list[float]] = {"val_loss": [], "gray_psnr": [], "truth_colorfulness": []}
    for batch in np.array_split(held[:, :crop, :crop], max(1, len(held) // 32)):
        with torch.no_grad():
            scores["val_loss"].append(float(loss_on(head, backbone, batch)))
            logits = head_logits(head, backbone, batch)
            for vividness in VIVIDNESS_SCORED:
                chroma = head.chroma(logits, vividness).permute(0, 2, 3, 1).numpy()
                for rgb, cells in zip(batch, chroma):
                    full = cv2.resize(cells, (crop, crop), interpolation=cv2.INTER_LINEAR)
                    colored = luma_chroma_to_rgb(rgb_to_gray(rgb), full)
                    scores.setdefault(f"psnr_{vividness}", []).append(psnr(colored, rgb))
                    scores.setdefault(f"colorfulness_{vividness}", []).append(colorfulness(colored))
        for rgb in batch:
            scores["gray_psnr"].append(psnr(np.repeat(rgb_to_gray(rgb)[..., None], 3, axis=2), rgb))
            scores["truth_colorfulness"].append(colorfulness(rgb))
    head.train()
    return {name: round(float(np.mean(values)), 4) for name, values in scores.items()}


def schedule(step: int, args: argparse.Namespace) -> float:
    """The share of the peak learning rates at `step`: a linear warm-up, then a cosine to zero at --max-steps."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def tuned_state(backbone: Backbone) -> dict[str, torch.Tensor] | None:
    return backbone.network.state_dict() if isinstance(backbone, TunedBackbone) else None


def trained_parameters(head: ColorHead, backbone: Backbone) -> list[torch.nn.Parameter]:
    return list(head.parameters()) + (list(backbone.parameters()) if isinstance(backbone, TunedBackbone) else [])


@contextmanager
def averaged_weights(ema: EMAModel | None, parameters: list[torch.nn.Parameter]) -> Iterator[None]:
    """The moving average's weights in place of the trained ones for the duration (none without --ema-decay)."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def save_checkpoint(run_dir: Path, head: ColorHead, backbone: Backbone, optimizer, ema: EMAModel | None, step: int,
                    args: argparse.Namespace) -> None:
    with atomic_path(run_dir / "checkpoint.pt", overwrite=True) as temp:
        torch.save({"head": head.state_dict(), "config": head.config, "backbone": tuned_state(backbone),
                    "optimizer": optimizer.state_dict(), "ema": None if ema is None else ema.state_dict(),
                    "step": step}, temp)
    with averaged_weights(ema, trained_parameters(head, backbone)):
        export_head(run_dir / "color", head, backbone, step, args)


def export_head(folder: Path, head: ColorHead, backbone: Backbone, step: int, args: argparse.Namespace) -> None:
    with atomic_path(folder, overwrite=True, is_dir=True) as temp:
        save_color_head(head, temp, {"backbone": args.backbone, "crop": args.crop, "trained_steps": step,
                                     "holdout": args.holdout}, tuned_state(backbone))


def starting_head(args: argparse.Namespace, channels: list[int], items: np.ndarray
                  ) -> tuple[ColorHead, dict[str, torch.Tensor] | None]:
    """A fresh head on the corpus' bins, or --init-head's (and its fine-tuned backbone's weights, if any)."""
    if args.init_head is None:
        return build_color_head(channels, args.bin_step, corpus_counts(items, args.bin_step, args.crop),
                                args.width), None
    head = load_color_head(args.init_head)
    if head.backbone != args.backbone:
        raise UserError(f"{args.init_head}: its head reads {head.backbone}; pass --backbone {head.backbone}")
    return head, load_head_backbone(args.init_head, head)


def moving_average(decay: float, parameters: list[torch.nn.Parameter]) -> EMAModel | None:
    """diffusers' EMAModel of the trained weights, or None for --ema-decay 0."""
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=decay)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir = args.runs_dir / args.run_name
    if run_dir.exists() and not args.resume:
        raise UserError(f"{run_dir}: exists; pass --resume to go on from its checkpoint, or another --run-name")
    run_dir.mkdir(parents=True, exist_ok=True)
    train_files, held_files = item_files(args.dataroot, args.holdout)
    cache = args.data_dir / "color_head_items"
    items = cached_items(train_files, args.item_size, cache / f"train_{args.item_size}.npz")
    held = cached_items(held_files, args.item_size, cache / f"held_{args.item_size}.npz") if held_files else None
    print(f"{len(items)} training items, {0 if held is None else len(held)} held out")

    backbone = TunedBackbone(args.backbone) if args.train_backbone else FrozenBackbone(args.backbone)
    channels = backbone.network.feature_info.channels()
    step = 0
    if args.resume and (run_dir / "checkpoint.pt").exists():
        state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
        head = ColorHead(state["config"], state["head"]["centres"], state["head"]["prior"])
        head.load_state_dict(state["head"])
        backbone_state = state.get("backbone")
        step = state["step"]
        for name in LOG_NAMES:
            truncate_log(run_dir / name, step)
    else:
        head, backbone_state = starting_head(args, channels, items)
    if backbone_state is not None:
        if not args.train_backbone:
            raise UserError(f"{args.init_head or run_dir}: its backbone was fine-tuned; pass --train-backbone")
        backbone.network.load_state_dict(backbone_state)
    groups = [{"params": list(head.parameters()), "peak_lr": args.lr}]
    if args.train_backbone:
        groups.append({"params": list(backbone.parameters()), "peak_lr": args.backbone_lr})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    parameters = trained_parameters(head, backbone)
    ema = moving_average(args.ema_decay, parameters)
    if step:
        optimizer.load_state_dict(state["optimizer"])
        if (ema is None) != (state.get("ema") is None):
            raise UserError(f"{run_dir / 'checkpoint.pt'}: its run was started "
                            f"{'without' if ema is not None else 'with'} --ema-decay; resume with the same flags")
        if ema is not None:
            ema.load_state_dict(state["ema"])
        print(f"resumed at step {step}")
    print(f"{len(head.centres)} chroma bins; head {sum(p.numel() for p in head.parameters()) / 1e6:.2f}M parameters")
    head.train()
    started = time.time()
    while step < args.max_steps:
        rng = np.random.default_rng([args.seed, step])  # a step's batch depends on the step alone: resumable
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * schedule(step, args)
        loss = loss_on(head, backbone, crops(items, rng, args.batch_size, args.crop))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.step(parameters)
        step += 1
        append_log(run_dir / LOG_NAMES[0], {"step": step, "loss": round(loss.item(), 5)})
        if step % args.checkpoint_every == 0 or step == args.max_steps:
            save_checkpoint(run_dir, head, backbone, optimizer, ema, step, args)
            print(f"step {step}: loss {loss.item():.4f}, {(time.time() - started) / 60:.1f} min", flush=True)
        if held is not None and (step % args.validate_every == 0 or step == args.max_steps):
            with averaged_weights(ema, parameters):
                record = {"step": step, **validate(head, backbone, held, args.crop)}
                export_head(run_dir / f"color-{step}", head, backbone, step, args)
            append_log(run_dir / LOG_NAMES[1], record)
            print(json.dumps(record), flush=True)
    load_color_head(run_dir / "color")  # the exported head loads


if __name__ == "__main__":
    run_cli(main)
