"""The colour-distribution head: on the frozen ImageNet backbone's maps of the grayscale frame (the hybrid VAC's),
a distribution over quantized chroma (Cb, Cr) bins at every position, and the chroma it decodes to.

Trained with plain cross-entropy on soft-encoded targets (Zhang, Isola, Efros, *Colorful Image Colorization*, 2016),
the head learns the calibrated distribution of colours given the frame; its mean is the PSNR-optimal chroma, pale
by construction. Class rebalancing, which Zhang et al. apply in training, is applied here at decoding instead: a
loss that weights each target bin by w(q) has the optimum w(q) p(q | x) (normalised), so dividing the calibrated
distribution by the prior, raised to the power `vividness`, gives every rebalancing strength from one trained head
(0: the calibrated mean; 1: Zhang et al.'s weights with lambda 0.5). It is the one knob between a pale, safe colour
and a vivid one. A model may also pool the distribution over the frame and cap the mean's saturation at its mode's
(Decoding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError, first_line

HEAD_CONFIG = "config.json"
HEAD_WEIGHTS = "color_head.safetensors"
HEAD_BACKBONE_WEIGHTS = "backbone.safetensors"  # a fine-tuned backbone's (train_color_head.py --train-backbone)
OUTPUT_STRIDE = 4  # of the backbone's input: half the working size
PRIOR_MIX = 0.5  # Zhang et al.'s lambda: the prior mixed with a uniform one, so rare bins are not boosted without bound
POOL_EPSILON = 1e-2  # the pooling guided filter's regularisation, on luma in [0, 1]


@dataclass(frozen=True)
class Decoding:
    """How a head's rebalanced distribution becomes one chroma per position, beyond its mean (a model's own:
    colorizer.json's `head_pool_radius` and `head_mode_temperature`; the defaults leave the mean as it is).

    `mode_temperature` < 1: the mean is never more saturated than the mean of the distribution annealed to that
    temperature, which leans to its mode: where most of the mass says gray and a minority says colour, the mean's
    colour is the minority's, and a gray wall or road stays gray; where every likely colour is saturated (a red or a
    blue shirt), the mean is kept. `pool_radius` > 0: both means are first pooled over the frame by a guided filter
    on the luma (locally affine in the luma, over windows of 2 r + 1 grid cells), so a region bounded by luma edges
    shares one colour: one object, one colour. The filter is linear and keeps a constant, so the pooled mean is the
    mean of every bin's probability pooled, at the cost of two maps, not one a bin; the pooled annealed mean stands
    in for the annealed pooled distribution's, which would need them all."""

    pool_radius: int = 0
    mode_temperature: float = 1.0


def bin_centres(step: float) -> torch.Tensor:
    """Every (Cb, Cr) bin centre of a grid of `step` levels within the chroma range: Q x 2."""
    axis = torch.arange(-128.0 + step / 2, 128.0, step)
    return torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)


def soft_targets(chroma: torch.Tensor, centres: torch.Tensor, neighbours: int = 5, sigma: float = 4.0) -> torch.Tensor:
    """N x 2 chroma -> N x Q distributions: a Gaussian over the `neighbours` nearest bin centres (soft encoding, so
    neighbouring bins are not counted as wrong as far ones)."""
    distances, nearest = torch.cdist(chroma, centres).topk(neighbours, largest=False)
    weights = torch.softmax(-distances.square() / (2 * sigma**2), dim=1)
    return torch.zeros(len(chroma), len(centres)).scatter_(1, nearest, weights)


