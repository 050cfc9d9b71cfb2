"""The browser app (app.py): its actions called directly, and the whole page in headless Chromium driven by Selenium
(the system's chromium and chromedriver; nothing is downloaded): one tab guiding a clip, two tabs sharing the queue,
Stop and a closed tab ending a run, and uploads over the page's limits. Skipped when gradio, selenium or the browser
is missing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, panning_clip, script_parts

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install -r requirements.txt)")

STARTUP_SECONDS = 600  # importing torch and gradio on a busy 2-core machine takes minutes
STEP_SECONDS = 300
MAX_FRAMES, MAX_FILE_SIZE = 400, "1mb"  # the browser tests' app: small limits, to refuse small files
STOP_SECONDS = 5  # a stopped run, or a closed tab's, leaves the CPU within this


TAB = gr.Request(session_hash="tab")  # the browser tab a direct call stands for


def app_actions(model: Path, work: Path, **limits):
    import app
    from colorizer import load_colorizer
    from utils import choose_device

    options = app.parse_app_args(["--model", str(model), *[f"--{k.replace('_', '-')}={v}" for k, v in limits.items()]])
    return app, app.ColorizeApp(load_colorizer(model, choose_device("cpu")), options, work)


def test_painted_layers_become_one_rgba_hint_image():
    from app import painted_strokes

    assert painted_strokes(None) is None
    empty = np.zeros((4, 6, 4), np.uint8)
    assert painted_strokes({"background": empty, "layers": [empty], "composite": empty}) is None
    first, second = empty.copy(), empty.copy()
    first[0:2, 0:2] = (255, 0, 0, 255)
    second[1, 1] = (0, 0, 255, 200)  # a later layer paints over an earlier one
    strokes = painted_strokes({"background": empty, "layers": [first, second], "composite": empty})
    assert strokes[0, 0].tolist() == [255, 0, 0, 255] and strokes[1, 1].tolist() == [0, 0, 255, 200]
    assert (strokes[2:, :, 3] == 0).all() and (strokes[:, 2:, 3] == 0).all()


def test_bad_input_is_a_one_line_page_error(tiny_model, gray_video, tmp_path):
    app, actions = app_actions(tiny_model, tmp_path, max_frames=5)
    with pytest.raises(gr.Error) as error:
        actions.load_clip(str(gray_video), app.Session())
    assert "has 12 frames and this page colorizes at most 5 (--max-frames)" in error.value.message
    app, actions = app_actions(tiny_model, tmp_path, max_pixels=96 * 72 - 1)
    with pytest.raises(gr.Error) as error:
        actions.load_clip(str(gray_video), app.Session())
    assert "its 96x72 frames are larger than this page takes" in error.value.message

    # What the CLI refuses, the page refuses with the CLI's message: a video that is not one, a broken keyframe.
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    with pytest.raises(gr.Error) as error:
        actions.load_clip(str(not_a_video), app.Session())
    assert "notes.mp4" in error.value.message and "\n" not in error.value.message
    broken = tmp_path / "keyframe.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(gr.Error) as error:
        actions.colorize(app.Session(clip=gray_video, frame_count=12, guides=[app.Guide(0, "--reference", broken)]),
                         TAB)
    assert "keyframe.png" in error.value.message and "\n" not in error.value.message
    assert not list(tmp_path.rglob("*_color.mp4"))


def test_the_page_colorizes_with_the_command_lines_options(hint_model, gray_video, tmp_path, monkeypatch):
    """The page's Colorize action writes the clip's frames, and its guides become the options the command line's
    --reference, --hints and --exemplar give (at 8 bits, replacing the page's previous result)."""
    from video_io import probe_clip

    parse_args = script_parts("video_colorization")["parse_args"]
    (tmp_path / "work").mkdir()
    app, actions = app_actions(hint_model, tmp_path / "work")
    page_video, _, status = actions.colorize(app.Session(clip=gray_video, frame_count=12), TAB)
    info = probe_clip(Path(page_video))
    assert status == "Colorized 12 frames." and (info.frame_count, info.height, info.width) == (12, 72, 96)

    used = []
    monkeypatch.setattr(app, "colorize_clip", lambda colorizer, clip, output, options, **_: used.append(options) or 12)
    guides = [app.Guide(3, "--reference", tmp_path / "key.png"), app.Guide(0, "--hints", tmp_path / "dots.png"),
              app.Guide(9, "--reference", tmp_path / "key9.png"), app.Guide(4, "--exemplar", tmp_path / "photo.png")]
    actions.colorize(app.Session(clip=gray_video, frame_count=12, guides=guides), TAB)
    flags = ["--reference", f"3={tmp_path / 'key.png'}", "--hints", f"0={tmp_path / 'dots.png'}", "--reference",
             f"9={tmp_path / 'key9.png'}", "--exemplar", str(tmp_path / "photo.png")]
    assert used == [parse_args(["--input", str(gray_video), "--bit-depth", "8", "--overwrite", *flags])[1]]


def test_stop_ends_the_run_after_the_batch_in_progress(tiny_model, gray_video, tmp_path, monkeypatch):
    """Stop (or a closed tab) during a run: the batch being sampled is the last, nothing is written, and the tab's
    next run is not stopped by it."""
    app, actions = app_actions(tiny_model, tmp_path)
    sample_latents, batches = actions.colorizer.sample_latents, []

    def sample_then_stop(*args, **kwargs):
        batches.append(len(args[0]))
        actions.stop(TAB)  # pressed while the first batch is sampled
        return sample_latents(*args, **kwargs)

    monkeypatch.setattr(actions.colorizer, "sample_latents", sample_then_stop)
    assert actions.colorize(app.Session(clip=gray_video, frame_count=12), TAB) == (None, None, "Stopped.")
    assert batches == [8] and not list(tmp_path.rglob("*_color.mp4")) and not actions.runs
    monkeypatch.setattr(actions.colorizer, "sample_latents", sample_latents)
    assert actions.colorize(app.Session(clip=gray_video, frame_count=12), TAB)[2] == "Colorized 12 frames."


# ---------------------------------------------------------------------------------------------------------------
# In a browser


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -r requirements.txt)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def app_server(hint_model, tmp_path_factory):  # noqa: F811
    """The app's address, its temporary folder (TMPDIR: its session files, gradio's cache and app.log land there)
    and its process."""
    temp = tmp_path_factory.mktemp("app")
    log_path = temp / "app.log"
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "app.py", "--model", str(hint_model), "--port", str(port),
                                    "--max-frames", str(MAX_FRAMES), "--max-file-size", MAX_FILE_SIZE],
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TMPDIR": str(temp)})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"app.py did not answer within {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(2)
        yield url, temp, process
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def click(driver, element_id: str) -> None:
    """A click through JavaScript: gradio's loading overlays would intercept a simulated mouse click."""
    driver.execute_script("arguments[0].click()", driver.find_element("id", element_id))


def wait_until(driver, condition, what: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, STEP_SECONDS).until(condition, f"waited {STEP_SECONDS} s for {what}")


def wait_for_text(driver, element_id: str, text: str) -> None:
    wait_until(driver, lambda d: text in d.find_element("id", element_id).text, f"#{element_id} to say {text!r}")


def upload(driver, element_id: str, path: Path) -> None:
    driver.find_element("css selector", f"#{element_id} input[type=file]").send_keys(str(path))


def paint_stroke(driver) -> None:
    """Drag the mouse across the middle of the editor's canvas: a stroke in the brush's first colour."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("css selector", "#editor canvas")
    ActionChains(driver).move_to_element_with_offset(canvas, -30, 0).click_and_hold().move_by_offset(60, 0) \
        .release().perform()


def choose_frame(driver, index: int) -> None:
    from selenium.webdriver.common.keys import Keys

    number = driver.find_element("css selector", "#frame input[type=number]")
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys(str(index), Keys.ENTER)


def download(driver, folder: Path) -> np.ndarray:
    """The page's colour video, downloaded into `folder`: its frames as an int array."""
    from video_io import iter_clip_frames

    href = driver.find_element("css selector", "#download a").get_attribute("href")
    path = folder / f"{len(list(folder.iterdir()))}.mp4"
    path.write_bytes(urllib.request.urlopen(href, timeout=60).read())
    return np.stack(list(iter_clip_frames(path))).astype(int)


def colorize_and_download(driver, status: str, folder: Path) -> np.ndarray:
    """Click Colorize, wait for `status`, download the linked video; its frames as an int array."""
    click(driver, "colorize")
    wait_for_text(driver, "status", status)
    return download(driver, folder)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(float) - b) ** 2)))


