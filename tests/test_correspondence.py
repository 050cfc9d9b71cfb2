"""Feature correspondence: colour found in an image that is not the frame (correspondence.py), and --exemplar."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import files_under, panning_clip, run_main


@pytest.fixture(scope="module")
def matcher():
    from correspondence import Matcher

    return Matcher()


def two_photos(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    import cv2

    return np.hstack([cv2.resize(image, (160, 160), interpolation=cv2.INTER_AREA) for image in (left, right)])


def test_matching_finds_each_object_where_the_exemplar_has_it(matcher):
    """A frame of coffee (left) and the cat (right), an exemplar with the two swapped: each half takes the colours of
    its own object, not those of the exemplar's same side."""
    from skimage import data

    from utils import rgb_to_chroma, rgb_to_gray

    frame, exemplar = two_photos(data.coffee(), data.chelsea()), two_photos(data.chelsea(), data.coffee())
    found, confidence = matcher.match(rgb_to_gray(frame)[None], [matcher.source(exemplar)])
    half = found.shape[2] // 2
    truth = rgb_to_chroma(frame)
    for side, own, other in ((slice(0, half), slice(0, 160), slice(160, 320)),
                             (slice(half, None), slice(160, 320), slice(0, 160))):
        mean_found = found[0, :, side].reshape(-1, 2).mean(axis=0)
        own_error = np.abs(mean_found - truth[:, own].reshape(-1, 2).mean(axis=0)).sum()
        other_error = np.abs(mean_found - truth[:, other].reshape(-1, 2).mean(axis=0)).sum()
        assert own_error < other_error / 3
    assert 0 < confidence.mean() <= 1


def test_a_mirrored_crop_colours_the_frame_better_than_gray(matcher):
    import cv2

    from correspondence import mirrored_crop
    from metrics import psnr
    from utils import luma_chroma_to_rgb, rgb_to_gray

    frames = panning_clip(12, (144, 192))
    source = matcher.source(mirrored_crop(frames[0]))
    for frame in (frames[0], frames[-1]):
        gray = rgb_to_gray(frame)
        found, _ = matcher.match(gray[None], [source])
        coloured = luma_chroma_to_rgb(gray, cv2.resize(found[0], (192, 144), interpolation=cv2.INTER_LINEAR))
        assert psnr(coloured, frame) > psnr(np.repeat(gray[..., None], 3, 2), frame) + 3


def test_guided_upsampling_puts_a_colour_edge_on_the_luma_edge():
    """Coarse chroma of a dark red half and a bright blue half: upsampled by the guided filter, the colour changes at
    the luma's edge more closely than bilinear upsampling, which smears it over a coarse pixel's width."""
    import cv2

    from correspondence import guided_upsample

    luma = np.full((64, 64), 60, np.uint8)
    luma[:, 37:] = 200  # the edge lies inside a coarse pixel, not on a coarse pixel's border
    truth = np.zeros((64, 64, 2), np.float32)
    truth[:, :37] = (-20, 60)
    truth[:, 37:] = (60, -20)
    coarse = cv2.resize(truth, (8, 8), interpolation=cv2.INTER_AREA)
    bilinear = cv2.resize(coarse, (64, 64), interpolation=cv2.INTER_LINEAR)
    guided = guided_upsample(coarse, luma, radius=8)
    error = {name: np.abs(up - truth)[:, 30:44].mean() for name, up in (("bilinear", bilinear), ("guided", guided))}
    assert error["guided"] < 0.75 * error["bilinear"]


def test_an_exemplar_colours_a_clip(tmp_path, tiny_model, colour_clip):
    """A random tiny model colours nothing; an exemplar that is a mirrored crop of the first frame colours all, alone
    or with the other guides."""
    from correspondence import mirrored_crop
    from metrics import psnr
    from video_io import iter_clip_frames, write_image_rgb

    folder, frames = colour_clip
    write_image_rgb(tmp_path / "exemplar.png", mirrored_crop(frames[0]))
    scores = {}
    exemplar = ["--exemplar", tmp_path / "exemplar.png"]
    every_guide = [*exemplar, "--reference", f"4={folder / 'colour' / '00004.png'}", "--hints", folder / "dot.png"]
    for name, extra in (("automatic", []), ("exemplar", exemplar), ("every guide", every_guide)):
        result = run_main("video_colorization", "--input", folder / "gray", "--output", tmp_path / name, "--model",
                          tiny_model, "--steps", "1", *extra, cwd=tmp_path)
        assert result.code == 0, result.stderr[-2000:]
        scores[name] = np.mean([psnr(o, f) for o, f in zip(iter_clip_frames(tmp_path / name), frames)])
    assert scores["exemplar"] > scores["automatic"] + 3
    assert scores["every guide"] > scores["automatic"] + 3  # an exemplar, a keyframe and painted hints together


@pytest.mark.parametrize("name, content, says", [("missing.png", None, "missing.png"),
                                                 ("broken.png", b"not an image", "cannot be decoded as an image")],
                         ids=["missing", "undecodable"])
