"""Datasets: colour frames from frame folders, random crops for pretraining, the cached latents of latent.npz, and the
items each training step draws from them (batch_indices, source_weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import UserError, resize_short_side, rgb_to_gray
from video_io import list_frames, natural_key, read_image_rgb


@dataclass(frozen=True)
class FrameRecord:
    video: str  # the frame folder's path relative to the data root
    index: int  # position of the frame in its folder, in natural order
    path: Path


def scan_frame_folders(root: Path) -> list[FrameRecord]:
    """Every folder below `root` (at any depth, `root` included) that holds images is one video."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; expected root/<video>/00000.jpg, 00001.jpg, ...")
    subfolders = sorted((p for p in root.rglob("*") if p.is_dir()),
                        key=lambda p: [natural_key(Path(part)) for part in p.relative_to(root).parts])
    records = []
    for folder in [root, *subfolders]:
        name = folder.relative_to(root).as_posix() if folder != root else root.name
        records.extend(FrameRecord(name, i, path) for i, path in enumerate(list_frames(folder)))
    if not records:
        raise UserError(f"{root}: no images found; expected root/<video>/00000.jpg, 00001.jpg, ...")
    return records


Window = tuple[int, int, int, bool]  # top, left, side, mirrored


def random_square_window(height: int, width: int, rng: np.random.Generator, min_fraction: float = 0.5) -> Window:
    """A random square covering `min_fraction` to all of the short side, anywhere in the frame, mirrored half of the
    time: new compositions and scales of the same scene, so the denoiser cannot learn a frame's colours by heart."""
    side = int(round(min(height, width) * rng.uniform(min_fraction, 1.0)))
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    return int(top), int(left), side, bool(rng.random() < 0.5)


def square_view(image: np.ndarray, window: Window, image_size: int) -> np.ndarray:
    """The window's square of `image`, resized to `image_size` (and mirrored if the window says so)."""
    import cv2

    top, left, side, mirrored = window
    crop = image[top : top + side, left : left + side]
    interpolation = cv2.INTER_AREA if side > image_size else cv2.INTER_CUBIC
    view = cv2.resize(crop, (image_size, image_size), interpolation=interpolation)
    return np.ascontiguousarray(view[:, ::-1]) if mirrored else view


