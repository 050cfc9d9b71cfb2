"""The colour-distribution head: its targets, its decoding and vividness, its folder, its training script, and its
place in the model's hint input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import REPO, panning_clip, run_main, run_ok

DEFAULT = REPO / "unet_model" / "default"


def test_soft_targets_peak_at_the_nearest_bin_and_sum_to_one():
    from color_head import bin_centres, soft_targets

    centres = bin_centres(8.0)
    chroma = torch.tensor([[0.0, 0.0], [30.5, -61.0], [-100.0, 12.0]])
    targets = soft_targets(chroma, centres)
    assert torch.allclose(targets.sum(dim=1), torch.ones(3))
    nearest = torch.cdist(chroma, centres).argmin(dim=1)
    assert torch.equal(targets.argmax(dim=1), nearest)
    assert (targets > 0).sum(dim=1).tolist() == [5, 5, 5]


def small_head(prior_counts: torch.Tensor | None = None):
    from color_head import bin_centres, build_color_head

    centres = bin_centres(16.0)
    if prior_counts is None:  # a corpus of mostly neutral colour: the prior peaks at gray
        prior_counts = torch.exp(-centres.square().sum(dim=1) / (2 * 20.0**2)) + 1e-3
    return build_color_head([8, 8, 8], 16.0, prior_counts, width=16)


def test_vividness_zero_is_the_calibrated_mean_and_more_vividness_moves_away_from_the_common_colours():
    head = small_head()
    torch.manual_seed(0)
    logits = torch.randn(2, len(head.centres), 3, 4) * 0.1  # nearly flat: what an unsure head predicts
    plain = head.chroma(logits, 0.0)
    expected = torch.einsum("bqhw,qc->bchw", torch.softmax(logits, dim=1), head.centres)
    assert torch.allclose(plain, expected, atol=1e-3)  # levels on the 8-bit scale: float rounding
    magnitudes = [head.chroma(logits, v).norm(dim=1).mean().item() for v in (0.0, 0.5, 1.0)]
    assert magnitudes[0] < magnitudes[1] < magnitudes[2]


def test_a_confident_neutral_prediction_stays_neutral_at_full_vividness():
    head = small_head()
    gray_bin = head.centres.norm(dim=1).argmin()
    logits = torch.full((1, len(head.centres), 2, 2), -20.0)
    logits[:, gray_bin] = 20.0
    assert head.chroma(logits, 1.0).abs().max() < 12.0  # within the gray bin's own cell


def peaked_logits(head, shares: dict[int, float], height: int = 1, width: int = 1) -> torch.Tensor:
    """1 x Q x height x width logits of a distribution with these shares on these bins (and next to none elsewhere)."""
    probabilities = torch.full((len(head.centres),), 1e-9)
    for index, share in shares.items():
        probabilities[index] = share
    return probabilities.log().view(1, -1, 1, 1).expand(1, -1, height, width).clone()


def test_the_cap_keeps_gray_where_most_of_the_mass_says_gray_and_leaves_a_choice_of_colours_alone():
    from color_head import Decoding

    head = small_head()
    gray, red, blue = (int(i) for i in (head.centres.norm(dim=1).argmin(), head.centres[:, 1].argmax(),
                                        head.centres[:, 0].argmax()))
    capped = Decoding(mode_temperature=0.5)
    # 60% gray, 40% red: annealed to T = 0.5 the shares go as their squares, 0.36 : 0.16, and the mean keeps its hue
    # with the annealed mean's saturation
    mostly_gray = peaked_logits(head, {gray: 0.6, red: 0.4})
    plain = head.chroma(mostly_gray, 0.0)[0, :, 0, 0]
    towards_mode = (0.36 * head.centres[gray] + 0.16 * head.centres[red]) / 0.52
    capped_chroma = head.chroma(mostly_gray, 0.0, decoding=capped)[0, :, 0, 0]
    assert torch.allclose(plain, 0.6 * head.centres[gray] + 0.4 * head.centres[red], atol=0.1)
    assert abs(capped_chroma.norm() - towards_mode.norm()) < 0.1
    assert capped_chroma.norm() < 0.8 * plain.norm()
    assert torch.allclose(capped_chroma / capped_chroma.norm(), plain / plain.norm(), atol=1e-4)
    # 60% red, 40% blue: both likely colours are saturated and the mean, a blend of them, is kept
    two_colours = peaked_logits(head, {red: 0.6, blue: 0.4})
    assert torch.allclose(head.chroma(two_colours, 0.0, decoding=capped), head.chroma(two_colours, 0.0))


def test_pooling_smooths_a_regions_distribution_and_keeps_its_luma_edge():
    from color_head import Decoding

    head = small_head()
    red, blue = (int(i) for i in (head.centres[:, 1].argmax(), head.centres[:, 0].argmax()))
    height, width = 12, 16
    logits = peaked_logits(head, {blue: 1.0}, height, width)
    specks = torch.rand(height, width // 2, generator=torch.Generator().manual_seed(0)) < 0.8
    left = logits[0, :, :, : width // 2]
    left[:, specks] = peaked_logits(head, {red: 1.0})[0, :, 0, :1]  # a red region with blue specks
    gray = torch.full((1, 1, height * 4, width * 4), 0.8)
    gray[..., : width * 2] = 0.2  # its luma edge where its colour ends
    plain = head.chroma(logits, 0.0)
    pooled = head.chroma(logits, 0.0, gray, Decoding(pool_radius=2))
    region_spread = [chroma[0, :, :, : width // 2].std(dim=(1, 2)) for chroma in (pooled, plain)]
    assert region_spread[0].max() < 0.5 * region_spread[1].min()
    # the columns on either side of the edge keep their own side's colour
    gap = (head.centres[red] - head.centres[blue]).norm()
    assert (pooled[0, :, :, width // 2] - head.centres[blue][:, None]).norm(dim=0).max() < 0.1 * gap
    assert (pooled[0, :, :, width // 2 - 1] - plain[0, :, :, : width // 2].mean(dim=(1, 2))[:, None]
            ).norm(dim=0).max() < 0.2 * gap


def test_pooling_the_mean_is_pooling_every_bins_probability_and_then_taking_the_mean():
    from color_head import Decoding, luma_guided_filter

    head = small_head()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, len(head.centres), 9, 11, generator=generator) * 3
    gray = torch.rand(2, 1, 36, 44, generator=generator)
    pooled = head.chroma(logits, 0.5, gray, Decoding(pool_radius=2))
    every_bin = luma_guided_filter(torch.softmax(head.rebalanced(logits, 0.5), dim=1), gray, 2)
    assert torch.allclose(every_bin.sum(dim=1), torch.ones(2, 9, 11), atol=1e-4)  # the filter keeps a constant
    expected = torch.einsum("bqhw,qc->bchw", every_bin, head.centres)
    assert torch.allclose(pooled, expected, atol=1e-2)  # levels on the 8-bit scale
    assert (pooled - head.chroma(logits, 0.5)).abs().max() > 1.0  # and the pooling did something


def test_a_saved_head_loads_and_predicts_the_same(tmp_path):
    from color_head import load_color_head, save_color_head

    head = small_head().eval()
    save_color_head(head, tmp_path / "color", {"backbone": "efficientnet_lite0"})
    loaded = load_color_head(tmp_path / "color")
    features = [torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2), torch.randn(1, 8, 1, 1)]
    gray = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(head(features, gray), loaded(features, gray))
    assert loaded.config["backbone"] == "efficientnet_lite0"


def test_a_missing_head_folder_is_a_one_line_error(tmp_path):
    from color_head import load_color_head
    from utils import UserError

    with pytest.raises(UserError, match="train_color_head.py") as error:
        load_color_head(tmp_path)
    assert "\n" not in str(error.value)


def test_head_colour_fills_only_where_no_hint_is_given():
    from colorizer import fill_hints

    hints = torch.zeros(1, 3, 2, 2)
    hints[0, :, 0, 0] = torch.tensor([0.5, -0.25, 1.0])  # a given hint at the top-left
    chroma = torch.full((1, 2, 2, 2), 64.0)
    filled = fill_hints(hints, chroma)
    assert filled[0, :, 0, 0].tolist() == [0.5, -0.25, 1.0]
    assert torch.allclose(filled[0, :2, 1, 1], torch.tensor([0.5, 0.5]))
    assert filled[0, 2].eq(1.0).all()
    marked = fill_hints(hints, chroma, mask=-1.0)  # a model trained with the head tells its guess from a given hint
    assert marked[0, 2, 0, 0] == 1.0 and marked[0, 2].flatten()[1:].eq(-1.0).all()
    assert torch.equal(marked[:, :2], filled[:, :2])


def photo_root(folder) -> str:
    """Three scikit-image photos, four shifted crops of each (several items per scene), one folder a photo."""
    import cv2
    from skimage import data

    from video_io import write_image_rgb

    for name, photo in (("coffee", data.coffee()), ("chelsea", data.chelsea()), ("astronaut", data.astronaut())):
        (folder / name).mkdir(parents=True)
        photo = cv2.resize(photo, (192, 144), interpolation=cv2.INTER_AREA)
        for k in range(4):
            write_image_rgb(folder / name / f"{name}_{k}.png", photo[k * 4 : k * 4 + 128, k * 8 : k * 8 + 160])
    return str(folder)


@pytest.mark.slow
def test_training_learns_held_out_colour_and_resumes(tmp_path):
    """A short run on a few photos learns: its training loss falls; a run resumed from its checkpoint goes on counting
    steps and scoring the held-out photos, and exports a head that knows its backbone."""
    root = photo_root(tmp_path / "photos")
    common = ["--dataroot", root, "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"),
              "--holdout", "astronaut", "--crop", "96", "--item-size", "112", "--batch-size", "8",
              "--validate-every", "10", "--checkpoint-every", "10", "--warmup-steps", "2", "--lr", "3e-3"]
    run_ok("train_color_head.py", *common, "--max-steps", "10", cwd=tmp_path)
    run_ok("train_color_head.py", *common, "--max-steps", "30", "--resume", cwd=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "runs" / "color" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    kept = sorted((tmp_path / "runs" / "color").glob("color-*"), key=lambda folder: int(folder.name[6:]))
    assert [json.loads((folder / "config.json").read_text())["trained_steps"] for folder in kept] == [10, 20, 30]
    train_losses = [json.loads(line)["loss"] for line in (tmp_path / "runs" / "color" / "train_loss.jsonl").open()]
    assert np.mean(train_losses[-5:]) < np.mean(train_losses[:5])
    config = json.loads((tmp_path / "runs" / "color" / "color" / "config.json").read_text())
    assert config["trained_steps"] == 30 and config["backbone"] == "efficientnet_lite0"


def test_the_moving_average_is_exported_and_carried_over_a_resume(tmp_path):
    """train_color_head.py --ema-decay: the exported head is the moving average kept in the checkpoint, not the
    trained weights; a resumed run goes on averaging from the stored average (its count of steps goes on); resuming
    it without the flag is a one-line error."""
    from color_head import load_color_head

    common = ["--dataroot", photo_root(tmp_path / "photos"), "--runs-dir", str(tmp_path / "runs"),
              "--data-dir", str(tmp_path / "data"), "--crop", "96", "--item-size", "112", "--batch-size", "4",
              "--checkpoint-every", "3", "--validate-every", "100", "--warmup-steps", "1", "--lr", "3e-3"]
    run_ok("train_color_head.py", *common, "--ema-decay", "0.9", "--max-steps", "3", cwd=tmp_path)
    run_ok("train_color_head.py", *common, "--ema-decay", "0.9", "--max-steps", "6", "--resume", cwd=tmp_path)
    checkpoint = torch.load(tmp_path / "runs" / "color" / "checkpoint.pt", weights_only=True)
    assert checkpoint["ema"]["optimization_step"] == 6
    exported = load_color_head(tmp_path / "runs" / "color" / "color")
    names = [name for name, _ in exported.named_parameters()]
    averaged = dict(zip(names, checkpoint["ema"]["shadow_params"]))
    assert all(torch.allclose(p, averaged[name]) for name, p in exported.named_parameters())
    assert max((p - checkpoint["head"][name]).abs().max() for name, p in exported.named_parameters()) > 1e-4

    resumed = run_main("train_color_head", *common, "--max-steps", "9", "--resume", cwd=tmp_path)
    assert resumed.code != 0 and "--ema-decay" in resumed.stderr and resumed.stderr.count("\n") == 1


def test_a_head_fine_tuned_with_its_backbone_is_read_on_its_own_weights(tmp_path):
    """train_color_head.py --init-head --train-backbone: the run starts from the given head (its bins kept), stores
    the backbone it fine-tuned beside the head, and a model with that head runs that backbone for it, not
    ImageNet's (which the VAC keeps reading); resuming such a run without --train-backbone is a one-line error."""
    from safetensors.torch import load_file

    from color_head import HEAD_BACKBONE_WEIGHTS, bin_centres, build_color_head, load_color_head, save_color_head
    from colorizer import load_colorizer, prepare_gray
    from export_model import export
    from modules import FrozenBackbone, imagenet_efficientnet
    from utils import rgb_to_gray

    torch.manual_seed(0)
    start = build_color_head([40, 112, 320], 16.0, torch.ones(len(bin_centres(16.0))), width=16)
    save_color_head(start, tmp_path / "start", {"backbone": "efficientnet_lite0", "crop": 96})
    common = ["--dataroot", photo_root(tmp_path / "photos"), "--runs-dir", str(tmp_path / "runs"),
              "--data-dir", str(tmp_path / "data"), "--crop", "96", "--item-size", "112", "--batch-size", "4",
              "--checkpoint-every", "2", "--validate-every", "100", "--warmup-steps", "1"]
    run_ok("train_color_head.py", *common, "--init-head", str(tmp_path / "start"), "--train-backbone",
           "--backbone-lr", "1e-2", "--max-steps", "2", cwd=tmp_path)
    tuned_folder = tmp_path / "runs" / "color" / "color"
    tuned = load_file(str(tuned_folder / HEAD_BACKBONE_WEIGHTS))
    imagenet = imagenet_efficientnet("efficientnet_lite0").state_dict()
    assert tuned.keys() == imagenet.keys()
    assert max((tuned[k].float() - imagenet[k].float()).abs().max() for k in tuned) > 1e-3
    head = load_color_head(tuned_folder)
    assert head.backbone_trained and torch.equal(head.centres, start.centres)

    export(DEFAULT, tmp_path / "model", overwrite=False, settings={"color_head": str(tuned_folder)})
    model = load_colorizer(tmp_path / "model", torch.device("cpu"))
    gray = np.stack([rgb_to_gray(f) for f in gray_frames(1)])
    head_gray = prepare_gray(gray, model.head_size(96, 128))
    chroma = model.condition(prepare_gray(gray, model.vac_size(96, 128)), 0.0, head_gray)[2]
    with torch.no_grad():
        on_tuned, on_imagenet = (head.chroma(head(FrozenBackbone("efficientnet_lite0", state)(head_gray), head_gray),
                                             0.0, head_gray, model.head_decoding) for state in (tuned, None))
    assert torch.allclose(chroma, on_tuned, atol=0.05)
    assert (chroma - on_imagenet).abs().mean() > 0.5
    assert not any(p.requires_grad for p in model.vac.backbone.parameters())

    resumed = run_main("train_color_head", *common, "--max-steps", "4", "--resume", cwd=tmp_path)
    assert resumed.code != 0 and "--train-backbone" in resumed.stderr and resumed.stderr.count("\n") == 1


