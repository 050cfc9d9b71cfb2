"""Colour guidance: the hints training draws, keyframes and painted hints carried along the flow, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, files_under, panning_clip, run_main, smooth_texture


def chroma_of(frames: list[np.ndarray]) -> np.ndarray:
    from utils import rgb_to_chroma

    return np.stack([rgb_to_chroma(f) for f in frames])


def test_training_hints_keep_half_the_items_unhinted_and_copy_true_colours():
    from guidance import draw_training_hints

    frames = panning_clip(64, (32, 32))
    chroma = chroma_of(frames)
    partner_mask = np.zeros(chroma.shape[:3], np.float32)
    partner_mask[::2, 8:24, 8:24] = 1  # even items have a partner covering the middle
    partner_chroma = chroma + 5.0
    rngs = [np.random.default_rng([0, i]) for i in range(len(chroma))]
    hints, dense = draw_training_hints(chroma, partner_chroma, partner_mask, rngs, none_fraction=0.5)
    hints = hints.numpy()
    mask = hints[:, 2]
    hinted = mask.reshape(len(mask), -1).any(axis=1)
    assert 20 <= (~hinted).sum() <= 44  # about half without any hint
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert np.all(hints[:, :2][np.broadcast_to(mask[:, None] == 0, hints[:, :2].shape)] == 0)  # no colour unhinted
    for i in np.flatnonzero(hinted):
        given = hints[i, :2].transpose(1, 2, 0) * 128
        inside = mask[i] > 0
        if np.array_equal(inside, partner_mask[i] > 0):  # the partner's warped colours, as they are
            assert dense[i]
            assert np.allclose(given[inside], partner_chroma[i][inside], atol=1e-3)
        else:  # points, patches or regions of the true colour: within the range of their patch
            assert np.abs(given[inside] - chroma[i][inside]).mean() < 6
    assert any(np.array_equal(mask[i] > 0, partner_mask[i] > 0) for i in np.flatnonzero(hinted))
    assert not dense[~hinted].any() and mask[dense].mean() > mask[hinted & ~dense].mean()  # points cover little
    # the same generators draw the same hints (a resumed run trains on the same ones)
    generators = [np.random.default_rng([0, i]) for i in range(64)]
    again, dense_again = draw_training_hints(chroma, partner_chroma, partner_mask, generators)
    assert torch.equal(again, torch.from_numpy(hints)) and np.array_equal(dense_again, dense)


def test_a_keyframe_travels_forward_and_backward_along_the_motion():
    from guidance import GuidePropagator, load_reference
    from utils import rgb_to_gray
    from video_io import write_image_rgb

    frames = panning_clip(12, (72, 96))
    grays = [rgb_to_gray(f) for f in frames]
    truth = chroma_of(frames)
    gray_error = np.abs(truth).mean()

    def propagated_errors(keyframe: int, tmp_path) -> list[float]:
        write_image_rgb(tmp_path / f"key{keyframe}.png", frames[keyframe])
        propagator = GuidePropagator([load_reference(tmp_path / f"key{keyframe}.png", keyframe, (72, 96))])
        propagator.backward_pass(grays[: keyframe + 1], [False] * (keyframe + 1))
        errors = []
        for t, gray in enumerate(grays):
            dense, sparse = propagator.step(t, gray)
            assert sparse is None and dense is not None
            reliable = dense.confidence > 0.5
            assert reliable.mean() > 0.5
            errors.append(float(np.abs(dense.chroma - truth[t])[reliable].mean()))
        return errors

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        forward = propagated_errors(0, Path(folder))
        middle = propagated_errors(6, Path(folder))
    assert forward[0] < 1.0 and middle[6] < 1.0  # the keyframe itself, to within JPEG-free rounding
    assert max(forward) < gray_error / 4 and max(middle) < gray_error / 4


def test_a_scene_cut_stops_a_keyframe():
    from guidance import Guide, GuidePropagator

    gray = panning_clip(1, (32, 32))[0][..., 0]
    ones = np.ones((32, 32), np.float32)
    guide = Guide(0, np.full((32, 32, 2), 10.0, np.float32), ones, ones, dense=True)
    propagator = GuidePropagator([guide])
    assert propagator.step(0, gray)[0] is not None
    assert propagator.step(1, gray)[0] is not None
    assert propagator.step(2, 255 - gray, cut=True) == (None, None)


def test_a_keyframe_palette_colours_what_the_flow_cannot_reach():
    """The shot pans onto content the keyframe's colour cannot be carried to: there the keyframe's colours by luma
    bring a model that says gray nearer the truth; where the colour arrived, it is kept as it is."""
    from guidance import GuidePropagator, paste_dense, reference_guide
    from utils import rgb_to_gray

    frames = panning_clip(8)
    propagator = GuidePropagator([reference_guide(frames[0], 0, frames[0].shape[:2])])
    for t, frame in enumerate(frames):
        dense, _ = propagator.step(t, rgb_to_gray(frame))
    truth = chroma_of(frames[-1:])[0]
    output = paste_dense(np.zeros_like(truth), dense, rgb_to_gray(frames[-1]))
    unreached = dense.confidence < 0.5
    assert 0.02 < unreached.mean() < 0.5
    gray_error = np.abs(truth[unreached]).mean()
    assert np.abs(output - truth)[unreached].mean() < 0.7 * gray_error
    assert np.abs(output - truth)[~unreached].mean() < 1.5


def test_colour_lost_behind_an_occluder_comes_back_from_the_keyframe():
    """A gray block covers part of the shot for three frames: the chain of frame-to-frame flows loses the colour
    behind it; a direct flow from the keyframe finds it again, fully trusted, once the block has gone."""
    from dataclasses import replace

    from guidance import GuidePropagator, reference_guide
    from utils import rgb_to_gray

    frames = panning_clip(8)
    occluded = [frame.copy() for frame in frames]
    for frame in occluded[2:5]:
        frame[20:50, 30:70] = 128
    keyed = reference_guide(frames[0], 0, frames[0].shape[:2])
    last = {}
    for name, guide in (("keyframe", keyed), ("chain only", replace(keyed, keyframe=None))):
        propagator = GuidePropagator([guide])
        for t, frame in enumerate(occluded):
            last[name] = propagator.step(t, rgb_to_gray(frame))[0]
    truth = chroma_of(frames[-1:])[0][20:50, 30:70]
    error = {name: np.abs(dense.chroma[20:50, 30:70] - truth).mean() for name, dense in last.items()}
    confidence = {name: dense.confidence[20:50, 30:70].mean() for name, dense in last.items()}
    assert confidence["chain only"] < 0.6 < 0.9 < confidence["keyframe"]
    assert error["keyframe"] < min(error["chain only"], 0.25 * np.abs(truth).mean())


def test_guides_travelling_together_share_the_steps_flow_and_move_as_they_would_alone(monkeypatch):
    """Two keyframes' guides carried to the next frame: the flow between the two frames is computed once for both
    (each guide adds only the two flows from its keyframe), and each arrives exactly as it would travelling alone."""
    import flow
    from guidance import reference_guide, travel
    from utils import rgb_to_gray

    frames = panning_clip(6)
    grays = [rgb_to_gray(f) for f in frames]
    guides = [reference_guide(frames[0], 0, grays[0].shape), reference_guide(frames[2], 2, grays[0].shape)]
    calls = []
    dense_flow = flow.dense_flow
    monkeypatch.setattr(flow, "dense_flow", lambda *args, **kwargs: calls.append(1) or dense_flow(*args, **kwargs))
    together = travel(guides, grays[3], grays[4])
    assert len(calls) == 2 + 2 * 2
    for guide, moved in zip(guides, together):
        alone = travel([guide], grays[3], grays[4])[0]
        assert all(np.array_equal(getattr(alone, part), getattr(moved, part))
                   for part in ("weighted", "support", "confidence"))


def test_model_hints_keep_a_one_pixel_dot_of_a_large_frame():
    from guidance import Guide, model_hints

    weighted, mask = np.zeros((480, 640, 2), np.float32), np.zeros((480, 640), np.float32)
    weighted[100, 200], mask[100, 200] = (30.0, -20.0), 1.0
    chroma, hinted = model_hints(None, Guide(0, weighted, mask, mask, dense=False), (48, 64))
    assert hinted.sum() == 1 and hinted[10, 20] == 1
    assert np.allclose(chroma[10, 20], (30.0, -20.0))


def test_flow_reference_baseline_beats_gray_and_starts_from_the_truth():
    from metrics import flow_reference_baseline, gray_baseline, psnr

    frames = panning_clip(10)
    carried = list(flow_reference_baseline(iter(frames)))
    gray = list(gray_baseline(iter(frames)))
    assert psnr(carried[0], frames[0]) > 45
    gray_psnr = np.mean([psnr(g, f) for g, f in zip(gray, frames)])
    assert np.mean([psnr(c, f) for c, f in zip(carried, frames)]) > gray_psnr + 8


def test_propagation_probe_tells_drift_from_a_change_of_the_true_colour():
    """experiments/probe_propagation.py on a pan: the carried colour holds and matches the truth; when the truth's
    colour itself shifts after the keyframe (a new grade), the one-pixel alignment oracle's error rises with the
    carried colour's, so the probe reports it as a change of colour, not as drift."""
    from experiments.probe_propagation import score_clip
    from utils import luma_chroma_to_rgb, rgb_to_chroma, rgb_to_gray

    frames = panning_clip(12)
    steady = score_clip(frames)
    shift = np.float32([0.0, 12.0])  # Cr up 12 levels in every frame after the keyframe
    regraded = frames[:1] + [luma_chroma_to_rgb(rgb_to_gray(f), rgb_to_chroma(f).astype(np.float32) + shift)
                             for f in frames[1:]]
    changed = score_clip(regraded)
    assert steady["held"] > 0.7 and changed["held"] > 0.7
    assert steady["carried"] < 15
    assert changed["carried"] > steady["carried"] + 80
    assert changed["oracle"] > 0.8 * changed["carried"]


