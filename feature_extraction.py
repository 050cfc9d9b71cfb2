"""Stage 1: colour frame folders -> data/<dataset>/latent.npz, the cached training features.

  python feature_extraction.py --dataroot ../shared/data/train --dataset-name corpus \
      --vae unet_model/default/vae --vac unet_model/default/vac

For every frame (root/<video>/00000.jpg ...; any depth of folders): the VAE latent of the colour frame (posterior
mean x the VAE's scaling factor), every last-layer VAC token of the grayscale frame, and the grayscale frame itself
(the denoiser's spatial condition), all at --image-size (short side resized, centre square). With a hybrid VAC
(`--vac timm:efficientnet_lite0`, or a trained one's folder), the feature maps of its frozen ImageNet backbone on the
grayscale frame at twice that size are stored instead of tokens, and that grayscale input itself: training then runs
only the VAC's head on the maps, or fine-tunes the backbone too on its input (train_diffusion.py --train-backbone).
Work is written in shards, so an interrupted run resumes where it stopped; latent.npz appears only when complete.

Under `accelerate launch` or torchrun, N processes (GPUs, machines sharing the --data-dir folder) take every Nth
shard each, and the main process merges them: the same latent.npz as one process makes.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from dataset import FrameFolderDataset, FrameRecord, gray_batch, scan_frame_folders
from modules import (BACKBONE_KEYS, BACKBONE_SCALE, HybridVAC, load_vac, load_vae, model_multiple, round_to_multiple,
                     vac_fingerprint, vae_downscale, vae_fingerprint, vae_input)
from guidance import partner_hints
from utils import (UserError, atomic_path, check_writable, choose_device, remove_stale_temporaries, rgb_to_chroma,
                   run_cli)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataroot", type=Path, nargs="+", required=True, help="root(s) of frame folders")
    parser.add_argument("--dataset-name", required=True, help="writes data/<name>/latent.npz")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--image-size", type=int, default=64, help="the model's working resolution (short side)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vae", default="unet_model/default/vae",
                        help="VAE folder or hub id (e.g. stabilityai/sd-vae-ft-mse)")
    parser.add_argument("--vac", default="unet_model/default/vac",
                        help="VAC folder, torchvision:vit_b_32, or timm:efficientnet_lite0 (a hybrid VAC's backbone)")
    parser.add_argument("--flip", action="store_true", help="also store each frame mirrored (doubles the data)")
    parser.add_argument("--random-crops", type=int, default=0,
                        help="store N random crops of each frame (50-100%% of its short side, randomly mirrored) "
                        "instead of its centre square: the augmentation that keeps the denoiser from memorizing scenes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    parser.add_argument("--hints", action="store_true",
                        help="also store what training draws colour hints from: each item's chroma and, for frames "
                        "of clips, another frame of the clip warped onto it by the optical flow, with its reliability")
    parser.add_argument("--partner-distance", type=int, default=8,
                        help="with --hints: the other frame lies at most this many frames away")
    parser.add_argument("--clips", nargs="+", default=["*"],
                        help="with --hints: video folders (patterns relative to --dataroot) whose images are "
                        "consecutive frames, not a photo collection, e.g. 'videos/*'")
    parser.add_argument("--no-tokens", dest="tokens", action="store_false",
                        help="do not store VAC tokens (train_diffusion.py then computes them, and can train the VAC)")
    parser.add_argument("--shard-size", type=int, default=1024, help="frames per resumable shard")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing latent.npz, and discard shards "
                        "an interrupted run left with other settings")
    return parser.parse_args()


@torch.inference_mode()
def extract_batch(rgb: np.ndarray, vae, vac, device: torch.device, partner: np.ndarray | None = None,
                  large_gray: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Features of a batch of colour views; `vac` None stores no tokens, a hybrid VAC its backbone's maps of
    `large_gray` (the views' luma at BACKBONE_SCALE x the size) and `large_gray` itself; with `partner` (the views'
    partner frames, all-zero where there is none), the hint sources too."""
    gray = gray_batch(rgb)
    latents = vae.encode(vae_input(rgb, vae).to(device)).latent_dist.mean * vae.config.scaling_factor
    features = {"latents": latents.cpu().numpy().astype(np.float16), "gray": (gray[:, 0] * 255).round().byte().numpy()}
    if isinstance(vac, HybridVAC):
        features["vac_gray"] = large_gray
        large = torch.from_numpy(large_gray).float().unsqueeze(1).to(device) / 255.0
        for key, value in zip(BACKBONE_KEYS, vac.features(large)):
            features[key] = value.cpu().numpy().astype(np.float16)  # ReLU6 outputs: float16 holds them exactly enough
    elif vac is not None:
        features["tokens"] = vac(gray.to(device)).cpu().numpy().astype(np.float16)
    if partner is not None:
        features.update(hint_sources(rgb, features["gray"], partner))
    return features