def save_red_head(folder, chroma: tuple[float, float] = (-20.0, 60.0), extra: dict | None = None) -> None:
    """A colour head on Lite0's maps that says 'red' (Cb -20, Cr 60, within a bin; or another `chroma`)
    everywhere, whatever the frame."""
    from color_head import bin_centres, build_color_head, save_color_head

    head = build_color_head([40, 112, 320], 16.0, torch.ones(len(bin_centres(16.0))), width=16)
    red = (head.centres - torch.tensor(chroma)).norm(dim=1).argmin()  # Cb below 0, Cr well above: red
    with torch.no_grad():
        head.fine[-1].weight.zero_()
        head.fine[-1].bias.fill_(-20.0)
        head.fine[-1].bias[red] = 20.0
    save_color_head(head, folder, {"backbone": "efficientnet_lite0", **(extra or {})})


@pytest.fixture(scope="module")
def red_head_model(tmp_path_factory):
    """The shipped UNet, VAE and VAC with a colour head that says 'red' everywhere, whatever the frame."""
    folder = tmp_path_factory.mktemp("red_head_model")
    for part in ("unet", "vae", "vac"):
        (folder / part).symlink_to(DEFAULT / part)
    save_red_head(folder / "color")
    config = json.loads((DEFAULT / "colorizer.json").read_text())
    (folder / "colorizer.json").write_text(json.dumps({**config, "color_head": "color", "saturation": 1.0}))
    return folder


