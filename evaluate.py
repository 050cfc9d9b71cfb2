"""Score colorized videos against their ground truth: PSNR, SSIM, CDC, colorfulness and warp error, as a table,
results.json / results.csv and figures.

    python evaluate.py --pred video_output/foreman.mp4 --gt ../shared/data/val
    python evaluate.py --gt ../shared/data/val --baseline gray

The metrics themselves, and evaluate_clip that computes them on a clip, are in metrics.py (their exact definitions
in metrics.DEFINITIONS, also written into every results.json, and in docs/evaluation.md); clips pair by name
(video_io.match_clips). Heavy libraries load only inside functions.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

import metrics
import utils
import video_io

SAMPLE_FRAMES = 4  # frames shown per clip in the side-by-side figure

TABLE_COLUMNS = (  # (key, header, format)
    ("frames", "frames", "{:d}"),
    ("psnr", "PSNR", "{:.3f}"),
    ("psnr_published_uint8", "PSNR(u8wrap)", "{:.3f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("cdc", "CDC", "{:.5f}"),
    ("gt_cdc", "CDC(GT)", "{:.5f}"),
    ("colorfulness", "CF", "{:.2f}"),
    ("gt_colorfulness", "CF(GT)", "{:.2f}"),
    ("colorfulness_gap", "|dCF|", "{:.2f}"),
    ("warp_error", "warp", "{:.3f}"),
    ("gt_warp_error", "warp(GT)", "{:.3f}"),
    ("frechet_lite2", "FD(Lite2)", "{:.2f}"),
)
SUMMARY_KEYS = tuple(key for key, _, _ in TABLE_COLUMNS) + ("psnr_capped_frames",)
FRAME_MEANS = ("psnr_published_uint8",)  # averaged over every frame of every clip, as its published code does
SET_METRICS = ("frechet_lite2",)  # of a method's frames over all clips at once: n/a for one clip


# ---------------------------------------------------------------------------------------------------------------
# Means, figures, table and files


def summarize(clip_results: dict[str, dict]) -> dict:
    """Mean over clips of each metric (clips weigh equally), but over every frame of every clip for FRAME_MEANS;
    frame and capped counts are summed."""
    counts = ("frames", "psnr_capped_frames")
    summary = {key: metrics.finite_mean(result[key] for result in clip_results.values())
               for key in SUMMARY_KEYS if key not in counts + FRAME_MEANS + SET_METRICS}
    summary |= {key: float(np.mean([value for result in clip_results.values() for value in result["per_frame"][key]]))
                for key in FRAME_MEANS}
    return {key: sum(result[key] for result in clip_results.values()) for key in counts} | summary


def sample_indices(frame_count: int, count: int = SAMPLE_FRAMES) -> list[int]:
    return sorted({round(i) for i in np.linspace(0, max(frame_count - 1, 0), count)})


def save_frames_figure(path: Path, clip: str, samples: dict[str, dict]) -> None:
    """Rows: sampled frames; columns: grayscale input | each prediction | ground truth."""
    indices = sorted(next(iter(samples.values())))
    save_grid_figure(path, clip, [(f"frame {index}", samples, index) for index in indices])


def middle_sample(samples: dict[str, dict]) -> dict[str, dict]:
    """The samples of each method cut to the middle sampled frame: what the overview figure shows of a clip."""
    indices = sorted(next(iter(samples.values())))
    middle = indices[len(indices) // 2]
    return {method: {middle: frames[middle]} for method, frames in samples.items()}


def save_overview_figure(path: Path, samples_by_clip: dict[str, dict]) -> None:
    """One row per clip (its middle sampled frame), so every clip can be looked at in one picture."""
    rows = []
    for clip, samples in samples_by_clip.items():
        (index,) = next(iter(samples.values()))
        rows.append((f"{clip}\nframe {index}", samples, index))
    save_grid_figure(path, "one frame per clip", rows)


def save_grid_figure(path: Path, title: str, rows: list[tuple[str, dict[str, dict], int]]) -> None:
    """Rows of (label, samples {method: {index: (prediction, ground truth)}}, index); columns: grayscale input |
    each prediction | ground truth. Row heights follow each row's frame shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [method for method in rows[0][1] if method != "gray"]
    titles = ["grayscale input", *methods, "ground truth"]
    panel_width = 3.2
    truths = [next(iter(samples.values()))[index][1] for _, samples, index in rows]
    aspects = [truth.shape[0] / truth.shape[1] for truth in truths]
    figure, axes = plt.subplots(len(rows), len(titles), squeeze=False, layout="constrained",
                                gridspec_kw={"height_ratios": aspects},
                                figsize=(panel_width * len(titles), panel_width * sum(aspects) + 0.6))
    for row, ((label, samples, index), truth) in enumerate(zip(rows, truths)):
        images = [np.repeat(utils.rgb_to_gray(truth)[..., None], 3, axis=2)]
        images += [samples[method][index][0] for method in methods] + [truth]
        for col, image in enumerate(images):
            axis = axes[row][col]
            axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[col], fontsize=10)
            if col == 0:
                axis.set_ylabel(label, fontsize=9)
    figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_curves_figure(path: Path, clip: str, results: dict[str, dict]) -> None:
    """Per-frame PSNR and colorfulness over time, every method and the ground truth on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    for method, result in results.items():
        style = "--" if method == "gray" else "-"
        top.plot(result["per_frame"]["psnr"], style, label=f"{method} (mean {result['psnr']:.2f} dB)")
        bottom.plot(result["per_frame"]["colorfulness"], style, label=f"{method} (mean {result['colorfulness']:.1f})")
    gt = next(iter(results.values()))
    bottom.plot(gt["per_frame"]["gt_colorfulness"], "k-", label=f"ground truth (mean {gt['gt_colorfulness']:.1f})")
    top.set_ylabel("PSNR (dB)")
    bottom.set_ylabel("colorfulness")
    bottom.set_xlabel("frame")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    top.set_title(clip)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _format(value: float | int, template: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return template.format(value)


def format_table(results: dict[str, dict[str, dict]], summaries: dict[str, dict]) -> str:
    """One row per clip and method, then the mean rows."""
    headers = ["clip", "method"] + [header for _, header, _ in TABLE_COLUMNS]
    rows = []
    for method, clips in results.items():
        for clip, result in clips.items():
            rows.append([clip, method] + [_format(result[key], template) for key, _, template in TABLE_COLUMNS])
    for method, summary in summaries.items():
        rows.append(["MEAN", method] + [_format(summary[key], template) for key, _, template in TABLE_COLUMNS])
    widths = [max(len(row[i]) for row in rows + [headers]) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [headers] + rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - len(summaries), "-" * len(lines[0]))
    return "\n".join(lines)


def _json_safe(value):
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def write_csv(path: Path, results: dict[str, dict[str, dict]], summaries: dict[str, dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "clip"] + list(SUMMARY_KEYS))
        for method, clips in results.items():
            for clip, result in clips.items():
                writer.writerow([method, clip] + [result[key] for key in SUMMARY_KEYS])
            writer.writerow([method, "MEAN"] + [summaries[method][key] for key in SUMMARY_KEYS])


def deep_metric_status(metric: str, weights: Path | None) -> str:
    """LPIPS and FID need network weights; they are never downloaded, and not computed yet."""
    if weights is None:
        return "skipped: no weights given (never downloaded)"
    if not weights.is_file():
        raise utils.UserError(f"{weights}: no such file; pass the {metric} weights on disk or leave the flag out")
    return f"skipped: {metric} is not implemented yet ({weights} was not read)"


def set_frechet(clip_features: list[dict | None]) -> float:
    """frechet_lite2 of a method: its frames over every clip against the ground truth's (NaN when not computed)."""
    if not clip_features or clip_features[0] is None:
        return math.nan
    return metrics.frechet_distance(np.concatenate([f["pred"] for f in clip_features]),
                                    np.concatenate([f["gt"] for f in clip_features]))


# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, help="colorized output: a video, a frame folder, or a folder of clips")
    parser.add_argument("--gt", type=Path, required=True,
                        help="ground truth in the same layouts; clips pair by name (x.mp4 = x/)")
    parser.add_argument("--baseline", choices=sorted(metrics.BASELINES),
                        help="also score a baseline as a prediction (a reference row): the grayscale input, or the "
                        "first ground-truth frame's colours carried along the optical flow (flow-reference)")
    parser.add_argument("--out", type=Path, help="output folder (default runs/eval/<prediction name, or 'gray'>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    parser.add_argument("--max-frames", type=int, help="score only the first N frames of each clip (quick runs)")
    parser.add_argument("--no-frechet", dest="frechet", action="store_false",
                        help="skip the Frechet distance on ImageNet EfficientNet-Lite2 features (its network costs "
                        "about 0.05 s a frame)")
    parser.add_argument("--lpips-weights", type=Path, help="LPIPS weights on disk (never downloaded)")
    parser.add_argument("--fid-weights", type=Path, help="FID Inception weights on disk (never downloaded)")
    args = parser.parse_args()
    if args.pred is None and args.baseline is None:
        parser.error("pass --pred (a colorized video or folder), --baseline gray, or both")
    if args.max_frames is not None and args.max_frames < 1:
        parser.error("--max-frames must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    skipped = {"lpips": deep_metric_status("LPIPS", args.lpips_weights),
               "fid": deep_metric_status("FID", args.fid_weights)}
    pairs = video_io.match_clips(args.pred, args.gt)
    methods = (["prediction"] if args.pred is not None else []) + ([args.baseline] if args.baseline else [])
    out = args.out or Path("runs/eval") / (video_io.clip_name(args.pred) if args.pred is not None else args.baseline)

    def frames(path: Path) -> Iterator[np.ndarray]:
        return itertools.islice(video_io.iter_clip_frames(path), args.max_frames)

    results: dict[str, dict[str, dict]] = {method: {} for method in methods}
    features = {method: [] for method in methods}
    network = metrics.FrechetFeatures() if args.frechet else None
    overview: dict[str, dict] = {}
    with utils.atomic_path(out, overwrite=args.overwrite, is_dir=True) as folder:
        for clip, pred_path, gt_path in pairs:
            frame_count = min(video_io.probe_clip(gt_path).frame_count, args.max_frames or math.inf)
            samples, clip_results = {}, {}
            for method in methods:
                baseline = metrics.BASELINES.get(method)
                pred_frames = frames(pred_path) if method == "prediction" else baseline(frames(gt_path))
                name = f"{pred_path if method == 'prediction' else method + ' baseline'} vs {gt_path}"
                result = metrics.evaluate_clip(pred_frames, frames(gt_path), sample_indices(frame_count), name,
                                               network)
                samples[method] = result.pop("samples")
                features[method].append(result.pop("features", None))
                result["frechet_lite2"] = math.nan
                clip_results[method] = results[method][clip] = result
                print(f"{clip} [{method}]: {result['frames']} frames, PSNR {result['psnr']:.3f} dB", file=sys.stderr)
            save_frames_figure(folder / f"{clip}_frames.png", clip, samples)
            overview[clip] = middle_sample(samples)
            save_curves_figure(folder / f"{clip}_curves.png", clip, clip_results)
        summaries = {method: summarize(clips) | {"frechet_lite2": set_frechet(features[method])}
                     for method, clips in results.items()}
        report = {
            "gt": str(args.gt),
            "pred": None if args.pred is None else str(args.pred),
            "max_frames": args.max_frames,
            "definitions": metrics.DEFINITIONS,
            "skipped": skipped,
            "methods": {method: {"mean": summaries[method], "clips": results[method]} for method in methods},
        }
        save_overview_figure(folder / "overview.png", overview)
        (folder / "results.json").write_text(json.dumps(_json_safe(report), indent=1) + "\n")
        write_csv(folder / "results.csv", results, summaries)
    print(format_table(results, summaries))
    capped = sum(summary["psnr_capped_frames"] for summary in summaries.values())
    if capped:
        print(f"note: {capped} frame(s) identical to the ground truth; their PSNR counts as {metrics.PSNR_CAP_DB:g} dB")
    print("CDC and warp error judge the output alone (a gray video scores well): read them beside the GT columns.")
    print("PSNR(u8wrap) is the published protocol's PSNR, uint8 errors wrapping (docs/evaluation.md): compare it only "
          "with figures computed the same way, and never quote it without PSNR.")
    print(f"LPIPS {skipped['lpips']}; FID {skipped['fid']}")
    print(f"wrote {out}/results.json, results.csv, overview.png and per-clip *_frames.png, *_curves.png")


if __name__ == "__main__":
    utils.run_cli(main)
