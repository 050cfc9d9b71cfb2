"""Bad input never crashes with a traceback or leaves a broken file; training survives interruption.

Every failing case asserts the exit code, the one-line `error: <file>: <problem>; <fix>` message and that no
partial output remains. Most cases run a script's main() through utils.run_cli in this process (the imports are
paid once); a few run the real scripts as subprocesses, as do the SIGINT / SIGTERM / SIGKILL training tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, Result, files_under, interrupt_colorize_frames, panning_clip, run_main

# ---------------------------------------------------------------------------------------------------------------
# Running the scripts


def script_command(script: str, *argv) -> list[str]:
    return [sys.executable, str(REPO / f"{script}.py"), *map(str, argv)]


SCRIPT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_script(script: str, *argv, cwd: Path) -> Result:
    result = subprocess.run(script_command(script, *argv), cwd=cwd, env=SCRIPT_ENV, capture_output=True, text=True,
                            timeout=600)
    return Result(result.returncode, result.stdout, result.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs and models


def write_video(path: Path, frames: list[np.ndarray], faststart: bool = False) -> Path:
    """H.264 mp4 of 48x64 frames; faststart puts the index first, so a truncated file still opens and declares
    every frame. Without frames, the file holds only the header."""
    import av

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"g": "10"}
        container.start_encoding()
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, frame_root, gray_video) -> Path:
    import av
    import cv2

    from video_io import write_image_rgb

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "empty").mkdir()
    (root / "no_images").mkdir()
    (root / "no_images" / "notes.txt").write_text("not a frame\n")
    for name in ("truncated_jpeg", "corrupt_jpeg"):
        shutil.copytree(frame_root / "pan", root / name)
        jpeg = root / name / "00005.jpg"
        data = bytearray(jpeg.read_bytes())
        if name == "truncated_jpeg":
            data = data[: len(data) // 2]
        else:  # decodes, with only a libjpeg warning on stderr: a half-gray frame unless caught
            data[len(data) // 2 : len(data) // 2 + 50] = bytes(50)
        jpeg.write_bytes(bytes(data))
    clip = panning_clip(40, (48, 64))
    whole = write_video(root / "whole.mp4", clip, faststart=True).read_bytes()
    with av.open(str(root / "whole.mp4")) as container:
        packets = sorted((p.pos, p.size) for p in container.demux(video=0) if p.size)
    (root / "cut.mp4").write_bytes(whole[: packets[20][0] + packets[20][1]])  # ends cleanly after packet 20
    damaged = bytearray(whole)
    damaged[len(whole) // 2 : len(whole) // 2 + 400] = bytes(400)
    (root / "damaged.mp4").write_bytes(bytes(damaged))
    data = gray_video.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])  # the index (at the end) is lost
    (root / "text.mp4").write_text("this is not a video\n")
    write_video(root / "zero.mp4", [])
    write_video(root / "one.mp4", clip[:1])
    for name, (height, width), count in (("tiny", (9, 17), 2), ("huge", (3000, 4000), 1)):
        (root / name).mkdir()
        for i, frame in enumerate(panning_clip(count)):
            write_image_rgb(root / name / f"{i:05d}.png", cv2.resize(frame, (width, height)))
    for kind in ("gray", "rgba", "rgb16"):
        (root / kind).mkdir()
        for i, frame in enumerate(panning_clip(2)):
            bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
            image = {"gray": cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), "rgba": cv2.cvtColor(frame, cv2.COLOR_RGB2BGRA),
                     "rgb16": bgr.astype(np.uint16) * 257}[kind]
            cv2.imwrite(str(root / kind / f"{i:05d}.png"), image)
    (root / "a_file").write_text("a file, not a folder\n")
    return root


@pytest.fixture(scope="module")
def others(tmp_path_factory) -> dict[str, Path]:
    """Components other than the tiny ones: another architecture, and the same architecture with other weights."""
    from modules import build_vac, build_vae, save_vac

    folder = tmp_path_factory.mktemp("other_components")
    torch.manual_seed(1)
    build_vae(widths=(8, 16), image_size=32).save_pretrained(folder / "vae_shape")
    build_vae(widths=(8, 16, 16), image_size=32).save_pretrained(folder / "vae_weights")
    save_vac(build_vac(image_size=32, patch_size=8, hidden_dim=48, layers=1, heads=2), folder / "vac_shape")
    save_vac(build_vac(image_size=32, patch_size=8, hidden_dim=32, layers=1, heads=2), folder / "vac_weights")
    return {name: folder / name for name in ("vae_shape", "vae_weights", "vac_shape", "vac_weights")}


@pytest.fixture(scope="module")
def model(tiny_components, tmp_path_factory) -> Path:
    """A model folder as training writes it (colorizer.json with the VAE/VAC fingerprints), untrained UNet."""
    from diffusers import DDPMScheduler

    from modules import build_unet, load_vac, load_vae, vac_fingerprint, vae_fingerprint

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    build_unet(4, 4, 32, net_dimension=8, sample_size=8).save_pretrained(folder / "unet")
    for name in ("vae", "vac"):
        shutil.copytree(tiny_components[name], folder / name)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False)
    config = {"vae": "vae", "vac": "vac", "image_size": 32, "scheduler": dict(scheduler.config),
              "vae_fingerprint": vae_fingerprint(load_vae(str(folder / "vae"))),
              "vac_fingerprint": vac_fingerprint(load_vac(str(folder / "vac")))}
    (folder / "colorizer.json").write_text(json.dumps(config))
    return folder


def model_variant(model: Path, folder: Path, change: str, others: dict[str, Path]) -> Path:
    """A copy of `model` whose NaN weights, or VAE replaced on disk since training, must be caught."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(model, folder)
    if change == "nan":
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        with torch.no_grad():
            next(unet.parameters()).view(-1)[0] = float("nan")
        unet.save_pretrained(folder / "unet")
    elif change == "replaced_vae":
        shutil.rmtree(folder / "vae")
        shutil.copytree(others["vae_weights"], folder / "vae")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# video_colorization.py