def gray_frames(count: int = 3) -> list[np.ndarray]:
    from utils import rgb_to_gray

    return [np.repeat(rgb_to_gray(f)[..., None], 3, axis=2) for f in panning_clip(count, (96, 128))]


def test_the_head_colours_automatic_output_and_leaves_a_keyframe_alone(red_head_model, tmp_path):
    from colorizer import load_colorizer
    from pipeline import ColorizationOptions, colorize_frames
    from utils import rgb_to_chroma
    from video_io import write_image_rgb

    with_head = load_colorizer(red_head_model, torch.device("cpu"))
    without = dataclasses.replace(with_head, color_heads=())
    frames = gray_frames()

    def mean_cr(colorizer, **options) -> float:
        options = {"saturation": 1.0, **options}
        output = colorize_frames(colorizer, iter(frames), ColorizationOptions(**options), (96, 128))
        return float(np.mean([rgb_to_chroma(f)[..., 1].mean() for f in output]))

    assert mean_cr(with_head) > mean_cr(without) + 15  # the head's red reaches the output through the UNet
    # the head gives the output's colour: the UNet gets it divided by the output's gain, so the gain leaves it
    assert mean_cr(with_head, saturation=1.5) == pytest.approx(mean_cr(with_head), abs=4.0)
    key = panning_clip(1, (96, 128))[0]
    write_image_rgb(tmp_path / "key.png", key)
    keyed = [mean_cr(c, reference=[f"0={tmp_path / 'key.png'}"]) for c in (with_head, without)]
    assert keyed[0] == pytest.approx(keyed[1], abs=1e-6)  # a keyframe's colours are not the head's to change


