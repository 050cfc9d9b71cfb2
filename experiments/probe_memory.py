"""What each colour source is worth where a keyframe's colour travels (first frame given): the pipeline runs each
clip with its frame 0 as --reference (keyframe matched), and at every later frame records, at the propagation size,
the keyframe colour carried along the flow, its confidence, the model's sampled chroma, the keyframe's palette colour
of each pixel's luma, the colour found in the keyframe by the frame's features and the match's confidence, the
previous output carried along the flow and where that flow passed its check, and the output. Each source's mean
squared chroma error against the truth is reported in three bands of the carried colour's confidence: held (1: the
flow or the keyframe's direct flow vouch for it), fading (0.25-1: some steps failed their check) and lost (below
0.25), with each band's share of the pixels.

  python experiments/probe_memory.py --clips dev/* --json docs/probes/memory_sources_dev.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the pipeline's modules live at the repo root

import correspondence
import guidance
import pipeline
from colorizer import DEFAULT_MODEL, load_colorizer
from pipeline import ColorizationOptions, colorize_clip
from utils import rgb_to_chroma, run_cli
from video_io import iter_clip_frames, write_image_rgb

BANDS = {"held": (0.999, 1.01), "fading": (0.25, 0.999), "lost": (-0.01, 0.25)}
SOURCES = ("carried", "model", "palette", "found", "previous", "output")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=Path, nargs="+", required=True, help="colour clips (frame folders or videos)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--metric-file", type=Path, default=correspondence.METRIC_FILE,
                        help="the learned matching metric: one trained with the scored clips held out")
    parser.add_argument("--fusion", default=str(guidance.FUSION_FILE),
                        help="the fusion weights the pipeline runs with (experiments/train_fusion.py's output), or "
                        "'none': the found colour pasted as an exemplar's is (the first round of the fusion's fit)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the table here")
    parser.add_argument("--samples", type=Path, help="write random pixels of every frame here (.npz): each source's "
                        "chroma, the confidences and the truth, to fit how they are fused")
    parser.add_argument("--pixels-per-frame", type=int, default=2000)
    return parser.parse_args()


def recorded_frames(colorizer, clip: Path, folder: Path) -> list[dict]:
    """Run the clip with its frame 0 as the keyframe, recording output_chroma's inputs and output per frame."""
    records = []
    original = guidance.GuidePropagator.output_chroma

    def recording(self, chroma, plain, luma, guide_luma, frame_guides, cut, propagation, found=None,
                  guided_output=True, fusion=None):
        dense = frame_guides[0]
        inputs = (self.fusion_inputs(chroma, luma, guide_luma, dense, cut, found)
                  if dense is not None and found is not None else None)
        output = original(self, chroma, plain, luma, guide_luma, frame_guides, cut, propagation, found,
                          guided_output, fusion)
        records.append({"inputs": inputs, "guide_luma": guide_luma,
                        "output": guidance.resize_to(output, guide_luma.shape)})
        return output

    frames = list(iter_clip_frames(clip))
    write_image_rgb(folder / "key.png", frames[0])
    guidance.GuidePropagator.output_chroma = recording
    try:
        colorize_clip(colorizer, clip, folder / "out", ColorizationOptions(reference=[str(folder / "key.png")],
                                                                           match_keyframes=True), frame_bar=False)
    finally:
        guidance.GuidePropagator.output_chroma = original
        shutil.rmtree(folder / "out", ignore_errors=True)
    for record, frame in zip(records, frames):
        record["truth"] = rgb_to_chroma(guidance.resize_to(frame, record["guide_luma"].shape))
    # a frame no keyframe colour reaches any more (every step since failed) has nothing to split by
    return [record for record in records[1:] if record["inputs"] is not None]


def candidates(record: dict) -> dict[str, np.ndarray]:
    """The fused sources (guidance.GuidePropagator.fusion_inputs) and the output."""
    return {**record["inputs"][0], "output": record["output"]}


def sampled_pixels(records: list[dict], count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`count` random pixels of each record: every candidate's chroma, the confidences (the carried colour's, the
    match's, the previous output's flow check) and the truth."""
    rows: dict[str, list] = {}
    for record in records:
        chosen = rng.choice(record["guide_luma"].size, min(count, record["guide_luma"].size), replace=False)
        carried_confidence, found_confidence, previous_reliable = record["inputs"][1]
        values = {**candidates(record), "truth": record["truth"], "carried_confidence": carried_confidence,
                  "found_confidence": found_confidence, "previous_reliable": previous_reliable}
        for name, value in values.items():
            rows.setdefault(name, []).append(value.reshape(record["guide_luma"].size, -1)[chosen])
    return {name: np.concatenate(value).astype(np.float32) for name, value in rows.items()}


def band_errors(records: list[dict]) -> dict:
    """Summed squared chroma error per band and source, and each band's pixel count, over the records."""
    table = {band: {"pixels": 0, **{source: 0.0 for source in SOURCES}} for band in BANDS}
    for record in records:
        confidence = record["inputs"][1][0]
        errors = {name: ((value - record["truth"]) ** 2).sum(axis=-1) for name, value in candidates(record).items()}
        for band, (low, high) in BANDS.items():
            inside = (confidence >= low) & (confidence < high)
            table[band]["pixels"] += int(inside.sum())
            for name, error in errors.items():
                table[band][name] += float(error[inside].sum())
    return table


def summary(table: dict) -> dict:
    total = sum(row["pixels"] for row in table.values())
    return {band: {"share": row["pixels"] / max(total, 1),
                   **{name: row[name] / max(row["pixels"], 1) for name in SOURCES}} for band, row in table.items()}


def main() -> None:
    import torch

    args = parse_args()
    torch.set_num_threads(args.threads)
    correspondence.METRIC_FILE = args.metric_file
    if args.fusion == "none":
        pipeline.load_fusion = lambda: None
    else:
        guidance.FUSION_FILE = Path(args.fusion)
    colorizer = load_colorizer(args.model, torch.device("cpu"))
    clips, pooled, samples = {}, None, []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as temp:
        for clip in args.clips:
            records = recorded_frames(colorizer, clip, Path(temp))
            samples.append(sampled_pixels(records, args.pixels_per_frame, rng))
            table = band_errors(records)
            clips[clip.name] = summary(table)
            pooled = table if pooled is None else {band: {key: pooled[band][key] + row[key] for key in row}
                                                   for band, row in table.items()}
            print(clip.name, json.dumps(clips[clip.name]), flush=True)
    result = {"pooled": summary(pooled), "clips": clips}
    print(f"{'band':<8} {'share':>6} " + " ".join(f"{name:>8}" for name in SOURCES))
    for band, row in result["pooled"].items():
        print(f"{band:<8} {row['share']:6.3f} " + " ".join(f"{row[name]:8.1f}" for name in SOURCES))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.samples:
        np.savez_compressed(args.samples, **{name: np.concatenate([s[name] for s in samples]) for name in samples[0]})


if __name__ == "__main__":
    run_cli(main)
