"""The colorization pipeline, shared by the command line (video_colorization.py), the app, bench.py, the experiments
and the tests:

- ColorizationOptions: how a clip is colorized, with the command line's defaults (add_sampling_arguments and
  parse_options are its flags);
- colorize_frames: a clip's frames -> colorized frames, streamed in batches (one initial noise per shot, the previous
  output carried along the optical flow, scene cuts, and the guides: keyframes, painted hints, exemplars);
- colorize_clip: one clip (a video or a frame folder) -> an .mp4 or a folder of PNG frames, written atomically, its
  work kept in segments beside the output (ClipState) so that the same call after a kill continues it, and a
  `stop` hook that ends a run between batches (the app's Stop button and closed tabs);
- load_guides: a clip's --reference, --hints and registered --exemplar images as a guidance.GuidePropagator.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import pickle
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from colorizer import SAMPLERS, Colorizer, check_head_start, combine, prepare_gray
from correspondence import REGISTRATION_FRAMES, Exemplars, load_exemplars, shared_matcher
from guidance import (Guide, GuidePropagator, load_fusion, load_hint_image, load_reference, parse_guide_spec,
                      propagation_size, registered_guide)
from utils import UserError, atomic_path, discard, first_line, remove_stale_temporaries, rgb_to_gray
from video_io import (ClipFrame, VideoInfo, VideoWriter, has_audio, iter_clip_frames, iter_timed_frames, join_video,
                      list_frames, probe_clip, read_image_rgb, write_image_rgb)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


BIT_DEPTHS = ("auto", "8", "10")
# A clip's work is kept in segments of this many frames (rounded up to whole batches): about 11 s of compute at
# 854x480 on 2 cores with the defaults, 30 s with a keyframe or an exemplar (the README's speeds), so a killed run
# redoes at most that much. Each segment of an mp4 is encoded on its own (it starts with a keyframe).
SEGMENT_FRAMES = 96
PROGRESS_FILE = "progress.pkl"


class Stopped(Exception):
    """A run ended by its `stop` hook; the work kept so far stays, as after Ctrl-C."""


@dataclass
class ColorizationOptions:
    """How a clip is colorized: the settings video_colorization.py's flags set (parse_args builds one from them), with
    the command line's defaults. app.py, bench.py, the experiments and the tests construct one directly:
    `ColorizationOptions(steps=2, reference=["0=key.png"])`."""

    sampler: str = "ddim"
    # Defaults chosen for the default model by the sampler sweep on the clips training held out, over three seeds
    # (its model card): the highest PSNR among settings that reach 60% of the ground truth's colourfulness there.
    steps: int = 1
    guidance: float = 1.0
    saturation: float | None = None  # None: the model's own default (Colorizer.sampling_default)
    vividness: float | None = None  # a colour head's strength; None: the model's own default
    head_start: int | None = None  # the step sampling starts at from the head's colour; None: the model's own
    heads_lead: bool | None = None  # the heads' colour, the diffusion setting its tint; None: the model's own
    seed: int = 0
    shared_noise: bool = True
    propagation: float | None = None  # None: SAMPLING_DEFAULTS's, or the model's own where its colour heads lead
    scene_cuts: bool = True
    cut_threshold: float = 0.35
    reference: list[str] = field(default_factory=list)  # "[N=]IMAGE", as --reference takes them
    hints: list[str] = field(default_factory=list)  # "[N=]IMAGE", as --hints takes them
    exemplar: list[str] = field(default_factory=list)  # colour images that are not frames of the clip
    # What an exemplar does, each switchable for the measurements (docs/exemplar.md): one that is a reframed frame
    # becomes a keyframe there; the colour found is upsampled by the guided filter on the frame's luma; matching
    # uses the metric learned on training clips (unet_model/matcher) rather than plain cosine similarity.
    register_exemplars: bool = True
    guided_output: bool = True
    learned_metric: bool = True
    match_keyframes: bool = True  # look each frame's colour up in the keyframes too (fused with the flow's carry)
    batch_size: int = 8
    crf: int = 18
    bit_depth: str = "auto"
    overwrite: bool = False

    def check(self) -> None:
        """The checks argparse does not make, as one-line errors."""
        if not 0 <= (self.propagation or 0) < 1 or min(self.saturation or 0, self.vividness or 0) < 0:
            raise UserError(f"--propagation {self.propagation} / --saturation {self.saturation} / --vividness "
                            f"{self.vividness}: propagation must be in [0, 1), saturation and vividness at least 0")
        check_head_start(self.head_start, self.sampler)
        if not 0 <= self.crf <= 51:
            raise UserError(f"--crf {self.crf}: H.264 takes 0 (lossless) to 51; 18 is the default")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1; pass a "
                                f"positive number")
        if self.sampler not in SAMPLERS or self.bit_depth not in BIT_DEPTHS:
            raise UserError(f"--sampler {self.sampler} / --bit-depth {self.bit_depth}: the sampler must be one of "
                            f"{', '.join(SAMPLERS)} and the bit depth one of {', '.join(BIT_DEPTHS)}")

    def flags(self) -> list[str]:
        """The video_colorization.py flags that set these options: those of the fields that differ from the
        defaults (for reports: bench.py records them)."""
        flags = []
        for option in fields(self):
            value, flag = getattr(self, option.name), "--" + option.name.replace("_", "-")
            if value == getattr(DEFAULTS, option.name):
                continue
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):
                flags += [item for spec in value for item in (flag, spec)]
            else:
                flags += [flag, str(value)]
        return flags


DEFAULTS = ColorizationOptions()


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the model's sampling, the temporal features, the guides and the batch size."""
    parser.add_argument("--sampler", default=DEFAULTS.sampler, choices=SAMPLERS)
    parser.add_argument("--steps", type=positive_int, default=DEFAULTS.steps, help="denoising steps per frame")
    parser.add_argument("--guidance", type=float, default=DEFAULTS.guidance,
                        help="classifier-free guidance on the VAC tokens")
    parser.add_argument("--saturation", type=float, default=DEFAULTS.saturation,
                        help="multiply the sampled chroma by this; few steps give the model's mean colour, which "
                        "is right more often than a full sample but pale, and a gain restores colour cheaper in PSNR "
                        "(default: the model's own, 1.5 for a model without a colour head)")
    parser.add_argument("--vividness", type=float, default=DEFAULTS.vividness,
                        help="the knob for automatic colour, with a model that has a colour head: 0 gives the most "
                        "likely mean colour (safe, pale), 1 leans towards rarer, more saturated colours (default: the "
                        "model's own choice, made on clips held out of training)")
    parser.add_argument("--head-start", type=int, default=DEFAULTS.head_start,
                        help="with a colour head and --sampler ddim: start sampling from the head's colour noised to "
                        "this denoising step (lower stays closer to the head's colour; 999: from pure noise, as "
                        "without a head) instead of from pure noise (default: the model's own)")
    parser.add_argument("--heads-lead", action=argparse.BooleanOptionalAction, default=DEFAULTS.heads_lead,
                        help="with a colour head: the output is the heads' colour, the diffusion sample setting its "
                        "large-scale tint (--no-heads-lead: the decoded sample, the heads' colour its hint; default: "
                        "the model's own)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--no-shared-noise", dest="shared_noise", action="store_false",
                        help="draw fresh noise for every frame (the paper's behaviour) instead of one per shot")
    parser.add_argument("--propagation", type=float, default=DEFAULTS.propagation,
                        help="weight of the previous output's flow-warped chroma where the flow is reliable; 0: off "
                        "(default: 0.99, or where the model's colour heads lead, its own where things move and 0.99 "
                        "where nothing moves)")
    parser.add_argument("--no-scene-cuts", dest="scene_cuts", action="store_false",
                        help="never start a new shot (new noise, no propagation) at a detected cut")
    parser.add_argument("--cut-threshold", type=float, default=DEFAULTS.cut_threshold,
                        help="Bhattacharyya distance of gray histograms")
    parser.add_argument("--reference", action="append", default=[], metavar="[N=]IMAGE",
                        help="a colour version of frame N (default 0): its colours travel along the motion to the "
                        "frames before and after it; repeat for several keyframes (any size; only chroma is used)")
    parser.add_argument("--hints", action="append", default=[], metavar="[N=]IMAGE",
                        help="an RGBA image of frame N (default 0) whose opaque pixels are colour hints, painted "
                        "dots or strokes on a transparent background (any size); repeatable")
    parser.add_argument("--exemplar", action="append", default=[], metavar="IMAGE",
                        help="a colour image of the scene that is not a frame of the clip (a coloured still, a photo "
                        "of the place; any size and framing): every frame takes its colours where its content "
                        "matches (ImageNet features, see correspondence.py); repeatable")
    parser.add_argument("--no-register-exemplars", dest="register_exemplars", action="store_false",
                        help="never make an exemplar that is a reframed frame of the clip a keyframe there")
    parser.add_argument("--no-guided-output", dest="guided_output", action="store_false",
                        help="upsample an exemplar's colour bilinearly instead of by the guided filter on the luma")
    parser.add_argument("--no-learned-metric", dest="learned_metric", action="store_false",
                        help="match exemplars by the plain cosine similarity of the backbone's features instead of "
                        "the metric learned on training clips (unet_model/matcher)")
    parser.add_argument("--no-match-keyframes", dest="match_keyframes", action="store_false",
                        help="with --reference: carry the keyframes' colour along the optical flow only, instead of "
                        "also looking each frame's colour up in the keyframes by its features (correspondence.py) "
                        "and fusing the two by learned weights (guidance.fuse_sources), which finds colour the flow "
                        "lost to fast motion or occlusion again")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size, help="frames denoised together")