def test_the_models_own_carry_weight_applies_where_its_heads_lead(red_head_model, tmp_path, monkeypatch):
    """colorizer.json's heads_propagation is the weight of the previous output's carry where the colour heads lead
    and things move (0.99 where nothing moves); a keyframe's frames (colour not the heads') keep 0.99 everywhere, and
    --propagation sets one weight everywhere."""
    import guidance
    from guidance import CarryWeight
    from colorizer import load_colorizer
    from pipeline import ColorizationOptions, colorize_frames
    from video_io import write_image_rgb

    folder = tmp_path / "model"
    folder.mkdir()
    for part in ("unet", "vae", "vac", "color"):
        (folder / part).symlink_to(red_head_model / part)
    config = json.loads((red_head_model / "colorizer.json").read_text())
    (folder / "colorizer.json").write_text(json.dumps({**config, "heads_lead": True, "heads_propagation": 0.7}))
    model = load_colorizer(folder, torch.device("cpu"))
    weights = []
    carry = guidance.propagate_chroma
    monkeypatch.setattr(guidance, "propagate_chroma", lambda *args: weights.append(args[-1]) or carry(*args))
    write_image_rgb(tmp_path / "key.png", panning_clip(1, (96, 128))[0])

    def carry_weights(**options) -> set[float]:
        weights.clear()
        list(colorize_frames(model, iter(gray_frames()), ColorizationOptions(**options), (96, 128)))
        return set(weights)

    assert carry_weights() == {CarryWeight(moving=0.7, still=0.99)}
    assert carry_weights(propagation=0.5) == {CarryWeight.constant(0.5)}
    assert carry_weights(heads_lead=False) == {CarryWeight.constant(0.99)}
    assert carry_weights(reference=[f"0={tmp_path / 'key.png'}"], match_keyframes=False) == {CarryWeight.constant(0.99)}


