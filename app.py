"""A browser app for guided colorization: load a grayscale video (or the demo clip), colorize it, then guide it with
colour strokes painted on a frame or a coloured version of a frame, and colorize again.

  python app.py                                   # -> http://127.0.0.1:7860
  python app.py --model runs/mine --port 8080

The page runs the command line's own code: pipeline.colorize_clip with its ColorizationOptions.
Painted strokes become `--hints N=IMAGE` and an uploaded keyframe `--reference N=IMAGE`, so the page and the CLI
give the same video (frame count, frame rate, size and audio kept). Colorizations run one at a time and the others
wait in gradio's queue, each tab shown its place; the Stop button or closing the tab ends a run within a batch. It
listens on this machine only unless --host says otherwise, makes no share link, sends no telemetry and downloads
nothing.
"""

from __future__ import annotations

import argparse
import html
import itertools
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no telemetry, no version check

import gradio as gr  # noqa: E402

from colorizer import DEFAULT_MODEL, Colorizer, load_colorizer  # noqa: E402
from demo import make_demo_clip  # noqa: E402
from pipeline import ColorizationOptions, Stopped, colorize_clip  # noqa: E402
from utils import UserError, choose_device, run_cli, seed_everything  # noqa: E402
from video_io import iter_clip_frames, probe_clip  # noqa: E402

GUIDE_NAMES = {"--reference": "keyframe (a coloured version of the frame)", "--hints": "painted hints",
               "--exemplar": "exemplar (a colour image of the scene, for every frame)"}


def parse_app_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model folder or training run folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 opens the page to the network (it has no login)")
    parser.add_argument("--port", type=int, default=7860)
    # Colorizing runs at a few frames per second on a CPU: the limits keep one request from holding the page for
    # hours. video_colorization.py has none and streams any length.
    parser.add_argument("--max-frames", type=int, default=1800, help="longest video the page colorizes, in frames")
    parser.add_argument("--max-pixels", type=int, default=1920 * 1080, help="largest frame (width x height)")
    parser.add_argument("--max-file-size", default="500mb", help="largest upload (gradio's size syntax)")
    return parser.parse_args(argv)


@dataclass
class Guide:
    frame: int
    flag: str  # "--reference", "--hints" or "--exemplar", the CLI flag it becomes
    path: Path


@dataclass
class Session:
    """What one browser tab has loaded: its clip, the guides given so far, and a folder for its files."""

    folder: Path | None = None
    clip: Path | None = None
    frame_count: int = 0
    guides: list[Guide] = field(default_factory=list)

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def page_error(problem: str | UserError) -> gr.Error:
    """A one-line message shown in the page (escaped: gr.Error renders HTML, and a path may hold < or &), with no
    traceback in the console: bad input is the user's to fix, not a crash."""
    message = " ".join(line.strip() for line in str(problem).splitlines() if line.strip())
    return gr.Error(html.escape(message), print_exception=False)


def limits_note(options: argparse.Namespace) -> str:
    """The page's limits, stated where a video is loaded: a video over them is refused before any work."""
    return (f"Videos of at most {options.max_frames} frames ({options.max_frames / 30:.0f} s at 30 frames/s, "
            f"`--max-frames`), {options.max_pixels:,} pixels a frame (1920x1080 is 2,073,600, `--max-pixels`) and "
            f"{options.max_file_size} (`--max-file-size`); `video_colorization.py` takes any. One video is colorized "
            f"at a time: the others wait their turn, and each shows its place in the queue.")


def guide_list(session: Session) -> str:
    if not session.guides:
        return "No guides: colorization is automatic."
    lines = [f"- {'all frames' if g.flag == '--exemplar' else f'frame {g.frame}'}: {GUIDE_NAMES[g.flag]}"
             for g in sorted(session.guides, key=lambda g: g.frame)]
    return "Guides for the next colorization:\n" + "\n".join(lines)


def read_frame(clip: Path, index: int) -> np.ndarray:
    """Frame `index` of a clip as HxWx3 uint8 RGB (decoding from the start: videos are not seeked frame-exactly)."""
    return next(itertools.islice(iter_clip_frames(clip), index, None))


