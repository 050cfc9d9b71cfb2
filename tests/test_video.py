"""The production video path: luma kept, any size, exact frame rate, audio, shots, steadiness, streaming."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import options, panning_clip, script_parts


def test_the_command_line_builds_the_options_with_their_defaults():
    from pipeline import ColorizationOptions, parse_options

    parse_args = script_parts("video_colorization")["parse_args"]
    args, settings = parse_args(["--input", "clip.mp4"])
    assert settings == ColorizationOptions() and args.input == Path("clip.mp4") and not hasattr(args, "steps")
    flags = ["--sampler", "ddpm", "--steps", "3", "--no-shared-noise", "--propagation", "0.0", "--reference",
             "5=key.png", "--hints", "dots.png", "--crf", "0", "--bit-depth", "8", "--overwrite"]
    args, settings = parse_args(["--input", "clip.mp4", "--skip-existing", *flags][:-1])
    expected = ColorizationOptions(sampler="ddpm", steps=3, shared_noise=False, propagation=0.0,
                                   reference=["5=key.png"], hints=["dots.png"], crf=0, bit_depth="8")
    assert settings == expected and args.skip_existing
    assert parse_args(["--input", "clip.mp4", *flags])[1].flags() == flags  # flags() gives the flags back
    assert parse_options(["--steps", "2", "--no-scene-cuts"]) == ColorizationOptions(steps=2, scene_cuts=False)


@pytest.mark.parametrize("bad", [{"propagation": 1.0}, {"saturation": -1.0}, {"crf": 52}, {"steps": 0},
                                 {"batch_size": 0}, {"sampler": "plms"}, {"bit_depth": "12"}])
def test_options_made_in_code_are_checked_as_the_command_line_checks_its_flags(bad):
    from pipeline import ColorizationOptions
    from utils import UserError

    ColorizationOptions().check()
    with pytest.raises(UserError):
        ColorizationOptions(**bad).check()


@pytest.fixture(scope="module")
def colorizer(tiny_model):
    from colorizer import load_colorizer

    return load_colorizer(tiny_model, torch.device("cpu"))


def colorize(colorizer, frames, **overrides) -> list[np.ndarray]:
    from pipeline import colorize_frames

    return list(colorize_frames(colorizer, iter(frames), options(**overrides), frames[0].shape[:2]))


@pytest.mark.parametrize("size", [(9, 17), (1920, 1080), (48, 64)])
def test_output_keeps_size_and_input_luma(colorizer, size):
    import cv2
    from utils import rgb_to_gray

    frames = [cv2.resize(f, (size[1], size[0]), interpolation=cv2.INTER_AREA) for f in panning_clip(3)]
    output = colorize(colorizer, frames)
    assert len(output) == 3
    for frame, result in zip(frames, output):
        assert result.shape == frame.shape
        assert np.abs(rgb_to_gray(result).astype(int) - rgb_to_gray(frame)).max() <= 1


def test_colour_input_is_recolorized_from_its_luma(colorizer):
    from utils import rgb_to_gray

    frames = panning_clip(2)
    gray_frames = [np.repeat(rgb_to_gray(f)[..., None], 3, axis=2) for f in frames]
    assert all(np.array_equal(a, b) for a, b in zip(colorize(colorizer, frames), colorize(colorizer, gray_frames)))


def test_frames_are_streamed_not_collected(colorizer):
    from pipeline import colorize_frames

    pulled = []

    def source():
        for i, frame in enumerate(panning_clip(12)):
            pulled.append(i)
            yield frame

    outputs = colorize_frames(colorizer, source(), options(batch_size=4), (72, 96))
    next(outputs)
    assert len(pulled) <= 5  # one batch (and the look-ahead that ends it), not the clip


def test_scene_cut_detection_finds_only_the_cut():
    from skimage import data
    from pipeline import is_scene_cut
    from utils import rgb_to_gray

    first = [rgb_to_gray(f) for f in panning_clip(6)]
    second = [rgb_to_gray(np.ascontiguousarray(data.coffee()[i : i + 72, 2 * i : 2 * i + 96])) for i in range(6)]
    clip = first + second
    cuts = [i for i in range(1, len(clip)) if is_scene_cut(clip[i - 1], clip[i], 0.35)]
    assert cuts == [6]


def test_scene_cut_starts_a_new_shot(colorizer):
    """After a cut, nothing of the previous shot is carried over: the second shot colours exactly as if alone."""
    import cv2
    from skimage import data

    first = panning_clip(4)
    second = [cv2.resize(data.coffee(), (96, 72), interpolation=cv2.INTER_AREA)] * 4
    together = colorize(colorizer, first + second, batch_size=3)
    alone = colorize(colorizer, second, batch_size=3, seed=1)  # shot 1 draws its noise with seed + 1
    # (batches are composed differently, so allow float rounding differences of a level or two)
    assert all(np.abs(a.astype(int) - b).max() <= 2 for a, b in zip(together[4:], alone))
    without_cuts = colorize(colorizer, first + second, batch_size=3, scene_cuts=False)
    assert np.abs(without_cuts[4].astype(int) - together[4]).max() > 2


def chroma_flicker(frames: list[np.ndarray]) -> float:
    from utils import rgb_to_chroma

    chroma = [rgb_to_chroma(f) for f in frames]
    return float(np.mean([np.abs(a - b).mean() for a, b in zip(chroma, chroma[1:])]))


def test_shared_noise_and_propagation_each_reduce_flicker(colorizer):
    frames = panning_clip(8)
    independent = chroma_flicker(colorize(colorizer, frames, shared_noise=False, propagation=0.0))
    shared = chroma_flicker(colorize(colorizer, frames, propagation=0.0))
    propagated = chroma_flicker(colorize(colorizer, frames, shared_noise=False, propagation=0.8))
    assert shared < independent and propagated < independent


def test_a_seed_reproduces_stochastic_sampling(colorizer):
    frames = panning_clip(3)
    ddpm = {"sampler": "ddpm", "steps": 3, "propagation": 0.0}
    first = colorize(colorizer, frames, **ddpm)
    torch.manual_seed(123)  # the state of torch's global generator must not matter
    again = colorize(colorizer, frames, **ddpm)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = colorize(colorizer, frames, **ddpm, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_saturation_scales_the_chroma_and_zero_gives_the_gray_input(colorizer):
    from utils import rgb_to_chroma, rgb_to_gray

    frames = panning_clip(2)
    plain = [rgb_to_chroma(f) for f in colorize(colorizer, frames, propagation=0.0, saturation=1.0)]
    doubled = [rgb_to_chroma(f) for f in colorize(colorizer, frames, propagation=0.0, saturation=2.0)]
    # where doubled colours stay inside the RGB cube (elsewhere chroma is scaled back in, keeping the luma)
    luma = rgb_to_gray(frames[0])
    in_gamut = (luma > 64) & (luma < 192) & (np.abs(plain[0]).max(axis=2) < 8)
    assert in_gamut.sum() >= 50 and np.abs(plain[0][in_gamut]).mean() > 1.0  # the check below is not vacuous
    assert np.abs(doubled[0][in_gamut] - 2 * plain[0][in_gamut]).mean() < 1.0
    assert np.abs(doubled[0]).mean() > 1.3 * np.abs(plain[0]).mean()
    gray = colorize(colorizer, frames, saturation=0.0)
    for frame, out in zip(frames, gray):
        assert np.abs(out.astype(int) - rgb_to_gray(frame)[..., None]).max() <= 1


def test_audio_is_copied_and_timing_kept(colorizer, tmp_path):
    import av
    from pipeline import colorize_clip
    from video_io import probe_clip

    source = tmp_path / "with_audio.mp4"
    with av.open(str(source), "w") as out:
        video = out.add_stream("libx264", rate=Fraction(30000, 1001))
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=44100)
        for frame in panning_clip(15, (48, 64)):
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        for k in range(22):
            samples = (0.3 * np.sin(np.arange(1024) * 0.05 + k)).astype(np.float32)[None]
            chunk = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 44100, k * 1024
            out.mux(audio.encode(chunk))
        out.mux(video.encode())
        out.mux(audio.encode())
    output = tmp_path / "out.mp4"
    assert colorize_clip(colorizer, source, output, options()) == 15

    def audio_packets(path: Path) -> list[bytes]:
        with av.open(str(path)) as container:
            return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]

    assert audio_packets(output) == audio_packets(source) and len(audio_packets(source)) > 10
    before, after = probe_clip(source), probe_clip(output)
    assert after.fps == Fraction(30000, 1001) and after.frame_count == before.frame_count
    with av.open(str(source)) as a, av.open(str(output)) as b:
        assert abs(a.duration - b.duration) <= 1e6 / 29.97 + 1  # within one frame (microseconds)
    assert not list(tmp_path.glob(".*tmp*"))


def leave_noise_in_freed_memory(seed: int) -> None:
    """Random bytes in the blocks the C heap hands out next, as a long run's work leaves them: a fresh process's
    heap is zeros, which hides a library's reads of memory it never wrote."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    rng = np.random.default_rng(seed)
    blocks = []
    for size in rng.integers(64, 120_000, 3000).tolist():
        blocks.append(libc.malloc(size))
        ctypes.memmove(blocks[-1], rng.bytes(size), size)
    for block in blocks:
        libc.free(block)


