"""Tests of metrics.py and evaluate.py: metric values worked out by hand, the paper's uint8 bug, clip matching, and
the CLI."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import flow as motion  # noqa: E402
from conftest import smooth_texture  # noqa: E402
import metrics  # noqa: E402
import utils  # noqa: E402
import video_io  # noqa: E402

VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "val"


def constant_frame(rgb: tuple, height: int = 16, width: int = 16) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (height, width, 3)).copy()


# --- PSNR ---------------------------------------------------------------------------------------------------------


def test_psnr_uint8_does_not_wrap():
    # The paper's bug: uint8 10 - 250 wraps to 16, which would score about 24 dB instead of about 0.5 dB.
    pred, gt = constant_frame((10, 10, 10)), constant_frame((250, 250, 250))
    assert metrics.psnr(pred, gt) == pytest.approx(20 * math.log10(255 / 240), abs=1e-9)
    assert metrics.psnr(gt, pred) == metrics.psnr(pred, gt)


def test_psnr_by_hand():
    pred = np.zeros((2, 2, 3), np.uint8)
    gt = pred.copy()
    gt[0, 0, 0] = 255  # MSE = 255^2 / 12, so PSNR = 10 log10(12)
    assert metrics.psnr(pred, gt) == pytest.approx(10 * math.log10(12), abs=1e-9)


def test_published_psnr_wraps_as_the_published_code_does():
    """ColorMNet's evaluation (and the seed paper's code) takes ((img1 - img2)**2).mean() of uint8 arrays: the
    difference and its square wrap modulo 256, so an error of d levels counts as (d * d) mod 256."""
    pred = np.zeros((2, 2, 3), np.uint8)
    gt = pred.copy()
    gt[0, 0, 0], gt[0, 0, 1], gt[0, 1, 0] = 16, 3, 255
    pred[1, 1, 2] = 20  # gt - pred = -20 there; the other 8 values are exact
    # Float: 16^2 + 3^2 + 255^2 + 20^2 = 256 + 9 + 65025 + 400 = 65690 over 12 values, so
    # PSNR = 10 log10(255^2 * 12 / 65690) = 10 log10(11.8785) = 10.748 dB.
    assert metrics.psnr(pred, gt) == pytest.approx(10 * math.log10(65025 * 12 / 65690), abs=1e-9)
    assert metrics.psnr(pred, gt) == pytest.approx(10.748, abs=1e-3)
    # Wrapped: 256 -> 0, 9 -> 9, 65025 = 254 * 256 + 1 -> 1, 400 = 256 + 144 -> 144: 154 over 12 values, so
    # PSNR = 10 log10(255^2 * 12 / 154) = 10 log10(5066.88) = 37.047 dB for the same errors.
    assert metrics.psnr_published_uint8(pred, gt) == pytest.approx(10 * math.log10(65025 * 12 / 154), abs=1e-9)
    assert metrics.psnr_published_uint8(pred, gt) == pytest.approx(37.047, abs=1e-3)
    assert metrics.psnr_published_uint8(gt, pred) == metrics.psnr_published_uint8(pred, gt)  # (-d)^2 = d^2
    # Errors of 16, 32 or 240 levels square to multiples of 256: a zero MSE, as identical frames have, so inf.
    assert metrics.psnr_published_uint8(constant_frame((0, 0, 0)), constant_frame((16, 32, 240))) == math.inf


def test_psnr_of_identical_frames_is_capped_and_counted():
    frame = smooth_texture()
    assert metrics.psnr(frame, frame) == metrics.PSNR_CAP_DB
    result = metrics.evaluate_clip([frame, frame], [frame, frame])
    assert result["psnr"] == metrics.PSNR_CAP_DB
    assert result["psnr_capped_frames"] == 2


# --- SSIM ---------------------------------------------------------------------------------------------------------


def test_ssim_identical_is_one_and_uint8_matches_float():
    gt = smooth_texture()
    pred = np.clip(gt.astype(np.int16) + 40, 0, 255).astype(np.uint8)
    assert metrics.ssim(gt, gt) == pytest.approx(1.0)
    value = metrics.ssim(pred, gt)
    assert 0.0 < value < 0.99
    assert value == pytest.approx(metrics.ssim(pred.astype(np.float64), gt.astype(np.float64)))


def test_ssim_rejects_tiny_frames():
    with pytest.raises(utils.UserError, match="too small"):
        metrics.ssim(constant_frame((1, 2, 3), 4, 4), constant_frame((1, 2, 3), 4, 4))


# --- Colorfulness ---------------------------------------------------------------------------------------------------


def test_colorfulness_by_hand():
    assert metrics.colorfulness(constant_frame((90, 90, 90))) == 0.0
    # rg = 100 and yb = |150 - 50| = 100 everywhere: no spread, CF = 0.3 * sqrt(100^2 + 100^2).
    assert metrics.colorfulness(constant_frame((200, 100, 50))) == pytest.approx(0.3 * math.hypot(100, 100))
    # Two pixels (0,0,0) and (100,0,0): rg = [0, 100], yb = [0, 50]; std = mean = (50, 25).
    two = np.array([[[0, 0, 0], [100, 0, 0]]], np.uint8)
    assert metrics.colorfulness(two) == pytest.approx(1.3 * math.hypot(50, 25))
    # yellow (100,100,0) and blue (0,0,100): yb = |+-100| = 100 for both, so no spread: CF = 0.3 * 100.
    yellow_blue = np.array([[[100, 100, 0], [0, 0, 100]]], np.uint8)
    assert metrics.colorfulness(yellow_blue) == pytest.approx(30.0)


# --- JS divergence and CDC ------------------------------------------------------------------------------------------


def test_js_divergence_symmetric_zero_and_by_hand():
    rng = np.random.default_rng(1)
    p, q = rng.dirichlet(np.ones(256)), rng.dirichlet(np.ones(256) * 0.1)  # q has near-empty bins
    q[:10] = 0
    q /= q.sum()
    assert metrics.js_divergence(p, q) == pytest.approx(metrics.js_divergence(q, p), abs=1e-15)
    assert metrics.js_divergence(p, p) == pytest.approx(0.0, abs=1e-15)
    assert metrics.js_divergence([1, 0], [0, 1]) == pytest.approx(math.log(2))
    # m = (0.75, 0.25): KL(p||m) = ln(4/3), KL(q||m) = (ln(2/3) + ln 2) / 2.
    expected = 0.5 * math.log(4 / 3) + 0.25 * (math.log(2 / 3) + math.log(2))
    assert metrics.js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(expected)
    from scipy.spatial.distance import jensenshannon

    assert metrics.js_divergence(p, q) == pytest.approx(jensenshannon(p, q) ** 2)


def test_cdc_of_constant_video_is_zero():
    frames = [constant_frame((30, 140, 220))] * 6
    assert metrics.cdc(frames) == 0.0


def test_cdc_by_hand_averages_over_dilations():
    black, white = constant_frame((0, 0, 0)), constant_frame((255, 255, 255))
    # Alternating frames: k=1 pairs differ completely (JS = ln 2), k=2 and k=4 pairs are equal (0).
    assert metrics.cdc([black, white, black, white, black]) == pytest.approx(math.log(2) / 3)
    # Two frames: only k=1 has a pair.
    assert metrics.cdc([black, white]) == pytest.approx(math.log(2))
    assert math.isnan(metrics.cdc([black]))


def test_cdc_matches_tcvc_reference_code():
    """TCVC's calc_cdc: scipy entropy JS per channel, mean over t, weights 1/3 over dilations, mean over channels."""
    from scipy.stats import entropy

    frames = [smooth_texture(seed=seed) for seed in range(7)]
    hists = [[np.bincount(f[..., c].ravel(), minlength=256) / f[..., 0].size for c in range(3)] for f in frames]
    per_channel = []
    for c in range(3):
        total = 0.0
        for k in (1, 2, 4):
            pairs = zip(hists, hists[k:])
            js = [0.5 * entropy(h[c], (h[c] + g[c]) / 2) + 0.5 * entropy(g[c], (h[c] + g[c]) / 2) for h, g in pairs]
            total += np.mean(js) / 3
        per_channel.append(total)
    assert metrics.cdc(frames) == pytest.approx(np.mean(per_channel), rel=1e-12)