def test_a_start_from_the_head_colour_leaves_the_noise_little_to_choose(red_head_model):
    """--head-start: sampling starts from the head's colour noised to that step, so the shot's noise (the seed) moves
    the output less the earlier the start; other samplers are refused in one line."""
    from colorizer import load_colorizer
    from pipeline import ColorizationOptions, colorize_frames
    from utils import UserError, rgb_to_chroma

    model = load_colorizer(red_head_model, torch.device("cpu"))
    frames = gray_frames()

    def chroma(head_start: int | None, seed: int) -> np.ndarray:
        options = ColorizationOptions(saturation=1.0, head_start=head_start, seed=seed)
        return np.stack([rgb_to_chroma(f) for f in colorize_frames(model, iter(frames), options, (96, 128))])

    def seed_change(head_start: int | None) -> float:
        return float(np.abs(chroma(head_start, 0) - chroma(head_start, 1)).mean())

    assert seed_change(0) < seed_change(None) / 4
    assert np.array_equal(chroma(999, 0), chroma(None, 0))  # a start at the sampler's first step: from noise
    with pytest.raises(UserError, match="--sampler ddim"):
        ColorizationOptions(sampler="ddpm", head_start=500).check()


def test_a_head_trained_on_larger_inputs_reads_the_frame_at_its_own_size(tmp_path, monkeypatch):
    """A head trained on 224 px crops (train_color_head.py --crop 224) beside the VAC's 128 px input: the pipeline
    gives it the frames resized from full size to 224 px on the short side, not the VAC's input upsampled; a head
    trained at the VAC's size shares the VAC's backbone pass."""
    from color_head import bin_centres, build_color_head, save_color_head
    from colorizer import Colorizer, load_colorizer, prepare_gray
    from pipeline import ColorizationOptions, colorize_frames
    from utils import rgb_to_gray

    torch.manual_seed(0)
    head = build_color_head([40, 112, 320], 16.0, torch.ones(len(bin_centres(16.0))), width=16)
    models = {}
    for side in (128, 224):
        folder = tmp_path / f"head{side}"
        for part in ("unet", "vae", "vac"):
            (folder / part).parent.mkdir(parents=True, exist_ok=True)
            (folder / part).symlink_to(DEFAULT / part)
        save_color_head(head, folder / "color", {"backbone": "efficientnet_lite0", "crop": side})
        config = json.loads((DEFAULT / "colorizer.json").read_text())
        (folder / "colorizer.json").write_text(json.dumps({**config, "color_head": "color"}))
        models[side] = load_colorizer(folder, torch.device("cpu"))
    height, width = 96, 128
    assert models[128].head_size(height, width) is None
    assert models[224].head_size(height, width) == (224, 288)  # 298.7 px wide, to a multiple of the stride 32

    read = []
    condition = Colorizer.condition

    def recording(self, vac_gray, vividness=None, head_gray=None):
        tokens, spatial, chroma = condition(self, vac_gray, vividness, head_gray)
        read.append((head_gray, chroma.shape[-2:]))
        return tokens, spatial, chroma

    monkeypatch.setattr(Colorizer, "condition", recording)
    frames = gray_frames(2)
    outputs = {side: list(colorize_frames(models[side], iter(frames), ColorizationOptions(), (height, width)))
               for side in (128, 224)}
    (shared, shared_grid), (own, own_grid) = read
    assert shared is None and tuple(shared_grid) == (32, 40)  # the VAC's 128 x 160 input, stride 4
    expected = prepare_gray(np.stack([rgb_to_gray(f) for f in frames]), (224, 288))
    assert torch.equal(own, expected) and tuple(own_grid) == (56, 72)
    assert not np.array_equal(outputs[128][0], outputs[224][0])  # the same weights read another picture