def test_the_same_command_writes_the_same_video(colorizer, tmp_path):
    """Two shots of an mp4 colorized twice, the heap holding other bytes each time: identical decoded frames (x264's
    macroblock-tree rate control read memory it never wrote, and the first shot differed run to run)."""
    import cv2
    from skimage import data
    from pipeline import colorize_clip
    from utils import rgb_to_gray
    from video_io import VideoWriter, iter_clip_frames

    coffee = [cv2.resize(data.coffee()[i : i + 300, 4 * i : 4 * i + 400], (96, 72), interpolation=cv2.INTER_AREA)
              for i in range(6)]
    source = tmp_path / "shots.mp4"
    with VideoWriter(source, 96, 72, Fraction(25)) as writer:
        for frame in panning_clip(6) + coffee:
            writer.write(np.repeat(rgb_to_gray(frame)[..., None], 3, axis=2))
    runs = []
    for seed in (0, 1):
        leave_noise_in_freed_memory(seed)
        colorize_clip(colorizer, source, tmp_path / f"run{seed}.mp4", options())
        runs.append(list(iter_clip_frames(tmp_path / f"run{seed}.mp4")))
    assert len(runs[0]) == len(runs[1]) == 12
    assert max(np.abs(a.astype(int) - b).max() for a, b in zip(*runs)) == 0