# --- Warp error ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("refine", [True, False])  # False: as a keyframe's colour travels (guidance.py)
def test_reliable_flow_tracks_a_moving_object_and_masks_what_it_uncovers(refine: bool):
    import cv2

    background, square = smooth_texture(96, 128), smooth_texture(40, 40, seed=7)
    prev, current = background.copy(), background.copy()
    prev[28:68, 30:70] = square
    current[28:68, 38:78] = square  # the square moves 8 px right, uncovering background at columns 30-37
    flow, mask = motion.reliable_flow(cv2.cvtColor(prev, cv2.COLOR_RGB2GRAY), cv2.cvtColor(current, cv2.COLOR_RGB2GRAY),
                                      refine)
    inside_square = (slice(32, 64), slice(48, 68))
    assert np.median(flow[inside_square][..., 0]) == pytest.approx(-8, abs=0.3)
    assert mask[inside_square].mean() > 0.9
    assert mask[:20].mean() > 0.9  # static background
    assert mask[32:64, 30:38].mean() < 0.4  # not visible in the previous frame: occluded, so left out


def test_full_resolution_flow_follows_a_small_thing_the_presets_half_resolution_search_misses():
    import cv2

    background, patch = smooth_texture(96, 128), smooth_texture(40, 40, seed=7)[:12, :12]
    prev, current = background.copy(), background.copy()
    prev[40:52, 40:52] = patch
    current[40:52, 42:54] = patch  # a 12 px square moves 2 px right on a still background
    grays = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in (prev, current)]
    inside_square = (slice(42, 50), slice(44, 52))
    errors = {full: np.abs(motion.reliable_flow(*grays, refine=False, full_resolution=full)[0][inside_square][..., 0]
                           + 2).mean() for full in (False, True)}
    assert errors[True] < 0.3
    assert errors[True] < 0.5 * errors[False]