# app_server before browser: the browser is closed first, so the app does not wait on an open page to stop.
@pytest.mark.slow  # a browser driving the page: about 90 s
def test_guided_colorization_in_a_browser(app_server, browser, gray_video, tmp_path):
    import cv2

    from video_io import read_image_rgba, write_image_rgb

    app_url, app_temp, _ = app_server

    truth = panning_clip()  # gray_video is its grayscale version: 12 frames of 72x96
    write_image_rgb(tmp_path / "keyframe5.png", truth[5])
    hints = np.zeros((72, 96, 4), np.uint8)
    hints[28:44, 40:56] = (0, 160, 0, 255)  # BGRA: an opaque green square on a transparent frame
    cv2.imwrite(str(tmp_path / "hints0.png"), hints)
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    browser.get(app_url)
    wait_until(browser, lambda d: d.find_elements("id", "colorize"), "the page to render")
    click(browser, "colorize")  # nothing loaded yet: a message, not a hung page
    wait_until(browser, lambda d: "Load a video or the demo clip first" in d.page_source, "the error message")

    upload(browser, "input-video", gray_video)
    wait_until(browser, lambda d: d.find_element("css selector", "#frame input[type=number]").get_attribute("max")
               == "11", "the frame slider to reach frame 11")
    automatic = colorize_and_download(browser, "Colorized 12 frames.", downloads)

    paint_stroke(browser)
    click(browser, "add-painted")
    wait_for_text(browser, "guides", "frame 0: painted hints")
    # The strokes reach --hints as an RGBA image of the frame: the brush's colour, opaque only where painted.
    painted = read_image_rgba(next(app_temp.glob("colorize-app-*/session-*/painted_00000_*.png")))
    stroke = painted[..., 3] >= 128
    assert painted.shape == (72, 96, 4) and 0 < stroke.mean() < 0.5
    assert np.abs(np.median(painted[stroke][:, :3], axis=0) - (0xCC, 0x32, 0x32)).max() <= 2
    upload(browser, "guide-image", tmp_path / "hints0.png")
    click(browser, "add-hints")
    wait_until(browser, lambda d: d.find_element("id", "guides").text.count("painted hints") == 2, "a second hint")
    hinted = colorize_and_download(browser, "guided by 2 guide(s)", downloads)

    choose_frame(browser, 5)
    upload(browser, "guide-image", tmp_path / "keyframe5.png")
    click(browser, "add-keyframe")
    wait_for_text(browser, "guides", "frame 5: keyframe")
    guided = colorize_and_download(browser, "guided by 3 guide(s)", downloads)

    for video in (automatic, hinted, guided):
        assert video.shape == (12, 72, 96, 3)
    # The hints reach the (untrained) model: frame 0 changes where they were painted and uploaded.
    assert np.abs(hinted[0][stroke] - automatic[0][stroke]).max() > 0
    assert np.abs(hinted[0, 28:44, 40:56] - automatic[0, 28:44, 40:56]).max() > 0
    # The keyframe's colours are those of frame 5's truth, to within the H.264 coding.
    assert psnr(guided[5], truth[5]) > psnr(automatic[5], truth[5]) + 6
    # Nothing was fetched from outside the app.
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and all(name.startswith(app_url) for name in fetched)