FAILING_INPUTS = [  # (input under `inputs`, the message's file, what the message says)
    ("does_not_exist", "does_not_exist", "no such file or folder; check the path"),
    ("empty", "empty", "no frames or videos inside"),
    ("no_images", "no_images", "no frames or videos inside"),
    ("truncated_jpeg", "00005.jpg", "cannot be decoded as an image"),
    ("corrupt_jpeg", "00005.jpg", "cannot be decoded as an image (Corrupt JPEG data"),
    ("truncated.mp4", "truncated.mp4", "cannot be read as a video"),
    ("cut.mp4", "cut.mp4", "of its 40 frames can be decoded (truncated or damaged)"),
    ("damaged.mp4", "damaged.mp4", "cannot be decoded"),
    ("text.mp4", "text.mp4", "cannot be read as a video"),
    ("zero.mp4", "zero.mp4", "has no video stream (no frames)"),
]


@pytest.mark.parametrize("name, names, says", FAILING_INPUTS, ids=[case[0] for case in FAILING_INPUTS])
def test_colorization_rejects_bad_input(tmp_path, inputs, model, name, names, says):
    out = tmp_path / "out"
    result = run_main("video_colorization", "--input", inputs / name, "--output", out / "result.mp4",
                      "--model", model, "--steps", "1", cwd=tmp_path)
    assert result.code == 2
    assert f"{names}: " in result.error and says in result.error and "; " in result.error  # the file, then the fix
    assert files_under(out) == []


def test_colorization_finishes_a_folder_past_its_bad_clips(tmp_path, inputs, model):
    """A bad clip in a folder stops only itself: the other clips are colorized, each failure is reported when it
    happens and again in the last line, and the exit code is 2. A rerun refuses the finished outputs, unless
    --skip-existing, which leaves them untouched and tries only the clips without an output."""
    clips, out = tmp_path / "clips", tmp_path / "out"
    clips.mkdir()
    for name in ("cut.mp4", "one.mp4", "text.mp4"):
        shutil.copy(inputs / name, clips / name)
    shutil.copytree(inputs / "tiny", clips / "tiny")

    def colorize(*extra) -> Result:
        return run_main("video_colorization", "--input", clips, "--output", out, "--model", model, "--steps", "1",
                        *extra, cwd=tmp_path)

    result = colorize()
    assert result.code == 2
    assert result.error.startswith("error: 2 of 4 clips failed, the others are done: ")
    assert "cut.mp4: only 21 of its 40 frames can be decoded" in result.error
    assert "text.mp4: cannot be read as a video" in result.error and "--skip-existing" in result.error
    assert f"[1/4] failed: {clips / 'cut.mp4'}: " in result.stderr
    assert f"[3/4] failed: {clips / 'text.mp4'}: " in result.stderr
    assert f"[4/4] {clips / 'tiny'} -> {out / 'tiny.mp4'} (2 frames)" in result.stdout
    assert files_under(out) == ["one.mp4", "tiny.mp4"]  # the good clips whole, nothing of the bad ones
    finished = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = colorize()
    assert result.code == 2 and f"{out / 'cut.mp4'}" not in result.error  # refused before any work
    existing = f"{out / 'one.mp4'}: already exists; pass --overwrite to replace it, --skip-existing to keep it"
    assert existing in result.error
    result = colorize("--skip-existing")
    assert result.code == 2 and result.error.startswith("error: 2 of 4 clips failed")
    assert "2 clip(s) to colorize, 2 already done" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == finished