def test_a_bad_exemplar_is_a_one_line_error(tmp_path, tiny_model, colour_clip, name, content, says):
    folder, _ = colour_clip
    if content is not None:
        (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    result = run_main("video_colorization", "--input", folder / "gray", "--output", out, "--model", tiny_model,
                      "--steps", "1", "--exemplar", tmp_path / name, cwd=tmp_path)
    assert result.code == 2 and says in result.error and "; " in result.error
    assert files_under(out) == []


def test_an_exemplar_that_is_a_reframed_frame_becomes_a_keyframe_there():
    """Among sampled frames of three shots, a mirrored crop of the coffee frame is found on that frame and covers what
    it shows (64% of the frame) with its true colours; a photo of something else is not registered anywhere."""
    import cv2
    from skimage import data

    from correspondence import mirrored_crop
    from guidance import registered_guide
    from utils import rgb_to_chroma, rgb_to_gray

    shots = {0: panning_clip(1, (144, 192))[0], 5: data.coffee(), 9: data.chelsea()}
    shots = {i: cv2.resize(image, (192, 144), interpolation=cv2.INTER_AREA) for i, image in shots.items()}
    grays = {i: rgb_to_gray(image) for i, image in shots.items()}
    guide = registered_guide(mirrored_crop(shots[5]), grays)
    assert guide is not None and guide.origin == 5
    covered = guide.support > 0.5
    assert 0.5 < covered.mean() < 0.7
    assert np.abs(guide.chroma - rgb_to_chroma(shots[5]))[covered].mean() < 3
    assert registered_guide(data.rocket(), grays) is None


def test_an_identity_projection_matches_as_plain_cosine_similarity(matcher):
    """The learned metric is a projection of the same features: the identity must leave the match unchanged, and the
    shipped projection must change it (it was trained)."""
    import torch
    from skimage import data

    from correspondence import METRIC_FILE, Matcher, load_projection
    from utils import rgb_to_gray

    frame, exemplar = rgb_to_gray(data.astronaut()[::2, ::2])[None], data.astronaut()[:, ::-1]
    plain, _ = matcher.match(frame, [matcher.source(exemplar)])
    channels = matcher.backbone_features(frame).shape[1]
    identity = Matcher(temperature=matcher.temperature, projection=torch.eye(channels))
    same, _ = identity.match(frame, [identity.source(exemplar)])
    np.testing.assert_allclose(same, plain, atol=1e-3)
    projection, temperature = load_projection(METRIC_FILE)
    assert projection.shape == (channels, channels) and temperature > 0
    assert not torch.allclose(projection, torch.eye(channels), atol=1e-3)


def test_a_missing_learned_metric_is_a_one_line_error(tmp_path, monkeypatch):
    import correspondence
    from utils import UserError

    monkeypatch.setattr(correspondence, "METRIC_FILE", tmp_path / "metric.safetensors")
    correspondence.shared_matcher.cache_clear()
    try:
        with pytest.raises(UserError, match="metric.safetensors.*restore it"):
            correspondence.shared_matcher()
    finally:
        correspondence.shared_matcher.cache_clear()


def test_training_the_metric_lowers_the_matching_error_on_its_pairs(tmp_path):
    """experiments/train_matcher.py on two short clips: the metric it writes colours the clips' far-apart frame
    pairs better than the identity it starts from, and a clip named by --holdout is left out."""
    import torch
    from conftest import panning_clip

    from correspondence import TEMPERATURE, load_projection
    from experiments.train_matcher import ClipFeatures, pair_loss
    from video_io import write_image_rgb

    frames = panning_clip(12, (144, 192))
    for name, clip in (("left", frames), ("right", [f[:, ::-1] for f in frames]), ("held", frames[:4])):
        (tmp_path / "clips" / name).mkdir(parents=True)
        for i, frame in enumerate(clip):
            write_image_rgb(tmp_path / "clips" / name / f"{i:05d}.png", np.ascontiguousarray(frame))
    out = tmp_path / "matcher" / "metric.safetensors"
    result = run_main("experiments.train_matcher", "--clips", tmp_path / "clips", "--holdout", "held",
                      "--frames-per-clip", 4, "--steps", 25, "--batch-size", 2, "--lr", 3e-3, "--out", out,
                      cwd=tmp_path)
    assert result.code == 0, result.stderr
    projection, temperature = load_projection(out)
    clips = [ClipFeatures(**clip) for clip in torch.load(out.with_name("features_4_0.pt"))]
    assert len(clips) == 2

    def error(projection: torch.Tensor, temperature: float) -> float:
        log_temperature = torch.tensor(float(np.log(temperature)))
        with torch.no_grad():
            return float(np.mean([pair_loss(projection, log_temperature, *clip.queries[b], *clip.keys[a], 10**6,
                                            torch.Generator()).item()
                                  for clip in clips for a in range(4) for b in range(4) if abs(a - b) >= 1]))

    assert error(projection, temperature) < error(torch.eye(len(projection)), TEMPERATURE)
