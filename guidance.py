"""Colour given from elsewhere: the UNet's hint input, the random hints training draws, and, at inference, the guides
(keyframes, painted hints, registered exemplars) carried along the optical flow. The pipeline's face is
GuidePropagator: `step` gives a frame the guides that reach it, `hint_input` the model's hint input from them, and
`output_chroma` the per-frame chain that makes the output's colour from the sampled chroma (painted hints kept local,
the previous output carried along the flow, the exemplars' and the painted colour pasted, the keyframe's pasted).

A hint is a chroma value (BT.601 Cb, Cr) at some pixels of the working-size frame plus a mask saying which pixels
carry one. The UNet receives them pixel-unshuffled beside the grayscale frame (modules.unet_input), so a single
hinted pixel stays exact. Where they come from:
- training: none (half of the items, so automatic colorization stays the main task), a few random points and small
  patches of the true colour (Zhang et al. 2017), or dense hints: another frame of the same clip warped onto this one
  by the optical flow and masked by its reliability, what propagation feeds the model at inference; for a model
  trained with a colour head, the head's chroma wherever an item has no dense hint, its mask HEAD_HINT_MASK;
- inference: a keyframe's chroma carried frame to frame along the flow (propagation), painted hint images, and the
  colour head's chroma wherever no guide gives one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import reduce
from pathlib import Path

import numpy as np
import torch

from correspondence import best_registration, paste_found, upsample_chroma
from flow import reliable_flow, reliable_flows, squared_norm, warp, warp_matching_luma
from modules import CHROMA_RANGE
from utils import UserError

HINT_CHANNELS = 3  # Cb and Cr (divided by CHROMA_RANGE, zero where no hint) and the mask
# The mask's value where the colour head's suggestion fills in (a model trained with it, train_diffusion.py
# --color-head): painted and carried hints are 0..1, so the UNet can tell a guess from a given colour.
HEAD_HINT_MASK = -1.0
UNRELIABLE_KEEP = 0.5  # confidence kept through a step where the flow fails its check
# Where the flow fails its check but the luma it brings matches this frame's within this many levels, the colour it
# brings is kept too: textureless regions (sky, smoke, walls) fail the check without being occluded (held-out clips,
# first frame given: 34.74 dB without, 35.33 / 35.39 / 35.40 with 8 / 12 / 16 levels).
LUMA_MATCH = 16
SPREAD_STEPS, SPREAD_EDGE = 300, 0.2  # painted colour's diffusion at the working size (see spread_painted)
# Where the colour heads lead, the previous output's weight slides from its value where things move to its value where
# nothing moves over this many pixels of motion (at the working size; CarryWeight). Where nothing moves, a lighter
# carry only lets the heads' frame-to-frame noise through; where things move, every warp blurs what is carried. Chosen
# on the four clips training held out (v7's heads at vividness 0.45, carry 0.9 moving and 0.99 still, seed 0): 28.81
# dB with 0.25 or 0.5, 28.79 with 1, against 28.79 for 0.9 everywhere (unet_model/default/README.md).
STILL_FLOW = 0.5
PROPAGATION_SHORT_SIDE = 480  # keyframe colour travels at most at this size (cost of the flow grows with area)
# A keyframe's colour travels along DIS flows without their variational refinement (flow.dense_flow), which is half
# a flow's cost. Chosen on the four clips training held out, first frame given: 37.22 dB refined (5 iterations, the
# medium preset's), 37.33 with 2, 37.44 with none; then the fast-motion dev set: 34.49 -> 34.81.
REFINED_GUIDE_FLOW = False
# ... and with their patches searched down to the frame's own resolution (the preset stops at half of it). Chosen on
# the four clips training held out, first frame given: 37.52 -> 37.94 dB, every clip up (with the shipped matcher
# 37.51 -> 37.91; patches every 3 or 4 px instead of 6: 37.91 and 37.86, at up to 2.8x the cost); then the
# fast-motion dev set 34.85 -> 35.15 and bench.py --reference's 854x480 clip 34.23 -> 35.09.
FULL_RESOLUTION_GUIDE_FLOW = True
# Where a keyframe's colour did not arrive, the output is the model's colour and the keyframe's palette colour for the
# pixel's luma, half each (see paste_dense). Chosen on the four clips training held out (128 px): first frame given
# 36.01 dB with the model alone, 36.28 with the palette alone, 36.32 half each; middle frame 36.47 -> 36.56.
PALETTE_SHARE = 0.5
PALETTE_LEVELS = 32  # luma levels of a keyframe's palette (8 grey levels each)
# Where a keyframe's colour travels and the frame was matched to the keyframe (ColorizationOptions.match_keyframes),
# the output is a softmax-weighted mean of these colours, the logits linear in fusion_features (the weights learned
# by experiments/train_fusion.py; see fuse_sources).
FUSED_SOURCES = ("carried", "palette", "found", "previous", "model")
FUSION_FILE = Path(__file__).resolve().parent / "unet_model" / "matcher" / "fusion.safetensors"
# The fused colour's guided filter fits its coefficients at about this short side (correspondence.guided_upsample's
# subsample; the fast guided filter): what it refines comes from grids of 40-64 px, and at 854x480 the filter at full
# size costs 23 ms a frame, at this side 7.
FUSED_GUIDED_SIDE = 120


def hint_tensor(chroma: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """BxHxWx2 chroma and BxHxW mask in [0, 1] -> Bx3xHxW (chroma/128 where hinted, the mask)."""
    mask = np.asarray(mask, np.float32)[..., None]
    stacked = np.concatenate([np.asarray(chroma, np.float32) / CHROMA_RANGE * mask, mask], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(stacked)).permute(0, 3, 1, 2)


def no_hints(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.zeros(batch, HINT_CHANNELS, height, width)


# ---------------------------------------------------------------------------------------------------------------
# Training hints


def point_hints(chroma: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A geometric number of points (mean 8) and small square patches, each holding its patch's mean true colour:
    what a user paints with a brush."""
    height, width = chroma.shape[:2]
    hinted, mask = np.zeros_like(chroma), np.zeros((height, width), np.float32)
    for _ in range(min(64, int(rng.geometric(1 / 8)))):
        side = int(rng.integers(1, 4))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        patch = (slice(top, top + side), slice(left, left + side))
        hinted[patch] = chroma[patch].reshape(-1, 2).mean(axis=0)
        mask[patch] = 1.0
    return hinted, mask