GOOD_INPUTS = [("one.mp4", 1, (48, 64)), ("tiny", 2, (9, 17)), ("huge", 1, (3000, 4000)), ("gray", 2, (72, 96)),
               ("rgba", 2, (72, 96)), ("rgb16", 2, (72, 96))]


@pytest.mark.parametrize("name, frames, size", GOOD_INPUTS, ids=[case[0] for case in GOOD_INPUTS])
def test_colorization_takes_odd_but_valid_input(tmp_path, inputs, model, name, frames, size):
    from video_io import probe_clip

    out = tmp_path / "out"
    result = run_main("video_colorization", "--input", inputs / name, "--output", out / "result.mp4",
                      "--model", model, "--steps", "1", cwd=tmp_path)
    assert result.code == 0, result.stderr[-3000:]
    assert files_under(out) == ["result.mp4"]
    info = probe_clip(out / "result.mp4")
    assert (info.frame_count, info.height, info.width) == (frames, *size)


MODEL_CASES = [  # (how the model or the requested component differs, the message)
    ("--vae", "vae_shape", "the UNet does not match this VAE"),
    ("--vae", "vae_weights", "was trained with another VAE than --vae"),
    ("--vac", "vac_shape", "the UNet expects 32-d VAC tokens, the VAC gives 48"),
    ("--vac", "vac_weights", "was trained with another VAC than --vac"),
    ("model", "replaced_vae", "was trained with another VAE than the VAE at"),
    ("model", "nan", "the unet weights contain NaN or inf; use an earlier checkpoint"),
]


@pytest.mark.parametrize("kind, change, says", MODEL_CASES, ids=[case[1] for case in MODEL_CASES])
def test_colorization_rejects_mismatched_or_broken_model(tmp_path, frame_root, model, others, kind, change, says):
    out = tmp_path / "out"
    if kind == "model":
        extra = ["--model", model_variant(model, tmp_path / "model", change, others)]
    else:
        extra = ["--model", model, kind, others[change]]
    result = run_main("video_colorization", "--input", frame_root / "pan", "--output", out / "result.mp4",
                      "--steps", "1", *extra, cwd=tmp_path)
    assert result.code == 2 and says in result.error and "model" in result.error
    assert files_under(out) == []


def test_colorization_accepts_the_components_it_was_trained_with(tmp_path, frame_root, model, tiny_components):
    result = run_main("video_colorization", "--input", frame_root / "pan_small", "--output", tmp_path / "r.mp4",
                      "--model", model, "--vae", tiny_components["vae"], "--vac", tiny_components["vac"],
                      "--steps", "1", cwd=tmp_path)
    assert result.code == 0, result.stderr[-3000:]