def test_reliable_flow_masks_pixels_that_come_from_outside_the_frame():
    import cv2

    texture = smooth_texture(96, 128)
    prev, current = texture[:, 8:-8], texture[:, 5:-11]  # the view pans: current(x) = prev(x - 3)
    flow, mask = motion.reliable_flow(cv2.cvtColor(prev, cv2.COLOR_RGB2GRAY), cv2.cvtColor(current, cv2.COLOR_RGB2GRAY))
    assert np.median(flow[mask][:, 0]) == pytest.approx(-3, abs=0.2)
    assert not mask[:, :3].any()  # their source lies left of the previous frame
    assert mask[:, 3:].mean() > 0.9


def test_warp_error_zero_when_colors_follow_the_motion_and_equal_to_a_global_color_jump():
    texture = smooth_texture(96, 128)
    prev, current = np.ascontiguousarray(texture[:, 8:-8]), np.ascontiguousarray(texture[:, 5:-11])
    assert metrics.warp_error(prev, prev, prev, prev) == pytest.approx(0.0, abs=1e-6)
    assert metrics.warp_error(prev, current, prev, current) < 1.0
    red, blue = constant_frame((200, 40, 40), *prev.shape[:2]), constant_frame((40, 40, 200), *prev.shape[:2])
    red_ab, blue_ab = utils.rgb_to_lab(red)[0, 0, 1:], utils.rgb_to_lab(blue)[0, 0, 1:]
    expected = float(np.hypot(*(red_ab - blue_ab)))
    assert metrics.warp_error(red, blue, prev, current) == pytest.approx(expected, rel=1e-4)


# --- Whole clips --------------------------------------------------------------------------------------------------


def test_evaluate_clip_warps_with_the_ground_truth_motion():
    texture = smooth_texture(96, 128)
    gt = [np.ascontiguousarray(texture[:, 8 - shift : 120 - shift]) for shift in (0, 3, 6)]
    frozen = [gt[0]] * 3  # a prediction that ignores the motion: steady by its own flow, not by the GT's
    result = metrics.evaluate_clip(frozen, gt)
    expected = np.mean([metrics.warp_error(gt[0], gt[0], gt[t - 1], gt[t]) for t in (1, 2)])
    assert result["warp_error"] == pytest.approx(expected)
    assert result["warp_error"] > 5 * result["gt_warp_error"]


def test_evaluate_clip_frame_count_mismatch_is_an_error():
    frames = [smooth_texture(seed=s) for s in range(3)]
    with pytest.raises(utils.UserError, match="3 predicted frames but 2 ground-truth"):
        metrics.evaluate_clip(frames, frames[:2], name="x")
    with pytest.raises(utils.UserError, match="2 predicted frames but 3 ground-truth"):
        metrics.evaluate_clip(frames[:2], frames, name="x")


def test_evaluate_clip_resizes_prediction_with_a_warning(capsys):
    import cv2

    gt = [smooth_texture(seed=s) for s in range(3)]
    pred = [cv2.resize(f, (40, 32), interpolation=cv2.INTER_AREA) for f in gt]
    result = metrics.evaluate_clip(pred, gt, sample_at=[0, 2], name="small")
    assert "resizing the prediction" in capsys.readouterr().err
    assert result["resized"] and result["frames"] == 3
    assert result["samples"][2][0].shape == gt[2].shape
    assert 15 < result["psnr"] < metrics.PSNR_CAP_DB