def test_the_carry_is_heavier_where_nothing_moves_than_where_things_move():
    """CarryWeight: the previous output's weight is `still` where the flow stands still and `moving` where the
    frame moves by a few pixels; a constant weight is the same in both."""
    from guidance import CarryWeight, propagate_chroma
    from utils import rgb_to_gray

    frames = [rgb_to_gray(f) for f in panning_clip(3, (96, 128))]
    previous_colour = np.full((96, 128, 2), 30.0, np.float32)
    prediction = np.zeros_like(previous_colour)

    def carried_share(previous: np.ndarray, current: np.ndarray, weight: CarryWeight) -> float:
        output = propagate_chroma(previous, current, previous_colour, prediction, weight)
        return float(np.median(output[16:-16, 16:-16, 0]) / 30.0)

    adaptive = CarryWeight(moving=0.8, still=0.99)
    assert carried_share(frames[0], frames[0], adaptive) == pytest.approx(0.99, abs=0.005)
    assert carried_share(frames[0], frames[2], adaptive) == pytest.approx(0.8, abs=0.01)  # about 4.5 pixels a step
    assert carried_share(frames[0], frames[0], CarryWeight.constant(0.8)) == pytest.approx(0.8, abs=0.005)


def test_colour_warped_by_luma_does_not_cross_a_luma_edge_and_is_bilinear_where_luma_is_flat():
    from flow import warp, warp_matching_luma

    luma = np.full((16, 16), 40, np.uint8)
    luma[:, 8:] = 200
    colour = np.zeros((16, 16, 2), np.float32)
    colour[:, :8], colour[:, 8:] = (40.0, -40.0), (-40.0, 40.0)
    half_pixel = np.zeros((16, 16, 2), np.float32)
    half_pixel[..., 0] = 0.5  # a flow half a pixel off: column 7 samples between the two halves
    assert np.abs(warp(colour, half_pixel)[:, 7] - (40.0, -40.0)).max() > 15  # bilinear mixes the two colours
    assert np.abs(warp_matching_luma(colour, half_pixel, luma, luma)[:, 7] - (40.0, -40.0)).max() < 1
    rng = np.random.default_rng(0)
    image, flow = rng.random((24, 32, 4), np.float32), rng.normal(0, 3, (24, 32, 2)).astype(np.float32)
    flat = np.full((24, 32), 90, np.uint8)
    assert np.allclose(warp_matching_luma(image, flow, flat, flat), warp(image, flow), atol=1e-5)