def test_colorization_output_problems(tmp_path, frame_root, model, inputs, monkeypatch):
    def colorize(output, *extra) -> Result:
        return run_main("video_colorization", "--input", frame_root / "pan_small", "--output", output, "--model",
                        model, "--steps", "1", *extra, cwd=tmp_path)

    # a folder that cannot be written: a read-only folder (root may write anywhere; /proc refuses even root)
    if os.geteuid() == 0:
        locked = Path("/proc/no_such_folder")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    result = colorize(locked / "result.mp4")
    assert result.code == 2 and "cannot write in" in result.error and "writable" in result.error
    result = colorize(inputs / "a_file" / "result.mp4")
    assert result.code == 2 and "a_file is a file" in result.error

    # an existing output is kept unless --overwrite
    existing = tmp_path / "existing.mp4"
    existing.write_bytes(b"keep me")
    result = colorize(existing)
    assert result.code == 2 and f"{existing}: already exists; pass --overwrite" in result.error
    assert existing.read_bytes() == b"keep me"
    assert colorize(existing, "--overwrite").code == 0
    assert existing.read_bytes() != b"keep me" and [p.name for p in tmp_path.glob(".*")] == []

    # a run stopped half-way (Ctrl-C, or SIGTERM, which utils.run_cli raises the same way) leaves neither the
    # output nor a temporary file
    interrupt_colorize_frames(monkeypatch, 3)
    result = colorize(tmp_path / "stopped" / "result.mp4")
    assert result.code == 130 and "interrupted (SIGINT)" in result.stderr
    assert files_under(tmp_path / "stopped") == []


@pytest.mark.parametrize("flag, value", [("--saturation", "-1"), ("--propagation", "1.5"), ("--propagation", "-0.1"),
                                         ("--crf", "52"), ("--crf", "-1")])
def test_colorization_rejects_out_of_range_settings(tmp_path, frame_root, model, flag, value):
    result = run_main("video_colorization", "--input", frame_root / "pan", "--output", tmp_path / "out.mp4",
                      "--model", model, flag, value, cwd=tmp_path)
    assert result.code == 2 and f"{flag} {value}" in result.error
    assert files_under(tmp_path) == []


