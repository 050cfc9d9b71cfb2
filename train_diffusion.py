"""Stage 2: train the latent UNet denoiser on data/<dataset>/latent.npz -> checkpoints in runs/<run>/.

  python train_diffusion.py --dataset-name corpus --run-name mine --max-steps 20000
  python train_diffusion.py --dataset-name corpus --run-name mine --max-steps 40000 --resume   # continue

The UNet sees the noisy colour latent concatenated with the unshuffled grayscale frame (modules.unet_input, with the
hints and a hybrid VAC's map) and cross-attends to the VAC tokens (dropped with probability --cond-dropout, which
enables classifier-free guidance at sampling time). Each checkpoint-<step>/ folder is a complete model (EMA weights in
unet/, colorizer.json naming the VAE, VAC and noise schedule) plus the training state (state/) that --resume continues
from. Built on Accelerate: the same script runs on CPU, one GPU, or several processes (`accelerate launch
train_diffusion.py ...`, or torchrun), which split each global batch evenly; N processes follow the same loss curve as
one (the random draws are made per global batch). With --color-head, the UNet learns to take a colour head's
suggestion (its calibrated chroma) through the hint input, marked as a guess, where an item has no dense hint: the
colouring it draws then follows the head where the frame bears it out.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from color_head import ColorHead, load_color_head
from colorizer import CONFIG_NAME, Colorizer, checkpoints_of, combine, fill_hints
from dataset import LatentDataset, batch_indices, source_weights
from guidance import HEAD_HINT_MASK, HINT_CHANNELS, draw_training_hints
from modules import (BACKBONE_KEYS, HybridVAC, build_unet, load_vac, load_vae, parameter_count, save_vac, unet_input,
                     vac_fingerprint, vac_spatial_channels, vae_downscale, vae_fingerprint)
from training_log import LOG_NAMES, append_log, truncate_log
from utils import (Interrupted, UserError, atomic_path, check_writable, discard, first_line, remove_stale_temporaries,
                   run_cli)
from video_io import write_image_rgb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-name", help="reads data/<name>/latent.npz")
    parser.add_argument("--data", type=Path, help="path to a latent.npz (instead of --dataset-name)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--vae",
                        help="the VAE that made the latents, if it is no longer where latent.npz says (checked)")
    parser.add_argument("--vac",
                        help="the VAC that made the tokens, if it is no longer where latent.npz says (checked)")
    parser.add_argument("--run-name", default="run", help="writes runs/<run-name>/ (--output-dir/<run-name>/)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs"))
    parser.add_argument("--net-dimension", type=int, default=64, help="width of the UNet's first block")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout in the UNet's ResNet blocks (regularizes small corpora)")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (split across processes)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=500)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--max-minutes", type=float, default=0,
                        help="stop (with a checkpoint) after this long; 0: no limit")
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50, help="steps per train_loss.jsonl line (their mean loss)")
    parser.add_argument("--validate-every", type=int, default=1000)
    parser.add_argument("--val-fraction", type=float, default=0.05, help="videos held out for validation loss")
    parser.add_argument("--holdout", nargs="+", default=[],
                        help="hold out these videos (patterns of their folder names) instead of a random "
                        "--val-fraction")
    parser.add_argument("--source-power", type=float, default=0.5,
                        help="sample each source (a video folder's parent: images/intel_scenes, videos, ...) in "
                        "proportion to its item count to this power: 1 samples every item alike, 0 every source alike")
    parser.add_argument("--hints", action="store_true", help="give the UNet a colour-hint input, trained with hints "
                        "drawn from the data (needs latent.npz made with feature_extraction.py --hints)")
    parser.add_argument("--hint-none-fraction", type=float, default=0.5,
                        help="with --hints: items trained without any hint (automatic colorization)")
    parser.add_argument("--color-head", type=Path, help="with --hints and a hybrid VAC: a colour head (a model's "
                        "color/ folder, or train_color_head.py's) whose calibrated chroma the UNet learns to take as a "
                        "suggestion where an item has no dense hint (needs latent.npz with the backbone's maps)")
    parser.add_argument("--head-fraction", type=float, default=0.8,
                        help="with --color-head: the share of items without a dense hint given the head's suggestion")
    parser.add_argument("--train-vac", action="store_true",
                        help="train the VAC with the UNet (tokens computed each step; the checkpoint holds the VAC)")
    parser.add_argument("--vac-lr-scale", type=float, default=0.3, help="with --train-vac: the VAC's learning rate "
                        "as a fraction of --lr (it starts pretrained)")
    parser.add_argument("--train-backbone", action="store_true", help="with --train-vac and a hybrid VAC: fine-tune "
                        "its ImageNet backbone too, on the grayscale input latent.npz stores (slower steps)")
    parser.add_argument("--backbone-lr-scale", type=float, default=0.1, help="with --train-backbone: the backbone's "
                        "learning rate as a fraction of the VAC's (it starts from ImageNet)")
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
    parser.add_argument("--init-from", type=Path, help="start from this model folder's UNet (and, with --train-vac, "
                        "its VAC) instead of random weights: a fresh optimizer on committed weights")
    parser.add_argument("--overwrite", action="store_true", help="start the run over, deleting its checkpoints")
    return parser.parse_args()


def copy_local_component(spec: str, run_dir: Path, name: str) -> str:
    """Local VAE/VAC folders are copied into the run, so a checkpoint never depends on a path outside it."""
    source = Path(spec)
    if not source.is_dir():
        return spec
    target = run_dir / name
    if not target.exists():
        with atomic_path(target, is_dir=True) as temp:  # a killed copy never passes for a complete one
            shutil.copytree(source, temp, dirs_exist_ok=True)
    return f"../{name}"


def check_components(dataset: LatentDataset, data_path: Path, vae, vac, vae_spec: str, vac_spec: str) -> None:
    """The VAE and VAC must be the ones that made latent.npz: a VAE retrained since (or another one passed with
    --vae) would decode the latents into garbage, and the UNet would learn from tokens it never sees later."""
    meta, problems = dataset.meta, {"vae": [], "vac": []}
    if meta.get("vae_fingerprint", vae_fingerprint(vae)) != vae_fingerprint(vae):
        problems["vae"].append("other encoder weights or scaling factor")
    if "scaling_factor" in meta and not math.isclose(float(meta["scaling_factor"]), vae.config.scaling_factor,
                                                     rel_tol=1e-5):
        problems["vae"].append(f"scaling factor {float(meta['scaling_factor']):.6g}, "
                               f"not {vae.config.scaling_factor:.6g}")
    if "downscale" in meta and int(meta["downscale"]) != vae_downscale(vae):
        problems["vae"].append(f"downscale {meta['downscale']}, not {vae_downscale(vae)}")
    if dataset.latents.shape[1] != vae.config.latent_channels:
        problems["vae"].append(f"{dataset.latents.shape[1]} latent channels, not {vae.config.latent_channels}")
    if isinstance(vac, HybridVAC):
        choose_backbone_maps(dataset, data_path, vac, vac_spec)
    else:
        dataset.backbone = {}  # features of a hybrid VAC's backbone, which this VAC does not read
    if dataset.tokens is None:
        pass  # tokens are computed with this VAC during training: any VAC fits
    elif meta.get("vac_fingerprint", vac_fingerprint(vac)) != vac_fingerprint(vac):
        problems["vac"].append("other weights")
    elif tuple(dataset.tokens.shape[1:]) != (vac.token_count, vac.token_dim):
        problems["vac"].append(f"tokens of {tuple(dataset.tokens.shape[1:])}, not {(vac.token_count, vac.token_dim)}")
    for name, spec in (("vae", vae_spec), ("vac", vac_spec)):
        if problems[name]:
            raise UserError(f"{data_path}: was made with another {name.upper()} than {spec} "
                            f"({'; '.join(problems[name])}); "
                            f"pass --{name} with the one that made it, or re-run feature_extraction.py --overwrite "
                            f"with this one")
    if dataset.latents.shape[-1] % 4 or dataset.latents.shape[-2] % 4:
        raise UserError(f"{data_path}: latents of {dataset.latents.shape[-2]}x{dataset.latents.shape[-1]} do not fit "
                        f"the UNet (multiples of 4 needed); re-run feature_extraction.py --overwrite with another "
                        f"--image-size")


def check_resumable(checkpoint: Path, args: argparse.Namespace, fingerprints: dict) -> None:
    """--resume continues the same model: settings that define it must not change (a mismatch in the optimizer
    state would fail anyway, a changed noise schedule or VAE would silently train something else)."""
    try:
        saved = json.loads((checkpoint / CONFIG_NAME).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{checkpoint / CONFIG_NAME}: unreadable ({error}); delete {checkpoint} to resume from the "
                        f"checkpoint before it") from None
    scheduler = saved.get("scheduler", {})
    pairs = [("--net-dimension", saved.get("net_dimension"), args.net_dimension),
             ("--prediction-type", scheduler.get("prediction_type"), args.prediction_type),
             ("--beta-schedule", scheduler.get("beta_schedule"), args.beta_schedule),
             ("--train-timesteps", scheduler.get("num_train_timesteps"), args.train_timesteps),
             ("--hints", bool(saved.get("hint_channels")), args.hints),
             ("--train-vac", bool(saved.get("train_vac")), args.train_vac),
             ("--train-backbone", bool(saved.get("train_backbone")), args.train_backbone),
             ("--color-head", bool(saved.get("color_head")), bool(args.color_head)),
             ("VAE", saved.get("vae_fingerprint"), fingerprints["vae_fingerprint"])]
    if not args.train_vac:  # a trained VAC has moved on from the one the run started with
        pairs.append(("VAC", saved.get("vac_fingerprint"), fingerprints["vac_fingerprint"]))
    for name, before, now in pairs:
        if before is not None and before != now:
            what = f"{name} {before}" if name.startswith("--") else f"another {name} (its latents are not this data's)"
            raise UserError(f"{checkpoint}: was trained with {what}; resume with the same, or pass --overwrite to "
                            f"start the run over")
    for name, key in (("--seed", "seed"), ("--batch-size", "batch_size")):
        if saved.get(key) is not None and saved[key] != getattr(args, key):
            print(f"warning: {checkpoint} was trained with {name} {saved[key]}; the data order will differ from an "
                  f"uninterrupted run", file=sys.stderr)


def load_suggesting_head(args: argparse.Namespace, vac, dataset: LatentDataset, data_path: Path,
                         device) -> ColorHead | None:
    """--color-head, checked against the VAC and the data: it reads the hybrid VAC's frozen backbone maps, which
    training takes from latent.npz."""
    if not args.color_head:
        return None
    head = load_color_head(args.color_head)
    backbone = vac.config.get("backbone") if isinstance(vac, HybridVAC) else None
    if head.config.get("backbone") != backbone or args.train_backbone:
        raise UserError(f"--color-head {args.color_head}: reads {head.config.get('backbone')}'s frozen maps; train "
                        f"with a hybrid VAC on that backbone (--vac timm:{head.config.get('backbone')}), without "
                        f"--train-backbone")
    if not dataset.backbone or dataset.vac_gray is None:
        raise UserError(f"{data_path}: holds no {backbone} maps and grayscale input for --color-head; re-run "
                        f"feature_extraction.py --overwrite with --vac timm:{backbone}")
    cached_side = dataset.vac_gray.shape[-1]
    if head.input_side not in (None, cached_side):
        raise UserError(f"--color-head {args.color_head}: reads {head.input_side} px inputs, {data_path} caches the "
                        f"backbone's maps of {cached_side} px ones; use a head trained with train_color_head.py "
                        f"--crop {cached_side}")
    return head.to(device).eval().requires_grad_(False)


def split(dataset: LatentDataset, args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """Train and held-out items: the videos --holdout names, or a random --val-fraction of whole videos."""
    if not args.holdout:
        return dataset.split_by_video(args.val_fraction, args.seed)
    held = {i for i, name in enumerate(dataset.videos) if any(fnmatch.fnmatch(name, p) for p in args.holdout)}
    if not held:
        raise UserError(f"--holdout {' '.join(args.holdout)}: matches no video of the data; use folder names such "
                        f"as {dataset.videos[0]}")
    is_held = np.isin(dataset.video_ids, sorted(held))
    return np.flatnonzero(~is_held).tolist(), np.flatnonzero(is_held).tolist()


def step_generator(seed: int, step: int, device) -> torch.Generator:
    """The random draws of global step `step` (noise, timesteps, dropout): like its batch, a function of --seed and
    the step alone, the same in every process and after --resume (no saved RNG state needed)."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


