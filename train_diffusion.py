"""Stage 2: train the latent UNet denoiser on data/<dataset>/latent.npz -> checkpoints in unet_model/<run>/.

  python train_diffusion.py --dataset-name corpus --run-name mine --max-steps 20000
  python train_diffusion.py --dataset-name corpus --run-name mine --max-steps 40000 --resume   # continue

The UNet sees the noisy colour latent concatenated with the unshuffled grayscale frame and cross-attends to the VAC
tokens (dropped with probability --cond-dropout, which enables classifier-free guidance at sampling time). Each
checkpoint-<step>/ folder is a complete model (EMA weights in unet/, colorizer.json naming the VAE, VAC and noise
schedule) plus the training state (state/) that --resume continues from. Built on Accelerate: the same script
runs on CPU, one GPU, or several (`accelerate launch train_diffusion.py ...`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from colorizer import CONFIG_NAME, Colorizer, combine
from dataset import LatentDataset
from modules import build_unet, load_vac, load_vae, parameter_count, spatial_gray
from utils import UserError, atomic_path, rgb_to_chroma, run_cli, write_image_rgb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-name", help="reads data/<name>/latent.npz")
    parser.add_argument("--data", type=Path, help="path to a latent.npz (instead of --dataset-name)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--run-name", default="run", help="writes unet_model/<run-name>/")
    parser.add_argument("--output-dir", type=Path, default=Path("unet_model"))
    parser.add_argument("--net-dimension", type=int, default=64, help="width of the UNet's first block")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (split across processes)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=500)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--max-minutes", type=float, default=0, help="stop (with a checkpoint) after this long; 0: no limit")
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--validate-every", type=int, default=1000)
    parser.add_argument("--val-fraction", type=float, default=0.05, help="videos held out for validation loss")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--cond-dropout", type=float, default=0.1, help="probability of dropping the VAC tokens")
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting; 0: plain MSE")
    parser.add_argument("--prediction-type", default="v_prediction", choices=("epsilon", "v_prediction", "sample"))
    parser.add_argument("--beta-schedule", default="scaled_linear")
    parser.add_argument("--train-timesteps", type=int, default=1000)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    parser.add_argument("--overwrite", action="store_true", help="start the run over, deleting its checkpoints")
    return parser.parse_args()


def checkpoints_of(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is renamed into place only once fully written)."""
    found = [p for p in run_dir.glob("checkpoint-*") if (p / CONFIG_NAME).exists() and (p / "state").is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def copy_local_component(spec: str, run_dir: Path, name: str) -> str:
    """Local VAE/VAC folders are copied into the run, so a checkpoint never depends on a path outside it."""
    source = Path(spec)
    if not source.is_dir():
        return spec
    target = run_dir / name
    if not target.exists():
        shutil.copytree(source, target)
    return f"../{name}"


def batch_indices(step: int, batch_size: int, count: int, seed: int) -> np.ndarray:
    """The examples of global step `step`: epochs are seeded permutations, so the data order survives --resume."""
    start = step * batch_size
    epoch_first, epoch_last = start // count, (start + batch_size - 1) // count
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(count) for e in range(epoch_first, epoch_last + 1)])
    offset = start - epoch_first * count
    return order[offset : offset + batch_size]


def diffusion_loss(unet, batch: dict, scheduler, cond_dropout: float, downscale: int, snr_gamma: float = 0.0,
                   generator=None) -> torch.Tensor:
    """The denoising loss of one batch; with snr_gamma > 0, Min-SNR weighting (Hang et al. 2023), which keeps the
    many easy low-noise timesteps from dominating and converges several times faster."""
    from diffusers.training_utils import compute_snr

    latents, tokens, gray = batch["latents"], batch["tokens"], batch["gray"]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator,
                              device=latents.device)
    if cond_dropout > 0:
        keep = torch.rand(len(latents), 1, 1, generator=generator, device=latents.device) >= cond_dropout
        tokens = tokens * keep
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(torch.cat([noisy, spatial_gray(gray, downscale)], dim=1), timesteps,
                      encoder_hidden_states=tokens).sample
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = latents
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        snr = compute_snr(scheduler, timesteps)
        # min(SNR, gamma) weights the x0 error; divide by what each target's MSE already weighs it with.
        already = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}
        per_example = per_example * torch.clamp(snr, max=snr_gamma) / already[scheduler.config.prediction_type]
    return per_example.mean()


def stack(dataset: LatentDataset, indices, device) -> dict:
    items = [dataset[int(i)] for i in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}


@torch.no_grad()
def validation_loss(unet, dataset, indices, scheduler, downscale, device, batch_size: int) -> float:
    generator = torch.Generator(device=device).manual_seed(1234)
    losses = [diffusion_loss(unet, stack(dataset, indices[i : i + batch_size], device), scheduler, 0.0, downscale,
                             generator=generator).item() for i in range(0, min(len(indices), 256), batch_size)]
    return float(np.mean(losses))


