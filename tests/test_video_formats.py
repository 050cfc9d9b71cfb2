"""Real-world footage keeps its timing, orientation and depth: variable frame rate, rotation tags, 10-bit video."""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import options, panning_clip

TICKS = Fraction(1, 16000)  # the time base phones and the clip use
PHONE_DURATIONS = [640, 320, 1280, 528]  # 40, 20, 80, 33 ms in 1/16000 s


@pytest.fixture(scope="module")
def colorizer(tiny_model):
    from colorizer import load_colorizer

    return load_colorizer(tiny_model, torch.device("cpu"))


def timestamps_from(durations: list[int], frame_count: int) -> list[int]:
    """Frame timestamps that cycle through `durations`."""
    return list(itertools.accumulate((durations[i % len(durations)] for i in range(frame_count - 1)), initial=0))


def write_clip(path: Path, frames: list, pts: list[int] | None = None, rotation: int = 0,
               pix_fmt: str = "yuv420p", audio_seconds: float = 0.0) -> Path:
    """An H.264 mp4 made with PyAV: RGB arrays or ready av.VideoFrames, at explicit timestamps (1/16000 s) or 25 fps,
    optionally with a display rotation (counter-clockwise degrees) and an AAC track."""
    import av

    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25)
        first = frames[0]
        height, width = (first.height, first.width) if isinstance(first, av.VideoFrame) else first.shape[:2]
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        if pts is not None:
            video.codec_context.time_base = video.time_base = TICKS
        if rotation:
            video.set_display_rotation(rotation)
        audio = out.add_stream("aac", rate=8000) if audio_seconds else None
        for k, frame in enumerate(frames):
            if not isinstance(frame, av.VideoFrame):
                frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[k], TICKS
            out.mux(video.encode(frame))
        if audio is not None:
            for k in range(int(audio_seconds * 8000 / 1024) + 1):
                samples = (0.3 * np.sin(np.arange(1024) * 0.05 + k)).astype(np.float32)[None]
                chunk = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 8000, k * 1024
                out.mux(audio.encode(chunk))
            out.mux(audio.encode())
        out.mux(video.encode())
    return path


def decoded(path: Path) -> tuple[Fraction, list]:
    """The video stream's time base and its decoded frames."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.time_base, list(container.decode(stream))


def luma_plane(frame) -> np.ndarray:
    """The Y plane of a decoded YUV frame as stored (no conversion), without the row padding."""
    plane = frame.planes[0]
    dtype = np.uint16 if "10" in frame.format.name else np.uint8
    return np.frombuffer(plane, dtype).reshape(plane.height, -1)[:, : plane.width].astype(int)


def test_constant_and_variable_rates_are_told_apart(gray_video):
    from video_io import is_variable_rate, probe_clip

    assert not probe_clip(gray_video).variable_rate  # 29.97 fps: written at its exact rate, as before
    assert not is_variable_rate([0, 1001, 2002, 3003])
    assert not is_variable_rate([0, 33, 67, 100, 133, 167])  # 29.97 fps rounded to milliseconds
    assert not is_variable_rate([0, 40, 40, 80])  # repeated timestamps cannot be copied: kept evenly spaced
    assert is_variable_rate(timestamps_from(PHONE_DURATIONS, 6))


def test_variable_rate_output_keeps_the_input_timestamps(colorizer, tmp_path):
    from pipeline import colorize_clip
    from video_io import probe_clip

    pts = timestamps_from(PHONE_DURATIONS, 10)
    source = write_clip(tmp_path / "vfr.mp4", panning_clip(10, (48, 64)), pts)
    assert probe_clip(source).variable_rate
    output = tmp_path / "out.mp4"
    assert colorize_clip(colorizer, source, output, options()) == 10
    (in_base, in_frames), (out_base, out_frames) = decoded(source), decoded(output)
    assert [f.pts for f in in_frames] == pts  # the input is what the test means it to be
    assert out_base == in_base == TICKS
    assert [f.pts for f in out_frames] == pts
    assert out_frames[0].format.name == "yuv420p"  # an 8-bit input stays 8-bit


def test_twenty_second_variable_rate_clip_stays_in_sync_with_its_audio(colorizer, tmp_path):
    """A clip that speeds up and slows down: evenly spaced frames would be seconds off in the middle."""
    import av

    from pipeline import colorize_clip

    fast, slow = [d * 2 for d in PHONE_DURATIONS], [d * 10 for d in PHONE_DURATIONS]  # 86 and 432 ms a frame
    pts = timestamps_from(fast, 48)
    while pts[-1] < 20 * 16000:
        pts.append(pts[-1] + slow[len(pts) % 4])
    frames = [panning_clip(1, (48, 64))[0]] * len(pts)
    source = write_clip(tmp_path / "phone.mp4", frames, pts, audio_seconds=20.5)
    output = tmp_path / "out.mp4"
    # in segments of 16 frames, each an mp4 of its own: joined, they keep every frame's timestamp
    assert colorize_clip(colorizer, source, output, options(propagation=0.0), segment_frames=16) == len(pts)

    def times(path: Path) -> tuple[list[float], list[bytes]]:
        """Each video frame's time in seconds, and the audio packets."""
        time_base, frames = decoded(path)
        with av.open(str(path)) as container:
            audio = [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]
        return [float(f.pts * time_base) for f in frames], audio

    (in_video, in_audio), (out_video, out_audio) = times(source), times(output)
    assert in_video[-1] >= 20.0 and len(in_audio) > 150
    shortest = min(fast) * TICKS
    assert abs(out_video[-1] - in_video[-1]) < shortest  # the last frame shows with its sound
    assert max(abs(a - b) for a, b in zip(out_video, in_video)) < shortest  # and so does every other
    assert out_audio == in_audio


