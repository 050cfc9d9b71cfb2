"""Learn how a keyframe's colour sources are fused (guidance.fuse_sources): where the keyframe's colour is not
vouched for, each pixel's output chroma is a softmax-weighted mean of the keyframe colour
carried along the flow, the keyframe's palette colour for the pixel's luma, the colour found in the keyframe by
features, the previous output carried along the flow and the model's sample; the weights' logits are linear in the
pixel's confidences (guidance.fusion_features). Fitted by least squared chroma error on pixels that
experiments/probe_memory.py --samples drew from training clips (neither the fast-motion dev set nor the held-out
clips), in rounds: the fused output feeds the next frame (as the previous output carried along the flow), so the
first round's pixels come from the pipeline without the fusion (probe_memory.py --fusion none), each later round's
from the pipeline with the last round's weights, and each fit uses every round's pixels (as in DAgger).

  python experiments/probe_memory.py --clips fit/* --fusion none --samples runs/memory/samples_fit.npz
  python experiments/train_fusion.py --samples runs/memory/samples_fit.npz --out runs/memory/fusion_1.safetensors
  python experiments/probe_memory.py --clips fit/* --fusion runs/memory/fusion_1.safetensors \
      --samples runs/memory/samples_fit2.npz
  python experiments/train_fusion.py --samples runs/memory/samples_fit*.npz --out runs/memory/fusion_2.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from guidance import FUSED_SOURCES, fusion_features
from utils import run_cli


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, nargs="+", required=True, help="probe_memory.py's pixels to fit on")
    parser.add_argument("--score", type=Path, nargs="*", default=[], help="pixels of other clips to score on")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--out", type=Path, required=True, help="the fusion's weights (.safetensors)")
    return parser.parse_args()


def load(paths: list[Path]):
    """probe_memory.py's samples -> (candidates N x K x 2, features N x F, truth N x 2) as tensors."""
    import torch

    parts = [np.load(path) for path in paths]
    joined = {name: np.concatenate([part[name] for part in parts]) for name in parts[0].files}
    stack = np.stack([joined[name] for name in FUSED_SOURCES], axis=1)
    features = fusion_features(joined["carried_confidence"][:, 0], joined["found_confidence"][:, 0],
                               joined["previous_reliable"][:, 0])
    fused = joined["carried_confidence"][:, 0] < 1.0  # where it is vouched for the keyframe's colour stays as it is
    return (torch.from_numpy(stack[fused]), torch.from_numpy(features[fused]),
            torch.from_numpy(joined["truth"][fused]))


def fused(weights, candidates, features):
    import torch

    share = torch.softmax(features @ weights.T, dim=-1)  # N x K
    return (share.unsqueeze(-1) * candidates).sum(dim=1)


def report(name: str, weights, candidates, features, truth) -> None:
    import torch

    with torch.no_grad():
        error = ((fused(weights, candidates, features) - truth) ** 2).sum(-1).mean().item()
    singles = {source: ((candidates[:, k] - truth) ** 2).sum(-1).mean().item()
               for k, source in enumerate(FUSED_SOURCES)}
    print(f"{name}: fused {error:.1f}; " + ", ".join(f"{s} {e:.1f}" for s, e in singles.items()), flush=True)


def main() -> None:
    import torch
    from safetensors.torch import save_file

    args = parse_args()
    candidates, features, truth = load(args.samples)
    weights = torch.zeros(len(FUSED_SOURCES), features.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=args.lr)
    for _ in range(args.steps):
        optimizer.zero_grad()
        loss = ((fused(weights, candidates, features) - truth) ** 2).sum(-1).mean()
        loss.backward()
        optimizer.step()
    report("fit", weights, candidates, features, truth)
    for path in args.score:
        report(path.name, weights, *load([path]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weights": weights.detach().contiguous()}, str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