@pytest.mark.skipif(not (SHARED_DATA / "train" / "videos" / "tuneavideo__man-skiing").is_dir(),
                    reason="needs ../shared/data/train/videos/tuneavideo__man-skiing")
def test_a_keyframe_carried_by_luma_leaves_no_colour_trail_on_a_real_clip(monkeypatch):
    """A skier crossing snow: bilinear warping leaves the jacket's colour on the snow it uncovers, frame after frame
    (0.19 dB over the 60 frames with the keyframe's flows at full resolution, 0.5 and more with them at half size)."""
    import itertools

    import flow
    import guidance
    from metrics import psnr
    from utils import luma_chroma_to_rgb, rgb_to_gray
    from video_io import iter_clip_frames

    frames = list(itertools.islice(iter_clip_frames(SHARED_DATA / "train" / "videos" / "tuneavideo__man-skiing"), 60))

    def carried_psnr() -> float:
        propagator = guidance.GuidePropagator([guidance.reference_guide(frames[0], 0, frames[0].shape[:2])])
        scores = []
        for t, frame in enumerate(frames):
            gray = rgb_to_gray(frame)
            scores.append(psnr(luma_chroma_to_rgb(gray, propagator.step(t, gray)[0].chroma), frame))
        return float(np.mean(scores))

    by_luma = carried_psnr()
    monkeypatch.setattr(guidance, "warp_matching_luma", lambda image, flow_field, *_: flow.warp(image, flow_field))
    assert by_luma > carried_psnr() + 0.1