def test_a_model_with_two_heads_takes_the_mean_of_their_colours(tmp_path):
    """export_model.py --color-head A B ships both heads; the model's colour is the mean of theirs, each read at its
    own input size (a red head at the VAC's 128 px, a blue one at 224 px); three input sizes are refused."""
    from colorizer import load_colorizer, prepare_gray
    from export_model import export
    from utils import UserError, rgb_to_gray

    save_red_head(tmp_path / "red", extra={"crop": 128})
    save_red_head(tmp_path / "blue", (40.0, -20.0), {"crop": 224})
    save_red_head(tmp_path / "green", (-30.0, -30.0), {"crop": 160})
    gray = np.stack([rgb_to_gray(f) for f in gray_frames(1)])

    def head_chroma(*heads: str) -> torch.Tensor:
        folder = tmp_path / ("model_" + "_".join(heads))
        settings = {"color_head": [str(tmp_path / h) for h in heads] if len(heads) > 1 else str(tmp_path / heads[0])}
        export(DEFAULT, folder, overwrite=False, settings=settings)
        model = load_colorizer(folder, torch.device("cpu"))
        head_size = model.head_size(96, 128)
        _, _, chroma = model.condition(prepare_gray(gray, model.vac_size(96, 128)), 0.0,
                                       prepare_gray(gray, head_size) if head_size else None)
        return chroma.mean(dim=(0, 2, 3))

    red, blue, both = head_chroma("red"), head_chroma("blue"), head_chroma("red", "blue")
    assert sorted(p.name for p in (tmp_path / "model_red_blue").iterdir() if p.name.startswith("color")) == \
        ["color", "color2", "colorizer.json"]
    assert (red - blue).abs().min() > 40  # two far-apart colours
    assert torch.allclose(both, (red + blue) / 2, atol=0.5)
    with pytest.raises(UserError, match="more than one input size") as error:
        head_chroma("red", "blue", "green")
    assert "\n" not in str(error.value)