@pytest.mark.parametrize("rotation", [-90, 90, 180])
def test_rotated_phone_video_comes_out_upright(colorizer, tmp_path, rotation):
    """A portrait picture stored turned, with a display matrix that turns it back: the output is stored upright and
    carries no rotation, so every player shows it the way the input is shown."""
    from pipeline import colorize_clip
    from utils import rgb_to_gray
    from video_io import iter_clip_frames, probe_clip

    upright = panning_clip(3, (64, 48))  # portrait: 64 high, 48 wide
    stored = [np.ascontiguousarray(np.rot90(f, -rotation // 90)) for f in upright]
    source = write_clip(tmp_path / "phone.mp4", stored, rotation=rotation)
    _, frames = decoded(source)
    assert frames[0].rotation % 360 == rotation % 360 and frames[0].to_ndarray(format="rgb24").shape == stored[0].shape
    info = probe_clip(source)
    assert (info.height, info.width) == (64, 48)
    assert all(np.abs(a.astype(int) - b).mean() < 4 for a, b in zip(iter_clip_frames(source), upright))

    output = tmp_path / "out.mp4"
    assert colorize_clip(colorizer, source, output, options()) == 3
    _, frames = decoded(output)
    for frame, expected in zip(frames, upright):
        assert frame.rotation == 0
        shown = rgb_to_gray(frame.to_ndarray(format="rgb24")).astype(int)
        assert shown.shape == (64, 48)
        error = np.abs(shown - rgb_to_gray(expected)).mean()
        assert error < 4 and error < np.abs(shown - rgb_to_gray(np.rot90(expected, 2))).mean() / 4


def ten_bit_frames(frame_count: int, size: tuple[int, int] = (48, 64)) -> list:
    """yuv420p10le frames whose luma has detail 8 bits cannot hold (steps of one 10-bit level), kept inside the legal
    range 64-940, with a little colour."""
    import av

    from utils import rgb_to_gray

    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for k, picture in enumerate(panning_clip(frame_count, size)):
        luma = 128 + 3 * rgb_to_gray(picture).astype(np.uint16) + (xx + yy + k) % 3
        chroma = np.full((height // 2, width // 2), 512, np.uint16) + (xx[::2, ::2] // 4).astype(np.uint16)
        frame = av.VideoFrame(width, height, "yuv420p10le")
        for plane, values in zip(frame.planes, (luma, chroma, chroma[::-1])):
            rows = np.frombuffer(plane, np.uint16).reshape(plane.height, -1)
            rows[:, : values.shape[1]] = values
        frames.append(frame)
    return frames


def test_ten_bit_luma_goes_through_the_pipeline_to_within_one_level(colorizer, tmp_path):
    """Read at depth, colorized and converted to the encoder's 10-bit YUV (all but the lossy compression)."""
    import av

    from pipeline import colorize_frames
    from video_io import iter_timed_frames

    source = write_clip(tmp_path / "ten.mp4", ten_bit_frames(3), pix_fmt="yuv420p10le")
    _, inputs = decoded(source)
    images = [frame.image for frame in iter_timed_frames(source, deep=True)]
    assert images[0].dtype == np.uint16
    outputs = list(colorize_frames(colorizer, iter(images), options(), images[0].shape[:2]))
    for frame, image in zip(inputs, outputs):
        assert image.dtype == np.uint16
        encoded = av.VideoFrame.from_ndarray(image, format="rgb48le").reformat(format="yuv420p10le")
        assert np.abs(luma_plane(encoded) - luma_plane(frame)).max() <= 1
    eight_bit = list(colorize_frames(colorizer, (f.image for f in iter_timed_frames(source)), options(), (48, 64)))
    as_ten_bits = av.VideoFrame.from_ndarray(eight_bit[0], format="rgb24").reformat(format="yuv420p10le")
    assert np.abs(luma_plane(as_ten_bits) - luma_plane(inputs[0])).max() > 1  # the 8-bit path would fail the check


def test_ten_bit_video_is_written_with_ten_bits(colorizer, tmp_path):
    import cv2

    from pipeline import colorize_clip
    from video_io import probe_clip

    source = write_clip(tmp_path / "ten.mp4", ten_bit_frames(4), pix_fmt="yuv420p10le")
    assert probe_clip(source).bit_depth == 10
    output = tmp_path / "out.mp4"
    assert colorize_clip(colorizer, source, output, options(crf=0)) == 4  # lossless: nothing hides a lost bit
    _, inputs = decoded(source)
    _, outputs = decoded(output)
    assert [f.format.name for f in outputs] == ["yuv420p10le"] * 4
    for frame, result in zip(inputs, outputs):
        assert np.abs(luma_plane(result) - luma_plane(frame)).max() <= 1

    eight = tmp_path / "eight.mp4"
    assert colorize_clip(colorizer, source, eight, options(bit_depth="8")) == 4
    assert decoded(eight)[1][0].format.name == "yuv420p"
    assert colorize_clip(colorizer, source, tmp_path / "frames", options()) == 4
    assert cv2.imread(str(tmp_path / "frames" / "00000.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # 16-bit PNGs
