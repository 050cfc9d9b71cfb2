"""How the colour heads' distributions are best turned into one chroma, measured on clips and photos held out of
training: PSNR against colourfulness for each decoding rule over its strength, the heads alone on each frame (v6's
output is their chroma plus a smooth tint, so this ranks rules at a fraction of the pipeline's cost).

  python experiments/probe_decoding.py --clips runs/heldout --photos runs/heldout_photos --stride 5 --frechet \
      --json docs/probes/decoding_rules.json --curve docs/probes/decoding_rules.png
  python experiments/probe_decoding.py --clips runs/heldout --photos runs/heldout_photos --stride 5 \
      --rules rebalance:0,0.35,0.5 --refine 0.02,0.01 grayworld0.25 grayworld0.5 oraclecast oraclegain \
      --cast-items data/color_head_items/train_240.npz --json docs/probes/decoding_bounds.json \
      --figure docs/probes/decoding_cast.jpg --figure-rows "rebalance 0.35" "rebalance+oraclecast 0.35" \
      "rebalance+cast 0.35" "rebalance+gainfit 0.35" \
      --figure-photos kodak24_kodim05 kodak24_kodim20 mcmaster_4 skimage_coffee
  python experiments/probe_decoding.py --clips runs/heldout --photos runs/heldout_photos --stride 5 \
      --rules rebalance:0,0.25,0.35,0.5 --extra-heads runs/color_lite1/color     # a third head, on Lite1
  python experiments/probe_decoding.py --clips runs/heldout --photos runs/heldout_photos --stride 5 \
      --rules rebalance:0.45 decoding2,1:0.45 decoding2,0.5:0.5,0.65,0.7 --json docs/probes/decoding_pooled_means.json

The heads' logits are computed once per frame; every rule then decodes the same logits. Rules:
- rebalance v: the calibrated distribution divided by the prior to the power v, its mean (color_head.py; v6);
- gain g: the calibrated mean times g (hue kept, gray stays gray);
- push k: the calibrated mean moved k levels further along its own direction, faded in over GRAY_RADIUS levels of
  it (the least squared error per unit of added chroma, where the distribution is calibrated);
- gated v: rebalancing at v scaled down by the mass the calibrated distribution puts within GRAY_RADIUS of gray;
- annealedT v: the rebalanced distribution annealed to temperature T (Zhang et al.'s annealed mean), e.g. annealed0.5;
- decodingR,T v: color_head.Decoding(R, T) on the rebalanced distribution: the mean's saturation capped at the mean of
  the distribution annealed to T (1: no cap), both means pooled over the frame on its luma (radius R grid cells, 0:
  not).

Each rule's chroma can then be refined (--refine, rows `rule+refinement`): `RADIUS,EPS` a guided filter on the
frame's luma (correspondence.guided_upsample: colour edges on luma edges); `grayworldA` the frame's mean chroma
times A taken away; and two oracles that read the truth, bounds rather than methods: `oraclecast` the frame's mean
chroma replaced by the truth's (what a right cast alone is worth), `oraclegain` the chroma scaled to the truth's
mean magnitude. With --cast-items, the cast predicted instead: a ridge regression of the frame's mean chroma on the
backbone's pooled maps, the heads' frame-averaged distributions and the rule's own mean and magnitude, fitted on
training items (rows `rule+cast`), and likewise the frame's chroma gain (`rule+gainfit`: the log ratio of the
truth's mean magnitude to the rule's).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

from color_head import Decoding, load_color_head
from colorizer import DEFAULT_MODEL, Colorizer, combine, head_folders, load_colorizer, own_backbones, prepare_gray
from correspondence import guided_upsample
from metrics import FrechetFeatures, colorfulness, frechet_distance, psnr
from utils import choose_device, rgb_to_chroma, rgb_to_gray, run_cli
from video_io import iter_clip_frames, list_clips

GRAY_RADIUS = 8.0  # chroma levels


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, required=True)
    parser.add_argument("--photos", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--stride", type=int, default=5, help="every Nth frame of each clip")
    parser.add_argument("--rules", nargs="+", default=["rebalance:0,0.25,0.35,0.5,0.75", "gain:1.25,1.5,1.75,2",
                                                        "push:4,8,12,16", "gated:0.35,0.5,0.75,1"])
    parser.add_argument("--refine", nargs="*", default=[], metavar="REFINEMENT",
                        help="also rows with each rule's chroma refined: RADIUS,EPS (a guided filter on the luma; "
                        "radius as a share of the short side, eps on luma in [0, 1]), grayworldA, oraclecast, "
                        "oraclegain (the module doc)")
    parser.add_argument("--cast-items", type=Path, help="train_color_head.py's cached training items: fit a ridge "
                        "regressor of each frame's mean chroma on them and add rows with its cast (+cast)")
    parser.add_argument("--cast-count", type=int, default=4000, help="items the cast regressor is fitted on")
    parser.add_argument("--cast-cache", type=Path, default=Path("runs/decoding/cast_items.npz"),
                        help="where the items' readings are kept between runs")
    parser.add_argument("--extra-heads", nargs="*", type=Path, default=[], metavar="FOLDER",
                        help="colour heads (train_color_head.py's color/ folders) added to the model's in every rule's "
                        "mean, each on the backbone it was trained on (e.g. --backbone efficientnet_lite1)")
    parser.add_argument("--frechet", action="store_true", help="score each row's FD(Lite2) too")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--figure", type=Path, help="write the --figure-rows' outputs here, one row per clip and photo")
    parser.add_argument("--figure-rows", nargs="*", default=[], metavar="LABEL", help="table rows to show, e.g. "
                        "'rebalance 0.35' 'rebalance+oraclecast 0.35'")
    parser.add_argument("--figure-photos", nargs="*", default=[], help="held-out photos shown besides the clips")
    parser.add_argument("--curve", type=Path)
    return parser.parse_args()


def with_extra_heads(colorizer: Colorizer, model: Path, folders: list[Path]) -> Colorizer:
    """The model (from the folder `model`) with the --extra-heads added to its own, each on the backbone it was
    trained on: every rule then decodes the mean of all of them."""
    extra = tuple(load_color_head(folder).to(colorizer.device).eval().requires_grad_(False) for folder in folders)
    heads = (*colorizer.color_heads, *extra)
    backbones = own_backbones(heads, colorizer.vac, [*head_folders(colorizer.config, model), *folders])
    return dataclasses.replace(colorizer, color_heads=heads, head_backbones=backbones)


def frame_reading(colorizer: Colorizer, gray: np.ndarray) -> tuple[list[torch.Tensor], np.ndarray]:
    """One frame's logits from every head and a global description of the frame for the cast regressor: each
    backbone pass's deepest map pooled, and each head's calibrated distribution averaged over the frame."""
    height, width = gray.shape
    vac_gray = prepare_gray(gray[None], colorizer.vac_size(height, width))
    head_size = colorizer.head_size(height, width)
    _, inputs = colorizer.head_inputs(vac_gray, prepare_gray(gray[None], head_size) if head_size is not None else None)
    logits, described = [], []
    for head, (features, reads) in zip(colorizer.color_heads, inputs):
        logits.append(head(features, reads))
        described += [features[-1].float().mean(dim=(0, 2, 3)), head.distribution(logits[-1], 0.0).mean(dim=(0, 2, 3))]
    return logits, torch.cat(described).numpy()


def decode(colorizer: Colorizer, logits: list[torch.Tensor], rule: str, strength: float,
           gray: np.ndarray) -> torch.Tensor:
    """The heads' mean chroma (1x2xhxw on the largest head grid) under a decoding rule (`gray`: the frame's luma)."""
    chromas = []
    for head, head_logits_ in zip(colorizer.color_heads, logits):
        if rule == "rebalance":
            chroma = head.chroma(head_logits_, strength)
        elif rule.startswith("annealed"):
            chroma = head.mean_chroma(head.rebalanced(head_logits_, strength) / float(rule[len("annealed"):]))
        elif rule.startswith("decoding"):
            radius, temperature = rule[len("decoding"):].split(",")
            luma = torch.from_numpy(gray.astype(np.float32) / 255.0)[None, None]
            chroma = head.chroma(head_logits_, strength, luma, Decoding(int(radius), float(temperature)))
        elif rule == "gated":
            calibrated = head.distribution(head_logits_, 0.0)
            gray_mass = torch.einsum("bqhw,q->bhw", calibrated, (head.centres.norm(dim=1) < GRAY_RADIUS).float())
            rebalanced = head.chroma(head_logits_, strength)
            plain = head.chroma(head_logits_, 0.0)
            chroma = plain + (1 - gray_mass[:, None]) * (rebalanced - plain)
        else:
            chroma = head.chroma(head_logits_, 0.0)
        chromas.append(chroma)
    grid = max((c.shape[-2:] for c in chromas), key=lambda shape: shape.numel())
    chroma = torch.stack([F.interpolate(c, size=grid, mode="bilinear", align_corners=False) for c in chromas]).mean(0)
    if rule == "gain":
        chroma = chroma * strength
    elif rule == "push":
        size = chroma.norm(dim=1, keepdim=True)
        chroma = chroma * (1 + strength / (size + GRAY_RADIUS))
    return chroma


def refined(gray: np.ndarray, chroma: np.ndarray, refine: str | None, truth: np.ndarray) -> np.ndarray:
    """The chroma at the frame's size, refined as `refine` names (the module doc); `truth` only for the oracles."""
    import cv2

    height, width = gray.shape
    chroma = cv2.resize(chroma, (width, height), interpolation=cv2.INTER_LINEAR)
    if refine is None:
        return chroma
    if refine == "oraclecast":
        return chroma - chroma.mean(axis=(0, 1)) + rgb_to_chroma(truth).mean(axis=(0, 1))
    if refine == "oraclegain":
        size = np.linalg.norm(chroma, axis=2).mean()
        return chroma * np.linalg.norm(rgb_to_chroma(truth), axis=2).mean() / max(size, 1e-6)
    if refine.startswith("grayworld"):
        return chroma - float(refine[len("grayworld"):]) * chroma.mean(axis=(0, 1))
    share, eps = map(float, refine.split(","))
    return guided_upsample(chroma, gray, max(1, round(share * min(height, width))), eps)