def test_a_head_on_its_own_backbone_reads_that_backbones_maps(tmp_path):
    """A head trained on EfficientNet-Lite1 beside a VAC on Lite0 (train_color_head.py --backbone): the model runs
    Lite1 for it on the frames at the head's size, and its colour joins the other heads' mean; a backbone that is no
    EfficientNet-Lite is refused in one line."""
    from color_head import bin_centres, build_color_head, save_color_head
    from colorizer import load_colorizer, prepare_gray
    from export_model import export
    from modules import FrozenBackbone
    from utils import UserError, rgb_to_gray

    torch.manual_seed(0)
    head = build_color_head([40, 112, 320], 16.0, torch.ones(len(bin_centres(16.0))), width=16)
    save_color_head(head, tmp_path / "lite1", {"backbone": "efficientnet_lite1", "crop": 224})
    save_red_head(tmp_path / "red", extra={"crop": 224})
    gray = np.stack([rgb_to_gray(f) for f in gray_frames(1)])
    head_gray = prepare_gray(gray, (224, 288))

    def model_chroma(*heads: str) -> torch.Tensor:
        folder = tmp_path / ("model_" + "_".join(heads))
        export(DEFAULT, folder, overwrite=False, settings={"color_head": [str(tmp_path / h) for h in heads]})
        model = load_colorizer(folder, torch.device("cpu"))
        assert model.head_size(96, 128) == (224, 288)
        return model.condition(prepare_gray(gray, model.vac_size(96, 128)), 0.0, head_gray)[2]

    lite1_alone = model_chroma("lite1")
    decoding = load_colorizer(tmp_path / "model_lite1", torch.device("cpu")).head_decoding  # the default model's
    with torch.no_grad():
        on_lite1, on_lite0 = (head.chroma(head(FrozenBackbone(name)(head_gray), head_gray), 0.0, head_gray, decoding)
                              for name in ("efficientnet_lite1", "efficientnet_lite0"))
    assert torch.allclose(lite1_alone, on_lite1, atol=0.05)
    assert (lite1_alone - on_lite0).abs().mean() > 20 * (lite1_alone - on_lite1).abs().mean()
    red_alone = model_chroma("red")
    assert torch.allclose(model_chroma("lite1", "red"), (lite1_alone + red_alone) / 2, atol=0.05)

    save_color_head(head, tmp_path / "b7", {"backbone": "efficientnet_b7", "crop": 224})
    with pytest.raises(UserError, match="efficientnet_b7") as error:
        model_chroma("b7")
    assert "\n" not in str(error.value)