# ---------------------------------------------------------------------------------------------------------------
# video_colorization.py --reference / --hints


def test_a_reference_frame_colours_the_clip(tmp_path, tiny_model, colour_clip):
    from metrics import psnr
    from video_io import iter_clip_frames

    folder, frames = colour_clip
    scores = {}
    for name, extra in (("automatic", []), ("first", ["--reference", folder / "colour" / "00000.png"]),
                        ("middle", ["--reference", f"4={folder / 'colour' / '00004.png'}"]),
                        ("both ends", ["--reference", folder / "colour" / "00000.png",
                                       "--reference", f"7={folder / 'colour' / '00007.png'}"])):
        out = tmp_path / name
        result = run_main("video_colorization", "--input", folder / "gray", "--output", out, "--model", tiny_model,
                          "--steps", "1", *extra, cwd=tmp_path)
        assert result.code == 0, result.stderr[-2000:]
        scores[name] = np.mean([psnr(o, f) for o, f in zip(iter_clip_frames(out), frames)])
    assert scores["first"] > scores["automatic"] + 8
    assert scores["middle"] > scores["automatic"] + 8
    assert scores["both ends"] > max(scores["first"], scores["middle"])  # every frame near a keyframe


GUIDE_ERRORS = [  # (flags, what the message says, given the clip folder)
    (["--reference", "8={colour}/00000.png"], "has no frame 8 (it has 8, numbered from 0)"),
    (["--reference", "{folder}/broken.png"], "broken.png: cannot be decoded as an image"),
    (["--hints", "{folder}/transparent.png"], "transparent.png: has no opaque pixel"),
    (["--hints", "{folder}/opaque.png"], "opaque.png: has no alpha channel"),
]


@pytest.mark.parametrize("flags, says", GUIDE_ERRORS, ids=["frame", "undecodable", "no_opaque", "no_alpha"])
def test_bad_guides_are_one_line_errors(tmp_path, tiny_model, colour_clip, flags, says):
    folder, _ = colour_clip
    flags = [f.format(folder=folder, colour=folder / "colour") for f in flags]
    out = tmp_path / "out"
    result = run_main("video_colorization", "--input", folder / "gray", "--output", out, "--model", tiny_model,
                      "--steps", "1", *flags, cwd=tmp_path)
    assert result.code == 2 and says in result.error and "; " in result.error
    assert files_under(out) == []


def test_a_painted_dot_colours_its_region_with_any_model(tmp_path, tiny_model, colour_clip):
    """The red dot of dot.png turns its surroundings red, also for a model without a hint input; the far corner
    keeps the model's colour."""
    from video_io import iter_clip_frames

    folder, _ = colour_clip
    outputs = {}
    for name, extra in (("plain", []), ("hinted", ["--hints", f"0={folder / 'dot.png'}"])):
        result = run_main("video_colorization", "--input", folder / "gray", "--output", tmp_path / name, "--model",
                          tiny_model, "--steps", "1", *extra, cwd=tmp_path)
        assert result.code == 0, result.stderr[-2000:]
        outputs[name] = chroma_of(list(iter_clip_frames(tmp_path / name)))
    red_cr = outputs["hinted"][0, 30:34, 40:44, 1].mean()
    assert red_cr > outputs["plain"][0, 30:34, 40:44, 1].mean() + 30  # Cr: the red difference
    assert red_cr > 40
    far = (slice(0, 8), slice(88, 96))
    assert np.abs(outputs["hinted"][0][far] - outputs["plain"][0][far]).max() < 3  # a tenth of the change above