class Ridge:
    """Ridge regression on standardised inputs, its penalty chosen by 5-fold cross-validation."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, penalty: float):
        self.centre, self.scale = inputs.mean(axis=0), inputs.std(axis=0) + 1e-6
        x = (inputs - self.centre) / self.scale
        self.offset = targets.mean(axis=0)
        self.weights = np.linalg.solve(x.T @ x + penalty * np.eye(x.shape[1]), x.T @ (targets - self.offset))
        self.penalty, self.error = penalty, float("nan")

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        return (inputs - self.centre) / self.scale @ self.weights + self.offset

    @classmethod
    def cross_validated(cls, inputs: np.ndarray, targets: np.ndarray) -> "Ridge":
        folds = np.arange(len(inputs)) % 5
        errors = {}
        for penalty in np.logspace(-1, 5, 13):
            errors[penalty] = np.mean([np.sum((cls(inputs[folds != k], targets[folds != k], penalty).predict(
                inputs[folds == k]) - targets[folds == k]) ** 2, axis=1).mean() for k in range(5)])
        best = min(errors, key=errors.get)
        model = cls(inputs, targets, best)
        model.error = float(errors[best])
        return model


def chroma_summary(chroma: np.ndarray) -> np.ndarray:
    """HxWx2 chroma -> its mean (Cb, Cr) and mean magnitude."""
    return np.array([*chroma.mean(axis=(0, 1)), np.linalg.norm(chroma, axis=2).mean()])


def rule_summary(colorizer: Colorizer, logits: list[torch.Tensor], rule: str, strength: float,
                 gray: np.ndarray) -> np.ndarray:
    return chroma_summary(decode(colorizer, logits, rule, strength, gray)[0].permute(1, 2, 0).numpy())


def item_readings(colorizer: Colorizer, items_file: Path, count: int, keys: list[tuple[str, float]],
                  cache: Path) -> dict[str, np.ndarray]:
    """`count` random training items read once (kept in `cache`): each one's description (frame_reading), each rule's
    chroma_summary and the truth's."""
    names = {key: f"{key[0]} {key[1]:g}" for key in keys}
    if cache.exists():
        with np.load(cache) as stored:
            # a cache from before --extra-heads holds the model's heads' readings only
            heads_read = int(stored["heads"]) if "heads" in stored else len(colorizer.color_heads)
            if (all(name in stored for name in names.values()) and len(stored["truth"]) == count
                    and heads_read == len(colorizer.color_heads)):
                return dict(stored)
    with np.load(items_file) as stored:
        items = stored["items"]
        items = items[np.random.default_rng(0).choice(len(items), size=min(count, len(items)), replace=False)]
    read = {name: [] for name in ["described", "truth", *names.values()]}
    for n, item in enumerate(items):
        gray = rgb_to_gray(item)
        logits, described = frame_reading(colorizer, gray)
        read["described"].append(described)
        read["truth"].append(chroma_summary(rgb_to_chroma(item)))
        for key, name in names.items():
            read[name].append(rule_summary(colorizer, logits, *key, gray))
        if n % 500 == 0:
            print(f"cast items {n}/{len(items)}", flush=True)
    read = {name: np.array(values) for name, values in read.items()} | {"heads": np.array(len(colorizer.color_heads))}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **read)
    return read


