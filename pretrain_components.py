"""Pretrain the project's own small VAE (E/D) or VAC (ViT) on colour frames, for machines without the paper's
pretrained Stable Diffusion VAE and ImageNet ViT.

  python pretrain_components.py vae --dataroot ../shared/data/train --out runs/mine/vae --minutes 30
  python pretrain_components.py vac --dataroot ../shared/data/train --out runs/mine/vac --minutes 30

vae: chroma-only (Cb, Cr) reconstruction (L1) + a small KL term, as Stable Diffusion's autoencoder; its scaling factor
     is set so the latents have unit variance.
--decoder-only --init FOLDER fine-tunes only the VAE decoder, so latents already cached stay valid.
vac: a colourization pretext: from the grayscale crop, each patch token predicts the quantized mean chroma (Lab
     a/b) of its patch, and the class token that of the whole crop, so the tokens learn what colour things are.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dataset import RandomCropDataset, gray_batch
from modules import build_vac, build_vae, load_vac, load_vae, parameter_count, save_vac, vae_input
from utils import atomic_path, check_writable, rgb_to_lab, run_cli, seed_everything

LAB_CHROMA_LIMIT = 80.0  # Lab a/b beyond +-80 are rare in natural footage; they fall into the outer bins


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("component", choices=("vae", "vac"))
    parser.add_argument("--dataroot", type=Path, nargs="+", required=True, help="frame folders root(s)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the component to")
    parser.add_argument("--image-size", type=int, default=64, help="crop size (the model's working resolution)")
    parser.add_argument("--crop-size", type=int, default=0,
                        help="vae: train on smaller crops of frames at the working scale (cheaper steps); 0: image "
                        "size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    parser.add_argument("--max-steps", type=int, default=1_000_000)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--bins", type=int, default=10, help="vac: chroma bins per axis (bins^2 classes)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--init", help="start from this saved component instead of random weights")
    parser.add_argument("--decoder-only", action="store_true",
                        help="vae: train only the decoder, keeping the latent space (and cached latents) unchanged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser.parse_args()


def chroma_classes(rgb: np.ndarray, grid: int, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BxHxWx3 uint8 -> (B x grid^2 patch classes, B image classes): quantized mean Lab a/b."""
    lab = np.stack([rgb_to_lab(image) for image in rgb])[..., 1:]
    batch, height, width, _ = lab.shape
    patches = lab.reshape(batch, grid, height // grid, grid, width // grid, 2).mean(axis=(2, 4)).reshape(batch, -1, 2)
    whole = lab.mean(axis=(1, 2))

    def quantize(ab: np.ndarray) -> torch.Tensor:
        index = np.clip(((ab + LAB_CHROMA_LIMIT) / (2 * LAB_CHROMA_LIMIT) * bins).astype(int), 0, bins - 1)
        return torch.from_numpy(index[..., 0] * bins + index[..., 1]).long()

    return quantize(patches), quantize(whole)


def save_vae(vae, folder: Path, sample: torch.Tensor, overwrite: bool, keep_scaling: bool) -> None:
    if not keep_scaling:
        with torch.no_grad():
            std = vae.encode(sample).latent_dist.mean.std().item()
        vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
    with atomic_path(folder, overwrite=overwrite, is_dir=True) as temp:
        vae.save_pretrained(temp)


def main() -> None:
    args = parse_args()
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out.exists() and not args.overwrite:
        from utils import UserError

        raise UserError(f"{args.out}: already exists; pass --overwrite to replace it")
    check_writable(args.out.parent, "an --out")
    crop_size = args.crop_size if args.component == "vae" and args.crop_size else args.image_size
    data = RandomCropDataset(args.dataroot, crop_size, short_side=round(args.image_size * 1.25), seed=args.seed)
    if len(data) < args.batch_size:
        raise UserError(f"{args.dataroot[0]}: {len(data)} frames, fewer than --batch-size {args.batch_size}; add "
                        f"frames or lower --batch-size")
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=np.stack)

    if args.component == "vae":
        model = load_vae(args.init) if args.init else build_vae(image_size=args.image_size)
        head = None
    else:
        model = load_vac(args.init) if args.init else build_vac(image_size=args.image_size)
        head = torch.nn.Linear(model.token_dim, args.bins**2)
    if args.decoder_only:
        model.encoder.requires_grad_(False)
        model.quant_conv.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + (list(head.parameters()) if head is not None else [])
    print(f"{args.component}: {parameter_count(model) / 1e6:.2f}M parameters, {len(data)} frames")
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    first_batch = next(iter(loader))

    def save(overwrite: bool) -> None:
        if args.component == "vae":
            save_vae(model, args.out, vae_input(first_batch, model), overwrite, keep_scaling=args.decoder_only)
        else:
            with atomic_path(args.out, overwrite=overwrite, is_dir=True) as temp:
                save_vac(model, temp)

    step, start, losses = 0, time.time(), []
    while step < args.max_steps and time.time() - start < args.minutes * 60:
        for rgb in loader:
            colour = vae_input(rgb, model) if args.component == "vae" else None
            gray = gray_batch(rgb)
            if args.component == "vae" and args.decoder_only:
                with torch.no_grad():
                    latents = model.encode(colour).latent_dist.mean
                loss = F.l1_loss(model.decode(latents).sample, colour)
            elif args.component == "vae":
                posterior = model.encode(colour).latent_dist
                reconstruction = model.decode(posterior.sample()).sample
                loss = F.l1_loss(reconstruction, colour) + args.kl_weight * posterior.kl().mean()
            else:
                tokens = model(gray)
                grid = args.image_size // model.config["patch_size"]
                patch_target, image_target = chroma_classes(rgb, grid, args.bins)
                logits = head(tokens)
                loss = F.cross_entropy(logits[:, 1:].reshape(-1, args.bins**2), patch_target.reshape(-1))
                loss = loss + F.cross_entropy(logits[:, 0], image_target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % 50 == 0:
                print(f"step {step} loss {np.mean(losses[-50:]):.4f} ({time.time() - start:.0f}s)", flush=True)
            if step % args.save_every == 0:
                save(overwrite=True)
            if step >= args.max_steps or time.time() - start > args.minutes * 60:
                break
    save(overwrite=True)
    print(f"saved {args.out} after {step} steps, {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    run_cli(main)
