"""Unit tests of utils.py, video_io.py, modules.py, dataset.py and colorizer.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import REPO, panning_clip


def test_frames_sort_by_number_not_text(tmp_path):
    from video_io import list_frames, write_image_rgb

    for name in ("10.jpg", "2.jpg", "1.png", "notes.txt"):
        if name.endswith(".txt"):
            (tmp_path / name).write_bytes(b"")
        else:
            write_image_rgb(tmp_path / name, np.zeros((4, 4, 3), np.uint8))
    assert [p.name for p in list_frames(tmp_path)] == ["1.png", "2.jpg", "10.jpg"]


def test_lab_round_trip_is_within_one_level():
    from utils import lab_to_rgb, rgb_to_lab

    image = panning_clip(1)[0]
    lab = rgb_to_lab(image)
    assert lab.dtype == np.float32 and 0 <= lab[..., 0].min() and lab[..., 0].max() <= 100
    assert np.abs(lab_to_rgb(lab).astype(int) - image).max() <= 1


@pytest.mark.parametrize("kind", ["gray", "rgba", "rgb16"])
def test_read_image_rgb_normalises_channels_and_depth(tmp_path, kind):
    import cv2
    from video_io import read_image_rgb

    rgb = panning_clip(1)[0]
    if kind == "gray":
        stored, expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), None
    elif kind == "rgba":
        stored = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
        expected = rgb
    else:
        stored, expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257, rgb
    cv2.imwrite(str(tmp_path / "x.png"), stored)
    loaded = read_image_rgb(tmp_path / "x.png")
    assert loaded.shape == rgb.shape and loaded.dtype == np.uint8
    if expected is None:
        assert (loaded[..., 0] == loaded[..., 1]).all() and (loaded[..., 0] == stored).all()
    else:
        assert np.array_equal(loaded, expected)


def test_spatial_gray_keeps_every_pixel():
    from modules import spatial_gray

    gray = torch.rand(2, 1, 16, 24)
    packed = spatial_gray(gray, 4)
    assert packed.shape == (2, 16, 4, 6)
    assert packed.min() >= -1 and packed.max() <= 1
    assert torch.allclose(torch.nn.functional.pixel_shuffle(packed, 4), gray * 2 - 1)


def test_vac_returns_class_and_patch_tokens(tiny_components):
    from modules import load_vac

    vac = load_vac(str(tiny_components["vac"]))
    tokens = vac(torch.rand(3, 1, 50, 70))
    assert tokens.shape == (3, (32 // 8) ** 2 + 1, 32) == (3, vac.token_count, vac.token_dim)
    assert torch.isfinite(tokens).all()


def test_saved_vac_reloads_identically(tiny_components, tmp_path):
    from modules import load_vac, save_vac

    vac = load_vac(str(tiny_components["vac"]))
    save_vac(vac, tmp_path / "copy")
    gray = torch.rand(1, 1, 32, 32)
    assert torch.equal(vac(gray), load_vac(str(tmp_path / "copy"))(gray))


def test_vae_loads_from_folder_and_keeps_scaling_factor(tiny_components):
    from modules import load_vae, vae_downscale

    vae = load_vae(str(tiny_components["vae"]))
    assert vae_downscale(vae) == 4
    latents = vae.encode(torch.rand(1, 2, 32, 48) * 2 - 1).latent_dist.mean
    assert latents.shape == (1, 4, 8, 12)
    assert vae.config.scaling_factor > 0


@pytest.mark.parametrize("channels", [2, 3])
def test_vae_input_and_output_conventions_round_trip_chroma(channels):
    """Chroma VAEs (ours) and RGB VAEs (Stable Diffusion's) both map colour frames to [-1, 1] and back to chroma."""
    from modules import build_vae, vae_input, vae_output_to_chroma
    from utils import rgb_to_chroma

    vae = build_vae(widths=(8, 16), image_size=16, channels=channels)
    frames = np.stack(panning_clip(2, (16, 24)))
    encoded = vae_input(frames, vae)
    assert encoded.shape == (2, channels, 16, 24) and encoded.abs().max() <= 1
    chroma = vae_output_to_chroma(encoded, vae)  # decoding a perfect reconstruction
    truth = np.stack([rgb_to_chroma(f) for f in frames])
    assert chroma.shape == (2, 16, 24, 2) and np.abs(chroma - truth).max() < 2


@pytest.mark.parametrize("loader,spec", [("load_vae", "nobody/no-such-vae-xyz"), ("load_vac", "torchvision:vit_b_32"),
                                         ("load_vac", "/no/such/folder")])
def test_unavailable_components_give_one_line_error(loader, spec, monkeypatch, tmp_path):
    import modules
    from utils import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch cache: the ImageNet ViT is not there
    with pytest.raises(UserError) as error:
        getattr(modules, loader)(spec)
    message = str(error.value)
    assert "\n" not in message and (spec.split(":")[-1] in message)


def test_unet_input_matches_the_shipped_models_channel_count():
    """The channel count training builds a UNet with is the one the shipped model has, and unet_input fills it."""
    from modules import unet_in_channels, unet_input

    default = REPO / "unet_model" / "default"
    unet = json.loads((default / "unet" / "config.json").read_text())
    vae = json.loads((default / "vae" / "config.json").read_text())
    vac = json.loads((default / "vac" / "vac_config.json").read_text())
    hints = json.loads((default / "colorizer.json").read_text())["hint_channels"]
    downscale = 2 ** (len(vae["block_out_channels"]) - 1)
    expected = unet_in_channels(vae["latent_channels"], downscale, hints, vac["spatial_channels"])
    assert expected == unet["in_channels"]
    built = unet_input(torch.zeros(2, vae["latent_channels"], 3, 5), torch.rand(2, 1, 3 * downscale, 5 * downscale),
                       downscale, torch.rand(2, hints, 3 * downscale, 5 * downscale),
                       torch.zeros(2, vac["spatial_channels"], 3, 5))
    assert built.shape == (2, expected, 3, 5)


def test_unet_predicts_latent_shaped_output():
    from modules import build_unet, gray_channels

    unet = build_unet(latent_channels=4, downscale=4, token_dim=32, net_dimension=8, sample_size=8)
    assert unet.config.in_channels == 4 + gray_channels(4)
    out = unet(torch.randn(2, 20, 8, 12), torch.tensor([3, 900]), encoder_hidden_states=torch.randn(2, 5, 32)).sample
    assert out.shape == (2, 4, 8, 12)


def test_scan_frame_folders_keeps_video_and_order(frame_root):
    from dataset import scan_frame_folders

    records = scan_frame_folders(frame_root)
    assert {r.video for r in records} == {"pan", "pan_small"}
    pan = [r for r in records if r.video == "pan"]
    assert [r.index for r in pan] == list(range(12))
    assert [r.path.name for r in pan][:3] == ["00000.jpg", "00001.jpg", "00002.jpg"]


def test_random_crops_are_reproducible_varied_crops_of_the_frame(frame_root):
    from dataset import FrameFolderDataset, scan_frame_folders
    from video_io import read_image_rgb

    records = scan_frame_folders(frame_root)
    views = FrameFolderDataset(records, 32, random_crops=6, seed=1)[0]["rgb"]
    assert views.shape == (6, 32, 32, 3) and views.dtype == np.uint8
    assert np.array_equal(views, FrameFolderDataset(records, 32, random_crops=6, seed=1)[0]["rgb"])
    assert not np.array_equal(views, FrameFolderDataset(records, 32, random_crops=6, seed=2)[0]["rgb"])
    assert len({view.tobytes() for view in views}) == 6
    # each view shows the frame's own colours, not padding or another frame's
    frame = read_image_rgb(records[0].path).reshape(-1, 3).astype(float)
    for view in views:
        assert np.abs(view.reshape(-1, 3).mean(0) - frame.mean(0)).max() < 60
    centre = FrameFolderDataset(records, 32)[0]["rgb"]
    assert centre.shape == (1, 32, 32, 3)


def test_batch_indices_cover_each_epoch_once_and_repeat():
    from dataset import batch_indices

    epoch = np.concatenate([batch_indices(step, 4, 10, seed=3) for step in range(5)])
    assert sorted(epoch[:10].tolist()) == list(range(10))
    assert np.array_equal(batch_indices(7, 4, 10, seed=3), batch_indices(7, 4, 10, seed=3))
    assert not np.array_equal(batch_indices(0, 4, 10, seed=3), batch_indices(0, 4, 10, seed=4))


def test_working_size_keeps_aspect_ratio(tiny_components):
    from colorizer import Colorizer
    from modules import load_vac, load_vae

    colorizer = Colorizer(None, load_vae(str(tiny_components["vae"])), load_vac(str(tiny_components["vac"])),
                          {"image_size": 64}, torch.device("cpu"))
    height, width = colorizer.working_size(480, 854)
    assert height == 64 and height % 16 == 0 and width % 16 == 0
    assert abs(width / height - 854 / 480) < 0.15
    assert colorizer.working_size(1920, 1080)[0] > colorizer.working_size(1920, 1080)[1]


@pytest.mark.parametrize("strength", [0.0, 1.0, 4.0])
def test_combine_keeps_input_luma_even_for_out_of_gamut_chroma(strength):
    from colorizer import combine
    from utils import rgb_to_chroma, rgb_to_gray

    frame = panning_clip(1)[0]
    gray = rgb_to_gray(frame)
    chroma = rgb_to_chroma(frame)[::8, ::8] * strength  # low resolution; x4 leaves the RGB cube
    out = combine(gray, chroma)
    assert out.shape == frame.shape
    assert np.abs(rgb_to_gray(out).astype(int) - gray).max() <= 1
    if strength == 0:
        assert np.array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    else:
        assert np.abs(rgb_to_chroma(out)).mean() > 3  # the colour is really there


def test_chroma_round_trip_restores_the_frame():
    from utils import luma_chroma_to_rgb, rgb_to_chroma, rgb_to_gray

    frame = panning_clip(1)[0]
    assert np.abs(luma_chroma_to_rgb(rgb_to_gray(frame), rgb_to_chroma(frame)).astype(int) - frame).max() <= 2


def test_a_sixteen_bit_luma_keeps_its_depth_and_takes_the_colour_at_its_scale():
    from utils import luma_chroma_to_rgb, rgb_to_chroma, rgb_to_gray

    frame = panning_clip(1)[0]
    out = luma_chroma_to_rgb(rgb_to_gray(frame).astype(np.uint16) * 257, rgb_to_chroma(frame))
    assert out.dtype == np.uint16
    assert np.abs(out.astype(int) - frame.astype(int) * 257).max() <= 2 * 257


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    import os

    from utils import atomic_path

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.txt") as temp:
            temp.write_text("x")
        with atomic_path(tmp_path / "frames", is_dir=True) as temp:
            (temp / "00000.png").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "frames").stat().st_mode & 0o777 == 0o755
