"""Learn the correspondence's metric: a linear projection of the frozen backbone's matching features, and the
softmax temperature, trained on frame pairs far apart in one clip (issue 29's training signal).

  python experiments/train_matcher.py --clips ../shared/data/train/videos --out runs/matcher/matcher.safetensors
  python experiments/probe_correspondence.py --clips <held-out clips> --every 10 \
      --projection runs/matcher/matcher.safetensors

Each training pair is a colour frame of a clip, mirrored half of the time and cropped to a random 70-100% of each
side (an exemplar's framing differs from the shot's), and a grayscale frame of the same clip at least a third of the
clip away. The gray frame's features are matched to the colour frame's as correspondence.Matcher.match does
(cosine similarities through the projection, the top-k, a softmax over similarity / temperature); the loss is the
mean squared error of the found chroma against the gray frame's true chroma at the stride-8 grid. The projection
starts as the identity and the temperature at correspondence.TEMPERATURE, so training starts from the hand-set
matcher. Clips named by --holdout are left out: the measurements score them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from correspondence import TEMPERATURE, TOP_K, Matcher, grid_chroma, project, soft_match
from utils import rgb_to_gray, run_cli
from video_io import iter_clip_frames, list_clips

if TYPE_CHECKING:  # torch is imported where needed
    import torch

HELD_OUT = ("flatten__puff", "openh264__bus_qcif", "tuneavideo__car-turn", "sam2__bedroom")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, required=True, help="a folder of colour clips (training data only)")
    parser.add_argument("--holdout", nargs="*", default=list(HELD_OUT), help="clip names left out of training")
    parser.add_argument("--frames-per-clip", type=int, default=10, help="evenly spaced frames taken from each clip")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--positions", type=int, default=512, help="gray-frame positions scored per pair")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs") / "matcher" / "matcher.safetensors",
                        help="the metric's file; the frames' features are cached beside it for the next run")
    return parser.parse_args()


@dataclass
class ClipFeatures:
    """One clip's sampled frames: as queries (gray features and true chroma at the grid) and as keys (an augmented
    colour copy's features and chroma, flattened, as Matcher.source gives them)."""

    queries: list[tuple[torch.Tensor, torch.Tensor]]  # (C x h x w features, h x w x 2 chroma)
    keys: list[tuple[torch.Tensor, torch.Tensor]]  # (n x C features, n x 2 chroma)


def augmented(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour frame as an exemplar might frame it: mirrored half of the time, a random 70-100% of each side."""
    height, width = rgb.shape[:2]
    keep_h, keep_w = (rng.uniform(0.7, 1.0, 2) * (height, width)).astype(int)
    top, left = rng.integers(0, height - keep_h + 1), rng.integers(0, width - keep_w + 1)
    crop = rgb[top:top + keep_h, left:left + keep_w]
    return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


def clip_features(clip: Path, matcher: Matcher, count: int, rng: np.random.Generator) -> ClipFeatures:
    """`count` evenly spaced frames of a clip seen by a matcher without a projection (the backbone's features)."""
    import torch

    frames = list(iter_clip_frames(clip))
    frames = [frames[i] for i in np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)]
    queries, keys = [], []
    for frame in frames:
        features = matcher.backbone_features(rgb_to_gray(frame)[None])[0]
        queries.append((features.half(), torch.from_numpy(grid_chroma(frame, features.shape[-2:]))))
        source = matcher.source(augmented(frame, rng))
        keys.append((source.features.half(), source.chroma))
    return ClipFeatures(queries, keys)


def pair_loss(projection: torch.Tensor, log_temperature: torch.Tensor, query: torch.Tensor,
              true_chroma: torch.Tensor, key: torch.Tensor, key_chroma: torch.Tensor,
              positions: int, generator: torch.Generator) -> torch.Tensor:
    """Mean squared chroma error (8-bit scale / 128) of one gray frame coloured by matching one colour frame, over
    `positions` random positions of the gray frame (each matched against all of the colour frame's)."""
    import torch

    queries, truth = query.flatten(1).T, true_chroma.reshape(-1, 2)
    chosen = torch.randperm(len(queries), generator=generator)[:positions]
    q = project(queries[chosen].float().T[None], projection)[0].T
    k = project(key.float().T[None], projection)[0].T
    found, _ = soft_match(q, k, key_chroma, log_temperature.exp(), TOP_K)
    return ((found - truth[chosen]) / 128.0).pow(2).mean()


def main() -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    args = parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    matcher = Matcher()
    clips = [c for c in list_clips(args.clips) if c.name not in set(args.holdout)]
    cache = args.out.with_name(f"features_{args.frames_per_clip}_{args.seed}.pt")
    if cache.is_file():
        data = [ClipFeatures(**clip) for clip in torch.load(cache)]
    else:
        data = [clip_features(c, matcher, args.frames_per_clip, rng) for c in tqdm(clips, desc="features")]
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save([vars(clip) for clip in data], cache)
    channels = data[0].queries[0][0].shape[0]
    projection = torch.eye(channels).requires_grad_(True)
    log_temperature = torch.tensor(float(np.log(TEMPERATURE))).requires_grad_(True)
    optimizer = torch.optim.Adam([projection, log_temperature], lr=args.lr)
    progress = tqdm(range(args.steps), desc="training")
    running = None
    for _ in progress:
        losses = []
        for _ in range(args.batch_size):
            clip = data[rng.integers(len(data))]
            count = len(clip.queries)
            a = rng.integers(count)
            far = [b for b in range(count) if abs(b - a) >= max(1, count // 3)]
            b = far[rng.integers(len(far))] if far else (a + 1) % count
            losses.append(pair_loss(projection, log_temperature, *clip.queries[b], *clip.keys[a], args.positions,
                                    generator))
        loss = torch.stack(losses).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        progress.set_postfix(loss=f"{running:.5f}", temperature=f"{log_temperature.exp().item():.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_name(args.out.name + ".tmp")
    save_file({"projection": projection.detach().contiguous(), "temperature": log_temperature.exp().detach()[None]},
              str(temporary))
    temporary.replace(args.out)
    print(f"wrote {args.out}: projection {channels}x{channels}, temperature {log_temperature.exp().item():.4f}")


if __name__ == "__main__":
    run_cli(main)