def region_hints(chroma: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The true colour over one to three random rectangles covering large parts of the frame: dense hints for
    items without a second frame (photos)."""
    height, width = chroma.shape[:2]
    mask = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        h, w = int(rng.integers(height // 4, height + 1)), int(rng.integers(width // 4, width + 1))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        mask[top : top + h, left : left + w] = 1.0
    return chroma * mask[..., None], mask


def draw_training_hints(chroma: np.ndarray, partner_chroma: np.ndarray, partner_mask: np.ndarray,
                        rngs: list[np.random.Generator], none_fraction: float = 0.5
                        ) -> tuple[torch.Tensor, np.ndarray]:
    """One hint set per item of a batch (BxHxWx2 true chroma; the partner frame's warped chroma and reliability,
    an all-zero mask for items without a partner; a generator per item) -> (Bx3xHxW hints, B booleans: the items
    given dense hints). Of the hinted items, half get points and half dense hints (the partner's where it has one,
    else rectangles of the true colour): a keyframe's colour, where the colour head stays silent."""
    hints = np.zeros((*chroma.shape[:3], 2), np.float32), np.zeros(chroma.shape[:3], np.float32)
    dense = np.zeros(len(rngs), bool)
    for i, rng in enumerate(rngs):
        draw = rng.random()
        if draw < none_fraction:
            continue
        if draw < none_fraction + (1 - none_fraction) / 2:
            hinted, mask = point_hints(chroma[i], rng)
        elif partner_mask[i].any():
            hinted, mask, dense[i] = partner_chroma[i], partner_mask[i], True
        else:
            hinted, mask, dense[i] = *region_hints(chroma[i], rng), True
        hints[0][i], hints[1][i] = hinted, mask
    return hint_tensor(*hints), dense


# ---------------------------------------------------------------------------------------------------------------
# Propagation along the flow


@dataclass(frozen=True)
class CarryWeight:
    """The previous output's weight in a frame's colour where the flow is reliable: `moving` where the flow moves by
    STILL_FLOW pixels or more, sliding to `still` where it does not move at all."""
    moving: float
    still: float

    @classmethod
    def constant(cls, weight: float) -> "CarryWeight":
        return cls(weight, weight)

    @property
    def carries(self) -> bool:
        return max(self.moving, self.still) > 0

    def at(self, flow: np.ndarray) -> np.ndarray | float:
        """The weight at each pixel of an HxWx2 flow (a number where the two weights are one)."""
        if self.still == self.moving:
            return self.moving
        stillness = np.exp(-np.sqrt(squared_norm(flow)) / np.float32(STILL_FLOW))
        return np.float32(self.moving) + np.float32(self.still - self.moving) * stillness


def carry(previous_gray: np.ndarray, gray: np.ndarray, previous_chroma: np.ndarray,
          blur: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The previous frame's chroma warped onto this frame, and a soft mask in [0, 1] of where the flow is reliable
    (the forward-backward check, feathered so that seams do not show)."""
    flow, soft = carry_flow(previous_gray, gray, blur)
    return warp(previous_chroma, flow), soft


def carry_flow(previous_gray: np.ndarray, gray: np.ndarray, blur: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The flow that brings the previous frame onto this one, and carry's soft mask of where it is reliable."""
    import cv2

    flow, reliable = reliable_flow(previous_gray, gray)
    return flow, cv2.GaussianBlur(reliable.astype(np.float32), (0, 0), blur) if blur else reliable.astype(np.float32)


def blend(carried: np.ndarray, mask: np.ndarray, chroma: np.ndarray, weight: np.ndarray | float) -> np.ndarray:
    """Carried chroma where the mask (times `weight`, a number or HxW) says so, the new prediction elsewhere."""
    soft = (mask * weight)[..., None]
    return soft * carried + (1.0 - soft) * chroma


def propagate_chroma(previous_gray: np.ndarray, gray: np.ndarray, previous_chroma: np.ndarray,
                     chroma: np.ndarray, weight: CarryWeight) -> np.ndarray:
    """Blend the previous output's chroma, carried along the optical flow, into this frame's prediction where the
    flow passes the forward-backward check: colours follow the motion instead of being re-drawn every frame."""
    flow, mask = carry_flow(previous_gray, gray)
    return blend(warp(previous_chroma, flow), mask, chroma, weight.at(flow))


def partner_hints(gray: np.ndarray, partner_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Another frame of the same clip (same crop) -> its chroma warped onto this frame and the flow's reliability:
    the dense hints training draws, made the way inference makes them."""
    from utils import rgb_to_chroma, rgb_to_gray

    return carry(rgb_to_gray(partner_rgb), gray, rgb_to_chroma(partner_rgb), blur=0)


# ---------------------------------------------------------------------------------------------------------------
# Keyframes and painted hints at inference


@dataclass
class Guide:
    """Colour given for a frame and carried to others: a reference keyframe (dense: every pixel; pasted into the
    output where it is carried reliably) or painted hints (sparse: only the model sees them).

    The colour is carried everywhere the flow takes it (`weighted`, `support`), and separately how far it can be
    trusted (`confidence`: each step multiplies it by the flow's reliability). `weighted` is the chroma times the
    support, so warping and merging never mix given colour with the zeros around a painted dot."""

    origin: int  # the frame the colour was given for
    weighted: np.ndarray  # HxWx2 float32: Cb/Cr x support, at the propagation size
    support: np.ndarray  # HxW float32 in [0, 1]: where colour was given (all of a keyframe, a hint's dots)
    confidence: np.ndarray  # HxW float32 in [0, 1]: support that reached this frame along reliable flow only
    dense: bool
    palette: np.ndarray | None = None  # a keyframe's PALETTE_LEVELSx2 chroma by luma level (see luma_palette)
    keyframe: tuple[np.ndarray, np.ndarray] | None = None  # a keyframe's uint8 luma and chroma (see reanchor)

    @property
    def chroma(self) -> np.ndarray:
        return self.chroma_at(None)

    def chroma_at(self, pixels: np.ndarray | None) -> np.ndarray:
        """The given chroma at `pixels` (see at_pixels; None: HxWx2)."""
        return at_pixels(self.weighted, pixels) / np.maximum(at_pixels(self.support, pixels), 1e-6)[..., None]


def at_pixels(image: np.ndarray, pixels: np.ndarray | None) -> np.ndarray:
    """An HxW[xC] image's values at `pixels`, flat indices into its HxW grid (N[xC]; np.take: many times faster
    than indexing by rows and columns), or the whole image where `pixels` is None."""
    return image if pixels is None else np.take(image.reshape(-1, *image.shape[2:]), pixels, axis=0)


def parse_guide_spec(spec: str) -> tuple[int, Path]:
    """`IMAGE` (frame 0) or `N=IMAGE` (frame N, 0-based)."""
    number, separator, rest = spec.partition("=")
    if separator and number.strip().isdigit():
        return int(number), Path(rest)
    return 0, Path(spec)


def propagation_size(height: int, width: int, short_side: int = PROPAGATION_SHORT_SIDE) -> tuple[int, int]:
    """Keyframe colour travels at the frame's own size, or at a short side of `short_side` for larger frames."""
    scale = min(1.0, short_side / min(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def load_reference(path: Path, index: int, size: tuple[int, int]) -> Guide:
    """A colour image of the frame from a file (any size; only its chroma is used, so its luma may differ a little)."""
    from video_io import read_image_rgb

    return reference_guide(read_image_rgb(path), index, size)


def reference_guide(rgb: np.ndarray, index: int, size: tuple[int, int]) -> Guide:
    import cv2

    from utils import rgb_to_chroma, rgb_to_gray

    resized = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    chroma, gray = rgb_to_chroma(resized), rgb_to_gray(resized)
    return Guide(index, chroma, np.ones(size, np.float32), np.ones(size, np.float32), dense=True,
                 palette=luma_palette(gray, chroma), keyframe=(gray, chroma))


def luma_palette(gray: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """A keyframe's mean chroma at each of PALETTE_LEVELS luma levels -> PALETTE_LEVELSx2 (a level the keyframe
    lacks takes the nearest present level's): the colours its pixels of each brightness have. New content of the
    shot (what the flow cannot carry the keyframe's colour to) mostly repeats them (Welsh et al. 2002 transfer colour
    between images by luma in the same spirit)."""
    levels = palette_levels(gray).ravel()
    counts = np.bincount(levels, minlength=PALETTE_LEVELS)
    sums = np.stack([np.bincount(levels, chroma[..., c].ravel(), minlength=PALETTE_LEVELS) for c in range(2)], 1)
    present = np.flatnonzero(counts)
    nearest = present[np.abs(np.arange(PALETTE_LEVELS)[:, None] - present[None]).argmin(axis=1)]
    return (sums[nearest] / counts[nearest, None]).astype(np.float32)


def palette_levels(gray: np.ndarray) -> np.ndarray:
    """uint8 luma -> its palette level."""
    return gray.astype(np.int32) * PALETTE_LEVELS // 256


def load_hint_image(path: Path, index: int, size: tuple[int, int]) -> Guide:
    """An RGBA image (any size, resized with nearest neighbour): opaque pixels are colour hints."""
    import cv2

    from utils import UserError, rgb_to_chroma
    from video_io import read_image_rgba

    rgba = cv2.resize(read_image_rgba(path), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    mask = (rgba[..., 3] >= 128).astype(np.float32)
    if not mask.any():
        raise UserError(f"{path}: has no opaque pixel, so no hint; paint hints opaque on a transparent background")
    return Guide(index, rgb_to_chroma(np.ascontiguousarray(rgba[..., :3])) * mask[..., None], mask, mask, dense=False)


def registered_guide(exemplar: np.ndarray, grays: dict[int, np.ndarray]) -> Guide | None:
    """An exemplar that is a reframed frame among `grays` (frame index -> uint8 luma at the propagation size; see
    correspondence.best_registration) -> a keyframe guide there covering what the exemplar shows, or None."""
    from utils import rgb_to_chroma, rgb_to_gray

    registered = best_registration(exemplar, grays)
    if registered is None:
        return None
    index, landed, covered = registered
    chroma = rgb_to_chroma(landed) * covered[..., None]
    return Guide(index, chroma, covered, covered.copy(), dense=True,
                 palette=luma_palette(rgb_to_gray(exemplar), rgb_to_chroma(exemplar)))


def travel(guides: list[Guide], from_gray: np.ndarray, to_gray: np.ndarray) -> list[Guide]:
    """Guides moved from the frame of `from_gray` onto the frame of `to_gray` (carry_guide), each re-anchored on its
    keyframe (reanchor). The step's flow is computed once for all of them (with two keyframes travelling together a
    frame takes six flows, not eight), with the settings a keyframe's colour travels by: REFINED_GUIDE_FLOW,
    FULL_RESOLUTION_GUIDE_FLOW."""
    keyed = [g for g in guides if g.keyframe is not None]
    step, *key_flows = reliable_flows([(from_gray, to_gray), *((g.keyframe[0], to_gray) for g in keyed)],
                                      REFINED_GUIDE_FLOW, FULL_RESOLUTION_GUIDE_FLOW)
    found_again = iter(key_flows)
    return [reanchor(carry_guide(g, from_gray, to_gray, step), to_gray,
                     next(found_again) if g.keyframe is not None else None) for g in guides]


def carry_guide(guide: Guide, from_gray: np.ndarray, to_gray: np.ndarray,
                step: tuple[np.ndarray, np.ndarray]) -> Guide:
    """A guide moved from the frame of `from_gray` onto the frame of `to_gray` along the flow (`step`: reliable_flow's
    flow and mask between them), sampled from source pixels of the target pixel's luma (no colour trails); its
    confidence is kept where the flow passes the forward-backward check or brings the right luma."""
    flow, reliable = step
    luma_matches = brings_matching_luma(from_gray, flow, to_gray)
    moved = warp_matching_luma(np.dstack([guide.weighted, guide.support, guide.confidence]), flow, from_gray, to_gray)
    kept = np.where(reliable | luma_matches, 1.0, UNRELIABLE_KEEP).astype(np.float32)
    weighted, support, confidence = (np.ascontiguousarray(a) for a in (moved[..., :2], moved[..., 2], moved[..., 3]))
    return replace(guide, weighted=weighted, support=support, confidence=confidence * kept)


def brings_matching_luma(source_gray: np.ndarray, flow: np.ndarray, gray: np.ndarray) -> np.ndarray:
    """Where the flow brings source luma within LUMA_MATCH levels of this frame's."""
    return np.abs(warp(source_gray.astype(np.float32), flow) - gray.astype(np.float32)) <= LUMA_MATCH


def reanchor(guide: Guide, gray: np.ndarray, direct_flow: tuple[np.ndarray, np.ndarray] | None) -> Guide:
    """A keyframe's carried guide with the keyframe's own colour, fully trusted, wherever a direct flow from the
    keyframe to this frame (`direct_flow`: reliable_flow's flow and mask; None for a guide without a keyframe) passes
    the forward-backward check and brings the right luma: colour the chain lost comes back (an occlusion that ended,
    a step whose flow failed), and the chain's resampling does not build up. Chosen on the four clips training held
    out, first frame given: 36.32 -> 36.89 dB (the keyframe's colour alone where both hold it: 36.66; re-anchoring
    only where the chain's confidence fell below a half: 36.37); middle frame 36.56 -> 37.02; eight training clips
    34.45 -> 35.15."""
    if guide.keyframe is None:
        return guide
    key_gray, key_chroma = guide.keyframe
    flow, reliable = direct_flow
    found = reliable & brings_matching_luma(key_gray, flow, gray)
    if not found.any():
        return guide
    direct = warp_matching_luma(key_chroma, flow, key_gray, gray)
    # where the chain still holds the colour too there are two estimates, whose errors differ: their mean
    direct = np.where((found & (guide.confidence >= 0.5))[..., None], 0.5 * (direct + guide.chroma), direct)
    return replace(guide, weighted=np.where(found[..., None], direct, guide.weighted).astype(np.float32, copy=False),
                   support=np.where(found, 1.0, guide.support).astype(np.float32, copy=False),
                   confidence=np.where(found, 1.0, guide.confidence).astype(np.float32, copy=False))


def merge(guides: list[Guide], t: int) -> Guide | None:
    """Several guides reaching frame t -> one: each weighs its confidence / (1 + frames it travelled), so between
    two keyframes the nearer one dominates and a fresh hint overrides an old one; where none is confident, by
    support alone."""
    if not guides:
        return None
    if len(guides) == 1:
        return replace(guides[0], origin=t)
    closeness = [1.0 / (1 + abs(t - g.origin)) for g in guides]
    weights = [c * (g.confidence + 1e-3 * g.support) for c, g in zip(closeness, guides)]
    chroma = sum(w[..., None] * g.chroma for w, g in zip(weights, guides)) / np.maximum(sum(weights), 1e-9)[..., None]
    support = np.maximum.reduce([g.support for g in guides])
    confidence = np.maximum.reduce([g.confidence for g in guides])
    return Guide(t, chroma * support[..., None], support, confidence, guides[0].dense,
                 merge_palettes(guides, closeness))


def merge_palettes(guides: list[Guide], closeness: list[float]) -> np.ndarray | None:
    """The keyframes' palettes, the nearer keyframe weighing more, as their colours do."""
    weighted = [(c, g.palette) for c, g in zip(closeness, guides) if g.palette is not None]
    if not weighted:
        return None
    return sum(c * palette for c, palette in weighted) / sum(c for c, _ in weighted)


class GuidePropagator:
    """One clip's colour from elsewhere, frame by frame. Carries every guide's colour along the optical flow, forward
    through the frames after its own and backward through those before it, each step masked by the flow's
    reliability, so colour fades out where the motion cannot be followed (occlusions, new content); a scene cut
    stops it. Call `backward_pass` first with the frames up to the last guide, then `step(t, gray)` for t = 0, 1, ...
    in order; each returns the frame's (dense, sparse) guides, which `hint_input` turns into the model's hint input.
    `output_chroma` then makes each sampled frame's output colour in order: its guides pasted, the exemplars'
    colour, and the previous output's colour carried along the flow (with no guide too: GuidePropagator([])).
    The backward results wait in float16 until their frame comes: memory grows with the frames before the last
    keyframe, not with the clip."""

    def __init__(self, guides: list[Guide]):
        self.guides = guides
        self.forward: list[Guide] = []
        self.previous_gray: np.ndarray | None = None
        self.backward: dict[int, list[Guide]] = {}
        self.previous_output: tuple[np.ndarray, np.ndarray] | None = None  # luma and chroma at the working size

    @property
    def last_guided_frame(self) -> int:
        return max((g.origin for g in self.guides), default=-1)

    def backward_pass(self, grays: list[np.ndarray], cuts: list[bool]) -> None:
        """grays: frames 0 .. last_guided_frame at the propagation size; cuts[t]: frame t starts a new shot."""
        for guide in self.guides:
            carried = guide
            for t in range(guide.origin - 1, -1, -1):
                if cuts[t + 1]:
                    break
                carried = travel([carried], grays[t + 1], grays[t])[0]
                if not carried.confidence.any():
                    break
                self.backward.setdefault(t, []).append(compact(carried, np.float16))

    def step(self, t: int, gray: np.ndarray, cut: bool = False) -> tuple[Guide | None, Guide | None]:
        if cut:
            self.forward = []
        elif self.previous_gray is not None and self.forward:
            self.forward = [g for g in travel(self.forward, self.previous_gray, gray) if g.confidence.any()]
        self.forward += [g for g in self.guides if g.origin == t]
        self.previous_gray = gray
        backward = [compact(g, np.float32) for g in self.backward.pop(t, [])]
        reaching = self.forward + backward
        return merge([g for g in reaching if g.dense], t), merge([g for g in reaching if not g.dense], t)

    @staticmethod
    def hint_input(frame_guides: list[tuple[Guide | None, Guide | None]],
                   size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of frames' (dense, sparse) guides -> the model's hint input at the working size, and where painted
        hints are among them the same without those (the second pass whose colour keep_painted_local keeps away
        from the painted strokes), else None."""
        hints = hint_tensor(*map(np.stack, zip(*(model_hints(d, s, size) for d, s in frame_guides))))
        if all(sparse is None for _, sparse in frame_guides):
            return hints, None
        return hints, hint_tensor(*map(np.stack, zip(*(model_hints(d, None, size) for d, _ in frame_guides))))

    def fusion_inputs(self, chroma: np.ndarray, luma: np.ndarray, guide_luma: np.ndarray, dense: Guide, cut: bool,
                      found: tuple[np.ndarray, np.ndarray], pixels: np.ndarray | None = None
                      ) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, ...]]:
        """What fuse_sources weighs, at the propagation size (at `pixels` of it, see at_pixels; None: all of it):
        FUSED_SOURCES' colours (the keyframe's carried and palette colour, the found colour, the previous output
        carried along the flow, the model's sample; the working-size ones resized) and the pixels' confidences (the
        carried colour's, the match's, whether the previous output's flow passed its check), fusion_features'
        arguments."""
        size = guide_luma.shape
        previous, reliable = chroma, np.zeros(chroma.shape[:2], np.float32)
        if self.previous_output is not None and not cut:
            previous, reliable = carry(self.previous_output[0], luma, self.previous_output[1])
        carried = dense.chroma_at(pixels)
        palette = (dense.palette[palette_levels(at_pixels(guide_luma, pixels))] if dense.palette is not None
                   else carried)
        sources = {"carried": carried, "palette": palette, "found": at_pixels(resize_to(found[0], size), pixels),
                   "previous": at_pixels(resize_to(previous, size), pixels),
                   "model": at_pixels(resize_to(chroma, size), pixels)}
        return sources, tuple(at_pixels(confidence, pixels) for confidence in (
            dense.confidence, resize_to(found[1], size), resize_to(reliable, size)))

    def fused_chroma(self, chroma: np.ndarray, luma: np.ndarray, guide_luma: np.ndarray, dense: Guide, cut: bool,
                     found: tuple[np.ndarray, np.ndarray], fusion: np.ndarray) -> np.ndarray:
        """The output colour at the propagation size where a keyframe's colour travels and the frame was matched to
        the keyframes: the carried colour where it is vouched for, elsewhere fuse_sources of fusion_inputs, refined
        on the frame's luma by the guided filter as far as the carried colour is not trusted."""
        # where the keyframe's colour is vouched for it stays as it is: fused there, the frames' own outputs (the
        # previous one) would feed back into it and drift
        output = dense.chroma
        fused = np.flatnonzero(dense.confidence < 1.0)
        if not len(fused):
            return output
        sources, confidences = self.fusion_inputs(chroma, luma, guide_luma, dense, cut, found, fused)
        output.reshape(-1, 2)[fused] = fuse_sources(sources, fusion_features(*confidences), fusion)
        # The fused sources come from coarser grids than the frame's (the model's sample and the previous output at
        # the working size, the found colour at the matcher's); the guided filter puts their edges on the frame's own.
        # Chosen on the four clips training held out, first frame given: 37.44 -> 37.52 dB; the same clips upscaled to
        # 480 px 37.80 -> 37.90; the fast-motion dev set 34.81 -> 34.86 (no clip down); bench.py --reference's
        # 854x480 clip 34.17 -> 34.23.
        subsample = max(1, min(guide_luma.shape) // FUSED_GUIDED_SIDE)
        return blend(output, dense.confidence, upsample_chroma(output, guide_luma, subsample), 1.0)

    def output_chroma(self, chroma: np.ndarray, plain: np.ndarray | None, luma: np.ndarray,
                      guide_luma: np.ndarray | None, frame_guides: tuple[Guide | None, Guide | None], cut: bool,
                      propagation: CarryWeight, found: tuple[np.ndarray, np.ndarray] | None = None,
                      guided_output: bool = True, fusion: np.ndarray | None = None) -> np.ndarray:
        """One frame's sampled chroma (HxWx2 at the working size, `luma` its uint8 luma there; `plain`: the same
        draws without painted hints, or None) -> its output chroma, frames in order: painted hints kept local, the
        previous output's colour carried along the flow (weight `propagation`; not across a cut), the exemplars'
        found colour (chroma and confidence, or None) and the painted colour pasted, then, where colour was found,
        upsampled to the propagation size by the guided filter (`guided_output`, else left to the keyframe paste's
        resize), and the keyframe's colour pasted there (`guide_luma`: the frame's uint8 luma at that size). With
        `fusion` weights, a keyframe's colour and a found colour (the keyframe matched), the sources are fused
        instead (fused_chroma)."""
        dense, sparse = frame_guides
        painted = spread_painted(sparse, luma / np.float32(255)) if sparse is not None else None
        if plain is not None and painted is not None:
            chroma = keep_painted_local(chroma, plain, painted[1])
        if fusion is not None and dense is not None and found is not None:
            chroma = self.fused_chroma(chroma, luma, guide_luma, dense, cut, found, fusion)
            if painted is not None:  # over the fused colour, not where the keyframe's colour is vouched for
                pasted = paste_painted(chroma, tuple(resize_to(p, guide_luma.shape) for p in painted))
                chroma = np.where((dense.confidence >= 1.0)[..., None], chroma, pasted).astype(np.float32)
            self.previous_output = luma, resize_to(chroma, luma.shape)
            return chroma
        if self.previous_output is not None and not cut and propagation.carries:
            previous_luma, previous_chroma = self.previous_output
            chroma = propagate_chroma(previous_luma, luma, previous_chroma, chroma, propagation)
        if found is not None:
            chroma = paste_found(chroma, *found)
        chroma = paste_painted(chroma, painted)
        if found is not None and guided_output:
            chroma = upsample_chroma(chroma, guide_luma)
        if dense is not None:
            chroma = paste_dense(resize_to(chroma, guide_luma.shape), dense, guide_luma)
        self.previous_output = luma, resize_to(chroma, luma.shape)
        return chroma


def fusion_features(carried_confidence: np.ndarray, found_confidence: np.ndarray,
                    previous_reliable: np.ndarray) -> np.ndarray:
    """Per-pixel confidences (any shape S) -> S x 8 features the fusion's logits are linear in: the keyframe colour's
    confidence (and its square), the keyframe match's, whether the previous output's flow passed its check, and
    their products."""
    c, f, m = (np.asarray(a, np.float32) for a in (carried_confidence, found_confidence, previous_reliable))
    return np.stack([np.ones_like(c), c, c * c, f, m, c * f, c * m, f * m], axis=-1)


def load_fusion(path: Path | None = None) -> np.ndarray:
    """The fusion's learned weights (K x F; FUSION_FILE unless `path`)."""
    from safetensors.numpy import load_file

    path = path or FUSION_FILE
    if not path.is_file():
        raise UserError(f"{path}: the keyframe fusion's weights are missing; restore them from git "
                        "(git checkout -- unet_model/matcher)")
    return load_file(str(path))["weights"]


def fuse_sources(sources: dict[str, np.ndarray], features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """FUSED_SOURCES' chroma (each ... x 2) and the pixels' fusion_features (... x F) -> each pixel's
    softmax-weighted mean of the sources (the weights K x F: experiments/train_fusion.py)."""
    logits = features @ weights.T
    # the max and the sum over the sources written out (numpy reduces a short last axis many times slower), adding
    # in the order numpy does
    share = np.exp(logits - reduce(np.maximum, np.moveaxis(logits, -1, 0))[..., None])
    share /= reduce(np.add, np.moveaxis(share, -1, 0))[..., None]
    return sum(share[..., k, None] * sources[name] for k, name in enumerate(FUSED_SOURCES)).astype(np.float32)


def compact(guide: Guide, dtype) -> Guide:
    """The guide's arrays in `dtype` (float16 while backward results wait for their frame)."""
    return replace(guide, weighted=guide.weighted.astype(dtype), support=guide.support.astype(dtype),
                   confidence=guide.confidence.astype(dtype))


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    if image.shape[:2] == size:
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] > size[0] else cv2.INTER_LINEAR
    return cv2.resize(image, (size[1], size[0]), interpolation=interpolation)


def model_hints(dense: Guide | None, sparse: Guide | None, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A frame's guides -> the model's hint chroma and binary mask at the working size: dense colour where at least
    half of a working pixel is reliably covered, a painted hint wherever any of it lands (a one-pixel dot of a large
    frame still reaches the model); painted hints win where both are present."""
    chroma, mask = np.zeros((*size, 2), np.float32), np.zeros(size, np.float32)
    for guide, threshold in ((dense, 0.5), (sparse, 0.0)):
        if guide is None:
            continue
        given, _, confidence = resized_guide(guide, size)
        hinted = confidence > threshold
        chroma[hinted] = given[hinted]
        mask[hinted] = 1.0
    return chroma, mask


def resized_guide(guide: Guide, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A guide's given chroma, support and confidence at `size` (area averages, so a dot smaller than a pixel
    leaves a fraction of support and confidence there, and its chroma whole)."""
    import cv2

    weighted, support, confidence = (cv2.resize(np.asarray(a, np.float32), (size[1], size[0]),
                                                interpolation=cv2.INTER_AREA)
                                     for a in (guide.weighted, guide.support, guide.confidence))
    return weighted / np.maximum(support, 1e-6)[..., None], support, confidence


def spread_painted(sparse: Guide, luma: np.ndarray, steps: int = SPREAD_STEPS,
                   edge: float = SPREAD_EDGE) -> tuple[np.ndarray, np.ndarray]:
    """Painted hints diffused over the frame at the working size (HxW luma in [0, 1]), slowed where the luma
    changes, as in colorization by optimization (Levin et al. 2004); the hinted pixels stay fixed. -> the spread
    chroma and its reach in [0, 1] (where painted, the confidence the hint kept along the flow; fading with
    distance and across edges).

    The model alone follows a few painted dots only weakly; spread and pasted, a stroke colours its region.
    Chosen on photos held out of training (skimage's, with dots of their true colours): mean chroma error 17.5
    with the model alone, 14.2 with the spread pasted (300 steps, edge 0.2; 100 steps: 15.9)."""
    size = luma.shape
    chroma, support, confidence = resized_guide(sparse, size)
    painted = confidence > 0
    # a dot smaller than a working pixel counts whole (as in model_hints); what it lost along the flow does not
    confidence = np.clip(confidence / np.maximum(support, 1e-6), 0.0, 1.0)
    across = np.exp(-((luma[:, 1:] - luma[:, :-1]) / edge) ** 2)[..., None]  # conductance between neighbours
    down = np.exp(-((luma[1:] - luma[:-1]) / edge) ** 2)[..., None]
    fixed = np.dstack([chroma * confidence[..., None], confidence])[painted]
    state = np.zeros((*size, 3), np.float32)  # chroma x reach, reach
    state[painted] = fixed
    for _ in range(steps):
        horizontal = across * (state[:, 1:] - state[:, :-1])
        vertical = down * (state[1:] - state[:-1])
        change = np.zeros_like(state)
        change[:, :-1] += horizontal
        change[:, 1:] -= horizontal
        change[:-1] += vertical
        change[1:] -= vertical
        state += 0.25 * change  # below 1/4 per neighbour: stable
        state[painted] = fixed
    reach = state[..., 2]
    return state[..., :2] / np.maximum(reach, 1e-6)[..., None], np.clip(reach, 0.0, 1.0)


def keep_painted_local(hinted: np.ndarray, plain: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """The model's chroma with painted hints (`hinted`) as far as their spread reaches (`reach`, from
    spread_painted), its chroma without them (`plain`) elsewhere (HxWx2 at the working size): a hint input trained
    with dense hints lets a few dots shift the whole frame (v3 moved the far half of a photo by up to 4.5 levels of
    chroma), and a painted stroke is meant to colour its region, not the rest."""
    return blend(hinted, reach, plain, 1.0)


def paste_painted(chroma: np.ndarray, painted: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The model's chroma at the working size with painted colour spread over it as far as it reaches (`painted`:
    spread_painted's chroma and reach, or None)."""
    if painted is None:
        return chroma
    spread, reach = painted
    return blend(spread, reach, chroma, 1.0)


def paste_dense(chroma: np.ndarray, dense: Guide | None, gray: np.ndarray) -> np.ndarray:
    """The model's chroma (HxWx2 at the propagation size, with the frame's uint8 luma) with the keyframe colour as far
    as it is trusted; where it is not, half the model's colour and half the keyframe's palette colour of the pixel's
    luma (PALETTE_SHARE): the model alone colours new content with less certainty than the shot's own colours do."""
    if dense is None:
        return chroma
    if dense.palette is not None:
        chroma = PALETTE_SHARE * dense.palette[palette_levels(gray)] + (1.0 - PALETTE_SHARE) * chroma
    return blend(dense.chroma, dense.confidence, chroma, 1.0)