def diffusion_loss(unet, batch: dict, scheduler, cond_dropout: float, downscale: int, snr_gamma: float = 0.0,
                   generator=None, part: tuple[int, int] | None = None) -> torch.Tensor:
    """The denoising loss of one batch; with snr_gamma > 0, Min-SNR weighting (Hang et al. 2023), which keeps the
    many easy low-noise timesteps from dominating and converges several times faster. part=(start, total): `batch`
    is rows start.. of a global batch of `total` rows split across processes; the noise, timesteps and dropout are
    drawn for the whole global batch and sliced, so N processes draw what one process would."""
    from diffusers.training_utils import compute_snr

    latents, tokens, gray, spatial = batch["latents"], batch["tokens"], batch["gray"], batch.get("spatial")
    start, total = part or (0, len(latents))
    rows, device = slice(start, start + len(latents)), latents.device
    noise = torch.randn((total, *latents.shape[1:]), generator=generator, device=device)[rows]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (total,), generator=generator,
                              device=device)[rows]
    if cond_dropout > 0:
        keep = torch.rand(total, 1, 1, generator=generator, device=device)[rows] >= cond_dropout
        tokens = tokens * keep
        spatial = spatial * keep.unsqueeze(-1) if spatial is not None else None  # the VAC's whole condition
    noisy = scheduler.add_noise(latents, noise, timesteps)
    model_input = unet_input(noisy, gray, downscale, batch.get("hints"), spatial)
    prediction = unet(model_input, timesteps, encoder_hidden_states=tokens).sample
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