def test_gray_baseline_scores():
    gt = [smooth_texture(seed=s) for s in range(5)]
    result = metrics.evaluate_clip(metrics.gray_baseline(gt), gt)
    expected = np.mean([metrics.psnr(np.repeat(utils.rgb_to_gray(f)[..., None], 3, axis=2), f) for f in gt])
    assert result["psnr"] == pytest.approx(expected)
    assert result["colorfulness"] == 0.0
    assert result["colorfulness_gap"] == pytest.approx(result["gt_colorfulness"]) and result["gt_colorfulness"] > 10
    assert result["warp_error"] < 0.05  # a gray video has (almost) no chroma to flicker
    assert result["gt_cdc"] > 0


# --- Clip matching, CLI ----------------------------------------------------------------------------------------------


def write_frames(folder: Path, frames: list) -> None:
    folder.mkdir(parents=True)
    for index, frame in enumerate(frames):
        video_io.write_image_rgb(folder / f"{index:05d}.png", frame)


def test_match_clips_pairs_video_with_folder_by_name(tmp_path, capsys):
    frames = [smooth_texture(seed=s) for s in range(2)]
    write_frames(tmp_path / "gt" / "a", frames)
    write_frames(tmp_path / "gt" / "b", frames)
    (tmp_path / "pred").mkdir()
    with video_io.VideoWriter(tmp_path / "pred" / "b.mp4", 80, 64, 25) as writer:
        for frame in frames:
            writer.write(frame)
    pairs = video_io.match_clips(tmp_path / "pred", tmp_path / "gt")
    assert pairs == [("b", tmp_path / "pred" / "b.mp4", tmp_path / "gt" / "b")]
    assert "no prediction for 1 ground-truth clip(s) (a)" in capsys.readouterr().err
    # A single video against a single clip pairs whatever the names.
    assert video_io.match_clips(tmp_path / "pred" / "b.mp4", tmp_path / "gt" / "a")[0][2] == tmp_path / "gt" / "a"
    write_frames(tmp_path / "pred" / "c", frames)
    with pytest.raises(utils.UserError, match="no ground-truth clip named 'c'"):
        video_io.match_clips(tmp_path / "pred", tmp_path / "gt")


def run_cli(*args: str, frechet: bool = False) -> subprocess.CompletedProcess:
    """evaluate.py with `args`; without its Lite2 network (about 10 s to load) unless `frechet`."""
    flags = [*args] if frechet else [*args, "--no-frechet"]
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *flags], capture_output=True, text=True, cwd=REPO)