def take_options(namespace: argparse.Namespace) -> ColorizationOptions:
    """The ColorizationOptions fields of parsed flags, moved out of `namespace` into the dataclass."""
    names = [f.name for f in fields(ColorizationOptions) if hasattr(namespace, f.name)]
    options = ColorizationOptions(**{name: getattr(namespace, name) for name in names})
    for name in names:
        delattr(namespace, name)
    return options


def parse_options(flags: list[str]) -> ColorizationOptions:
    """Sampling flags alone (--sampler ... --batch-size): what bench.py and experiments/sampler_sweep.py
    take as --settings."""
    parser = argparse.ArgumentParser(prog="--settings", description="video_colorization.py's sampling flags")
    add_sampling_arguments(parser)
    return take_options(parser.parse_args(flags))


def batched(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def is_scene_cut(previous_gray: np.ndarray, gray: np.ndarray, threshold: float) -> bool:
    """A cut changes the whole frame's tone distribution at once; motion inside a shot barely moves it."""
    import cv2

    histograms = [cv2.calcHist([g], [0], None, [32], [0, 256]) for g in (previous_gray, gray)]
    return cv2.compareHist(histograms[0], histograms[1], cv2.HISTCMP_BHATTACHARYYA) > threshold


def load_guides(clip: Path, info, options: ColorizationOptions, colorizer: Colorizer,
                exemplars: list[np.ndarray] = ()) -> GuidePropagator | None:
    """--reference and --hints for this clip, checked against its frame count, and the exemplars that turn out to
    be reframed frames of it (guidance.registered_guide) as keyframes, with their backward propagation done
    (it reads the frames up to the last guided one once more)."""
    size = propagation_size(info.height, info.width)
    guides = []
    for option, load in (("--reference", load_reference), ("--hints", load_hint_image)):
        for spec in getattr(options, option[2:]):
            index, path = parse_guide_spec(spec)
            if index >= info.frame_count:
                raise UserError(f"{option} {spec}: {clip} has no frame {index} (it has {info.frame_count}, numbered "
                                f"from 0); give a frame number below {info.frame_count}")
            guides.append(load(path, index, size))
    if len(exemplars) and options.register_exemplars:
        grays = sampled_grays(clip, info, size, REGISTRATION_FRAMES)
        guides += [g for g in (registered_guide(e, grays) for e in exemplars) if g is not None]
    if not guides:
        return None
    propagator = GuidePropagator(guides)
    if propagator.last_guided_frame > 0:
        working = colorizer.working_size(info.height, info.width)
        grays, small = [], []
        for frame in itertools.islice(iter_clip_frames(clip), propagator.last_guided_frame + 1):
            gray = rgb_to_gray(resize_if_needed(frame, info.height, info.width))
            grays.append(working_gray(gray, size))
            small.append(working_gray(gray, working))
        cuts = [False] + [options.scene_cuts and is_scene_cut(a, b, options.cut_threshold)
                          for a, b in zip(small, small[1:])]
        propagator.backward_pass(grays, cuts)
    return propagator


def sampled_grays(clip: Path, info, size: tuple[int, int], count: int) -> dict[int, np.ndarray]:
    """`count` evenly spaced frames of the clip (the first among them) -> frame index: uint8 luma at `size`."""
    wanted = set(np.linspace(0, info.frame_count - 1, min(count, info.frame_count)).round().astype(int).tolist())
    return {index: working_gray(rgb_to_gray(resize_if_needed(frame, info.height, info.width)), size)
            for index, frame in enumerate(itertools.islice(iter_clip_frames(clip), max(wanted) + 1))
            if index in wanted}


def working_gray(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A frame's luma (uint8 or uint16) at `size` as uint8: what scene cuts and the optical flow look at."""
    return (prepare_gray(gray[None], size)[0, 0].numpy() * 255).round().astype(np.uint8)


@dataclass
class ClipState:
    """All that colorize_frames carries from one batch of a clip to the next (the frames done, the shot and the last
    frame's luma for scene cuts, the noise generators, the guides and the previous output carried along the flow):
    kept with each segment of the clip's work, so that a resumed run goes on exactly as an uninterrupted one."""

    frames_done: int
    shot: int
    previous_small: np.ndarray | None
    noise_generator: torch.Generator  # fresh noise per frame (--no-shared-noise)
    step_generator: torch.Generator  # the noise stochastic samplers add at each step
    propagator: GuidePropagator


def start_state(args: ColorizationOptions, guides: GuidePropagator | None = None) -> ClipState:
    """A clip's state before its first frame."""
    # The step noise has a stream of its own (not seed + k, which the shots use).
    step_seed = int(np.random.SeedSequence([args.seed, 1]).generate_state(1)[0])
    return ClipState(0, 0, None, torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(step_seed),
                     guides if guides is not None else GuidePropagator([]))  # it carries the output along the flow


def colorize_frames(colorizer: Colorizer, frames: Iterator[np.ndarray], args: ColorizationOptions,
                    first_frame_shape: tuple[int, int], guides: GuidePropagator | None = None,
                    exemplars: Exemplars | None = None, state: ClipState | None = None,
                    stop: Callable[[], bool] | None = None) -> Iterator[np.ndarray]:
    """Yield the colorized frames of one clip (HxWx3 RGB of the input frames' type, uint8 or uint16), streaming in
    batches of --batch-size.

    Temporal consistency, each part switchable for comparison: one initial noise per shot (--no-shared-noise
    draws fresh noise per frame), flow-guided propagation of the previous output's chroma (--propagation 0 turns
    it off), and scene-cut detection that starts a new shot (--no-scene-cuts). With `guides` (keyframes and
    painted hints), their colour carried to each frame is the model's hint input (for a model that has one), a
    painted colour spreads over its region, and a keyframe's colour is kept wherever it was carried reliably. With
    `exemplars`, the colour each frame's features find in them is blended into the output over the colour carried
    from the previous frame (see correspondence.py). With a model that has a colour head (color_head.py), the head's
    chroma at --vividness is the model's hint input wherever no guide gives one, unless a keyframe or an exemplar
    colours the clip.

    `state` (a ClipState, updated as the frames go; its guides replace `guides`) continues a clip from a batch
    boundary: after a batch's last frame is yielded it holds all the next batch needs.

    `stop`, when given, is asked before each batch; True raises Stopped, so a run ends within one batch's compute."""
    height, width = first_frame_shape
    size = colorizer.working_size(height, width)
    guide_size = propagation_size(height, width)
    state = start_state(args, guides) if state is None else state
    propagator = state.propagator
    guides = propagator if propagator.guides else None
    keyframes = [g.keyframe for g in propagator.guides if g.keyframe is not None] if args.match_keyframes else []
    exemplars_given = exemplars is not None
    if keyframes:
        exemplars = (exemplars or Exemplars([], shared_matcher(args.learned_metric))).with_keyframes(keyframes)
    fusion = load_fusion() if keyframes else None
    # A keyframe's or an exemplar's colours are the clip's own; the colour head's guess would only compete with them.
    saturation = colorizer.sampling_default("saturation", args.saturation)
    head_vividness = None if args.reference or exemplars is not None or saturation == 0 else colorizer.vividness(
        args.vividness)
    # the head's colour as the start is DDIM's (Colorizer.sample_latents); other samplers start from noise
    head_start = None if head_vividness is None or args.sampler != "ddim" else colorizer.head_start(args.head_start)
    heads_lead = colorizer.heads_lead(args.heads_lead)
    propagation = colorizer.propagation(args.propagation, head_vividness is not None and heads_lead)
    latent_shape = colorizer.latent_shape(height, width)
    shot_noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(args.seed + state.shot))
    for batch in batched(frames, args.batch_size):
        if stop is not None and stop():
            raise Stopped(f"stopped after {state.frames_done} frames")
        gray = np.stack([rgb_to_gray(resize_if_needed(frame, height, width)) for frame in batch])
        small = np.stack([working_gray(g, size) for g in gray])
        cuts = [previous is not None and args.scene_cuts and is_scene_cut(previous, current, args.cut_threshold)
                for previous, current in zip([state.previous_small, *small[:-1]], small)]
        state.previous_small = small[-1]
        guide_gray = [working_gray(g, guide_size) if guides or exemplars else None for g in gray]
        frame_guides = [guides.step(state.frames_done + i, g, cut) if guides else (None, None)
                        for i, (g, cut) in enumerate(zip(guide_gray, cuts))]
        state.frames_done += len(batch)
        found = None
        if exemplars is not None and (exemplars_given or any(uses_keyframe_match(d) for d, _ in frame_guides)):
            match_size = exemplars.matcher.input_size(height, width)
            found = exemplars.colour(np.stack([working_gray(g, match_size) for g in gray]), size)
        hints = plain_hints = None
        if guides and colorizer.takes_hints:
            hints, plain_hints = propagator.hint_input(frame_guides, size)
        noise = []
        for cut in cuts:
            if cut:
                state.shot += 1
                shot_noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(args.seed + state.shot))
            noise.append(shot_noise if args.shared_noise else torch.randn(latent_shape,
                                                                            generator=state.noise_generator))
        vac_size = colorizer.vac_size(height, width)
        vac_gray = prepare_gray(gray, vac_size) if vac_size != size else None
        head_size = colorizer.head_size(height, width) if head_vividness is not None else None
        head_gray = prepare_gray(gray, head_size) if head_size is not None else None
        model_gray, batch_noise = prepare_gray(gray, size), torch.stack(noise)
        step_state = state.step_generator.get_state()

        def sample_chroma(hint_input: torch.Tensor | None, generator: torch.Generator) -> np.ndarray:
            chroma = colorizer.sample_chroma(model_gray, batch_noise, args.sampler, args.steps, args.guidance,
                                             generator=generator, hints=hint_input, vac_gray=vac_gray,
                                             vividness=head_vividness, output_gain=saturation,
                                             head_start=head_start, head_gray=head_gray, heads_lead=heads_lead)
            return chroma * saturation

        predicted = sample_chroma(hints, state.step_generator)
        plain = itertools.repeat(None)
        if plain_hints is not None:  # the same draws without the painted hints, which are kept where they reach
            plain = sample_chroma(plain_hints, torch.Generator().set_state(step_state))
        found_colour = zip(*found) if found is not None else itertools.repeat(None)
        for g, g_small, g_guide, chroma, plain_chroma, cut, frame_guide, colour in zip(
                gray, small, guide_gray, predicted, plain, cuts, frame_guides, found_colour):
            if frame_guide[0] is None and not exemplars_given:  # a keyframe's colour only where it travels: not
                colour = None  # across a scene cut
            yield combine(g, propagator.output_chroma(chroma, plain_chroma, g_small, g_guide, frame_guide, cut,
                                                      propagation, colour, args.guided_output, fusion))