def smoothed_prior(counts: torch.Tensor, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    """Bin counts -> the prior distribution over bins, smoothed by a Gaussian across neighbouring bins."""
    kernel = torch.exp(-torch.cdist(centres, centres).square() / (2 * sigma**2))
    prior = kernel @ (counts / counts.sum())
    return prior / prior.sum()


class ColorHead(nn.Module):
    """The backbone's maps at strides 8, 16, 32 (a feature pyramid, top down) ++ the grayscale frame unshuffled to
    stride 4 -> logits over the chroma bins at stride 4. `centres` and the corpus prior are buffers, so a saved head
    decodes on its own."""

    def __init__(self, config: dict, centres: torch.Tensor, prior: torch.Tensor):
        super().__init__()
        self.config = config
        width = config["width"]
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in config["channels"])
        self.smooth = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width),
                                                  nn.SiLU()) for _ in config["channels"])
        gray_channels = OUTPUT_STRIDE**2
        self.fine = nn.Sequential(nn.Conv2d(width + gray_channels, width, 3, padding=1), nn.GroupNorm(8, width),
                                  nn.SiLU(), nn.Conv2d(width, len(centres), 1))
        self.register_buffer("centres", centres.float())
        self.register_buffer("prior", prior.float())

    @property
    def input_side(self) -> int | None:
        """The short side of the backbone's input the head was trained on (train_color_head.py --crop)."""
        return self.config.get("crop")

    @property
    def backbone(self) -> str | None:
        """The ImageNet backbone whose maps the head reads (train_color_head.py --backbone)."""
        return self.config.get("backbone")

    @property
    def backbone_trained(self) -> bool:
        """Whether the head reads its own fine-tuned copy of that backbone (its folder's HEAD_BACKBONE_WEIGHTS)."""
        return bool(self.config.get("backbone_trained"))

    def forward(self, features: list[torch.Tensor], gray: torch.Tensor) -> torch.Tensor:
        """features: the backbone's maps on `gray` (Bx1xHxW in [0, 1], the backbone's input) -> B x Q x H/4 x W/4."""
        pyramid = None
        for lateral, smooth, feature in reversed(list(zip(self.lateral, self.smooth, features))):
            level = lateral(feature.float())
            if pyramid is not None:
                level = level + F.interpolate(pyramid, size=level.shape[-2:], mode="bilinear", align_corners=False)
            pyramid = smooth(level)
        fine_gray = F.pixel_unshuffle(gray * 2.0 - 1.0, OUTPUT_STRIDE)
        pyramid = F.interpolate(pyramid, size=fine_gray.shape[-2:], mode="bilinear", align_corners=False)
        return self.fine(torch.cat([pyramid, fine_gray], dim=1))

    def rebalanced(self, logits: torch.Tensor, vividness: float) -> torch.Tensor:
        """Logits -> the logits of the distribution rebalanced by the prior to the power `vividness` (module doc), up
        to a constant per position."""
        prior = (1 - PRIOR_MIX) * self.prior + PRIOR_MIX / len(self.prior)
        return logits - vividness * prior.log().view(1, -1, 1, 1)

    def distribution(self, logits: torch.Tensor, vividness: float) -> torch.Tensor:
        """Logits -> the distribution over bins, rebalanced by the prior to the power `vividness` (module doc)."""
        return torch.softmax(self.rebalanced(logits, vividness), dim=1)

    def chroma(self, logits: torch.Tensor, vividness: float, gray: torch.Tensor | None = None,
               decoding: Decoding = Decoding()) -> torch.Tensor:
        """Logits -> B x 2 x h x w chroma (Cb, Cr, on the 8-bit scale): the mean of the rebalanced distribution,
        decoded as `decoding` says (pooling needs `gray`, the Bx1xHxW frames in [0, 1] the head read)."""
        weights = unnormalised_probabilities_(self.rebalanced(logits, vividness))
        capped = decoding.mode_temperature < 1.0
        maps = [self.weighted_chroma(weights)]
        if capped:
            # the annealed distribution's weights are the plain ones to the power 1 / T
            maps.append(self.weighted_chroma(weights.pow_(1.0 / decoding.mode_temperature)))
        if decoding.pool_radius > 0:
            if gray is None:
                raise ValueError("pooling the distribution needs the frames' luma")
            maps = luma_guided_filter(torch.cat(maps, dim=1), gray, decoding.pool_radius).split(2, dim=1)
        if not capped:
            return maps[0]
        mean, towards_mode = maps
        cap = saturation(towards_mode) / saturation(mean).clamp_min(1e-6)
        return mean * cap.clamp(max=1.0)

    def weighted_chroma(self, weights: torch.Tensor) -> torch.Tensor:
        """B x Q x h x w non-negative weights over the bins -> the chroma they average to, B x 2 x h x w."""
        # one matrix product gives the weighted sums and the total (a 1x1 convolution is ten times slower on a CPU)
        centres_and_one = torch.cat([self.centres, self.centres.new_ones(len(self.centres), 1)], dim=1)
        sums = torch.matmul(centres_and_one.t(), weights.flatten(2))
        return (sums[:, :2] / sums[:, 2:]).view(len(weights), 2, *weights.shape[-2:])

    def mean_chroma(self, logits: torch.Tensor) -> torch.Tensor:
        """The mean chroma of the distribution softmax(logits) over the bins."""
        return self.weighted_chroma(unnormalised_probabilities_(logits.clone()))


def unnormalised_probabilities_(logits: torch.Tensor) -> torch.Tensor:
    """B x Q x h x w logits -> softmax's probabilities over Q times a positive number per position, in place: one pass
    over the bins fewer than normalising them, and no new buffer (the caller's tensor is overwritten)."""
    return logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()