def choose_backbone_maps(dataset: LatentDataset, data_path: Path, vac: HybridVAC, vac_spec: str) -> None:
    """Training reads a hybrid VAC's backbone maps from latent.npz where they are its frozen backbone's; else (a
    fine-tuned backbone, or another one than the cache's) it computes them each step from the grayscale input
    latent.npz stores, and the cache is dropped so that no item loads it for nothing."""
    stored = dataset.meta.get("backbone_name")
    if not vac.backbone_trained and stored == vac.config["backbone"] and set(dataset.backbone) == set(BACKBONE_KEYS):
        return
    if dataset.vac_gray is None:
        what = f"{stored} features" if stored else "no backbone features"
        need = ("no grayscale input for the fine-tuned backbone" if vac.backbone_trained else
                f"{what}, not the {vac.config['backbone']} features the hybrid VAC {vac_spec} reads")
        raise UserError(f"{data_path}: holds {need}; re-run feature_extraction.py --overwrite with --vac "
                        f"{vac_spec}")
    if not vac.backbone_trained:
        print(f"note: {data_path} holds {stored} features; {vac.config['backbone']}'s are computed each step from the "
              f"grayscale input it stores (slower steps)", file=sys.stderr)
    dataset.backbone = {}


def stack(dataset: LatentDataset, indices, device) -> dict:
    """A batch: tensors on `device`; numpy arrays (the hint sources) stay numpy."""
    items = [dataset[int(i)] for i in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) if torch.is_tensor(items[0][key])
            else np.stack([item[key] for item in items]) for key in items[0]}