def write_gray_video(path: Path, frame_count: int) -> Path:
    """A grayscale mp4 of `frame_count` frames of 72x96: the panning clip, started again every 60 frames."""
    from utils import rgb_to_gray
    from video_io import VideoWriter

    frames = [np.repeat(rgb_to_gray(frame)[..., None], 3, axis=2) for frame in panning_clip(60)]
    with VideoWriter(path, 96, 72, 25) as writer:
        for i in range(frame_count):
            writer.write(frames[i % len(frames)])
    return path


def load_clip(driver, app_url: str, clip: Path) -> None:
    """Open the page in the current tab and load `clip` into it."""
    from video_io import probe_clip

    driver.get(app_url)
    wait_until(driver, lambda d: d.find_elements("id", "colorize"), "the page to render")
    upload(driver, "input-video", clip)
    last = str(probe_clip(clip).frame_count - 1)
    wait_until(driver, lambda d: d.find_element("css selector", "#frame input[type=number]").get_attribute("max")
               == last, f"the frame slider to reach frame {last}")


def luma_error(video: np.ndarray, clip: Path) -> float:
    """Mean difference, in levels, between a colorized video's luma and its grayscale input's."""
    from utils import rgb_to_gray
    from video_io import iter_clip_frames

    gray = np.stack([rgb_to_gray(frame) for frame in iter_clip_frames(clip)]).astype(float)
    return float(np.abs(np.stack([rgb_to_gray(frame.astype(np.uint8)) for frame in video]) - gray).mean())


def cpu_rate(pid: int, seconds: float = 1.0) -> float:
    """The cores a process used over the next `seconds`."""
    import psutil

    process = psutil.Process(pid)
    before, start = sum(process.cpu_times()[:2]), time.monotonic()
    time.sleep(seconds)
    return (sum(process.cpu_times()[:2]) - before) / (time.monotonic() - start)


def wait_busy(pid: int, idle: float) -> float:
    """Wait until the app is colorizing, using a tenth of a core more than when `idle` (the cores its server uses
    waiting; on a machine busy with other work a run gets little more): the cores it uses then."""
    deadline = time.monotonic() + STEP_SECONDS
    while (rate := cpu_rate(pid)) < idle + 0.1:
        assert time.monotonic() < deadline, f"the app did not start colorizing within {STEP_SECONDS} s"
    return rate