def test_colorization_script_reports_one_line(tmp_path, inputs, model):
    """The real script, as a user runs it: exit code 2, a single line on stderr, no output."""
    result = run_script("video_colorization", "--input", inputs / "corrupt_jpeg",
                        "--output", tmp_path / "out.mp4", "--model", model, "--steps", "1", cwd=tmp_path)
    assert result.code == 2
    assert result.stderr.strip().splitlines() == [result.error]
    assert "corrupt_jpeg/00005.jpg: cannot be decoded as an image" in result.error
    assert files_under(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# feature_extraction.py


def extract(tmp_path: Path, dataroot: Path, components: dict, *extra) -> Result:
    return run_main("feature_extraction", "--dataroot", dataroot, "--dataset-name", "tiny", "--image-size", "32",
                    "--vae", components["vae"], "--vac", components["vac"], "--shard-size", "8", *extra, cwd=tmp_path)


@pytest.fixture(scope="module")
def latent_npz(tmp_path_factory, frame_root, tiny_components) -> Path:
    """data/tiny/latent.npz of the two clips of frame_root, made by an uninterrupted run."""
    folder = tmp_path_factory.mktemp("features")
    result = extract(folder, frame_root, tiny_components)
    assert result.code == 0, result.stderr[-3000:]
    return folder / "data" / "tiny" / "latent.npz"


@pytest.mark.parametrize("case", ["corrupt_jpeg", "empty", "no_images", "does_not_exist", "unwritable", "exists",
                                  "image_size"])
def test_feature_extraction_rejects_bad_input(tmp_path, inputs, frame_root, tiny_components, case):
    dataroot, extra = {"corrupt_jpeg": inputs / "corrupt_jpeg", "empty": inputs / "empty",
                       "no_images": inputs / "no_images", "does_not_exist": inputs / "does_not_exist"
                       }.get(case, frame_root), []
    if case == "unwritable":
        extra = ["--data-dir", inputs / "a_file" / "data"]
    if case == "image_size":
        extra = ["--image-size", "40"]
    if case == "exists":
        (tmp_path / "data" / "tiny").mkdir(parents=True)
        (tmp_path / "data" / "tiny" / "latent.npz").write_bytes(b"keep me")
    result = extract(tmp_path, dataroot, tiny_components, *extra)
    assert result.code == 2
    says = {"corrupt_jpeg": "00005.jpg: cannot be decoded as an image", "empty": "no images found",
            "no_images": "no images found", "does_not_exist": "not a folder", "unwritable": "a_file is a file",
            "exists": "latent.npz: already exists; pass --overwrite", "image_size": "must be a multiple of 16"}[case]
    assert says in result.error
    if case == "exists":
        assert files_under(tmp_path) == ["data", "data/tiny", "data/tiny/latent.npz"]
        assert (tmp_path / "data" / "tiny" / "latent.npz").read_bytes() == b"keep me"
    else:
        assert files_under(tmp_path) == []


def test_feature_extraction_takes_odd_but_valid_frames(tmp_path, inputs, tiny_components):
    root = tmp_path / "frames"
    for name in ("tiny", "huge", "gray", "rgba", "rgb16"):
        shutil.copytree(inputs / name, root / name)
    result = extract(tmp_path, root, tiny_components)
    assert result.code == 0, result.stderr[-3000:]
    with np.load(tmp_path / "data" / "tiny" / "latent.npz") as data:
        assert data["latents"].shape == (9, 4, 8, 8) and np.isfinite(data["latents"]).all()
        assert sorted(data["videos"].tolist()) == ["gray", "huge", "rgb16", "rgba", "tiny"]


def test_feature_extraction_resumes_only_its_own_shards(tmp_path, frame_root, tiny_components, others, latent_npz,
                                                        monkeypatch):
    from dataset import FrameFolderDataset

    # frames 0-7 / 8-15 / 16-19 make three shards; a damaged frame in the last stops the run after two
    root = tmp_path / "frames"
    shutil.copytree(frame_root, root)
    damaged = root / "pan_small" / "00005.jpg"
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 2])
    work = tmp_path / "work"
    work.mkdir()
    result = extract(work, root, tiny_components)
    assert result.code == 2 and "pan_small/00005.jpg: cannot be decoded" in result.error
    shards = work / "data" / "tiny" / "shards"
    assert files_under(work / "data" / "tiny") == ["shards", "shards/shard-00000.npz", "shards/shard-00001.npz"]

    # resuming with another VAE would mix latent spaces: refused, the shards stay
    result = extract(work, root, {**tiny_components, "vae": others["vae_weights"]})
    assert result.code == 2
    assert "shard-00000.npz: was made with another VAE (--vae) by an earlier, interrupted run" in result.error
    assert "--overwrite" in result.error and len(list(shards.glob("shard-*.npz"))) == 2

    # a kill -9 leaves temporaries; the resumed run removes them, makes only the missing shard, and the result
    # equals an uninterrupted run's
    (shards / ".shard-00002.x1y2.tmp.npz").write_bytes(b"half")
    (work / "data" / "tiny" / ".latent.x1y2.tmp.npz").write_bytes(b"half")
    damaged.write_bytes(good)
    made, original = [], FrameFolderDataset.__getitem__
    monkeypatch.setattr(FrameFolderDataset, "__getitem__", lambda dataset, i: made.append(i) or original(dataset, i))
    result = extract(work, root, tiny_components)
    assert result.code == 0, result.stderr[-3000:]
    assert made == list(range(16, 20))  # only the missing shard's frames are extracted
    assert files_under(work / "data") == ["tiny", "tiny/latent.npz"]
    with np.load(work / "data" / "tiny" / "latent.npz") as resumed, np.load(latent_npz) as uninterrupted:
        for key in ("latents", "tokens", "gray", "frame_indices", "video_ids", "videos", "vae_fingerprint"):
            assert np.array_equal(resumed[key], uninterrupted[key]), key


def test_feature_extraction_never_leaves_half_a_latent_npz(tmp_path, frame_root, tiny_components, monkeypatch):
    original = np.savez

    def savez_interrupted_on_latent(path, **arrays):
        if "latent" not in Path(path).name:
            return original(path, **arrays)
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt  # what SIGTERM raises too (utils.run_cli)

    monkeypatch.setattr(np, "savez", savez_interrupted_on_latent)
    result = extract(tmp_path, frame_root, tiny_components)
    assert result.code == 130
    assert files_under(tmp_path / "data" / "tiny") == ["shards", "shards/shard-00000.npz", "shards/shard-00001.npz",
                                                       "shards/shard-00002.npz"]


# ---------------------------------------------------------------------------------------------------------------
# evaluate.py