def test_painted_colour_spreads_over_its_region_and_stops_at_edges():
    from guidance import Guide, spread_painted

    luma = np.full((32, 48), 0.3, np.float32)
    luma[:, 24:] = 0.9  # a bright right half behind a sharp edge
    colour = np.array([30.0, -20.0], np.float32)
    mask = np.zeros((32, 48), np.float32)
    mask[16, 8] = 1.0
    dot = Guide(0, colour * mask[..., None], mask, mask, dense=False)
    chroma, reach = spread_painted(dot, luma)
    assert np.allclose(chroma[16, 8], colour) and reach[16, 8] == 1.0
    assert np.allclose(chroma[12:20, 4:12], colour, atol=1e-3)  # one colour spreads as itself
    assert reach[16, 12] > 0.25 and (np.diff(reach[16, 8:24]) < 0).all()  # fading with distance
    assert reach[:, 26:].max() < 0.01  # the edge holds it back
    flat_reach = spread_painted(dot, np.full((32, 48), 0.3, np.float32))[1]
    assert flat_reach[16, 28] > 10 * reach[16, 28]  # without the edge it goes on
    faded = spread_painted(Guide(0, colour * mask[..., None], mask, mask * 0.5, dense=False), luma)[1]
    assert faded[16, 8] == 0.5  # a hint carried with half confidence pastes half


def test_a_reference_needs_a_single_clip(tmp_path, tiny_model, colour_clip):
    folder, _ = colour_clip
    result = run_main("video_colorization", "--input", folder / "clips", "--output", tmp_path / "out", "--model",
                      tiny_model, "--reference", folder / "colour" / "00000.png", cwd=tmp_path)
    assert result.code == 2 and "--reference / --hints colour one clip" in result.error


def test_painted_hints_reach_a_model_with_a_hint_input_and_stay_local(tmp_path, hint_model, colour_clip,
                                                                       monkeypatch):
    """The model sees the painted hints (one pass with them, one without), and its colour changes only where their
    spread reaches: the far corner keeps nearly the plain run's colour."""
    from colorizer import Colorizer
    from video_io import iter_clip_frames

    folder, _ = colour_clip
    given = []
    sample = Colorizer.sample_latents

    def recording(self, *args, hints=None, **kwargs):
        given.append(None if hints is None else float(hints.abs().sum()))
        return sample(self, *args, hints=hints, **kwargs)

    monkeypatch.setattr(Colorizer, "sample_latents", recording)
    outputs = {}
    for name, extra in (("plain", []), ("hinted", ["--hints", f"0={folder / 'dot.png'}"])):
        given.clear()
        result = run_main("video_colorization", "--input", folder / "gray", "--output", tmp_path / name, "--model",
                          hint_model, "--steps", "1", *extra, cwd=tmp_path)
        assert result.code == 0, result.stderr[-2000:]
        outputs[name] = np.stack(list(iter_clip_frames(tmp_path / name))).astype(int)
    assert given[0] > 0 and given[1] == 0  # frame 0's batch: with the hints, then the same draws without them
    far = (slice(None), slice(0, 8), slice(88, 96))
    far_change = np.abs(outputs["plain"][far] - outputs["hinted"][far]).mean()
    near_change = np.abs(outputs["plain"][0, 28:36, 38:46] - outputs["hinted"][0, 28:36, 38:46]).mean()
    assert near_change > 10 and far_change < 3  # 12 levels far away when the model's colour is not kept local


def test_the_models_colour_from_painted_hints_is_kept_where_they_reach():
    from guidance import Guide, keep_painted_local, spread_painted

    luma = np.full((32, 48), 0.3, np.float32)
    luma[:, 24:] = 0.9
    mask = np.zeros((32, 48), np.float32)
    mask[16, 8] = 1.0
    dot = Guide(0, np.array([30.0, -20.0], np.float32) * mask[..., None], mask, mask, dense=False)
    hinted, plain = np.full((32, 48, 2), 50.0, np.float32), np.zeros((32, 48, 2), np.float32)
    reach = spread_painted(dot, luma)[1]
    kept = keep_painted_local(hinted, plain, reach)
    assert np.allclose(kept[16, 8], 50.0) and np.abs(kept[:, 26:]).max() < 0.5  # at the dot, and beyond the edge
    assert np.allclose(kept[..., 0], 50.0 * reach)


