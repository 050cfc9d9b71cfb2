"""Frames and videos in and out: clips (video files and frame folders; their names, and pairing two folders of them
by name), image decoding, timestamps, audio."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from utils import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")


# ---------------------------------------------------------------------------------------------------------------
# Clips


def natural_key(path: Path) -> list:
    """Sort key that orders numbers by value, so frame 2 comes before frame 10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def is_video_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def list_frames(folder: Path) -> list[Path]:
    """The image files of a frame folder, in natural order."""
    frames = (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(frames, key=natural_key)


def list_clips(root: Path) -> list[Path]:
    """The clips under `root`: `root` itself when it is a video or a frame folder, else its videos and frame folders."""
    if not root.exists():
        raise UserError(f"{root}: no such file or folder; check the path")
    if root.is_file():
        if not is_video_file(root):
            raise UserError(f"{root}: not a video ({', '.join(VIDEO_EXTENSIONS)}); pass a video or a frame folder")
        return [root]
    if list_frames(root):
        return [root]
    clips = [p for p in sorted(root.iterdir(), key=natural_key) if is_video_file(p) or (p.is_dir() and list_frames(p))]
    if not clips:
        raise UserError(f"{root}: no frames or videos inside; expected root/<clip>/00000.jpg ... or video files")
    return clips


def clip_name(path: Path) -> str:
    """A video x.mp4 and a frame folder x/ both name the clip x."""
    return path.stem if path.is_file() else path.name


def _clips_by_name(root: Path) -> dict[str, Path]:
    clips: dict[str, Path] = {}
    for path in list_clips(root):
        name = clip_name(path)
        if name in clips:
            raise UserError(f"{root}: both {clips[name].name} and {path.name} are clip '{name}'; keep one")
        clips[name] = path
    return clips


def match_clips(pred_root: Path | None, gt_root: Path) -> list[tuple[str, Path | None, Path]]:
    """Colorized clips paired with their ground truth (evaluate.py): (name, prediction or None, ground truth) per
    clip. A single clip against a single clip pairs whatever the names; otherwise clips pair by name. Without a
    prediction every ground-truth clip is listed."""
    gt_clips = _clips_by_name(gt_root)
    if pred_root is None:
        return [(name, None, path) for name, path in gt_clips.items()]
    pred_clips = _clips_by_name(pred_root)
    pred_is_clip = list(pred_clips.values()) == [pred_root]
    if pred_is_clip and list(gt_clips.values()) == [gt_root]:
        return [(clip_name(pred_root), pred_root, gt_root)]
    missing = [name for name in pred_clips if name not in gt_clips]
    if missing:
        names = ", ".join(list(gt_clips)[:6]) + (", ..." if len(gt_clips) > 6 else "")
        raise UserError(f"{pred_clips[missing[0]]}: no ground-truth clip named '{missing[0]}' in {gt_root} "
                        f"(it has {names}); rename it to match")
    unmatched = [name for name in gt_clips if name not in pred_clips]
    if unmatched and not pred_is_clip:
        print(f"warning: {pred_root}: no prediction for {len(unmatched)} ground-truth clip(s) "
              f"({', '.join(unmatched)}); their scores are left out of the means", file=sys.stderr)
    return [(name, pred_clips[name], gt_clips[name]) for name in pred_clips]


# ---------------------------------------------------------------------------------------------------------------
# Images


JPEG_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file")  # libjpeg's warnings about a damaged file


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[list[str]]:
    """Collect what native libraries (libjpeg, libpng) print on file descriptor 2 inside the block; the text is
    in the yielded list's first item afterwards."""
    captured: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        captured.append("")
        yield captured
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield captured
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                captured.append(sink.read().decode(errors="replace"))
    finally:
        os.close(saved)


def read_image_rgb(path: Path) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB, whatever its channels (gray, RGBA) or depth (8 or 16 bit)."""
    import cv2

    image = decode_image_8bit(path)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image_rgba(path: Path) -> np.ndarray:
    """Read an image with an alpha channel as HxWx4 uint8 RGBA (8 or 16 bit); an image without one is an error."""
    import cv2

    image = decode_image_8bit(path)
    if image.ndim == 2 or image.shape[2] != 4:
        raise UserError(f"{path}: has no alpha channel; save it as an RGBA PNG, hints opaque on a transparent "
                        f"background")
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)


def decode_image_8bit(path: Path) -> np.ndarray:
    """An image file as OpenCV decodes it (BGR, BGRA or gray), brought to 8 bits.

    A damaged file is an error naming it: libjpeg decodes a truncated or corrupt JPEG into a half-gray picture with
    only a warning on stderr, so those warnings are caught and turned into the error."""
    import cv2

    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror or error}); check the file") from None
    with captured_native_stderr() as messages:
        try:
            image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        except cv2.error:
            image = None
    lines = [line.strip() for line in messages[0].splitlines() if line.strip()]
    damage = [line for line in lines if line.startswith(JPEG_DAMAGE)]
    if image is None or image.size == 0 or damage:
        reason = f" ({(damage or lines)[0]})" if lines else ""
        raise UserError(f"{path}: cannot be decoded as an image{reason}; replace or remove the file")
    sys.stderr.write(messages[0])  # harmless library warnings stay visible
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise UserError(f"{path}: unsupported pixel type {image.dtype}; convert it to 8 or 16-bit PNG/JPEG")
    return image


def write_image_rgb(path: Path, image: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise UserError(f"{path}: cannot be written; check the folder is writable")


# ---------------------------------------------------------------------------------------------------------------
# Videos


@dataclass
class VideoInfo:
    width: int  # as displayed: a phone video stored sideways with a rotation tag reports its upright size
    height: int
    fps: Fraction
    frame_count: int
    bit_depth: int = 8  # of the luma samples
    time_base: Fraction | None = None  # of the frame timestamps; None for frame folders
    variable_rate: bool = False  # frame durations differ: the output must copy the timestamps to stay in sync


@dataclass
class ClipFrame:
    image: np.ndarray  # HxWx3 RGB as displayed (upright): uint8, or uint16 at 16-bit scale when read deep
    pts: int | None  # presentation time in the stream's time base; None for frame folders


def probe_clip(source: Path) -> VideoInfo:
    """Size (upright), frame rate, frame count, bit depth and timing of a video file or frame folder (frame folders
    are taken as 25 fps, 8-bit)."""
    source = Path(source)
    if source.is_dir():
        frames = list_frames(source)
        if not frames:
            raise UserError(f"{source}: no images inside; expected frames named 00000.jpg, 00001.jpg, ...")
        first = read_image_rgb(frames[0])
        return VideoInfo(first.shape[1], first.shape[0], Fraction(25), len(frames))
    import av

    try:
        with av.open(str(source)) as container:
            if not container.streams.video:
                raise UserError(f"{source}: has no video stream (no frames); pass a video with at least one frame")
            stream = container.streams.video[0]
            fps = stream.average_rate or stream.guessed_rate or Fraction(25)
            count = stream.frames or sum(1 for _ in container.decode(video=0))
            width, height = stream.codec_context.width, stream.codec_context.height
            bit_depth = max((c.bits for c in stream.format.components), default=8) if stream.format else 8
            time_base = stream.time_base
    except av.error.FFmpegError as error:
        raise UserError(f"{source}: cannot be read as a video ({av_reason(error)}); re-encode or replace it") from None
    if not width or not height:
        raise UserError(f"{source}: its video stream has no frame size; re-encode or replace it")
    quarter_turns, timestamps = scan_rotation_and_timestamps(source)
    if quarter_turns % 2:
        width, height = height, width
    return VideoInfo(width, height, Fraction(fps), count, bit_depth, time_base, is_variable_rate(timestamps))


def scan_rotation_and_timestamps(source: Path) -> tuple[int, list[int]]:
    """The quarter turns that show a video upright (from its first frame) and its frames' timestamps in
    presentation order (from the packets: only the first frame is decoded). A damaged part ends the scan early: the
    frame reader reports damage, naming the frame."""
    import av

    quarter_turns, timestamps, first = 0, [], None
    with contextlib.suppress(av.error.FFmpegError), av.open(str(source)) as container:
        for packet in container.demux(container.streams.video[0]):
            if packet.pts is not None:
                timestamps.append(packet.pts)
            if first is None:
                first = next(iter(packet.decode()), None)
                quarter_turns = display_quarter_turns(first) if first is not None else 0
    return quarter_turns, sorted(timestamps)


def is_variable_rate(timestamps: list[int]) -> bool:
    """Whether frame durations differ by more than one tick of the time base: one tick is how a constant rate that
    the time base cannot represent is rounded (29.97 fps in milliseconds: 33, 34, 33 ms). Repeated timestamps
    cannot be copied into an output (the encoder needs them increasing): such a clip is taken as constant-rate."""
    durations = np.diff(timestamps)
    return durations.size > 0 and durations.min() > 0 and durations.max() - durations.min() > 1


def display_quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns (0-3) that show `frame` as intended: phones store portrait video sideways
    with a display matrix saying how to turn it (PyAV's frame.rotation, counter-clockwise degrees; other angles than
    quarter turns are rounded to the nearest one)."""
    return round(frame.rotation / 90) % 4


def av_reason(error: Exception) -> str:
    """FFmpeg's message without the errno and the path (the caller names the file)."""
    return getattr(error, "strerror", None) or str(error)


def iter_clip_frames(source: Path) -> Iterator[np.ndarray]:
    """Yield the frames of a video file or frame folder as HxWx3 uint8 RGB, upright, one at a time (bounded memory).
    See iter_timed_frames."""
    return (frame.image for frame in iter_timed_frames(source))


def iter_timed_frames(source: Path, deep: bool = False, start: int = 0) -> Iterator[ClipFrame]:
    """Yield the frames of a video file or frame folder with their timestamps, one at a time (bounded memory), as
    HxWx3 RGB turned upright: uint8, or with `deep` uint16 at 16-bit scale (10-bit video keeps its depth); from frame
    `start` on (a video's earlier frames are decoded, which is exact, and not converted).

    Damaged input is an error, never a shorter clip: an undecodable image or video packet, or a video that ends
    before the frame count in its header (a truncated download), raises UserError naming the file and frame."""
    source = Path(source)
    if source.is_dir():
        for path in list_frames(source)[start:]:
            image = read_image_rgb(path)
            yield ClipFrame(image.astype(np.uint16) * 257 if deep else image, None)  # 255 * 257 = 65535
        return
    import av

    count = declared = 0
    try:
        container = av.open(str(source))
    except av.error.FFmpegError as error:
        raise UserError(f"{source}: cannot be read as a video ({av_reason(error)}); re-encode or replace it") from None
    try:
        with container:
            if not container.streams.video:
                raise UserError(f"{source}: has no video stream (no frames); pass a video with at least one frame")
            declared = container.streams.video[0].frames
            for frame in container.decode(video=0):
                count += 1
                if count <= start:
                    continue
                image = frame.to_ndarray(format="rgb48le" if deep else "rgb24")
                yield ClipFrame(np.ascontiguousarray(np.rot90(image, display_quarter_turns(frame))), frame.pts)
    except av.error.FFmpegError as error:
        raise UserError(f"{source}: frame {count} cannot be decoded ({av_reason(error)}); the video is damaged: "
                        f"re-encode or replace it") from None
    if count < declared:
        raise UserError(f"{source}: only {count} of its {declared} frames can be decoded (truncated or damaged); "
                        f"re-encode or replace it")


class VideoWriter:
    """Write RGB frames (uint8, or uint16 at 16-bit scale) to an H.264 mp4 of 8 or 10 bits: at an exact constant
    frame rate (for example 30000/1001; the first frame is frame `first_frame` of the clip, so that the parts of a
    clip written one after another join into one video, see join_video), or, given a time base, at the timestamps
    passed with each frame (a variable-rate input's own, so that its audio stays in sync)."""

    def __init__(self, path: Path, width: int, height: int, fps: Fraction, crf: int = 18, bit_depth: int = 8,
                 time_base: Fraction | None = None, first_frame: int = 0):
        import av

        if bit_depth not in (8, 10):
            raise ValueError(f"bit_depth {bit_depth}: H.264 is written with 8 or 10 bits")
        self.container = av.open(str(path), mode="w", format="mp4")
        self.rate = Fraction(fps).limit_denominator(100000)
        self.stream = self.container.add_stream("libx264", rate=self.rate)
        self.next_frame = first_frame
        self.stream.width, self.stream.height = width, height
        # 4:2:0 needs even sizes; odd-sized frames keep full chroma instead of being cropped.
        subsampling = "420" if width % 2 == 0 and height % 2 == 0 else "444"
        self.stream.pix_fmt = f"yuv{subsampling}p" + ("10le" if bit_depth == 10 else "")
        # x264's crf 0 is lossless only at 8 bits; qp 0 is lossless at any depth. Its macroblock-tree rate control
        # reads memory it never wrote (the same frames, single-threaded, encoded differently whenever the heap held
        # other bytes: a 854x480 clip differed by up to 31 levels after decoding, run to run), so it is off and the
        # same frames always make the same file.
        self.stream.options = {"qp": "0"} if crf == 0 else {"crf": str(crf)}
        self.stream.options["x264-params"] = "mbtree=0"
        self.time_base = time_base
        if time_base is not None:  # the encoder and the file count in the input's own ticks, so none is rounded
            self.stream.codec_context.time_base = time_base
            self.stream.time_base = time_base

    def write(self, frame: np.ndarray, pts: int | None = None) -> None:
        """Add a frame; `pts` (in the time base given) is used only when the writer was given one."""
        import av

        pixel_format = "rgb48le" if frame.dtype == np.uint16 else "rgb24"
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=pixel_format)
        if self.time_base is not None:
            video_frame.pts, video_frame.time_base = pts, self.time_base
        else:
            video_frame.pts, video_frame.time_base = self.next_frame, 1 / self.rate
            self.next_frame += 1
        try:
            self.container.mux(self.stream.encode(video_frame))
        except av.error.FFmpegError as error:
            raise UserError(f"{self.container.name}: cannot be written ({av_reason(error)}); check the disk") from None

    def close(self) -> None:
        import av

        try:
            self.container.mux(self.stream.encode())
            self.container.close()
        except av.error.FFmpegError as error:
            raise UserError(f"{self.container.name}: cannot be written ({av_reason(error)}); check the disk") from None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # the file is being thrown away: close it without masking the error in flight
            with contextlib.suppress(Exception):
                self.container.close()