def test_a_head_on_a_model_without_a_hybrid_vac_is_a_one_line_error(tiny_model, tmp_path):
    import shutil

    from color_head import save_color_head
    from colorizer import load_colorizer
    from utils import UserError

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    save_color_head(small_head(), folder / "color", {"backbone": "efficientnet_lite0"})
    config = json.loads((folder / "colorizer.json").read_text())
    (folder / "colorizer.json").write_text(json.dumps({**config, "color_head": "color"}))
    with pytest.raises(UserError, match="hybrid VAC") as error:
        load_colorizer(folder, torch.device("cpu"))
    assert "\n" not in str(error.value)


@pytest.mark.slow  # feature extraction and a two-step training run: about a minute
def test_a_unet_trained_with_the_head_sees_its_colour_marked_as_a_guess(tmp_path, tiny_components, frame_root,
                                                                         monkeypatch):
    """train_diffusion.py --color-head: the head's colour reaches the UNet's hint input, marked HEAD_HINT_MASK, on
    items without a dense hint and never on those with one; the checkpoint is a model that samples the same way."""
    import colorizer
    import modules
    from colorizer import load_colorizer
    from conftest import run_main
    from guidance import HEAD_HINT_MASK
    from modules import build_hybrid_vac, save_vac

    run_ok("feature_extraction.py", "--dataroot", str(frame_root), "--dataset-name", "hybrid", "--image-size", "32",
           "--hints", "--vae", str(tiny_components["vae"]), "--vac", "timm:efficientnet_lite0", cwd=tmp_path)
    save_vac(build_hybrid_vac(token_dim=32, layers=1, heads=2, spatial_channels=8), tmp_path / "small_vac")
    save_red_head(tmp_path / "red")
    seen, unet_input = [], modules.unet_input
    monkeypatch.setattr(modules, "unet_input", lambda *args: seen.append(args[3].clone()) or unet_input(*args))
    result = run_main("train_diffusion", "--dataset-name", "hybrid", "--output-dir", "runs", "--net-dimension", "8",
                      "--vac", tmp_path / "small_vac", "--batch-size", "8", "--warmup-steps", "1", "--train-vac",
                      "--hints", "--color-head", tmp_path / "red", "--max-steps", "2", "--checkpoint-every", "2",
                      "--validate-every", "100", cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
    rows = torch.cat(seen[:2])  # the two training steps' batches
    guessed = (rows[:, 2] == HEAD_HINT_MASK).flatten(1).any(dim=1)
    dense = (rows[:, 2] > 0).flatten(1).float().mean(dim=1) > 0.2
    assert guessed.any() and not (guessed & dense).any() and (~guessed).any()
    where = rows[:, 2:3] == HEAD_HINT_MASK
    assert (rows[:, 1:2][where] * 128).min() > 40  # the red head's Cr wherever it fills in
    assert ((rows[guessed, 2] == HEAD_HINT_MASK) | (rows[guessed, 2] == 1.0)).all()  # its guess, or a painted point

    model = load_colorizer(tmp_path / "runs" / "run", torch.device("cpu"))
    assert model.color_heads and model.head_hint_mask == HEAD_HINT_MASK
    seen.clear()
    monkeypatch.setattr(colorizer, "unet_input", modules.unet_input)
    model.sample_latents(torch.rand(1, 1, 32, 32), torch.randn(1, 4, 8, 8), steps=1, vividness=0.0)
    assert seen[0][:, 2].eq(HEAD_HINT_MASK).all()
