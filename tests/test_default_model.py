"""The shipped default model (unet_model/default): present, loadable offline, and actually colorizing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, panning_clip

DEFAULT = REPO / "unet_model" / "default"


def test_default_model_is_complete_and_small():
    for part in ("colorizer.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vac/vac_config.json", "vac/vac.safetensors"):
        assert (DEFAULT / part).is_file(), f"unet_model/default/{part} is missing"
    size = sum(p.stat().st_size for p in DEFAULT.rglob("*") if p.is_file())
    assert size <= 60 * 2**20


def test_default_model_colorizes_a_frame_offline(monkeypatch):
    from colorizer import load_colorizer
    from pipeline import ColorizationOptions, colorize_frames
    from utils import rgb_to_chroma, rgb_to_gray

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    colorizer = load_colorizer(DEFAULT, torch.device("cpu"))
    frames = [np.repeat(rgb_to_gray(f)[..., None], 3, axis=2) for f in panning_clip(2, (96, 128))]
    args = ColorizationOptions(steps=4)
    output = list(colorize_frames(colorizer, iter(frames), args, (96, 128)))
    assert len(output) == 2 and output[0].shape == (96, 128, 3)
    assert np.abs(rgb_to_chroma(output[0])).mean() > 1.0  # really coloured, not gray
    assert np.abs(rgb_to_gray(output[0]).astype(int) - frames[0][..., 0]).max() <= 1


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_default_weights_give_a_one_line_error(tmp_path, damage):
    from colorizer import load_colorizer
    from utils import UserError

    copy = tmp_path / "default"
    shutil.copytree(DEFAULT, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError) as error:
        load_colorizer(copy, torch.device("cpu"))
    assert "\n" not in str(error.value) and str(copy) in str(error.value)


def test_default_decoder_leaves_no_corner_blotch():
    """The shipped VAE's decoder paints a blotch into an image's first pixels; decode_chroma's margin keeps it out."""
    from colorizer import load_colorizer

    colorizer = load_colorizer(DEFAULT, torch.device("cpu"))
    latents = torch.zeros((1, *colorizer.latent_shape(64, 112)))
    chroma = colorizer.decode_chroma(latents)[0]
    assert chroma.shape == (64, 112, 2)
    magnitude = np.sqrt((chroma**2).sum(axis=2))
    assert magnitude[:8, :8].mean() < 2 * np.median(magnitude)
    plain = colorizer.vae.decode(latents / colorizer.vae.config.scaling_factor).sample  # without the margin
    assert plain[0, :, :8, :8].abs().mean() > 5 * plain[0, :, 24:40, 40:72].abs().mean()  # the blotch is real


def test_default_hints_pull_their_region_and_leave_far_regions_alone(tmp_path):
    """Green dots painted on the left of a photo turn the left green; the right side keeps its colours."""
    import cv2
    from skimage import data

    from colorizer import load_colorizer
    from guidance import GuidePropagator, load_hint_image
    from pipeline import ColorizationOptions, colorize_frames
    from utils import rgb_to_chroma, rgb_to_gray

    colorizer = load_colorizer(DEFAULT, torch.device("cpu"))
    photo = cv2.resize(data.coffee(), (128, 96), interpolation=cv2.INTER_AREA)
    gray = np.repeat(rgb_to_gray(photo)[..., None], 3, axis=2)
    green = np.array([40, 200, 40], np.uint8)
    dots = np.zeros((96, 128, 4), np.uint8)
    for row in range(12, 84, 12):  # a column of 2x2 dots in the left sixth
        dots[row : row + 2, 9:11] = (*green[::-1], 255)  # BGRA
    cv2.imwrite(str(tmp_path / "dots.png"), dots)
    settings = ColorizationOptions()
    plain, hinted = (rgb_to_chroma(next(colorize_frames(colorizer, iter([gray]), settings, (96, 128), guides)))
                     for guides in (None, GuidePropagator([load_hint_image(tmp_path / "dots.png", 0, (96, 128))])))
    target = rgb_to_chroma(green[None, None])[0, 0]
    left, right = (slice(None), slice(0, 128 // 6)), (slice(None), slice(128 * 2 // 3, None))
    before, after = (np.linalg.norm(c[left] - target, axis=-1).mean() for c in (plain, hinted))
    assert after < 0.5 * before
    assert np.abs(hinted[right] - plain[right]).mean() < 2.0


def test_where_the_heads_lead_the_output_keeps_their_detail_and_takes_the_samples_tint():
    """With --heads-lead the output is the colour heads' chroma plus a correction smooth at the frame's scale, which
    follows the diffusion's sample (two noises, two tints); without it the decoded sample departs from the heads'
    colour at fine scales too (the latent path's blotches)."""
    import cv2
    from skimage import data

    from colorizer import load_colorizer, prepare_gray
    from utils import rgb_to_gray

    colorizer = load_colorizer(DEFAULT, torch.device("cpu"))
    gray = rgb_to_gray(data.chelsea())[None]
    height, width = gray.shape[1:]
    inputs = {"gray": prepare_gray(gray, colorizer.working_size(height, width)),
              "vac_gray": prepare_gray(gray, colorizer.vac_size(height, width)),
              "head_gray": prepare_gray(gray, colorizer.head_size(height, width))}
    _, _, head = colorizer.conditioning(inputs["gray"], inputs["vac_gray"], 0.25, inputs["head_gray"])
    head = head.permute(0, 2, 3, 1).numpy()[0]

    def departure(seed: int, lead: bool) -> np.ndarray:
        noise = torch.randn((1, *colorizer.latent_shape(height, width)), generator=torch.Generator().manual_seed(seed))
        chroma = colorizer.sample_chroma(inputs["gray"], noise, steps=1,
                                         vac_gray=inputs["vac_gray"], head_gray=inputs["head_gray"], vividness=0.25,
                                         heads_lead=lead)
        return chroma[0] - head

    def fine(difference: np.ndarray) -> float:
        return float(np.abs(difference - cv2.GaussianBlur(difference, (0, 0), 2.0)).mean())

    led, other_noise, plain = departure(0, True), departure(1, True), departure(0, False)
    assert fine(led) < 0.05 * fine(plain) and fine(plain) > 0.3
    assert np.abs(led - other_noise).mean() > 0.2  # the tint is the sample's, not a constant