def hint_sources(rgb: np.ndarray, gray: np.ndarray, partner: np.ndarray) -> dict[str, np.ndarray]:
    """Chroma (int8: BT.601 Cb/Cr lie within +-128) of each view, and its partner's chroma warped onto it with the
    flow's reliability (zero where there is no partner)."""
    chroma = np.stack([rgb_to_chroma(view) for view in rgb])
    partner_chroma, partner_mask = np.zeros_like(chroma), np.zeros(chroma.shape[:3], np.uint8)
    for i in np.flatnonzero(partner.reshape(len(partner), -1).any(axis=1)):
        carried, reliable = partner_hints(gray[i], partner[i])
        partner_chroma[i], partner_mask[i] = carried, reliable > 0.5
    to_int8 = lambda c: np.clip(np.round(c), -128, 127).astype(np.int8)  # noqa: E731
    return {"chroma": to_int8(chroma), "partner_chroma": to_int8(partner_chroma), "partner_mask": partner_mask}


def extract_shard(dataset: FrameFolderDataset, indices: list[int], vae, vac, device, batch_size: int,
                  workers: int, progress) -> dict[str, np.ndarray]:
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=workers, collate_fn=stack_views)
    parts: dict[str, list[np.ndarray]] = {}
    try:
        for batch in loader:
            rgb, partners, large = batch["rgb"], batch.get("partner"), batch.get("large_gray")
            for v in range(rgb.shape[1]):  # B x views x H x W x 3 -> one batch per view
                partner = partners[:, v] if partners is not None else None
                large_view = large[:, v] if large is not None else None
                for key, value in extract_batch(rgb[:, v], vae, vac, device, partner, large_view).items():
                    parts.setdefault(key, []).append(value)
            progress.update(len(rgb))
    except UserError as error:  # from a DataLoader worker, the message carries the worker's traceback
        raise UserError(str(error).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None
    records = [dataset.records[i] for i in indices]
    # Batches interleave [view 1 of the frames, view 2, ..., mirrored views]; index arrays follow the same order.
    order = [r for start in range(0, len(records), batch_size) for _ in range(dataset.views)
             for r in records[start : start + batch_size]]
    shard = {key: np.concatenate(values) for key, values in parts.items()}
    shard["frame_indices"] = np.array([r.index for r in order], dtype=np.int32)
    shard["video_names"] = np.array([r.video for r in order])
    for key in ("latents", "tokens"):
        if key in shard and not np.isfinite(shard[key]).all():
            bad = order[int(np.flatnonzero(~np.isfinite(shard[key]).reshape(len(order), -1).all(axis=1))[0])]
            component = "VAE" if key == "latents" else "VAC"
            raise UserError(f"{bad.path}: the {component} gives NaN or inf for this frame; check the {component}'s "
                            f"weights (or its float16 range)")
    return shard


def stack_views(items: list[dict]) -> dict[str, np.ndarray]:
    return {key: np.stack([item[key] for item in items]) for key in items[0] if key != "index"}


def shard_job(records: list[FrameRecord], args: argparse.Namespace, vae_print: str, vac_print: str,
              backbone: str | None = None) -> dict:
    """What a shard's content depends on, stored in it: a resumed run must not mix shards made otherwise."""
    import hashlib

    listing = "\n".join(f"{r.video}\t{r.index}\t{r.path.name}" for r in records)
    frames = hashlib.sha256(listing.encode()).hexdigest()[:16]
    interleaved = args.flip or args.random_crops > 0
    job = {"vae": vae_print, "vac": vac_print if args.tokens and not backbone else None, "image_size": args.image_size,
           "flip": args.flip, "random_crops": args.random_crops, "seed": args.seed if args.random_crops else None,
           "batch_size": args.batch_size if interleaved else None, "frames": frames}
    if backbone:  # recorded only when used, as --hints
        job.update(backbone=backbone, vac_gray=True)
    if args.hints:  # recorded only when used, so shards of earlier runs without it still resume
        job.update(hints=True, partner_distance=args.partner_distance, clips=sorted(args.clips))
    return job


def check_shard(path: Path, job: dict, overwrite: bool) -> bool:
    """True if the shard at `path` was made by this same job; a shard from other settings is an error (it is
    discarded with --overwrite)."""
    import json

    try:
        with np.load(path) as shard:
            stored = json.loads(str(shard["job"])) if "job" in shard.files else {}
    except Exception as error:  # zip, pickle or json errors of a damaged file
        stored = {"damaged": str(error)}
    if stored == job:
        return True
    if overwrite:
        path.unlink()
        return False
    names = {"vae": "VAE (--vae)", "vac": "VAC (--vac) or --no-tokens", "image_size": "--image-size", "flip": "--flip",
             "random_crops": "--random-crops", "seed": "--seed", "hints": "--hints",
             "partner_distance": "--partner-distance", "clips": "--clips", "backbone": "hybrid VAC backbone (--vac)",
             "vac_gray": "version of feature_extraction.py",
             "batch_size": "--batch-size", "frames": "set of frames under --dataroot"}
    changed = [names[key] for key in {**stored, **job} if stored.get(key) != job.get(key)] \
        if "damaged" not in stored else ["damaged"]
    what = "is damaged" if changed == ["damaged"] else f"was made with another {', '.join(changed)}"
    raise UserError(f"{path}: {what} by an earlier, interrupted run; repeat that run's options to resume it, or pass "
                    f"--overwrite to discard its shards")


def main() -> None:
    from tqdm import tqdm

    args = parse_args()
    check_args(args)
    out_dir = args.data_dir / args.dataset_name
    final = out_dir / "latent.npz"
    if final.exists() and not args.overwrite:
        raise UserError(f"{final}: already exists; pass --overwrite to rebuild it or choose another --dataset-name")
    check_writable(out_dir, "a --data-dir")
    from accelerate import Accelerator

    device = choose_device(args.device)  # checks the flag
    accelerator = Accelerator(cpu=device.type == "cpu")
    if accelerator.num_processes > 1:
        device = accelerator.device  # each process its own device (cuda:<local rank>), or the CPU
    rank, world, main_process = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    vae, vac = load_vae(args.vae).to(device).eval(), load_vac(args.vac).to(device).eval()
    vac_print = vac_fingerprint(vac)
    backbone = vac.config["backbone"] if isinstance(vac, HybridVAC) else None
    vac = vac if args.tokens or backbone else None
    if args.image_size % model_multiple(vae):
        raise UserError(f"--image-size {args.image_size}: must be a multiple of {model_multiple(vae)} for this VAE "
                        f"(its downscale x 4), e.g. {round_to_multiple(args.image_size, model_multiple(vae))}")
    records = scan_records(args.dataroot)
    clips = frozenset(r.video for r in records if any(fnmatch.fnmatch(r.video, p) for p in args.clips))
    dataset = FrameFolderDataset(records, args.image_size, args.random_crops, args.seed, args.flip,
                                 args.partner_distance if args.hints else 0, clips,
                                 BACKBONE_SCALE * args.image_size if backbone else 0)
    shard_dir = out_dir / "shards"
    shard_ranges = [list(range(start, min(start + args.shard_size, len(records))))
                    for start in range(0, len(records), args.shard_size)]
    vae_print = vae_fingerprint(vae)
    extras = sorted(shard_dir.glob("shard-*.npz"))[len(shard_ranges) :]
    if extras and not args.overwrite:
        raise UserError(f"{extras[0]}: an earlier, interrupted run had more frames under --dataroot; repeat its "
                        f"options to resume it, or pass --overwrite to discard its shards")
    wait_for_all(accelerator)  # every process has looked before the main one changes the folder
    created = []
    if main_process:
        created = [shard_dir, *(folder for folder in shard_dir.parents if not folder.exists())]
        shard_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(shard_dir, "shard-*")  # left by a killed run
        remove_stale_temporaries(out_dir, "latent")
        for extra in extras:
            extra.unlink()
    wait_for_all(accelerator)
    mine = [number for number in range(len(shard_ranges)) if number % world == rank]  # every Nth shard
    accelerator.print(f"{len(records)} frames, {len(shard_ranges)} shards, {world} process(es) -> {final}")
    if world > 1:
        print(f"process {rank} of {world}: {len(mine)} shard(s), {sum(len(shard_ranges[n]) for n in mine)} frames"
              + ("; a smaller --shard-size would give it work" if not mine else ""), flush=True)
    with tqdm(total=sum(len(shard_ranges[n]) for n in mine), desc="extracting", unit="frame",
              disable=not main_process) as progress, remove_if_empty(created):
        for number in mine:
            indices = shard_ranges[number]
            path = shard_dir / f"shard-{number:05d}.npz"
            job = shard_job([dataset.records[i] for i in indices], args, vae_print, vac_print, backbone)
            if path.exists() and check_shard(path, job, args.overwrite):
                progress.update(len(indices))
                continue
            shard = extract_shard(dataset, indices, vae, vac, device, args.batch_size, args.workers, progress)
            with atomic_path(path) as temp:
                np.savez(temp, **shard, job=json.dumps(job))
    wait_for_all(accelerator)
    if not main_process:
        return  # the main process merges
    merged = merge_shards(sorted(shard_dir.glob("shard-*.npz")), len(shard_ranges))
    merged.update(vae=args.vae, vac=args.vac, image_size=args.image_size, downscale=vae_downscale(vae),
                  scaling_factor=vae.config.scaling_factor, vae_fingerprint=vae_print, vac_fingerprint=vac_print,
                  **({"backbone_name": backbone} if backbone else {}))
    write_dataset(merged, final, shard_dir, args.overwrite)
    tokens = f"tokens {merged['tokens'].shape[1:]}" if "tokens" in merged else \
        f"{backbone} features" if backbone else "no tokens"
    print(f"wrote {final}: {len(merged['latents'])} items, latents {merged['latents'].shape[1:]}, {tokens}"
          + (", hint sources" if args.hints else ""))


def check_args(args: argparse.Namespace) -> None:
    if args.random_crops < 0:
        raise UserError(f"--random-crops {args.random_crops}: must be 0 (centre squares) or more")
    for name in ("image_size", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")


def scan_records(roots: list[Path]) -> list[FrameRecord]:
    """Every frame under the --dataroot folders; with several roots, each video's name starts with its root's, so
    the same folder name under two of them stays two videos."""
    records = []
    for root in roots:
        prefix = f"{root.name}/" if len(roots) > 1 else ""
        records += [FrameRecord(prefix + r.video, r.index, r.path) for r in scan_frame_folders(root)]
    return records


def write_dataset(merged: dict[str, np.ndarray], final: Path, shard_dir: Path, overwrite: bool) -> None:
    """The merged dataset written whole (a temporary file renamed), then the shards it came from removed."""
    with atomic_path(final, overwrite=overwrite) as temp:
        np.savez(temp, **merged)
    for path in shard_dir.glob("shard-*.npz"):
        path.unlink()
    shard_dir.rmdir()


def wait_for_all(accelerator) -> None:
    """A barrier of all processes; if another one failed (its one-line error is printed too), this one ends with
    a one-line error rather than a traceback. A no-op for a single process."""
    try:
        accelerator.wait_for_everyone()
    except Exception:  # gloo: "Connection closed by peer"; NCCL waits until the launcher ends it
        raise UserError("another process stopped with an error (see its message); fix that and run again, which "
                        "resumes from the finished shards") from None


@contextlib.contextmanager
def remove_if_empty(folders: list[Path]):
    """A run that fails before its first shard leaves no empty folders behind (`folders`: innermost first)."""
    try:
        yield
    except BaseException:
        for folder in folders:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds on an empty folder
        raise


def merge_shards(paths: list[Path], expected: int) -> dict[str, np.ndarray]:
    if len(paths) != expected:
        raise UserError(f"{paths[0].parent if paths else 'shards'}: {len(paths)} of {expected} shards; re-run to "
                        f"finish")
    parts: dict[str, list[np.ndarray]] = {}
    for path in paths:
        with np.load(path) as shard:
            for key in shard.files:
                if key != "job":
                    parts.setdefault(key, []).append(shard[key])
    merged = {key: np.concatenate(values) for key, values in parts.items()}
    videos, video_ids = np.unique(merged.pop("video_names"), return_inverse=True)
    merged["videos"], merged["video_ids"] = videos, video_ids.astype(np.int32)
    return merged


if __name__ == "__main__":
    run_cli(main)