def hybrid_condition(vac: HybridVAC, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A hybrid VAC's tokens and spatial map for a batch: from the cached backbone maps where training reads them
    (choose_backbone_maps), else from the grayscale input."""
    if BACKBONE_KEYS[0] not in batch:
        return vac(batch["vac_gray"])
    return vac.head([batch[key] for key in BACKBONE_KEYS])


def head_suggestion(head: ColorHead, batch: dict) -> torch.Tensor:
    """The colour head's calibrated chroma (vividness 0) for a batch, from its cached backbone maps and the
    backbone's grayscale input, at the working size: Bx2xhxw on the 8-bit scale."""
    with torch.no_grad():
        chroma = head.chroma(head([batch[key] for key in BACKBONE_KEYS], batch["vac_gray"]), 0.0)
    return F.interpolate(chroma, size=batch["gray"].shape[-2:], mode="bilinear", align_corners=False)


def complete_batch(batch: dict, vac, hint_rngs: list[np.random.Generator] | None, none_fraction: float = 1.0,
                   head: ColorHead | None = None, head_fraction: float = 0.0) -> dict:
    """The model's inputs for a batch: VAC tokens when latent.npz has none (with gradients when the VAC trains; a
    hybrid VAC makes them, and its spatial map, from the cached backbone features or, fine-tuning its backbone, from
    the grayscale input), and colour hints when the UNet takes them (`hint_rngs`: one generator per row, None for a
    UNet without hints). With a colour `head`, a `head_fraction` of the rows without dense hints get its suggestion
    wherever they have no hint, as sampling gives it."""
    batch = {key: value for key, value in batch.items() if torch.is_tensor(value)} | \
        {key: value for key, value in batch.items() if not torch.is_tensor(value) and hint_rngs is not None}
    suggestion = head_suggestion(head, batch) if head is not None and hint_rngs is not None else None
    if isinstance(vac, HybridVAC):
        batch["tokens"], batch["spatial"] = hybrid_condition(vac, batch)
        for key in (*BACKBONE_KEYS, "vac_gray"):
            batch.pop(key, None)
    elif "tokens" not in batch:
        batch["tokens"] = vac(batch["gray"])
    if hint_rngs is not None:
        hints, dense = draw_training_hints(batch.pop("chroma"), batch.pop("partner_chroma"),
                                           batch.pop("partner_mask"), hint_rngs, none_fraction)
        hints = hints.to(batch["gray"].device)
        if suggestion is not None:
            suggested = [not d and rng.random() < head_fraction for d, rng in zip(dense, hint_rngs)]
            rows = torch.tensor(suggested, device=hints.device).view(-1, 1, 1, 1)
            hints = torch.where(rows, fill_hints(hints, suggestion, HEAD_HINT_MASK), hints)
        batch["hints"] = hints
    return batch


def hint_generators(seed: int, step: int, rows: range) -> list[np.random.Generator]:
    """The hint draws of rows `rows` of global step `step`: a function of --seed, the step and the row alone."""
    return [np.random.default_rng([seed, step, 2, row]) for row in rows]


@torch.no_grad()
def validation_loss(unet, vac, dataset, indices, scheduler, downscale, device, batch_size: int, hints: bool,
                    head: ColorHead | None = None) -> float:
    """Plain v-MSE of held-out items without hints (but the colour head's suggestion, where the model takes one):
    automatic colorization as sampling does it, comparable between runs of the same kind."""
    generator = torch.Generator(device=device).manual_seed(1234)
    losses = []
    for i in range(0, min(len(indices), 256), batch_size):
        batch = stack(dataset, indices[i : i + batch_size], device)
        rows = range(len(batch["latents"]))
        batch = complete_batch(batch, vac, hint_generators(0, 0, rows) if hints else None, none_fraction=1.0,
                               head=head, head_fraction=1.0)
        losses.append(diffusion_loss(unet, batch, scheduler, 0.0, downscale, generator=generator).item())
    return float(np.mean(losses))


def save_sample_grid(colorizer: Colorizer, dataset, indices, path: Path) -> None:
    """A PNG for people: grayscale | sampled colours | ground truth, one row per held-out frame."""
    batch = stack(dataset, indices[:: max(1, len(indices) // 6)][:6], colorizer.device)
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    tokens, spatial = batch.get("tokens"), None
    if isinstance(colorizer.vac, HybridVAC):
        with torch.no_grad():
            tokens, spatial = hybrid_condition(colorizer.vac, batch)
    head_input = {"vac_gray": batch["vac_gray"], "vividness": 0.0} if colorizer.color_heads else {}
    latents = colorizer.sample_latents(batch["gray"], noise, "ddim", 20, tokens=tokens, spatial=spatial, **head_input)
    predicted, truth = colorizer.decode_chroma(latents), colorizer.decode_chroma(batch["latents"])
    gray = (batch["gray"][:, 0].cpu().numpy() * 255).round().astype(np.uint8)
    rows = [np.concatenate([np.repeat(g[..., None], 3, 2), combine(g, p), combine(g, t)], 1)
            for g, p, t in zip(gray, predicted, truth)]
    write_image_rgb(path, np.concatenate(rows, 0))


def check_args(args: argparse.Namespace) -> None:
    for name in ("net_dimension", "batch_size", "max_steps", "checkpoint_every", "keep_checkpoints", "validate_every",
                 "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout {args.dropout}: must be in [0, 1)")
    if args.color_head and not args.hints:
        raise UserError("--color-head: the head speaks through the UNet's hint input; add --hints")
    if not 0 <= args.head_fraction <= 1:
        raise UserError(f"--head-fraction {args.head_fraction}: must be in [0, 1]")
    if not args.data and not args.dataset_name:
        raise UserError("no data: pass --dataset-name NAME (data/NAME/latent.npz) or --data PATH")


def load_data(args: argparse.Namespace) -> tuple[LatentDataset, Path, str, str]:
    """latent.npz and the specs of the VAE and VAC that made it."""
    data_path = args.data or (args.data_dir / args.dataset_name / "latent.npz")
    dataset = LatentDataset(data_path)
    vae_spec, vac_spec = args.vae or dataset.meta.get("vae"), args.vac or dataset.meta.get("vac")
    if not vae_spec or not vac_spec:
        raise UserError(f"{data_path}: does not name the VAE and VAC that made it; pass --vae and --vac, or re-run "
                        f"feature_extraction.py --overwrite")
    if args.hints and dataset.hint_sources is None:
        raise UserError(f"{data_path}: holds no hint sources for --hints; re-run feature_extraction.py with --hints")
    if args.train_vac and dataset.tokens is not None:
        print(f"note: {data_path} holds VAC tokens; --train-vac computes them anew each step", file=sys.stderr)
        dataset.tokens = None
    return dataset, data_path, vae_spec, vac_spec


def prepare_run_dir(args: argparse.Namespace, accelerator) -> Path:
    """runs/<run>/, checked and cleaned (of a --overwrite'd run, of what a kill left half-written)."""
    run_dir = args.output_dir / args.run_name
    check_writable(run_dir, "an --output-dir")
    if run_dir.exists() and any(run_dir.iterdir()) and not (args.resume or args.overwrite):
        raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or --overwrite to restart")
    accelerator.wait_for_everyone()  # every process has looked at the run folder before the main one changes it
    if accelerator.is_main_process:
        if args.overwrite and run_dir.exists():
            discard(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir, "checkpoint-*")  # half-written checkpoints of a killed run
    accelerator.wait_for_everyone()
    return run_dir


@dataclass
class Models:
    """What trains (the UNet, and the VAC with --train-vac), their EMA, the optimizer and its schedule."""

    unet: torch.nn.Module
    vac: torch.nn.Module
    ema: object
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    ema_vac: object | None = None
    vac_copy: torch.nn.Module | None = None

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def update(self, accelerator, loss: torch.Tensor) -> None:
        """One optimizer step on this loss (gradients clipped to norm 1), then the schedule and the EMA weights."""
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(self.trained_parameters(), 1.0)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())
        if self.ema_vac is not None:
            self.ema_vac.step(self.vac.parameters())

    def averaged_vac(self) -> torch.nn.Module:
        """The VAC inference uses: its EMA weights when it trains."""
        if self.ema_vac is None:
            return self.vac
        self.ema_vac.copy_to(self.vac_copy.parameters())
        return self.vac_copy.to(next(self.vac.parameters()).device).eval()


def build_models(args: argparse.Namespace, accelerator, dataset: LatentDataset, vac, downscale: int) -> Models:
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    latent_channels, latent_size = dataset.latents.shape[1], dataset.latents.shape[-1]
    unet = build_unet(latent_channels, downscale, vac.token_dim, args.net_dimension, latent_size, args.dropout,
                      HINT_CHANNELS if args.hints else 0, vac_spatial_channels(vac))
    if args.init_from:
        initialize_from(args.init_from, unet, vac if args.train_vac else None)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=type(unet), model_config=unet.config)
    groups = [{"params": list(unet.parameters())}]
    if args.train_vac:
        backbone = set(vac.backbone.parameters()) if isinstance(vac, HybridVAC) else set()
        groups.append({"params": [p for p in vac.parameters() if p.requires_grad and p not in backbone],
                       "lr": args.lr * args.vac_lr_scale})
        if args.train_backbone:
            groups.append({"params": list(vac.backbone.parameters()),
                           "lr": args.lr * args.vac_lr_scale * args.backbone_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    if args.train_vac:
        ema_vac, vac_copy = EMAModel(vac.parameters(), decay=args.ema_decay), copy.deepcopy(vac)
        unet, vac, optimizer, lr_schedule = accelerator.prepare(unet, vac, optimizer, lr_schedule)
        accelerator.register_for_checkpointing(ema_vac)
        ema_vac.to(accelerator.device)
    else:
        ema_vac = vac_copy = None
        unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)
        vac.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    ema.to(accelerator.device)
    return Models(unet, vac, ema, optimizer, lr_schedule, ema_vac, vac_copy)


def initialize_from(folder: Path, unet, vac) -> None:
    """Copy a model folder's UNet (and VAC) weights into the freshly built ones; the shapes must match, but for a
    UNet input widened by a hybrid VAC's spatial map (the last channels of modules.unet_input): those new input
    channels start at zero weight, so the run begins as the model it came from. A VAC of another kind than the
    folder's keeps its fresh weights; a hybrid VAC on another backbone takes the head's parts that fit (see
    load_hybrid_head)."""
    from diffusers import UNet2DConditionModel

    from colorizer import resolve_component, resolve_model_folder

    folder = resolve_model_folder(folder)
    try:
        weights = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).state_dict()
        widened = unet.state_dict()["conv_in.weight"].shape[1] - weights["conv_in.weight"].shape[1]
        if widened > 0:
            weights["conv_in.weight"] = F.pad(weights["conv_in.weight"], (0, 0, 0, 0, 0, widened))
        unet.load_state_dict(weights)
        if vac is not None:
            config = json.loads((folder / CONFIG_NAME).read_text())
            source = load_vac(resolve_component(config["vac"], folder))
            if isinstance(source, HybridVAC) and isinstance(vac, HybridVAC):
                load_hybrid_head(vac, source)
            elif not isinstance(source, HybridVAC) and not isinstance(vac, HybridVAC):
                vac.vit.load_state_dict(source.vit.state_dict())
            else:
                print(f"note: --init-from {folder}: its VAC is of another kind; the run's VAC starts fresh",
                      file=sys.stderr)
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        raise UserError(f"--init-from {folder}: does not fit this run ({first_line(error)}); pass the --net-dimension, "
                        f"--hints and data it was trained with") from None


def load_hybrid_head(vac: HybridVAC, source: HybridVAC) -> None:
    """`source`'s trained weights into `vac`. On the same backbone, all of them; on another one, only the head's
    tensors of the same shape (the transformer layers, positions, norms and the spatial output), while the
    projections of the backbone's maps, whose widths differ, and the backbone itself keep their fresh weights."""
    if source.config["backbone"] == vac.config["backbone"]:
        vac.load_state_dict(source.trained_state_dict(), strict=False)
        vac.config["backbone_trained"] = vac.backbone_trained or source.backbone_trained
        return
    own = vac.head_state_dict()
    fitting = {k: v for k, v in source.head_state_dict().items() if k in own and own[k].shape == v.shape}
    vac.load_state_dict(fitting, strict=False)
    print(f"note: the VAC's head reads {vac.config['backbone']}, not {source.config['backbone']}: "
          f"{len(fitting)} of its {len(own)} tensors start from the model's, the rest fresh", file=sys.stderr)


def steps_before(args: argparse.Namespace, run_dir: Path) -> int:
    """The training steps behind the run's starting weights: those of the --init-from model, counting the runs it
    went on from; a resumed run keeps what its checkpoint recorded."""
    from colorizer import resolve_model_folder

    resumed = checkpoints_of(run_dir)[-1:] if args.resume else []
    if resumed:
        return int(json.loads((resumed[0] / CONFIG_NAME).read_text()).get("steps_before", 0))
    if not args.init_from:
        return 0
    config = json.loads((resolve_model_folder(args.init_from) / CONFIG_NAME).read_text())
    return int(config.get("step", 0)) + int(config.get("steps_before", 0))


def resume(args: argparse.Namespace, accelerator, run_dir: Path, fingerprints: dict) -> int:
    """With --resume, load the newest complete checkpoint's state; returns the step to continue from."""
    existing = checkpoints_of(run_dir)
    if not args.resume:
        return 0
    if not existing:
        accelerator.print(f"{run_dir}: no checkpoint to resume from; starting at step 0")
        return 0
    check_resumable(existing[-1], args, fingerprints)
    try:
        accelerator.load_state(str(existing[-1] / "state"))
    except Exception as error:  # torch, safetensors and accelerate each raise their own kinds
        raise UserError(f"{existing[-1]}: cannot be resumed ({first_line(error)}); pass the options it was "
                        f"trained with, or delete it to resume from the checkpoint before it") from None
    step = int(existing[-1].name.split("-")[1])
    accelerator.print(f"resumed {existing[-1]} at step {step}")
    if accelerator.is_main_process:
        for name in LOG_NAMES:
            truncate_log(run_dir / name, step)
    return step


def run_config(args: argparse.Namespace, accelerator, run_dir: Path, data: tuple[LatentDataset, Path, int],
               component_specs: tuple[str, str], fingerprints: dict, scheduler) -> dict:
    """What a checkpoint's colorizer.json records: the components (copied into the run folder when local), the
    network's shape and the data and settings it was trained with. data: the dataset, its path and the number of
    training items."""
    dataset, data_path, train_count = data
    vae_spec, vac_spec = component_specs
    return {
        "vae": copy_local_component(vae_spec, run_dir, "vae") if accelerator.is_main_process else None,
        "vac": copy_local_component(vac_spec, run_dir, "vac") if accelerator.is_main_process else None,
        **fingerprints,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "image_size": int(dataset.meta.get("image_size", 64)),
        "scheduler": dict(scheduler.config),
        "net_dimension": args.net_dimension,
        "dropout": args.dropout,
        "cond_dropout": args.cond_dropout,
        **({"hint_channels": HINT_CHANNELS} if args.hints else {}),
        **({"color_head": copy_local_component(str(args.color_head), run_dir, "color")
            if accelerator.is_main_process else None, "head_hint_mask": HEAD_HINT_MASK} if args.color_head else {}),
        **({"train_vac": True, "vac": "vac"} if args.train_vac else {}),
        **({"train_backbone": True} if args.train_backbone else {}),
        "dataset": str(data_path),
        "train_frames": train_count,
        "steps_before": steps_before(args, run_dir),
    }


def share_step_state(accelerator, loss: torch.Tensor, signum: int, out_of_time: bool) -> tuple[float, int, bool]:
    """One collective per step: the loss averaged over the processes, and whether any of them got a signal or ran
    out of time, so that all of them checkpoint and stop together (a process stopping alone would leave the others
    waiting). -> (mean loss, the largest signal number, out of time)."""
    flags = torch.tensor([signum, out_of_time], device=accelerator.device)
    shared = accelerator.gather(torch.cat([loss.detach().float().reshape(1), flags.float()])).reshape(-1, 3)
    return shared[:, 0].mean().item(), int(shared[:, 1].max().item()), bool(shared[:, 2].max().item())


def install_stop_handler(accelerator) -> list:
    """The first Ctrl-C / SIGTERM stops after this step with a checkpoint; a second one stops at once (the newest
    complete checkpoint is never touched by a checkpoint being written). Under a launcher, a Ctrl-C reaches each
    process twice within milliseconds (from the terminal, then passed on by the launcher): a repeat within 2 s is
    that one signal. Returns the list that holds (signal, time) once one came."""
    stop_requested, launched = [], "TORCHELASTIC_RUN_ID" in os.environ  # torchrun or accelerate launch

    def request_stop(number: int, frame) -> None:
        if stop_requested:
            if launched and time.time() - stop_requested[1] < 2:
                return
            raise Interrupted(number)
        stop_requested.extend((number, time.time()))
        who = f"process {accelerator.process_index}: " if accelerator.num_processes > 1 else ""
        print(f"\n{who}{signal.Signals(number).name}: stopping after this step with a checkpoint (send it again to "
              f"stop at once)", flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    return stop_requested


def save_checkpoint(models: Models, accelerator, run_dir: Path, config: dict, step: int, keep: int) -> None:
    """checkpoint-<step>/: EMA UNet (and VAC) + colorizer.json (a usable model) and the full training state."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_path(run_dir / f"checkpoint-{step}", overwrite=True, is_dir=True) as temp:
            accelerator.save_state(str(temp / "state"))
            unet = accelerator.unwrap_model(models.unet)
            with torch.random.fork_rng(devices=[]):  # random init would shift the RNG: resume must match
                ema_unet = type(unet).from_config(unet.config)
            models.ema.copy_to(ema_unet.parameters())
            ema_unet.save_pretrained(temp / "unet")
            saved = {**config, "step": step}
            if models.ema_vac is not None:
                save_vac(models.averaged_vac(), temp / "vac")
                saved["vac_fingerprint"] = vac_fingerprint(models.averaged_vac())
            (temp / CONFIG_NAME).write_text(json.dumps(saved, indent=2))
        for old in checkpoints_of(run_dir)[:-keep]:
            discard(old)
    accelerator.wait_for_everyone()


def validate(models: Models, accelerator, run_dir: Path, config: dict, step: int, data: tuple, vae, scheduler,
             args: argparse.Namespace, head: ColorHead | None = None) -> None:
    """Validation loss and a sample grid of the held-out items (`data`: the dataset and their indices), with the EMA
    weights."""
    if not accelerator.is_main_process:
        return
    dataset, val_ids = data
    model = accelerator.unwrap_model(models.unet)
    models.ema.store(model.parameters())
    models.ema.copy_to(model.parameters())
    model.eval()
    downscale, vac = vae_downscale(vae), models.averaged_vac()
    loss = validation_loss(model, vac, dataset, val_ids, scheduler, downscale, accelerator.device, args.batch_size,
                           args.hints, head)
    heads = (head,) if head is not None else ()
    colorizer = Colorizer(model, vae.to(accelerator.device), vac, config, accelerator.device, heads)
    save_sample_grid(colorizer, dataset, val_ids, run_dir / f"samples-{step:07d}.png")
    model.train()
    models.ema.restore(model.parameters())
    append_log(run_dir / "validation.jsonl", {"step": step, "val_loss": loss})
    accelerator.print(f"step {step}: validation loss {loss:.4f}")


def main() -> None:
    args = parse_args()  # before the heavy imports: --help and a wrong flag answer at once
    check_args(args)
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    # split_batches: each step's global batch is split across the processes, so the learning-rate schedule steps
    # once per step (by default Accelerate steps it once per process, and N processes would run through it N times
    # faster)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if args.batch_size % accelerator.num_processes:
        raise UserError(f"--batch-size {args.batch_size}: must be a multiple of the {accelerator.num_processes} "
                        f"processes, which take equal shares of it; e.g. "
                        f"{math.ceil(args.batch_size / accelerator.num_processes) * accelerator.num_processes}")
    set_seed(args.seed)
    dataset, data_path, vae_spec, vac_spec = load_data(args)
    if vac_spec.startswith("timm:") and not args.train_vac:
        raise UserError(f"VAC {vac_spec}: a new hybrid VAC, its head untrained; add --train-vac")
    vae = load_vae(vae_spec).eval().requires_grad_(False)
    vac = load_vac(vac_spec).eval().requires_grad_(args.train_vac)
    if args.train_backbone and not (args.train_vac and isinstance(vac, HybridVAC)):
        raise UserError(f"--train-backbone: needs --train-vac and a hybrid VAC (--vac timm:efficientnet_lite0, or a "
                        f"folder of one), not {vac_spec}")
    if isinstance(vac, HybridVAC):
        vac.config["backbone_trained"] = args.train_backbone or vac.backbone_trained
        vac.backbone.requires_grad_(args.train_backbone)  # else frozen: its maps cached, or computed from vac_gray
    check_components(dataset, data_path, vae, vac, vae_spec, vac_spec)
    head = load_suggesting_head(args, vac, dataset, data_path, accelerator.device)
    fingerprints = {"vae_fingerprint": vae_fingerprint(vae), "vac_fingerprint": vac_fingerprint(vac)}
    run_dir = prepare_run_dir(args, accelerator)
    downscale = vae_downscale(vae)
    models = build_models(args, accelerator, dataset, vac, downscale)
    scheduler = DDPMScheduler(num_train_timesteps=args.train_timesteps, beta_schedule=args.beta_schedule,
                              prediction_type=args.prediction_type, clip_sample=False)
    step = resume(args, accelerator, run_dir, fingerprints)
    if step >= args.max_steps:
        accelerator.print(f"already at step {step}; pass a larger --max-steps to train on")
        return
    train_ids, val_ids = split(dataset, args)
    weights = source_weights(dataset.sources()[train_ids], args.source_power)
    config = run_config(args, accelerator, run_dir, (dataset, data_path, len(train_ids)), (vae_spec, vac_spec),
                        fingerprints, scheduler)
    accelerator.print(f"UNet {parameter_count(models.unet) / 1e6:.2f}M parameters; {len(train_ids)} train / "
                      f"{len(val_ids)} val items; {accelerator.num_processes} process(es) on {accelerator.device}")
    stop_requested = install_stop_handler(accelerator)

    per_process = args.batch_size // accelerator.num_processes
    part = (accelerator.process_index * per_process, args.batch_size)  # this process's rows of each global batch
    start, losses, signum = time.time(), [], 0
    progress = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_main_process, desc="training")
    models.unet.train()
    while step < args.max_steps:
        indices = np.array(train_ids)[batch_indices(step, args.batch_size, len(train_ids), args.seed, weights)]
        mine = indices[part[0] : part[0] + per_process]
        rows = range(part[0], part[0] + per_process)
        with accelerator.autocast():
            batch = complete_batch(stack(dataset, mine, accelerator.device), models.vac,
                                   hint_generators(args.seed, step, rows) if args.hints else None,
                                   args.hint_none_fraction, head, args.head_fraction)
            loss = diffusion_loss(models.unet, batch, scheduler, args.cond_dropout, downscale, args.snr_gamma,
                                  step_generator(args.seed, step, accelerator.device), part)
        models.update(accelerator, loss)
        step += 1
        out_of_time = bool(args.max_minutes) and time.time() - start > args.max_minutes * 60
        signal_here = stop_requested[0] if stop_requested else 0
        mean_loss, signum, out_of_time = share_step_state(accelerator, loss, signal_here, out_of_time)
        losses.append(mean_loss)
        if not math.isfinite(losses[-1]):
            raise UserError(f"{run_dir}: the loss became {losses[-1]} at step {step}; resume from the last checkpoint "
                            f"with a lower --lr (or --mixed-precision no)")
        progress.update(1)
        if step % args.log_every == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-args.log_every:]):.4f}")
            if accelerator.is_main_process:
                append_log(run_dir / "train_loss.jsonl",
                           {"step": step, "loss": float(np.mean(losses[-args.log_every:]))})
        if signum or out_of_time or step % args.checkpoint_every == 0 or step == args.max_steps:
            save_checkpoint(models, accelerator, run_dir, config, step, args.keep_checkpoints)
        if step % args.validate_every == 0 or step == args.max_steps:
            validate(models, accelerator, run_dir, config, step, (dataset, val_ids), vae, scheduler, args, head)
        if signum or out_of_time:
            accelerator.print(f"stopped at step {step} with checkpoint-{step}; continue with --resume")
            break
    progress.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if signum and step < args.max_steps:
        sys.exit(128 + signum)  # interrupted, not finished: the shell convention for a signal


if __name__ == "__main__":
    run_cli(main)