def uses_keyframe_match(dense: Guide | None) -> bool:
    """Whether a frame's output uses the colour found in the keyframes: only where the keyframe's colour travels to
    it and is not vouched for everywhere (GuidePropagator.fused_chroma), so a batch of the shots after the keyframe's
    runs no matcher."""
    return dense is not None and bool((dense.confidence < 1.0).any())


def resize_if_needed(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frame folders may mix sizes; every frame of a clip is brought to the first frame's size."""
    import cv2

    if frame.shape[:2] == (height, width):
        return frame
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)


def output_bit_depth(choice: str, info: VideoInfo) -> int:
    """--bit-depth auto keeps the input's depth, as far as H.264 goes (10 bits)."""
    if choice == "auto":
        return 10 if info.bit_depth > 8 else 8
    return int(choice)


def pixels_and_timestamps(frames: Iterator[ClipFrame]) -> tuple[Iterator[np.ndarray], deque[int | None]]:
    """The frames' pixels, streamed, and a queue that each frame's timestamp joins as the frame is read:
    colorize_frames yields one output per input, in order, so an output's timestamp is the oldest one waiting."""
    timestamps: deque[int | None] = deque()

    def pixels() -> Iterator[np.ndarray]:
        for frame in frames:
            timestamps.append(frame.pts)
            yield frame.image

    return pixels(), timestamps