def test_motion_ranking_puts_lost_content_first_and_a_still_clip_last(tmp_path):
    """experiments/rank_motion.py: a clip that jumps between two photos loses most pixels to the flow's check, a slow
    pan few (those entering at the edge), a still clip none."""
    import json

    from conftest import run_ok
    from video_io import write_image_rgb

    pan = panning_clip(6, (64, 64))
    clips = {"still": [pan[0]] * 6, "pan": pan,
             "jumps": [pan[0] if i % 2 else np.ascontiguousarray(pan[5][::-1]) for i in range(6)]}
    for name, frames in clips.items():
        (tmp_path / "clips" / name).mkdir(parents=True)
        for i, frame in enumerate(frames):
            write_image_rgb(tmp_path / "clips" / name / f"{i:05d}.png", frame)
    run_ok("experiments/rank_motion.py", "--clips", str(tmp_path / "clips"), "--size", "64", "--json",
           str(tmp_path / "motion.json"), cwd=tmp_path)
    ranking = json.loads((tmp_path / "motion.json").read_text())["ranking"]
    assert list(ranking) == ["jumps", "pan", "still"]
    assert ranking["still"]["unreliable"] == 0.0 and ranking["jumps"]["unreliable"] > 0.3
    assert ranking["pan"]["median_flow"] > ranking["still"]["median_flow"]


def jumping_patch_clip(frame_count: int = 6) -> tuple[list[np.ndarray], tuple[slice, slice]]:
    """The gray cameraman photo with a colour patch of the cat photo on it, which jumps across the frame after frame 0
    (too far for the optical flow) and stays there -> (frames, where the patch is from frame 1 on)."""
    import cv2
    from skimage import data

    background = np.repeat(cv2.resize(data.camera(), (192, 128), interpolation=cv2.INTER_AREA)[..., None], 3, 2)
    patch = cv2.resize(data.chelsea(), (56, 48), interpolation=cv2.INTER_AREA)
    frames = []
    for t in range(frame_count):
        frame = background.copy()
        left = 8 if t == 0 else 124
        frame[40:88, left:left + 56] = patch
        frames.append(frame)
    return frames, (slice(44, 84), slice(128, 176))


def test_matching_the_keyframe_finds_colour_the_flow_lost_and_stays_in_its_shot():
    """After the jump the keyframe's colour cannot reach the patch along the flow; the patch's features find it in
    the keyframe, and the shipped fusion weights give it the patch's own colour, much nearer the truth than the flow
    alone does (--no-match-keyframes: the keyframe's palette and the default model's colour). After a scene cut the
    keyframe's colour no longer travels, and matching does not bring it into the new shot: its frames come out the
    same either way. (Mean chroma error on the patch: 10.1 matched against 18.7; 7.7 against 18.5 with the keyframe's
    flows searched at half size, which vouched for fewer of the patch's pixels from the gray background.)"""
    import cv2
    from skimage import data

    from colorizer import DEFAULT_MODEL, load_colorizer
    from guidance import GuidePropagator, reference_guide
    from pipeline import ColorizationOptions, colorize_frames

    shot, (rows, columns) = jumping_patch_clip()
    frames = shot + [cv2.resize(data.coffee(), (192, 128), interpolation=cv2.INTER_AREA)] * 2
    colorizer = load_colorizer(DEFAULT_MODEL, torch.device("cpu"))
    truth = chroma_of(shot[1:])[:, rows, columns]
    outputs, error = {}, {}
    for matched in (False, True):
        guides = GuidePropagator([reference_guide(frames[0], 0, frames[0].shape[:2])])
        options = ColorizationOptions(steps=1, reference=["0=key.png"], match_keyframes=matched)
        outputs[matched] = list(colorize_frames(colorizer, iter(frames), options, frames[0].shape[:2], guides=guides))
        error[matched] = np.abs(chroma_of(outputs[matched][1:len(shot)])[:, rows, columns] - truth).mean()
    assert error[True] < 0.6 * error[False], error
    assert np.array_equal(np.stack(outputs[True][len(shot):]), np.stack(outputs[False][len(shot):]))