def fit_casts(colorizer: Colorizer, items_file: Path, count: int, specs: list[str], cache: Path) -> dict:
    """For each rule and strength, two ridge regressions on the frame's description and the rule's summary, fitted
    on training items: the frame's mean chroma (the cast) and the log ratio of the truth's mean chroma magnitude to
    the rule's (its gain)."""
    keys = [(rule, float(strength)) for rule, listed in (spec.split(":") for spec in specs)
            for strength in listed.split(",")]
    read = item_readings(colorizer, items_file, count, keys, cache)
    truth = read["truth"]
    casts = {}
    for key in keys:
        summary = read[f"{key[0]} {key[1]:g}"]
        inputs = np.concatenate([read["described"], summary], axis=1)
        cast = Ridge.cross_validated(inputs, truth[:, :2])
        gain = Ridge.cross_validated(inputs, np.log1p(truth[:, 2:]) - np.log1p(summary[:, 2:]))
        before = np.mean(np.sum((summary[:, :2] - truth[:, :2]) ** 2, axis=1))
        print(f"{key[0]} {key[1]:g}: mean-chroma error {before:.1f} -> {cast.error:.1f}, log-gain error "
              f"{np.mean((np.log1p(truth[:, 2]) - np.log1p(summary[:, 2])) ** 2):.3f} -> {gain.error:.3f} "
              f"(5-fold)", flush=True)
        casts[key] = cast, gain
    return casts


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    colorizer = with_extra_heads(load_colorizer(args.model, choose_device("cpu")), args.model, args.extra_heads)
    sets = {"clips": {clip.name: list(itertools.islice(iter_clip_frames(clip), 0, None, args.stride))
                      for clip in list_clips(args.clips)},
            "photos": {clip.name: list(iter_clip_frames(clip))[:1] for clip in list_clips(args.photos)}}
    cache = {kind: {name: [(rgb_to_gray(f), *frame_reading(colorizer, rgb_to_gray(f))) for f in frames]
                    for name, frames in clips.items()} for kind, clips in sets.items()}
    casts = fit_casts(colorizer, args.cast_items, args.cast_count, args.rules, args.cast_cache
                      ) if args.cast_items else {}
    refines = [None, *args.refine, *(["cast", "gainfit"] if casts else [])]
    print("logits cached", flush=True)
    network = FrechetFeatures() if args.frechet else None
    truths = {kind: np.stack([network(f) for f in itertools.chain(*clips.values())]) for kind, clips in sets.items()
              } if network else {}
    rows, shown = {}, {}
    for spec, refine in [("gray:0", None), *itertools.product(args.rules, refines)]:
        rule, strengths = spec.split(":")
        for strength in map(float, strengths.split(",")):
            label = f"{rule}{'' if refine is None else '+' + refine} {strength:g}"
            rows[label] = {}
            for kind, clips in sets.items():
                per_clip, outputs = {}, []
                for name, frames in clips.items():
                    scores = []
                    for index, (truth, reading) in enumerate(zip(frames, cache[kind][name])):
                        output = rule_output(colorizer, reading, truth, rule, strength, refine, casts)
                        outputs.append(output)
                        scores.append((psnr(output, truth), colorfulness(output), colorfulness(truth)))
                        if label in args.figure_rows and index == len(frames) // 2 and (
                                kind == "clips" or name in args.figure_photos):
                            shown.setdefault(label, {})[name] = output
                    per_clip[name] = np.mean(scores, axis=0)
                table = np.array(list(per_clip.values()))
                row = {"psnr": float(table[:, 0].mean()), "colorfulness": float(table[:, 1].mean()),
                       "gt_colorfulness": float(table[:, 2].mean()),
                       "per_clip_psnr": {name: float(v[0]) for name, v in per_clip.items()}}
                if network:
                    row["frechet_lite2"] = frechet_distance(np.stack([network(o) for o in outputs]), truths[kind])
                rows[label][kind] = row
            clips_row, photos_row = rows[label]["clips"], rows[label]["photos"]
            worst = min(clips_row["per_clip_psnr"].items(), key=lambda item: item[1] - rows["gray 0"]["clips"][
                "per_clip_psnr"][item[0]])
            print(f"{label:16s} clips {clips_row['psnr']:6.2f} CF {clips_row['colorfulness']:5.1f}  "
                  f"photos {photos_row['psnr']:6.2f} CF {photos_row['colorfulness']:5.1f}  "
                  f"worst {worst[0]} {worst[1] - rows['gray 0']['clips']['per_clip_psnr'][worst[0]]:+.2f}  "
                  f"FD {clips_row.get('frechet_lite2', float('nan')):.1f} / "
                  f"{photos_row.get('frechet_lite2', float('nan')):.1f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "stride": args.stride, "rows": rows}, indent=2))
    if args.curve:
        save_curve(args.curve, rows)
    if args.figure:
        truth_frames = {name: frames[len(frames) // 2] for clips in sets.values() for name, frames in clips.items()}
        save_figure(args.figure, shown, truth_frames)


def rule_output(colorizer: Colorizer, reading: tuple, truth: np.ndarray, rule: str, strength: float,
                refine: str | None, casts: dict) -> np.ndarray:
    """One frame coloured by a rule (and refinement) from its cached reading (gray, logits, description)."""
    gray, logits, described = reading
    if rule == "gray":
        return combine(gray, np.zeros((*gray.shape, 2), np.float32))
    chroma = decode(colorizer, logits, rule, strength, gray)[0].permute(1, 2, 0).numpy()
    if refine not in ("cast", "gainfit"):
        return combine(gray, refined(gray, chroma, refine, truth))
    summary = chroma_summary(chroma)
    cast, gain = casts[(rule, strength)]
    inputs = np.concatenate([described, summary])[None]
    if refine == "cast":
        return combine(gray, refined(gray, chroma, None, truth) + (cast.predict(inputs)[0] - summary[:2]).astype(
            np.float32))
    ratio = np.expm1(np.log1p(summary[2]) + gain.predict(inputs)[0, 0]) / max(summary[2], 1e-6)
    return combine(gray, refined(gray, chroma * np.float32(ratio), None, truth))


def save_figure(path: Path, shown: dict[str, dict[str, np.ndarray]], truths: dict[str, np.ndarray]) -> None:
    """One row per clip (its middle sampled frame) and per chosen photo: each shown row's output, then the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(shown.values())))
    columns = [*shown, "truth"]
    figure, axes = plt.subplots(len(names), len(columns), figsize=(2.8 * len(columns), 2.0 * len(names)),
                                squeeze=False)
    for row, name in enumerate(names):
        for column, label in enumerate(columns):
            axes[row, column].imshow(truths[name] if label == "truth" else shown[label][name])
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(label, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def save_curve(path: Path, rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, kind in zip(axes, ("clips", "photos")):
        rules = sorted({label.split()[0] for label in rows} - {"gray"})
        for rule in rules:
            points = [(label.split()[1], row[kind]) for label, row in rows.items() if label.split()[0] == rule]
            axis.plot([r["colorfulness"] for _, r in points], [r["psnr"] for _, r in points], marker="o", label=rule)
            for strength, row in points:
                axis.annotate(strength, (row["colorfulness"], row["psnr"]), fontsize=7, textcoords="offset points",
                              xytext=(3, 3))
        gray = rows["gray 0"][kind]
        axis.axhline(gray["psnr"], color="gray", linestyle=":", label="gray input")
        axis.axvline(gray["gt_colorfulness"], color="gray", linestyle="--", label="ground truth's colourfulness")
        axis.set_title(f"held-out {kind}")
        axis.set_xlabel("colourfulness")
        axis.set_ylabel("PSNR (dB)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    run_cli(main)