def colorize_clip(colorizer: Colorizer, clip: Path, output: Path, options: ColorizationOptions,
                  frame_bar: bool = True, start_over: bool = False, segment_frames: int = SEGMENT_FRAMES,
                  stop: Callable[[], bool] | None = None) -> int:
    """Colorize one clip into `output` (.mp4 or a PNG folder), written to a temporary path and renamed at the end.
    `frame_bar` False hides the frame progress bar (several processes would draw theirs over each other).

    The work is kept as it goes, in segments of `segment_frames` (whole batches) committed to resume_folder(output):
    the same call after a kill continues from the last segment, and writes what an uninterrupted run writes. A kept
    state of another input, other settings or another model is an error, unless `start_over` discards it. `stop`
    (asked before each batch) ends the run with Stopped when it returns True.

    The output is upright (a rotation tag is applied to the pixels), keeps the input's depth (--bit-depth) and, for a
    variable-rate video, the input's own frame timestamps."""
    info = probe_clip(clip)
    if info.frame_count == 0:
        raise UserError(f"{clip}: has no frames; pass a video with at least one frame")
    segment = options.batch_size * -(-segment_frames // options.batch_size)  # whole batches: a resume point
    folder = resume_folder(output)
    for name in {output.stem, output.name}:  # what a killed run left beside the output (its kept work stays)
        remove_stale_temporaries(output.parent, name)
    identity = run_identity(clip, options, colorizer, segment)
    state = kept_state(folder, identity, start_over)
    exemplars = [read_image_rgb(Path(path)) for path in options.exemplar]
    try:
        count = write_clip(colorizer, clip, output, options, frame_bar, info, state, identity, segment, exemplars,
                           stop)
    except BaseException as error:
        if isinstance(error, UserError) or not (folder / PROGRESS_FILE).exists():
            discard(folder)  # bad input fails again on a rerun; a run stopped before its first segment kept nothing
        raise
    discard(folder)
    return count


def write_clip(colorizer: Colorizer, clip: Path, output: Path, options: ColorizationOptions, frame_bar: bool,
               info: VideoInfo, state: ClipState | None, identity: dict[str, str], segment: int,
               exemplars: list[np.ndarray], stop: Callable[[], bool] | None) -> int:
    """colorize_clip's work from `state` (None: from frame 0), kept in segments, then the output from them."""
    from tqdm import tqdm

    folder = resume_folder(output)
    as_video = output.suffix.lower() == ".mp4"
    bit_depth = output_bit_depth(options.bit_depth, info)
    with atomic_path(output, overwrite=options.overwrite, is_dir=not as_video) as temp:
        if state is None:
            discard(folder)
            (folder if as_video else folder / "frames").mkdir(parents=True)
            state = start_state(options, load_guides(clip, info, options, colorizer, exemplars))
        else:
            print(f"{clip}: resuming from frame {state.frames_done} of {info.frame_count} (the work kept in "
                  f"{folder})", file=sys.stderr, flush=True)
        # Deep frames carry the input's luma at 16 bits through colorize_frames to the 10-bit output.
        pixels, timestamps = pixels_and_timestamps(iter_timed_frames(clip, deep=bit_depth > 8,
                                                                     start=state.frames_done))
        frames = colorize_frames(colorizer, pixels, options, (info.height, info.width),
                                 exemplars=load_exemplars(exemplars, options.learned_metric), state=state, stop=stop)
        # The bar (frames done, frames/s, time left) shows only on a terminal and is cleared when the clip ends or
        # fails, so an error stays one line; elsewhere (a log file) each segment kept prints a line of the same.
        with tqdm(frames, total=info.frame_count, initial=state.frames_done, desc=clip.name, unit="frame",
                  leave=False, disable=None if frame_bar else True) as bar:
            # a generator of our own: it stays exhausted, while the app's tqdm (gradio's) fails when asked again
            colorized = (frame for frame in bar)
            start, began = state.frames_done, (state.frames_done, time.monotonic())
            while (first := next(colorized, None)) is not None:
                write_part(itertools.chain([first], itertools.islice(colorized, segment - 1)), timestamps, folder,
                           start, as_video, info, options, bit_depth)
                save_state(folder, identity, state)
                start = state.frames_done
                if bar.disable and start < info.frame_count:
                    print(progress_line(clip.name, start, info.frame_count, *began), file=sys.stderr, flush=True)
        if state.frames_done < info.frame_count:  # inside the block: a short output is thrown away, never kept
            raise UserError(f"{clip}: only {state.frames_done} of its {info.frame_count} frames could be read; "
                            f"re-encode or replace it")
        if as_video:
            join_video(sorted(folder.glob("[0-9]*.mp4")), clip if has_audio(clip) else None, temp)
        else:
            os.replace(folder / "frames", temp)
    return state.frames_done


def progress_line(name: str, done: int, total: int, first: int, began: float) -> str:
    """`done` of `total` frames, and the rate and time left from the frames done since `first` (at `began`)."""
    from tqdm import tqdm

    rate = (done - first) / max(time.monotonic() - began, 1e-6)
    return (f"{name}: {done} of {total} frames, {rate:.2f} frames/s, "
            f"{tqdm.format_interval((total - done) / max(rate, 1e-6))} left")


def write_part(frames: Iterator[np.ndarray], timestamps: deque[int | None], folder: Path, start: int,
               as_video: bool, info: VideoInfo, options: ColorizationOptions, bit_depth: int) -> None:
    """One segment of a clip's output, frames `start`, ...: an mp4 of its own (named by its first frame, renamed into
    place once complete) or PNG frames in folder/frames."""
    if not as_video:
        for index, frame in enumerate(frames, start):
            write_image_rgb(folder / "frames" / f"{index:05d}.png", frame)
            timestamps.popleft()  # PNG frames have no timestamps; the queue is only kept short
        return
    path = folder / f"{start:08d}.mp4"
    temp = path.with_suffix(".tmp")
    # Evenly spaced frames at the average rate would drift from the copied audio on a variable-rate input: those
    # frames keep their own timestamps.
    time_base = info.time_base if info.variable_rate else None
    with VideoWriter(temp, info.width, info.height, info.fps, options.crf, bit_depth, time_base, start) as writer:
        for frame in frames:
            writer.write(frame, timestamps.popleft())
    durable_replace(temp, path)


def resume_folder(output: Path) -> Path:
    """Where a clip's work is kept until its output is complete: a hidden folder beside the output."""
    return output.with_name(f".{output.name}.resume")


def run_identity(clip: Path, options: ColorizationOptions, colorizer: Colorizer, segment: int) -> dict[str, str]:
    """Digests of what a run's output depends on, by what a user changes: the input file or frames, the settings
    (the flags, the guide images' contents, the segment length) and the model's weights."""
    files = list_frames(clip) if clip.is_dir() else [clip]
    settings = {name: value for name, value in asdict(options).items() if name != "overwrite"}
    guide_images = [parse_guide_spec(spec)[1] for spec in options.reference + options.hints] + options.exemplar
    model = hashlib.sha256(json.dumps(colorizer.config, sort_keys=True, default=str).encode())
    for module in (colorizer.unet, colorizer.vae, colorizer.vac, *colorizer.color_heads):
        for tensor in module.state_dict().values():
            model.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return {"input": digest(str(clip.resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]),
            "settings": digest(settings, segment, [Path(image).read_bytes() if Path(image).is_file() else None
                                                   for image in guide_images]),  # load_guides names a missing one
            "model": model.hexdigest()}


def digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def kept_state(folder: Path, identity: dict[str, str], start_over: bool) -> ClipState | None:
    """The state a killed run of the same command kept in `folder`, or None to start from frame 0 (none kept, or
    `start_over`). A state of another input, other settings or another model is never mixed in."""
    progress = folder / PROGRESS_FILE
    if start_over or not progress.exists():
        return None
    try:
        with open(progress, "rb") as file:
            kept = pickle.load(file)  # written by save_state: this run's own file, not input from elsewhere
    except Exception as error:
        raise UserError(f"{progress}: the kept work cannot be read ({first_line(error)}); pass --start-over to "
                        f"discard it") from None
    changed = [part for part in identity if kept["identity"].get(part) != identity[part]]
    if changed:
        raise UserError(f"{folder}: holds the unfinished work of a run with another {' and '.join(changed)}; run "
                        f"that command again to finish it, or pass --start-over to discard it")
    return kept["state"]


def save_state(folder: Path, identity: dict[str, str], state: ClipState) -> None:
    """Commit a segment: the state after it, written whole or not at all (a kill or a power cut leaves the last
    one)."""
    temp = folder / (PROGRESS_FILE + ".tmp")
    with open(temp, "wb") as file:
        pickle.dump({"identity": identity, "state": state}, file)
    durable_replace(temp, folder / PROGRESS_FILE)


def durable_replace(temp: Path, final: Path) -> None:
    """Rename `temp` onto `final` once its bytes are on the disk, so that a power cut never leaves a renamed file
    without its contents."""
    with open(temp, "rb") as file:
        os.fsync(file.fileno())
    os.replace(temp, final)