def seconds_until_idle(pid: int, since: float, below: float) -> float:
    """Seconds from `since` (time.monotonic) to the end of the first half second in which the app used fewer than
    `below` cores; at most about 60."""
    while time.monotonic() - since < 60 and cpu_rate(pid, 0.5) >= below:
        pass
    return time.monotonic() - since


def stopped_runs(log: Path, clip: str) -> list[int]:
    """The frames done by each run of `clip` that the app's log says was stopped."""
    return [int(line.split()[-2]) for line in log.read_text().splitlines() if line.startswith(f"{clip}: stopped after")]


@pytest.mark.slow  # a browser on a refused upload: a few seconds
def test_uploads_over_the_limits_are_refused_before_any_work(app_server, browser, tmp_path):
    app_url, _, _ = app_server
    browser.get(app_url)
    wait_until(browser, lambda d: d.find_elements("id", "colorize"), "the page to render")
    limits = browser.find_element("id", "limits").text
    assert f"at most {MAX_FRAMES} frames" in limits and MAX_FILE_SIZE in limits

    big = tmp_path / "big.mp4"
    big.write_bytes(bytes(2 * 1024 * 1024))
    upload(browser, "input-video", big)  # refused by the browser itself: nothing reaches the app
    wait_until(browser, lambda d: 'exceed the maximum allowed size of 1.0 Mb: "big.mp4"' in d.page_source,
               "the size limit's message")
    upload(browser, "input-video", write_gray_video(tmp_path / "long.mp4", MAX_FRAMES + 1))
    wait_until(browser, lambda d: f"long.mp4: has {MAX_FRAMES + 1} frames and this page colorizes at most "
               f"{MAX_FRAMES} (--max-frames)" in d.page_source, "the frame limit's message")
    click(browser, "colorize")  # neither became the tab's clip
    wait_until(browser, lambda d: "Load a video or the demo clip first" in d.page_source, "the no-clip message")


@pytest.mark.slow  # two tabs, one after the other in the queue: about 20 s
def test_two_tabs_queue_and_each_gets_its_own_clip(app_server, browser, gray_video, tmp_path):
    app_url, _, _ = app_server
    long_clip = write_gray_video(tmp_path / "long.mp4", 120)  # several seconds: the second tab finds it running
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    first = browser.current_window_handle
    load_clip(browser, app_url, long_clip)
    browser.switch_to.new_window("tab")
    second = browser.current_window_handle
    load_clip(browser, app_url, gray_video)
    browser.switch_to.window(first)
    click(browser, "colorize")
    browser.switch_to.window(second)
    click(browser, "colorize")
    wait_until(browser, lambda d: "queue: 1/1" in d.find_element("id", "output-video").text,
               "the second tab to show its place in the queue")
    wait_for_text(browser, "status", "Colorized 12 frames.")
    short_video = download(browser, downloads)
    browser.close()
    browser.switch_to.window(first)
    wait_for_text(browser, "status", "Colorized 120 frames.")
    long_video = download(browser, downloads)

    assert long_video.shape == (120, 72, 96, 3) and short_video.shape == (12, 72, 96, 3)
    assert luma_error(long_video, long_clip) < 3 and luma_error(short_video, gray_video) < 3


@pytest.mark.slow  # two runs of a long clip, each stopped after a few seconds: about 30 s
def test_stop_and_a_closed_tab_end_the_run_within_seconds(app_server, browser, tmp_path):
    """The run leaves the CPU within STOP_SECONDS: the app's CPU use falls back from its colorizing rate to below
    halfway to its idle rate, and the log says the pipeline's stop hook ended the run."""
    app_url, app_temp, process = app_server
    clip = write_gray_video(tmp_path / "stopped.mp4", MAX_FRAMES)  # half a minute or more of work
    idle = cpu_rate(process.pid)

    load_clip(browser, app_url, clip)
    click(browser, "colorize")
    busy = wait_busy(process.pid, idle)
    since = time.monotonic()
    click(browser, "stop")
    after_stop = seconds_until_idle(process.pid, since, (idle + busy) / 2)
    wait_for_text(browser, "status", "Stopped.")

    click(browser, "colorize")
    busy = wait_busy(process.pid, idle)
    running = browser.current_window_handle
    browser.switch_to.new_window("tab")  # the browser keeps a tab
    browser.switch_to.window(running)
    since = time.monotonic()
    browser.close()
    after_close = seconds_until_idle(process.pid, since, (idle + busy) / 2)
    browser.switch_to.window(browser.window_handles[0])

    print(f"the app idle ({idle:.2f} cores; {busy:.2f} colorizing) {after_stop:.1f} s after Stop, {after_close:.1f} s "
          f"after closing the tab")
    assert after_stop < STOP_SECONDS and after_close < STOP_SECONDS
    stopped = stopped_runs(app_temp / "app.log", clip.name)
    assert len(stopped) == 2 and all(0 < frames < MAX_FRAMES for frames in stopped)
