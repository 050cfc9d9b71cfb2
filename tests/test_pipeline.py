"""End to end: feature_extraction.py -> train_diffusion.py (stop, --resume) -> video_colorization.py."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from conftest import run_ok


@pytest.mark.slow  # whole training runs: about 10 seconds
def test_three_stages_end_to_end(tmp_path, tiny_components, frame_root, gray_video):
    from video_io import iter_clip_frames, probe_clip

    run_ok("feature_extraction.py", "--dataroot", str(frame_root), "--dataset-name", "tiny", "--image-size", "32",
           "--vae", str(tiny_components["vae"]), "--vac", str(tiny_components["vac"]), "--shard-size", "8",
           cwd=tmp_path)
    with np.load(tmp_path / "data" / "tiny" / "latent.npz") as data:
        assert data["latents"].shape == (20, 4, 8, 8) and data["tokens"].shape == (20, 17, 32)
        assert data["gray"].shape == (20, 32, 32) and data["gray"].dtype == np.uint8
        assert sorted(data["videos"].tolist()) == ["pan", "pan_small"]
        assert np.bincount(data["video_ids"]).tolist() in ([12, 8], [8, 12])
    assert not (tmp_path / "data" / "tiny" / "shards").exists()

    run_ok("feature_extraction.py", "--dataroot", str(frame_root), "--dataset-name", "crops", "--image-size", "32",
           "--vae", str(tiny_components["vae"]), "--vac", str(tiny_components["vac"]), "--random-crops", "3",
           cwd=tmp_path)
    with np.load(tmp_path / "data" / "crops" / "latent.npz") as data:
        assert data["latents"].shape == (60, 4, 8, 8) and sorted(np.bincount(data["video_ids"]).tolist()) == [24, 36]
        assert len({g.tobytes() for g in data["gray"]}) == 60  # three different views of every frame

    train = ["train_diffusion.py", "--dataset-name", "tiny", "--run-name", "tiny", "--net-dimension", "8",
             "--batch-size", "4", "--checkpoint-every", "5", "--validate-every", "10", "--warmup-steps", "2"]
    run_ok(*train, "--max-steps", "10", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    resumed = run_ok(*train, "--max-steps", "20", "--resume", cwd=tmp_path)
    assert "resumed" in resumed.stdout and "step 10" in resumed.stdout
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-20"]
    config = json.loads((run_dir / "checkpoint-20" / "colorizer.json").read_text())
    assert config["step"] == 20 and config["vae"] == "../vae" and (run_dir / "vae" / "config.json").exists()
    assert (run_dir / "samples-0000020.png").exists()
    losses = [json.loads(line)["step"] for line in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert losses == [10, 20]

    output = tmp_path / "out.mp4"
    run_ok("video_colorization.py", "--input", str(gray_video), "--model", str(run_dir), "--output", str(output),
           "--steps", "3", cwd=tmp_path)
    source, result = probe_clip(gray_video), probe_clip(output)
    assert (result.frame_count, result.width, result.height) == (source.frame_count, source.width, source.height)
    assert result.fps == Fraction(30000, 1001)
    assert len(list(iter_clip_frames(output))) == source.frame_count

    frames_out = tmp_path / "frames_out"
    run_ok("video_colorization.py", "--input", str(frame_root / "pan"), "--model", str(run_dir),
           "--output", str(frames_out), "--steps", "2", cwd=tmp_path)
    assert sorted(p.name for p in frames_out.iterdir())[:2] == ["00000.png", "00001.png"]
    assert len(list(frames_out.iterdir())) == 12


@pytest.mark.slow  # whole training runs: about 10 seconds
def test_guided_training_with_a_trained_vac(tmp_path, tiny_components, frame_root):
    """--hints data -> a UNet with a hint input and a VAC trained with it, both in every checkpoint."""
    import torch
    from colorizer import load_colorizer
    from modules import load_vac, vac_fingerprint

    run_ok("feature_extraction.py", "--dataroot", str(frame_root), "--dataset-name", "guided", "--image-size", "32",
           "--vae", str(tiny_components["vae"]), "--vac", str(tiny_components["vac"]), "--hints", "--clips", "pan",
           "--no-tokens", "--partner-distance", "2", cwd=tmp_path)
    with np.load(tmp_path / "data" / "guided" / "latent.npz") as data:
        assert "tokens" not in data.files and data["chroma"].shape == (20, 32, 32, 2)
        has_partner = data["partner_mask"].reshape(20, -1).any(axis=1)
        clip = np.array([data["videos"][v] == "pan" for v in data["video_ids"]])
        assert np.array_equal(has_partner, clip)  # partners only within the clip --clips names
        reliable = data["partner_mask"] > 0
        difference = np.abs(data["partner_chroma"].astype(float) - data["chroma"])[reliable]
        assert difference.mean() < 0.25 * np.abs(data["chroma"][reliable].astype(float)).mean()

    train = ["train_diffusion.py", "--dataset-name", "guided", "--run-name", "guided", "--net-dimension", "8",
             "--batch-size", "4", "--checkpoint-every", "4", "--validate-every", "8", "--warmup-steps", "2", "--hints",
             "--train-vac", "--holdout", "pan_small"]
    run_ok(*train, "--max-steps", "4", cwd=tmp_path)
    resumed = run_ok(*train, "--max-steps", "8", "--resume", cwd=tmp_path)
    assert "resumed" in resumed.stdout and "step 4" in resumed.stdout
    checkpoint = tmp_path / "runs" / "guided" / "checkpoint-8"
    config = json.loads((checkpoint / "colorizer.json").read_text())
    assert config["hint_channels"] == 3 and config["vac"] == "vac" and config["train_vac"]
    trained_vac = load_vac(str(checkpoint / "vac"))
    untrained = vac_fingerprint(load_vac(str(tiny_components["vac"])))
    assert vac_fingerprint(trained_vac) == config["vac_fingerprint"] != untrained
    colorizer = load_colorizer(checkpoint, torch.device("cpu"))
    assert colorizer.takes_hints and colorizer.unet.config.in_channels == 4 + 16 + 48
    # --init-from starts a new run on those weights (with a learning rate of 0 they stay exactly those weights)
    run_ok(*train, "--max-steps", "1", "--init-from", str(checkpoint), "--lr", "0", "--run-name", "again",
           "--checkpoint-every", "1", cwd=tmp_path)
    from safetensors.torch import load_file

    again = tmp_path / "runs" / "again" / "checkpoint-1"
    for part in ("unet/diffusion_pytorch_model.safetensors", "vac/vac.safetensors"):
        before, after = load_file(str(checkpoint / part)), load_file(str(again / part))
        assert all(torch.equal(before[key], after[key]) for key in before)
    run_ok(*train, "--max-steps", "2", "--resume", "--run-name", "again", "--checkpoint-every", "1", cwd=tmp_path)
    for step in (1, 2):  # the steps behind its starting weights, kept through --resume
        config = json.loads((tmp_path / "runs" / "again" / f"checkpoint-{step}" / "colorizer.json").read_text())
        assert config["steps_before"] == 8


def test_demo_clip_comes_with_its_colour_original(tmp_path):
    """--demo writes the colour frames beside the grayscale input, so its output can be scored against them."""
    from demo import make_demo_clip
    from utils import rgb_to_chroma, rgb_to_gray
    from video_io import iter_clip_frames

    gray_path = make_demo_clip(tmp_path / "demo_gray.mp4", frame_count=4, size=(64, 96), original=tmp_path / "demo.mp4")
    gray, colour = (list(iter_clip_frames(path)) for path in (gray_path, tmp_path / "demo.mp4"))
    assert len(gray) == len(colour) == 4 and gray[0].shape == colour[0].shape == (64, 96, 3)
    for gray_frame, colour_frame in zip(gray, colour):
        assert np.abs(rgb_to_chroma(colour_frame)).mean() > 5 > 1 > np.abs(rgb_to_chroma(gray_frame)).mean()
        assert np.abs(rgb_to_gray(gray_frame).astype(int) - rgb_to_gray(colour_frame)).mean() < 6  # H.264 noise