@pytest.mark.parametrize("case", ["corrupt_gt", "truncated_pred", "exists", "unwritable"])
def test_evaluation_rejects_bad_input(tmp_path, inputs, frame_root, case):
    pred, gt, out = frame_root / "pan", frame_root / "pan", tmp_path / "eval"
    if case == "corrupt_gt":
        gt = inputs / "corrupt_jpeg"
    elif case == "truncated_pred":
        pred, gt = inputs / "cut.mp4", inputs / "whole.mp4"
    elif case == "exists":
        out.mkdir()
        (out / "results.json").write_text("keep me")
    else:
        out = inputs / "a_file" / "eval"
    before = files_under(tmp_path)
    result = run_main("evaluate", "--pred", pred, "--gt", gt, "--out", out, "--max-frames", "40", "--no-frechet",
                      cwd=tmp_path)
    says = {"corrupt_gt": "corrupt_jpeg/00005.jpg: cannot be decoded as an image",
            "truncated_pred": "cut.mp4: only", "exists": "eval: already exists; pass --overwrite",
            "unwritable": "cannot write there"}[case]
    assert result.code == 2 and says in result.error
    assert files_under(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# train_diffusion.py

TRAIN = ["--dataset-name", "tiny", "--run-name", "tiny", "--net-dimension", "8", "--batch-size", "4",
         "--warmup-steps", "2", "--validate-every", "10", "--checkpoint-every", "5"]


def edited_latents(latent_npz: Path, folder: Path, **changes) -> Path:
    with np.load(latent_npz) as data:
        arrays = {key: data[key] for key in data.files}
    for key, change in changes.items():
        arrays[key] = change(arrays[key]) if callable(change) else change
    path = folder / "data" / "tiny" / "latent.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def nan_at_start(latents: np.ndarray) -> np.ndarray:
    latents = latents.copy()
    latents[0, 0, 0, 0] = np.nan
    return latents


TRAIN_CASES = [  # (case, message)
    ("vae_weights", "was made with another VAE than"),
    ("vae_shape", "downscale 4, not 2"),
    ("vac_shape", "was made with another VAC than"),
    ("recorded_vae_replaced", "was made with another VAE than"),
    ("nan_latents", "its latents contain NaN or inf"),
    ("unwritable", "a_file is a file"),
    ("missing", "latent.npz: not found; run feature_extraction.py first"),
]


@pytest.mark.parametrize("case, says", TRAIN_CASES, ids=[case[0] for case in TRAIN_CASES])
def test_training_rejects_mismatched_data(tmp_path, inputs, latent_npz, others, case, says):
    extra = []
    if case in ("vae_weights", "vae_shape"):
        extra = ["--vae", others[case]]
    elif case == "vac_shape":
        extra = ["--vac", others[case]]
    if case == "recorded_vae_replaced":  # the folder latent.npz names holds another VAE now
        edited_latents(latent_npz, tmp_path, vae=str(others["vae_weights"]))
    elif case == "nan_latents":
        edited_latents(latent_npz, tmp_path, latents=nan_at_start)
    elif case != "missing":
        edited_latents(latent_npz, tmp_path)
    if case == "unwritable":
        extra = ["--output-dir", inputs / "a_file" / "runs"]
    before = files_under(tmp_path)
    result = run_main("train_diffusion", *TRAIN, "--max-steps", "5", *extra, cwd=tmp_path)
    assert result.code == 2 and says in result.error
    assert files_under(tmp_path) == before


def test_resume_refuses_other_settings(tmp_path, latent_npz):
    edited_latents(latent_npz, tmp_path)
    assert run_main("train_diffusion", *TRAIN, "--max-steps", "5", cwd=tmp_path).code == 0
    run = tmp_path / "runs" / "tiny"
    before = files_under(run)
    result = run_main("train_diffusion", *TRAIN, "--max-steps", "10", cwd=tmp_path)
    assert result.code == 2 and "already holds a run; pass --resume" in result.error
    for option, value in (("--net-dimension", "16"), ("--prediction-type", "epsilon")):
        args = [*TRAIN, "--max-steps", "10", "--resume", option, value]
        result = run_main("train_diffusion", *args, cwd=tmp_path)
        assert result.code == 2 and f"checkpoint-5: was trained with {option}" in result.error
    assert files_under(run) == before


def test_training_script_reports_one_line(tmp_path, latent_npz, others):
    edited_latents(latent_npz, tmp_path)
    result = run_script("train_diffusion", *TRAIN, "--max-steps", "5", "--vae", others["vae_weights"], cwd=tmp_path)
    assert result.code == 2 and result.stderr.strip().splitlines() == [result.error]
    assert "data/tiny/latent.npz: was made with another VAE" in result.error
    assert files_under(tmp_path) == ["data", "data/tiny", "data/tiny/latent.npz"]


MAX_STEPS = 30


def train_command(*extra) -> list[str]:
    return script_command("train_diffusion", *TRAIN, "--max-steps", MAX_STEPS, *extra)


def ema_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "unet" / "diffusion_pytorch_model.safetensors"))