def test_cli_writes_reports_and_figures(tmp_path):
    gt = [smooth_texture(seed=s) for s in range(4)]
    write_frames(tmp_path / "gt" / "clip", gt)
    write_frames(tmp_path / "pred" / "clip", [np.roll(f, 1, axis=2) for f in gt])
    out = tmp_path / "out"
    done = run_cli("--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--baseline", "gray", "--out",
                   str(out), frechet=True)
    assert done.returncode == 0, done.stderr
    assert "MEAN" in done.stdout and "skipped: no weights given (never downloaded)" in done.stdout
    report = json.loads((out / "results.json").read_text())
    for method in ("prediction", "gray"):  # a distance between sets of frames: for the method, not for one clip
        assert report["methods"][method]["mean"]["frechet_lite2"] > 0
        assert report["methods"][method]["clips"]["clip"]["frechet_lite2"] is None
    assert set(report["methods"]) == {"prediction", "gray"}
    assert report["methods"]["prediction"]["clips"]["clip"]["frames"] == 4
    assert len(report["methods"]["gray"]["clips"]["clip"]["per_frame"]["psnr"]) == 4
    assert (out / "results.csv").read_text().count("\n") == 5  # header, then a clip row and a mean row per method
    for name in ("clip_frames.png", "clip_curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    again = run_cli("--gt", str(tmp_path / "gt"), "--baseline", "gray", "--out", str(out))
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_cli_reports_the_published_psnr_over_every_frame(tmp_path):
    """The published protocol's PSNR is the mean over every frame of every clip (a clip of three frames weighs three
    times a clip of one), each frame's value (d * d) mod 256 in the MSE; the gray baseline's stands beside it."""
    clips = {"long": [smooth_texture(seed=s) for s in range(3)], "short": [smooth_texture(seed=7)]}
    for name, frames in clips.items():
        write_frames(tmp_path / "gt" / name, frames)
        write_frames(tmp_path / "pred" / name, [np.roll(f, 1, axis=2) for f in frames])
    out = tmp_path / "out"
    done = run_cli("--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--baseline", "gray", "--out",
                   str(out), "--no-frechet")
    assert done.returncode == 0, done.stderr
    assert "PSNR(u8wrap)" in done.stdout.splitlines()[0]
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert set(methods) == {"prediction", "gray"}
    for method in methods.values():
        every_frame = [v for clip in method["clips"].values() for v in clip["per_frame"]["psnr_published_uint8"]]
        assert len(every_frame) == 4
        assert method["mean"]["psnr_published_uint8"] == pytest.approx(np.mean(every_frame), abs=1e-12)
        clip_means = [clip["psnr_published_uint8"] for clip in method["clips"].values()]
        assert abs(np.mean(clip_means) - np.mean(every_frame)) > 1e-6  # not the mean of the clip means
    pred = np.roll(clips["short"][0], 1, axis=2).astype(int)
    wrapped_mse = ((clips["short"][0].astype(int) - pred) ** 2 % 256).mean()
    short = methods["prediction"]["clips"]["short"]["per_frame"]["psnr_published_uint8"]
    assert short == [pytest.approx(20 * math.log10(255 / math.sqrt(wrapped_mse)), abs=1e-9)]


def test_overview_shows_one_frame_of_every_clip(tmp_path):
    """Two clips of different shapes and colours: the overview holds both colours; each clip's own figure only its."""
    from PIL import Image

    colours = {"red": ((200, 30, 30), (48, 96)), "blue": ((30, 30, 200), (64, 64))}
    for clip, (colour, shape) in colours.items():
        frames = [np.full((*shape, 3), colour, np.uint8) for _ in range(3)]
        write_frames(tmp_path / "gt" / clip, frames)
        write_frames(tmp_path / "pred" / clip, frames)
    out = tmp_path / "out"
    done = run_cli("--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(out))
    assert done.returncode == 0, done.stderr

    def pixels_near(figure: str, colour: tuple) -> int:
        image = np.asarray(Image.open(out / figure).convert("RGB")).astype(int)
        return int((np.abs(image - colour).max(axis=2) < 20).sum())

    assert all(pixels_near("overview.png", colour) > 2000 for colour, _ in colours.values())
    assert pixels_near("red_frames.png", colours["red"][0]) > 2000
    assert pixels_near("red_frames.png", colours["blue"][0]) == 0


def test_cli_errors_are_one_line(tmp_path):
    gt = [smooth_texture(seed=s) for s in range(3)]
    write_frames(tmp_path / "gt" / "clip", gt)
    write_frames(tmp_path / "pred" / "clip", gt[:2])
    done = run_cli("--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "2 predicted frames but 3 ground-truth frames" in done.stderr
    assert not (tmp_path / "out").exists()
    missing = run_cli("--gt", str(tmp_path / "gt"), "--baseline", "gray", "--lpips-weights", str(tmp_path / "nope.pth"))
    assert missing.returncode == 2 and "nope.pth: no such file" in missing.stderr


@pytest.mark.skipif(not VAL.is_dir(), reason=f"{VAL} not present")
def test_gray_baseline_on_val_first_frames():
    clip = VAL / "openh264__foreman_cif"
    gt = list(itertools.islice(video_io.iter_clip_frames(clip), 3))
    result = metrics.evaluate_clip(metrics.gray_baseline(gt), gt)
    # Over all 150 frames this clip scores 24.50 dB and colorfulness about 28 (see README_EVALUATE.md).
    assert 24.0 < result["psnr"] < 25.0
    assert 0.97 < result["ssim"] < 0.99
    assert 25 < result["gt_colorfulness"] < 31


def test_probe_scores_every_photo_of_a_folder_of_several_sizes(tmp_path, tiny_model):
    """experiments/probe_limits.py on a folder of photos (held-out photo sets hold portrait and landscape ones): each
    is scored once, and the true chroma through a resize beats the gray input."""
    import cv2
    from skimage import data

    from conftest import run_main

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, image in (("a", data.astronaut()), ("b", data.chelsea()), ("c", data.coffee())):
        small = cv2.resize(image, (96, 64) if name != "c" else (64, 96), interpolation=cv2.INTER_AREA)
        video_io.write_image_rgb(photos / f"{name}.png", small)
    result = run_main("experiments.probe_limits", "--model", tiny_model, "--clips", photos, "--every", 1, "--variants",
                      "gray", "oracle-resize", "--json", tmp_path / "probe.json", cwd=REPO)
    assert result.code == 0, result.stderr
    summary = json.loads((tmp_path / "probe.json").read_text())["summary"]
    assert summary["frames"] == 3
    assert summary["oracle-resize"]["psnr"] > summary["gray"]["psnr"] + 5


def test_probe_hints_hold_the_true_colour_where_given_and_need_a_hint_model(tmp_path, tiny_model, frame_root):
    from experiments.probe_limits import true_chroma, truth_hints
    from conftest import run_main

    frames = np.stack(list(video_io.iter_clip_frames(frame_root / "pan"))[:2])
    truth = true_chroma(frames, (32, 48))
    for kind, coverage in (("points", (0.0, 0.3)), ("regions", (0.0, 1.0)), ("full", (0.999, 1.0))):
        hints = truth_hints(truth, kind, seed=0).numpy()
        mask = hints[:, 2]
        assert coverage[0] < mask.mean() <= coverage[1], kind
        hinted = mask > 0
        given = hints[:, :2].transpose(0, 2, 3, 1)[hinted] * 128
        if kind == "points":  # each dot holds its patch's mean colour
            assert np.abs(given).max() <= np.abs(truth).max() + 1e-3
        else:
            assert np.allclose(given, truth[hinted], atol=1e-3)
    result = run_main("experiments.probe_limits", "--model", tiny_model, "--clips", frame_root / "pan", "--variants",
                      "hints-full", cwd=REPO)
    assert result.code == 2 and "has no hint input" in result.stderr


def test_cdc_counts_a_smooth_colour_drifting_by_a_tenth_of_a_level_until_both_round_alike(tmp_path):
    """experiments/probe_cdc_rounding.py: truth and output drift alike, 0.1 chroma levels a frame, the truth's
    chroma with a fixed texture of its own, the output's smooth. CDC's whole-bin histograms count the smooth one's
    drift many times over; rebuilt with the same noise of one level in both, the two score alike."""
    import cv2
    from skimage import data

    from conftest import run_main

    luma = cv2.resize(data.camera(), (160, 128), interpolation=cv2.INTER_AREA)
    texture = np.random.default_rng(1).normal(0, 2, (128, 160, 2)).astype(np.float32)
    for name, own in (("gt", texture), ("pred", 0.0)):
        write_frames(tmp_path / name / "clip", [utils.luma_chroma_to_rgb(luma, np.float32([10 + 0.1 * t, -6]) + own
                                                                         + np.zeros((128, 160, 2), np.float32))
                                                for t in range(9)])
    result = run_main("experiments.probe_cdc_rounding", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt",
                      "--dither", 1, "--json", tmp_path / "rounding.json", cwd=REPO)
    assert result.code == 0, result.stderr
    row = json.loads((tmp_path / "rounding.json").read_text())["clips"]["clip"]
    assert row["cdc"] > 3 * row["gt_cdc"] > 0
    assert row["cdc_dither1"] < 1.3 * row["gt_cdc_dither1"]
    assert row["cdc_frozen"] < 0.1 * row["gt_cdc"]  # the first frame's colour on every frame: nothing moves


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    """Same covariance, means apart by (1, 2, 2): the trace term vanishes and the distance is 1 + 4 + 4 = 9."""
    from metrics import frechet_distance

    points = np.random.default_rng(0).normal(size=(500, 3))
    assert frechet_distance(points, points) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(points + np.array([1.0, 2.0, 2.0]), points) == pytest.approx(9.0, abs=1e-6)


def test_frechet_on_lite2_features_tells_gray_frames_from_colour_ones():
    from conftest import panning_clip
    from metrics import FrechetFeatures, frechet_distance
    from utils import rgb_to_gray

    frames = panning_clip(8, (96, 128))
    rng = np.random.default_rng(0)
    noisy = [np.clip(f + rng.normal(0, 2, f.shape), 0, 255).astype(np.uint8) for f in frames]
    gray = [np.repeat(rgb_to_gray(f)[..., None], 3, axis=2) for f in frames]
    features = FrechetFeatures()
    truth = np.stack([features(f) for f in frames])
    assert truth.shape == (8, 1280)
    to_noisy = frechet_distance(np.stack([features(f) for f in noisy]), truth)
    to_gray = frechet_distance(np.stack([features(f) for f in gray]), truth)
    assert to_gray > 3 * to_noisy