def painted_strokes(editor: dict | None) -> np.ndarray | None:
    """The ImageEditor's painted layers flattened into one RGBA image, strokes opaque and the rest transparent (what
    --hints reads); None when nothing is painted."""
    layers = (editor or {}).get("layers") or []
    if not layers:
        return None
    strokes = np.zeros_like(layers[0])
    for layer in layers:  # a later layer paints over an earlier one
        painted = layer[..., 3] > 0
        strokes[painted] = layer[painted]
    return strokes if strokes[..., 3].any() else None


def write_rgba(path: Path, image: np.ndarray) -> Path:
    import cv2

    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)):
        raise page_error(f"{path}: cannot be written; check the disk")
    return path


class ColorizeApp:
    """The page's actions. One colorizer serves every tab; gradio runs one colorization at a time."""

    def __init__(self, colorizer: Colorizer, options: argparse.Namespace, work: Path):
        self.colorizer = colorizer
        self.options = options
        self.work = work
        self.runs: dict[str, threading.Event] = {}  # a tab's (gradio session's) run in progress -> its stop flag
        # Gradio's cancel frees the queue's slot at once, but cannot stop the thread of a running call: the cancelled
        # run ends at its next batch, and the next one waits for it here rather than share the model and the CPU.
        self.one_run = threading.Lock()

    def folder(self, session: Session) -> Path:
        if session.folder is None:
            session.folder = Path(tempfile.mkdtemp(prefix="session-", dir=self.work))
        return session.folder

    def check_limits(self, clip: Path) -> int:
        """The clip's frame count, after checking that the page takes it."""
        try:
            info = probe_clip(clip)
        except UserError as error:
            raise page_error(error) from None
        if info.frame_count == 0:
            raise page_error(f"{clip.name}: has no frames; load a video with at least one frame")
        if info.frame_count > self.options.max_frames:
            raise page_error(f"{clip.name}: has {info.frame_count} frames and this page colorizes at most "
                             f"{self.options.max_frames} (--max-frames); trim it, or colorize it with "
                             f"video_colorization.py, which takes any length")
        if info.width * info.height > self.options.max_pixels:
            raise page_error(f"{clip.name}: its {info.width}x{info.height} frames are larger than this page takes "
                             f"({self.options.max_pixels} pixels, --max-pixels); scale it down, or colorize it with "
                             f"video_colorization.py")
        return info.frame_count

    def load_clip(self, clip: str | None, session: Session):
        """A new clip replaces the old one, its guides and its result."""
        if clip is None:
            session.clip, session.frame_count, session.guides = None, 0, []
            return session, gr.update(value=0, maximum=1, interactive=False), None, guide_list(session), None, None
        count = self.check_limits(Path(clip))
        session.clip, session.frame_count, session.guides = Path(clip), count, []
        slider = gr.update(value=0, maximum=max(count - 1, 1), interactive=count > 1)
        return session, slider, self.editor_value(session, 0), guide_list(session), None, None

    def load_demo(self, session: Session):
        clip = make_demo_clip(self.folder(session) / "demo_gray.mp4")
        return (str(clip), *self.load_clip(str(clip), session))

    def editor_value(self, session: Session, index: int) -> dict | None:
        if session.clip is None:
            return None
        try:
            frame = read_frame(session.clip, min(int(index), session.frame_count - 1))
        except UserError as error:
            raise page_error(error) from None
        return {"background": frame, "layers": [], "composite": None}

    def show_frame(self, index: float, session: Session) -> dict | None:
        return self.editor_value(session, int(index))

    def add_guide(self, session: Session, frame: float, flag: str, path: Path) -> Session:
        frame = int(frame)
        if session.clip is None:
            raise page_error("Load a video or the demo clip first")
        session.guides.append(Guide(frame, flag, path))
        return session

    def add_painted_hints(self, editor: dict | None, frame: float, session: Session):
        strokes = painted_strokes(editor)
        if strokes is None:
            raise page_error("Nothing painted: choose the brush and paint colour strokes on the frame first")
        path = write_rgba(self.folder(session) / f"painted_{int(frame):05d}_{len(session.guides)}.png", strokes)
        session = self.add_guide(session, frame, "--hints", path)
        return session, guide_list(session), self.editor_value(session, frame)

    def add_uploaded(self, image: str | None, frame: float, session: Session, flag: str):
        if image is None:
            raise page_error("Upload an image of the frame first")
        path = self.folder(session) / f"{flag[2:]}_{int(frame):05d}_{len(session.guides)}{Path(image).suffix}"
        shutil.copyfile(image, path)  # gradio's upload cache is cleaned on its own schedule
        session = self.add_guide(session, frame, flag, path)
        return session, guide_list(session), None

    def add_keyframe(self, image: str | None, frame: float, session: Session):
        return self.add_uploaded(image, frame, session, "--reference")

    def add_hint_image(self, image: str | None, frame: float, session: Session):
        return self.add_uploaded(image, frame, session, "--hints")

    def add_exemplar(self, image: str | None, frame: float, session: Session):
        return self.add_uploaded(image, frame, session, "--exemplar")

    def clear_guides(self, session: Session):
        session.guides = []
        return session, guide_list(session)

    def colorize(self, session: Session, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        """colorize_clip with the CLI's defaults and the guides; its tqdm bar becomes the page's progress bar. The
        tab's Stop button or its closing (self.stop) ends it before the next batch."""
        if session.clip is None:
            raise page_error("Load a video or the demo clip first")
        guides = {flag: [f"{g.frame}={g.path}" for g in session.guides if g.flag == flag] for flag in GUIDE_NAMES}
        exemplars = [str(g.path) for g in session.guides if g.flag == "--exemplar"]
        # 8-bit output whatever the input: 10-bit H.264 does not play in browsers.
        options = ColorizationOptions(reference=guides["--reference"], hints=guides["--hints"], exemplar=exemplars,
                                      bit_depth="8", overwrite=True)
        output = self.folder(session) / f"{session.clip.stem}_color.mp4"
        stop = self.runs[request.session_hash] = threading.Event()
        try:
            with self.one_run:
                progress(0, desc="reading the clip and its guides")
                seed_everything(options.seed)  # as video_colorization.py does: the same video as a fresh CLI run
                # Each press is a new request: work a stopped one kept for its output is never resumed.
                count = colorize_clip(self.colorizer, session.clip, output, options, start_over=True, stop=stop.is_set)
        except UserError as error:
            raise page_error(error) from None
        except Stopped as stopped:  # Stop pressed or the tab closed: no page shows it, so the console keeps a trace
            print(f"{session.clip.name}: {stopped}", file=sys.stderr, flush=True)
            return None, None, "Stopped."
        finally:
            if self.runs.get(request.session_hash) is stop:
                del self.runs[request.session_hash]
        guided = f", guided by {len(session.guides)} guide(s)" if session.guides else ""
        return str(output), str(output), f"Colorized {count} frames{guided}."

    def stop(self, request: gr.Request) -> None:
        """Ends the tab's run, if one is running: the tab was closed, or its Stop pressed."""
        if run := self.runs.get(request.session_hash):
            run.set()

    def press_stop(self, request: gr.Request) -> str:
        self.stop(request)  # a queued run gradio's cancel removes
        return "Stopped."


def build_page(app: ColorizeApp) -> gr.Blocks:
    with gr.Blocks(title="Guided video colorization", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        session = gr.State(Session(), delete_callback=Session.remove)
        gr.Markdown("# Guided video colorization\nLoad a grayscale video, colorize it, then guide the colours: "
                    "paint strokes on a frame or upload a coloured version of it, and colorize again.")
        with gr.Row():
            with gr.Column():
                gray = gr.Video(label="Grayscale input", sources=["upload"], elem_id="input-video")
                demo = gr.Button("Demo clip", elem_id="demo")
                gr.Markdown(limits_note(app.options), elem_id="limits")
            with gr.Column():
                colour = gr.Video(label="Colorized", interactive=False, elem_id="output-video")
                download = gr.File(label="Download the colour video", interactive=False, elem_id="download")
        with gr.Row():
            run = gr.Button("Colorize", variant="primary", elem_id="colorize")
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
        status = gr.Markdown(elem_id="status")

        gr.Markdown("## Guide the colours")
        frame = gr.Slider(0, 1, value=0, step=1, label="Frame", interactive=False, elem_id="frame")
        with gr.Row():
            with gr.Column():
                editor = gr.ImageEditor(label="Paint colour strokes on this frame", type="numpy", image_mode="RGBA",
                                        sources=(), transforms=(), format="png", elem_id="editor",
                                        brush=gr.Brush(colors=["#cc3232", "#e0a030", "#32a050", "#3270cc",
                                                               "#8a5a3c", "#f0d2b4"], color_mode="defaults"))
                add_paint = gr.Button("Add painted hints", elem_id="add-painted")
            with gr.Column():
                # image_mode None passes the file on as uploaded: a conversion would re-encode it (an RGBA JPEG
                # cannot be written), and --reference / --hints read any image themselves.
                upload = gr.Image(label="Or upload an image of this frame: a coloured version (keyframe) or colour "
                                  "strokes on a transparent background (hints); or a colour image of the scene that "
                                  "is not a frame (exemplar)", type="filepath", image_mode=None,
                                  sources=["upload"], elem_id="guide-image")
                with gr.Row():
                    add_keyframe = gr.Button("Add as keyframe", elem_id="add-keyframe")
                    add_hints = gr.Button("Add as hints", elem_id="add-hints")
                    add_exemplar = gr.Button("Add as exemplar", elem_id="add-exemplar")
        guides = gr.Markdown(guide_list(Session()), elem_id="guides")
        clear = gr.Button("Clear guides", elem_id="clear-guides")

        loaded = [session, frame, editor, guides, colour, download]
        gray.upload(app.load_clip, [gray, session], loaded)
        gray.clear(app.load_clip, [gray, session], loaded)
        demo.click(app.load_demo, [session], [gray, *loaded])
        frame.change(app.show_frame, [frame, session], [editor])
        add_paint.click(app.add_painted_hints, [editor, frame, session], [session, guides, editor])
        add_keyframe.click(app.add_keyframe, [upload, frame, session], [session, guides, upload])
        add_hints.click(app.add_hint_image, [upload, frame, session], [session, guides, upload])
        add_exemplar.click(app.add_exemplar, [upload, frame, session], [session, guides, upload])
        clear.click(app.clear_guides, [session], [session, guides])
        # One at a time: the model and the CPU are shared; the others queue, and gradio shows each its place.
        colorizing = run.click(app.colorize, [session], [colour, download, status], show_progress_on=[colour],
                               concurrency_limit=1)
        stop.click(app.press_stop, None, [status], cancels=[colorizing])
        page.unload(app.stop)  # a closed tab's run stops too, rather than keep the CPU busy for nobody
    return page


def main() -> None:
    options = parse_app_args()
    if not options.model.exists():
        raise UserError(f"{options.model}: model folder not found; pass --model runs/<run> (a training run) or a "
                        f"model folder, or restore unet_model/default")
    colorizer = load_colorizer(options.model, choose_device(options.device))
    with tempfile.TemporaryDirectory(prefix="colorize-app-") as work:
        page = build_page(ColorizeApp(colorizer, options, Path(work)))
        try:
            page.launch(server_name=options.host, server_port=options.port, share=False,
                        max_file_size=options.max_file_size, prevent_thread_lock=True, quiet=True)
        except OSError:  # gradio's message names its own settings, not this script's flags
            raise UserError(f"{options.host}:{options.port}: cannot listen there (the port is in use, or the address "
                            f"is not this machine's); pass another --port or --host") from None
        print(f"open {page.local_url} in a browser; Ctrl-C stops the app", flush=True)  # quiet: no share-link advice
        # Gradio's own wait swallows Ctrl-C and SIGTERM; this one lets run_cli report them (exit 130 / 143) as the
        # other scripts do, once the server is closed and the session files are removed.
        try:
            while True:
                time.sleep(1)
        finally:
            page.close()


if __name__ == "__main__":
    run_cli(main)