def has_audio(source: Path) -> bool:
    import av

    if Path(source).is_dir():
        return False
    try:
        with av.open(str(source)) as container:
            return bool(container.streams.audio)
    except av.error.FFmpegError:
        return False


def join_video(parts: list[Path], audio_source: Path | None, output: Path) -> None:
    """Write `output` with the video packets of `parts` (mp4s of one clip's consecutive frames, written by
    VideoWriter with the same settings) one after another and every audio stream of `audio_source` (a video, or
    None), all copied unchanged (no re-encoding), so the soundtrack is bit-identical and stays in sync."""
    import av

    with contextlib.ExitStack() as stack:
        videos = [stack.enter_context(av.open(str(part))) for part in parts]
        audio = stack.enter_context(av.open(str(audio_source))).streams.audio if audio_source else []
        out = stack.enter_context(av.open(str(output), mode="w", format="mp4"))
        video_stream = out.add_stream_from_template(videos[0].streams.video[0])
        targets = {id(v.streams.video[0]): video_stream for v in videos}
        targets.update({id(s): out.add_stream_from_template(s) for s in audio})
        video_packets = itertools.chain.from_iterable(v.demux(v.streams.video[0]) for v in videos)
        audio_packets = audio[0].container.demux(*audio) if audio else iter(())
        # Interleave by time, so the muxer never has to buffer a whole stream.
        packets = heapq.merge(video_packets, audio_packets, key=lambda p: float((p.dts or 0) * p.time_base))
        last_dts = None
        for packet in packets:
            if packet.dts is None:
                continue
            if packet.stream.type == "video":
                # A part's decoding times start before its first frame by the B-frames' delay, which at a
                # variable rate can reach back past the previous part's last one: they are moved up, never past
                # the packet's presentation time, which (as the order of the packets) stays as encoded.
                if last_dts is not None and packet.dts <= last_dts:
                    packet.dts = min(last_dts + 1, packet.pts)
                last_dts = packet.dts
            packet.stream = targets[id(packet.stream)]
            out.mux(packet)