def test_a_painted_hint_does_not_cover_a_keyframes_vouched_colour():
    """A keyframe and a red stroke painted on the same frame, the keyframe matched: where the keyframe's colour is
    vouched for (all of its own frame) it stays as given; the stroke shows only where the fused colour rules."""
    from guidance import CarryWeight, Guide, GuidePropagator, load_fusion, reference_guide
    from utils import rgb_to_gray

    frame = panning_clip(1)[0]
    gray, shape = rgb_to_gray(frame), frame.shape[:2]
    stroke = np.zeros(shape, np.float32)
    stroke[20:30, 20:60] = 1.0
    red = np.stack([stroke * -40.0, stroke * 100.0], axis=-1).astype(np.float32)
    key = reference_guide(frame, 0, shape)
    propagator = GuidePropagator([key, Guide(0, red, stroke, stroke.copy(), dense=False)])
    frame_guides = propagator.step(0, gray)
    model = np.zeros((*shape, 2), np.float32)
    found = (model.copy(), np.zeros(shape, np.float32))
    output = propagator.output_chroma(model, None, gray, gray, frame_guides, False, CarryWeight.constant(0.99), found,
                                      True, load_fusion())
    assert np.abs(output - key.chroma)[stroke > 0].max() < 1e-3


def test_fused_colour_takes_the_frames_edges_where_the_keyframes_colour_is_not_trusted():
    """Every source brings a colour step blurred over about 8 px across a sharp luma edge (as colour from the working
    size or the matcher's grid does); the fused output's step is sharper there, where the carried colour is not
    trusted, and the carried colour stays exactly as it is where it is vouched for."""
    import cv2

    from guidance import Guide, GuidePropagator, load_fusion

    height, width = 240, 320
    luma = np.full((height, width), 60, np.uint8)
    luma[:, width // 2:] = 190
    step = np.zeros((height, width, 2), np.float32)
    step[:, width // 2:] = (-30.0, 50.0)
    blurred = cv2.GaussianBlur(step, (0, 0), 4.0)
    confidence = np.zeros((height, width), np.float32)
    confidence[:8] = 1.0  # the top rows vouched for
    dense = Guide(0, blurred.copy(), np.ones((height, width), np.float32), confidence, dense=True)
    output = GuidePropagator([]).fused_chroma(blurred, luma, luma, dense, False,
                                              (blurred, np.ones((height, width), np.float32)), load_fusion())

    def jump(chroma: np.ndarray) -> float:  # the colour change across the edge, two pixels either side
        return float(np.abs(chroma[8:, width // 2 + 2] - chroma[8:, width // 2 - 3]).sum(axis=-1).mean())

    assert jump(output) > 1.25 * jump(blurred), (jump(output), jump(blurred))
    assert np.array_equal(output[:8], blurred[:8])


def test_a_keyframes_colour_follows_a_small_thing_that_moves_on_its_own(monkeypatch):
    """A 12 px reddish square moves 1 px a frame over a still background: the keyframe's flows, searched down to
    the frame's own resolution, carry its colour with it; searched down to half of it (DIS's medium preset), they
    carry the square as if it moved with the background."""
    import guidance
    from utils import rgb_to_chroma, rgb_to_gray

    background = smooth_texture(96, 128)
    square = np.clip(smooth_texture(40, 40, seed=7)[:12, :12] + np.array((60, -40, -40)), 0, 255).astype(np.uint8)
    frames = []
    for t in range(5):
        frame = background.copy()
        frame[40:52, 40 + t:52 + t] = square
        frames.append(frame)
    inside = (slice(42, 50), slice(46, 54))  # the square's middle in the last frame
    truth = rgb_to_chroma(frames[-1])[inside]
    error = {}
    for full_resolution in (False, True):
        monkeypatch.setattr(guidance, "FULL_RESOLUTION_GUIDE_FLOW", full_resolution)
        propagator = guidance.GuidePropagator([guidance.reference_guide(frames[0], 0, frames[0].shape[:2])])
        for t, frame in enumerate(frames):
            dense = propagator.step(t, rgb_to_gray(frame))[0]
        error[full_resolution] = float(np.abs(dense.chroma[inside] - truth).mean())
    assert error[True] < 0.05 * np.abs(truth).mean()
    assert error[True] < 0.2 * error[False], error


def test_missing_fusion_weights_are_a_one_line_error_that_names_the_fix(tmp_path):
    from guidance import load_fusion
    from utils import UserError

    with pytest.raises(UserError) as error:
        load_fusion(tmp_path / "fusion.safetensors")
    message = str(error.value)
    assert "\n" not in message and "fusion.safetensors" in message and "git checkout -- unet_model/matcher" in message