class FrameFolderDataset(Dataset):
    """Colour frames (from scan_frame_folders), each as `views` squares of `image_size`: the centre square (short side
    resized), or with `random_crops` that many random squares, drawn from (seed, frame) so a rerun or another
    process makes the same ones; with `flip`, followed by the same squares mirrored.

    With `partner_distance` > 0, every frame of a video named in `clips` (folders of consecutive frames, not photo
    collections) also gets a partner: the same squares of another frame of its clip, at most that many frames away,
    which training warps onto the frame as dense colour hints. Other items get an all-zero partner.

    With `large_size`, each item also holds its squares' luma at that size (`large_gray`): what a hybrid VAC's
    backbone sees, at a finer resolution than the model's working one."""

    def __init__(self, records: list[FrameRecord], image_size: int, random_crops: int = 0, seed: int = 0,
                 flip: bool = False, partner_distance: int = 0, clips: frozenset[str] = frozenset(),
                 large_size: int = 0):
        self.records = records
        self.image_size = image_size
        self.random_crops = random_crops
        self.seed = seed
        self.flip = flip
        self.partner_distance = partner_distance
        self.clips = clips
        self.large_size = large_size

    @property
    def views(self) -> int:
        return max(1, self.random_crops) * (2 if self.flip else 1)

    def __len__(self) -> int:
        return len(self.records)

    def windows(self, i: int, height: int, width: int) -> list[Window]:
        if not self.random_crops:
            side = min(height, width)
            return [((height - side) // 2, (width - side) // 2, side, False)]
        rng = np.random.default_rng([self.seed, i])
        return [random_square_window(height, width, rng) for _ in range(self.random_crops)]

    def partner(self, i: int) -> int | None:
        """The record of another frame of i's clip, drawn from (seed, frame), or None."""
        record = self.records[i]
        if not self.partner_distance or record.video not in self.clips:
            return None
        rng = np.random.default_rng([self.seed, i, 1])
        candidates = [j for j in range(i - self.partner_distance, i + self.partner_distance + 1)
                      if j != i and 0 <= j < len(self.records) and self.records[j].video == record.video]
        return int(rng.choice(candidates)) if candidates else None

    def __getitem__(self, i: int) -> dict:
        image = read_image_rgb(self.records[i].path)
        windows = self.windows(i, *image.shape[:2])
        views = np.stack([square_view(image, window, self.image_size) for window in windows])
        item = {"rgb": views, "index": i}
        if self.large_size:
            item["large_gray"] = np.stack([rgb_to_gray(square_view(image, window, self.large_size))
                                           for window in windows])
        if self.partner_distance:
            j = self.partner(i)
            partner = np.zeros_like(views)
            if j is not None:
                other = read_image_rgb(self.records[j].path)
                if other.shape != image.shape:
                    import cv2

                    other = cv2.resize(other, image.shape[1::-1], interpolation=cv2.INTER_AREA)
                partner = np.stack([square_view(other, window, self.image_size) for window in windows])
            item["partner"] = partner
        if self.flip:
            item = {key: np.concatenate([value, value[:, :, ::-1]]) if key != "index" else value
                    for key, value in item.items()}
        return {key: np.ascontiguousarray(value) if key != "index" else value for key, value in item.items()}


class RandomCropDataset(Dataset):
    """Random flipped crops of every frame below `roots`, held in memory at a short side of `short_side`.
    Used to pretrain the project's own VAE and VAC."""

    def __init__(self, roots: list[Path], crop_size: int, short_side: int, seed: int = 0):
        from tqdm import tqdm

        records = [r for root in roots for r in scan_frame_folders(root)]
        self.images = [resize_short_side(read_image_rgb(r.path), short_side) for r in tqdm(records, desc="loading")]
        self.crop_size = crop_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        image = self.images[i]
        top = self.rng.integers(0, image.shape[0] - self.crop_size + 1)
        left = self.rng.integers(0, image.shape[1] - self.crop_size + 1)
        crop = image[top : top + self.crop_size, left : left + self.crop_size]
        return np.ascontiguousarray(crop[:, ::-1] if self.rng.random() < 0.5 else crop)


def gray_batch(rgb: np.ndarray) -> torch.Tensor:
    """BxHxWx3 uint8 RGB -> Bx1xHxW grayscale luma in [0, 1]."""
    gray = np.stack([rgb_to_gray(frame) for frame in np.asarray(rgb)])
    return torch.from_numpy(gray).float().unsqueeze(1) / 255.0


LATENT_KEYS = ("latents", "gray", "video_ids", "frame_indices", "videos")
HINT_KEYS = ("chroma", "partner_chroma", "partner_mask")  # written with --hints; training draws colour hints from them
LATENT_META = ("vae", "vac", "image_size", "downscale", "scaling_factor", "vae_fingerprint", "vac_fingerprint",
               "backbone_name")


class LatentDataset(Dataset):
    """The cached features of `feature_extraction.py`: one item = colour latent, grayscale frame, and, when stored,
    the VAC tokens or a hybrid VAC's backbone features (`backbone_<stride>`) and its grayscale input (`vac_gray`, at
    twice the working size), and what colour hints are drawn from (the item's chroma, its partner frame's warped
    chroma and that warp's reliability)."""

    def __init__(self, path: Path):
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: not found; run feature_extraction.py first")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in LATENT_KEYS if k not in data.files]
                if missing:
                    raise UserError(f"{path}: missing {', '.join(missing)}; re-run feature_extraction.py")
                self.latents = data["latents"]
                self.gray = data["gray"]
                self.video_ids = data["video_ids"]
                self.frame_indices = data["frame_indices"]
                self.videos = [str(v) for v in data["videos"]]
                self.tokens = data["tokens"] if "tokens" in data.files else None
                self.backbone = {k: data[k] for k in sorted(data.files)
                                 if k.startswith("backbone_") and k.split("_", 1)[1].isdigit()}
                self.vac_gray = data["vac_gray"] if "vac_gray" in data.files else None
                self.hint_sources = {k: data[k] for k in HINT_KEYS} if set(HINT_KEYS) <= set(data.files) else None
                self.meta = {k: str(data[k]) for k in LATENT_META if k in data.files}
        except UserError:
            raise
        except Exception as error:  # zipfile, zlib and numpy errors of a damaged file
            raise UserError(f"{path}: unreadable ({error}); delete it and re-run feature_extraction.py") from None
        self.check(path)

    def check(self, path: Path) -> None:
        """A latent.npz that would train garbage or crash later is an error now."""
        rerun = "re-run feature_extraction.py with --overwrite"
        if len(self.latents) == 0:
            raise UserError(f"{path}: holds no frames; {rerun} on a folder with frames")
        arrays = [self.latents, self.gray, self.video_ids, self.frame_indices, *self.optional_arrays().values()]
        if len({len(a) for a in arrays}) > 1 or self.latents.ndim != 4 or self.gray.ndim != 3 or \
                (self.tokens is not None and self.tokens.ndim != 3):
            raise UserError(f"{path}: its arrays do not fit together (damaged or edited); {rerun}")
        if len(self.video_ids) and (self.video_ids.min() < 0 or self.video_ids.max() >= len(self.videos)):
            raise UserError(f"{path}: its video ids do not fit its video list (damaged or edited); {rerun}")
        for name, array in (("latents", self.latents), ("tokens", self.tokens if self.tokens is not None else [])):
            for start in range(0, len(array), 4096):  # in chunks: bounded memory on large corpora
                if not np.isfinite(array[start : start + 4096]).all():
                    raise UserError(f"{path}: its {name} contain NaN or inf (a broken VAE or VAC, or float16 "
                                    f"overflow); {rerun} after checking the components")

    def optional_arrays(self) -> dict[str, np.ndarray]:
        return {**({"tokens": self.tokens} if self.tokens is not None else {}), **self.backbone,
                **({"vac_gray": self.vac_gray} if self.vac_gray is not None else {}), **(self.hint_sources or {})}

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        """Tensors for the model; the hint sources stay numpy arrays (hints are drawn from them with numpy)."""
        item = {"latents": torch.from_numpy(self.latents[i].astype(np.float32)),
                "gray": torch.from_numpy(self.gray[i]).float().unsqueeze(0) / 255.0}
        if self.tokens is not None:
            item["tokens"] = torch.from_numpy(self.tokens[i].astype(np.float32))
        item.update({key: torch.from_numpy(value[i].astype(np.float32)) for key, value in self.backbone.items()})
        if self.vac_gray is not None:
            item["vac_gray"] = torch.from_numpy(self.vac_gray[i]).float().unsqueeze(0) / 255.0
        if self.hint_sources is not None:
            item.update({key: value[i].astype(np.float32) for key, value in self.hint_sources.items()})
        return item

    def sources(self) -> np.ndarray:
        """Each item's source: its video folder's parent (`images/intel_scenes` for `images/intel_scenes/forest`;
        `videos` for every clip under `videos/`; `.` for top-level folders)."""
        parents = [str(Path(video).parent) for video in self.videos]
        return np.array(parents)[self.video_ids]

    def split_by_video(self, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
        """Hold out whole videos, up to `val_fraction` of the frames (neighbouring frames are near-duplicates, so a
        frame-level split would leak); a video too large to fit, such as a whole photo collection, stays in train."""
        sizes = np.bincount(self.video_ids, minlength=len(self.videos))
        budget, held = val_fraction * len(self.video_ids), set()
        for video in np.random.default_rng(seed).permutation(len(self.videos)):
            if sizes[video] <= budget:
                held.add(int(video))
                budget -= sizes[video]
        train = [i for i, v in enumerate(self.video_ids) if v not in held]
        val = [i for i, v in enumerate(self.video_ids) if v in held]
        if not val:  # too little data to hold out a whole video: fall back to a few frames
            val, train = train[-max(1, len(train) // 10) :], train[: -max(1, len(train) // 10)] or train
        return train, val


def batch_indices(step: int, batch_size: int, count: int, seed: int, weights: np.ndarray | None = None) -> np.ndarray:
    """The examples of global step `step`: epochs are seeded permutations, so the data order survives --resume; with
    `weights` (a probability per example), a seeded weighted draw of the step instead."""
    if weights is not None:
        return np.random.default_rng([seed, step, 3]).choice(count, size=batch_size, p=weights)
    start = step * batch_size
    epoch_first, epoch_last = start // count, (start + batch_size - 1) // count
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(count)
                            for e in range(epoch_first, epoch_last + 1)])
    offset = start - epoch_first * count
    return order[offset : offset + batch_size]


def source_weights(sources: np.ndarray, power: float) -> np.ndarray | None:
    """A sampling probability per example: each source drawn in proportion to its size ** power (None: uniform)."""
    names, inverse, counts = np.unique(sources, return_inverse=True, return_counts=True)
    if power == 1 or len(names) == 1:
        return None
    weights = counts.astype(np.float64) ** power / counts
    return weights[inverse] / weights[inverse].sum()