def save_sample_grid(colorizer: Colorizer, dataset, indices, path: Path) -> None:
    """A PNG for people: grayscale | sampled colours | ground truth, one row per held-out frame."""
    batch = stack(dataset, indices[:: max(1, len(indices) // 6)][:6], colorizer.device)
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    latents = colorizer.sample_latents(batch["gray"], noise, "ddim", 20, tokens=batch["tokens"])
    predicted, truth = colorizer.decode_rgb(latents), colorizer.decode_rgb(batch["latents"])
    gray = (batch["gray"][:, 0].cpu().numpy() * 255).round().astype(np.uint8)
    rows = [np.concatenate([np.repeat(g[..., None], 3, 2), combine(g, rgb_to_chroma(p)), combine(g, rgb_to_chroma(t))], 1)
            for g, p, t in zip(gray, predicted, truth)]
    write_image_rgb(path, np.concatenate(rows, 0))


def main() -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm

    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    data_path = args.data or (args.data_dir / (args.dataset_name or "") / "latent.npz")
    if not args.data and not args.dataset_name:
        raise UserError("no data: pass --dataset-name NAME (data/NAME/latent.npz) or --data PATH")
    dataset = LatentDataset(data_path)
    run_dir = args.output_dir / args.run_name
    existing = checkpoints_of(run_dir) if run_dir.exists() else []
    if run_dir.exists() and any(run_dir.iterdir()) and not (args.resume or args.overwrite):
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or --overwrite to restart")
    if args.overwrite and accelerator.is_main_process and run_dir.exists():
        shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()
    run_dir.mkdir(parents=True, exist_ok=True)

    vae = load_vae(dataset.meta["vae"]).eval().requires_grad_(False)
    vac = load_vac(dataset.meta["vac"]).eval().requires_grad_(False)
    downscale = int(2 ** (len(vae.config.block_out_channels) - 1))
    latent_channels, latent_size = dataset.latents.shape[1], dataset.latents.shape[-1]
    unet = build_unet(latent_channels, downscale, dataset.tokens.shape[-1], args.net_dimension, latent_size)
    scheduler = DDPMScheduler(num_train_timesteps=args.train_timesteps, beta_schedule=args.beta_schedule,
                              prediction_type=args.prediction_type, clip_sample=False)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=type(unet), model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
    accelerator.register_for_checkpointing(ema)
    ema.to(accelerator.device)

    step = 0
    if args.resume and existing:
        accelerator.load_state(str(existing[-1] / "state"))
        step = int(existing[-1].name.split("-")[1])
        accelerator.print(f"resumed {existing[-1]} at step {step}")
    train_ids, val_ids = dataset.split_by_video(args.val_fraction, args.seed)
    config = {
        "vae": copy_local_component(dataset.meta["vae"], run_dir, "vae") if accelerator.is_main_process else None,
        "vac": copy_local_component(dataset.meta["vac"], run_dir, "vac") if accelerator.is_main_process else None,
        "image_size": int(dataset.meta.get("image_size", 64)),
        "scheduler": dict(scheduler.config),
        "net_dimension": args.net_dimension,
        "cond_dropout": args.cond_dropout,
        "dataset": str(data_path),
        "train_frames": len(train_ids),
    }
    accelerator.print(f"UNet {parameter_count(unet) / 1e6:.2f}M parameters; {len(train_ids)} train / {len(val_ids)} "
                      f"val items; {accelerator.num_processes} process(es) on {accelerator.device}")

    stop_requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: stop_requested.append(number))

    def save_checkpoint() -> None:
        """checkpoint-<step>/: EMA UNet + colorizer.json (a usable model) and the full training state."""
        accelerator.wait_for_everyone()
        final = run_dir / f"checkpoint-{step}"
        if accelerator.is_main_process:
            with atomic_path(final, overwrite=True, is_dir=True) as temp:
                accelerator.save_state(str(temp / "state"))
                ema_unet = type(accelerator.unwrap_model(unet)).from_config(accelerator.unwrap_model(unet).config)
                ema.copy_to(ema_unet.parameters())
                ema_unet.save_pretrained(temp / "unet")
                (temp / CONFIG_NAME).write_text(json.dumps({**config, "step": step}, indent=2))
            for old in checkpoints_of(run_dir)[: -args.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def validate() -> None:
        if not accelerator.is_main_process:
            return
        model = accelerator.unwrap_model(unet)
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        model.eval()
        loss = validation_loss(model, dataset, val_ids, scheduler, downscale, accelerator.device, args.batch_size)
        colorizer = Colorizer(model, vae.to(accelerator.device), vac.to(accelerator.device), config, accelerator.device)
        save_sample_grid(colorizer, dataset, val_ids, run_dir / f"samples-{step:07d}.png")
        model.train()
        ema.restore(model.parameters())
        with open(run_dir / "validation.jsonl", "a") as log:
            log.write(json.dumps({"step": step, "val_loss": loss}) + "\n")
        accelerator.print(f"step {step}: validation loss {loss:.4f}")

    per_process = math.ceil(args.batch_size / accelerator.num_processes)
    start, losses = time.time(), []
    progress = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_main_process, desc="training")
    unet.train()
    while step < args.max_steps:
        indices = np.array(train_ids)[batch_indices(step, args.batch_size, len(train_ids), args.seed)]
        mine = indices[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]
        with accelerator.autocast():
            loss = diffusion_loss(unet, stack(dataset, mine, accelerator.device), scheduler, args.cond_dropout, downscale,
                                  args.snr_gamma)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        step += 1
        losses.append(accelerator.gather(loss.detach()).mean().item())
        progress.update(1)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if accelerator.is_main_process:
                with open(run_dir / "train_loss.jsonl", "a") as log:
                    log.write(json.dumps({"step": step, "loss": float(np.mean(losses[-50:]))}) + "\n")
        out_of_time = args.max_minutes and time.time() - start > args.max_minutes * 60
        if stop_requested or out_of_time or step % args.checkpoint_every == 0 or step == args.max_steps:
            save_checkpoint()
        if step % args.validate_every == 0 or step == args.max_steps:
            validate()
        if stop_requested or out_of_time:
            accelerator.print(f"stopped at step {step}; continue with --resume")
            break
    progress.close()


if __name__ == "__main__":
    run_cli(main)