def logged_steps(run: Path, log: str) -> list[int]:
    return [json.loads(line)["step"] for line in (run / log).read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, latent_npz) -> Path:
    """The uninterrupted run every interrupted-and-resumed one must reproduce exactly."""
    folder = tmp_path_factory.mktemp("reference")
    edited_latents(latent_npz, folder)
    result = subprocess.run(train_command(), cwd=folder, env=SCRIPT_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "runs" / "tiny"


@pytest.mark.slow  # four training runs in subprocesses, signalled and resumed: about a minute in all
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_interrupted_training_resumes_exactly(tmp_path, latent_npz, reference_run, sig):
    edited_latents(latent_npz, tmp_path)
    run = tmp_path / "runs" / "tiny"
    process = subprocess.Popen(train_command(), cwd=tmp_path, env=SCRIPT_ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoint-5" / "colorizer.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if sig == signal.SIGKILL:
        time.sleep(0.1)  # land between checkpoints
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=300)
    assert "Traceback" not in stderr, stderr[-3000:]
    from colorizer import checkpoints_of

    steps = [int(c.name.split("-")[1]) for c in checkpoints_of(run)]
    assert steps and steps[-1] < MAX_STEPS, "the run finished before the signal: nothing was tested"
    if sig == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
        # the kill may come in the middle of writing a checkpoint: its temporary folder must not count
        (run / ".checkpoint-99.abc123.tmp" / "state").mkdir(parents=True)
    else:
        assert process.returncode == 128 + sig
        assert f"stopped at step {steps[-1]} with checkpoint-{steps[-1]}; continue with --resume" in stdout
    for checkpoint in checkpoints_of(run):  # every checkpoint left is complete and loadable
        assert json.loads((checkpoint / "colorizer.json").read_text())["step"] == int(checkpoint.name.split("-")[1])
        assert ema_weights(checkpoint)

    resumed = subprocess.run(train_command("--resume"), cwd=tmp_path, env=SCRIPT_ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed runs/tiny/checkpoint-{steps[-1]} at step {steps[-1]}" in resumed.stdout
    final = run / f"checkpoint-{MAX_STEPS}"
    assert json.loads((final / "colorizer.json").read_text())["step"] == MAX_STEPS
    assert [c.name for c in checkpoints_of(run)] == [c.name for c in checkpoints_of(reference_run)]
    assert not list(run.glob(".*")), "temporaries left behind"
    assert logged_steps(run, "validation.jsonl") == logged_steps(reference_run, "validation.jsonl")
    # same step count, optimizer state, EMA, data order and random draws: the very same weights
    reference, weights = ema_weights(reference_run / f"checkpoint-{MAX_STEPS}"), ema_weights(final)
    assert reference.keys() == weights.keys()
    assert all(torch.equal(reference[key], weights[key]) for key in reference)


def test_data_order_depends_only_on_seed_and_step():
    from dataset import batch_indices

    count, batch = 18, 4
    epochs = np.concatenate([np.random.default_rng([0, e]).permutation(count) for e in range(3)])
    for step in range(12):
        assert np.array_equal(batch_indices(step, batch, count, seed=0), epochs[step * batch : (step + 1) * batch])
    assert not np.array_equal(batch_indices(0, batch, count, seed=0), batch_indices(0, batch, count, seed=1))


def test_sources_are_sampled_by_size_to_a_power():
    from dataset import batch_indices, source_weights

    sources = np.array(["images/big"] * 900 + ["videos"] * 100)
    assert source_weights(sources, 1.0) is None  # every item alike: the seeded epochs above
    weights = source_weights(sources, 0.5)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[:900].sum() == pytest.approx(30 / 40)  # 900 ** 0.5 against 100 ** 0.5
    drawn = np.concatenate([batch_indices(step, 16, 1000, 0, weights) for step in range(200)])
    assert 0.2 < (drawn >= 900).mean() < 0.3
    assert np.array_equal(batch_indices(7, 16, 1000, 0, weights), batch_indices(7, 16, 1000, 0, weights))