def saturation(chroma: torch.Tensor) -> torch.Tensor:
    """B x 2 x h x w chroma -> B x 1 x h x w: its distance from gray (a norm over the channels, which is slow)."""
    return torch.hypot(chroma[:, :1], chroma[:, 1:])


def luma_guided_filter(maps: torch.Tensor, gray: torch.Tensor, radius: int) -> torch.Tensor:
    """B x C x h x w maps -> the same pooled by the guided filter (He et al. 2010) on the frames' luma (Bx1xHxW in
    [0, 1], averaged onto the h x w grid), windows of 2 radius + 1 cells: locally affine in the luma, so what a region
    bounded by luma edges holds is shared across it."""
    guide = F.adaptive_avg_pool2d(gray.float(), maps.shape[-2:])

    def box(image: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(image, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)

    mean_guide, mean_maps = box(guide), box(maps)
    variance = box(guide * guide) - mean_guide**2
    slope = (box(guide * maps) - mean_guide * mean_maps) / (variance + POOL_EPSILON)
    offset = mean_maps - slope * mean_guide
    return box(slope) * guide + box(offset)


def build_color_head(backbone_channels: list[int], step: float, prior_counts: torch.Tensor, width: int = 96,
                     min_share: float = 1e-4) -> ColorHead:
    """A fresh head whose bins are the grid cells the corpus uses (`prior_counts` over bin_centres(step), soft
    counts of training chroma): cells holding less than `min_share` of it are dropped."""
    centres = bin_centres(step)
    used = prior_counts > min_share * prior_counts.sum()
    config = {"channels": list(backbone_channels), "width": width, "bin_step": step}
    return ColorHead(config, centres[used], smoothed_prior(prior_counts[used], centres[used], step / 2))


def save_color_head(head: ColorHead, folder: Path, extra: dict | None = None,
                    backbone_state: dict[str, torch.Tensor] | None = None) -> None:
    """The head into `folder`, with the weights of the backbone it was fine-tuned with where `backbone_state` is
    given (a TunedBackbone's network's state dict)."""
    from safetensors.torch import save_file

    def contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().contiguous() for key, value in state.items()}

    folder.mkdir(parents=True, exist_ok=True)
    save_file(contiguous(head.state_dict()), str(folder / HEAD_WEIGHTS))
    config = {**head.config, **(extra or {})}
    if backbone_state is not None:
        save_file(contiguous(backbone_state), str(folder / HEAD_BACKBONE_WEIGHTS))
        config["backbone_trained"] = True
    (folder / HEAD_CONFIG).write_text(json.dumps(config, indent=2))


def load_color_head(folder: Path) -> ColorHead:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / HEAD_CONFIG).exists() or not (folder / HEAD_WEIGHTS).exists():
        raise UserError(f"{folder}: no colour head ({HEAD_CONFIG} + {HEAD_WEIGHTS}); pass a folder written by "
                        f"train_color_head.py")
    try:
        config = json.loads((folder / HEAD_CONFIG).read_text())
        state = load_file(str(folder / HEAD_WEIGHTS))
        head = ColorHead(config, state["centres"], state["prior"])
        head.load_state_dict(state)
    except Exception as error:  # json, safetensors and torch each raise their own kinds
        raise UserError(f"{folder}: cannot load the colour head ({first_line(error)}); re-export it") from None
    return head.eval()


def load_head_backbone(folder: Path, head: ColorHead) -> dict[str, torch.Tensor] | None:
    """The fine-tuned backbone weights stored with a head that was trained with them (load_color_head's), else
    None: the head reads ImageNet's own."""
    from safetensors.torch import load_file

    if not head.backbone_trained:
        return None
    path = Path(folder) / HEAD_BACKBONE_WEIGHTS
    if not path.exists():
        raise UserError(f"{folder}: its head was trained with its backbone, but {HEAD_BACKBONE_WEIGHTS} is missing; "
                        f"copy the whole folder train_color_head.py wrote")
    return load_file(str(path))


def chroma_at(rgb: np.ndarray, stride: int) -> np.ndarray:
    """BxHxWx3 uint8 -> B x H/stride x W/stride x 2 mean chroma per cell (the head's targets)."""
    from utils import rgb_to_chroma

    chroma = np.stack([rgb_to_chroma(frame) for frame in rgb])
    b, h, w, _ = chroma.shape
    return chroma.reshape(b, h // stride, stride, w // stride, stride, 2).mean(axis=(2, 4))
