"""`mqt-edge watch`: a generated video, an MJPEG stream over HTTP, image folders, and the sources
that cannot be opened. Every frame read is accounted for: answered, dropped, skipped or failed."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import cli, scene, stderr_lines
from mqt_edge.errors import InputError
from mqt_edge.sources import open_source

Q = "What color is the circle?"
EXAMPLE = Path(__file__).parent.parent / "examples" / "shapes.png"
FPS, SECONDS = 30, 10


def circle(i: int, n: int, width: int = 320, height: int = 240) -> np.ndarray:
    """Frame i of n: a red circle crossing a white frame."""
    im = Image.new("RGB", (width, height), "white")
    x = int((width - 90) * i / max(1, n - 1))
    ImageDraw.Draw(im).ellipse([x, height // 2 - 45, x + 90, height // 2 + 45], fill="red")
    return np.asarray(im)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """10 s at 30 fps, H.264, written with PyAV."""
    av = pytest.importorskip("av", reason="the video extra (PyAV) writes the test video")
    path = tmp_path_factory.mktemp("video") / "circle.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(FPS * SECONDS):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(circle(i, FPS * SECONDS), format="rgb24")))
        out.mux(stream.encode())
    return path


def watch(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mqt_edge", "watch", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def lines(r: subprocess.CompletedProcess) -> tuple[list[dict], dict]:
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert records and set(records[-1]) == {"summary"}, r.stdout[-500:]
    return records[:-1], records[-1]["summary"]


def adds_up(s: dict) -> bool:
    return s["read"] == s["answered"] + s["dropped"] + s["skipped"] + s["failed"] + s["left"]


def test_a_video_file_is_answered_about_the_newest_frame_and_the_counts_add_up(shipped_bundle, video):
    # --speed 5: the 10 s video arrives in 2 s, faster than the answers, so frames are dropped
    r = watch(video, Q, "--bundle", shipped_bundle, "--threads", "1", "-m", "16", "--speed", "5", "--json")
    answers, s = lines(r)
    assert s["read"] == FPS * SECONDS and not s["interrupted"] and s["left"] == 0
    assert s["answered"] == len(answers) >= 3 and s["dropped"] > 0, s
    assert len(answers) + sum(a["dropped"] for a in answers) == s["read"]  # the JSON lines alone add up
    assert adds_up(s) and s["skipped"] == s["failed"] == 0
    frames = [a["frame"] for a in answers]
    assert frames == sorted(set(frames)) and frames[-1] == FPS * SECONDS - 1  # the last frame is the newest
    previous = -1
    for a in answers:
        assert a["dropped"] == a["frame"] - previous - 1  # the frames in between are the dropped ones
        previous = a["frame"]
        assert a["t"] == pytest.approx(a["frame"] / FPS, abs=1e-3)  # the video's own timestamp
        assert a["answer"] == "red" and a["m"] == 16
        assert a["timings_ms"]["latency"] >= a["timings_ms"]["llm"] > 0 and a["timings_ms"]["ttft"] > 0


def test_every_nth_frame_without_drops(shipped_bundle, video):
    r = watch(video, Q, "--bundle", shipped_bundle, "--threads", "1", "-m", "4", "--speed", "0",
              "--every", "30", "--no-drop", "--json")
    answers, s = lines(r)
    assert [a["frame"] for a in answers] == list(range(0, FPS * SECONDS, 30))
    assert [a["t"] for a in answers] == pytest.approx(list(range(SECONDS)), abs=1e-3)
    assert all(a["dropped"] == 0 and a["answer"] == "red" for a in answers)
    assert s["read"] == 300 and s["skipped"] == 290 and s["answered"] == 10 and adds_up(s)


def test_rate_paces_the_answers(shipped_bundle, video):
    r = watch(video, Q, "--bundle", shipped_bundle, "--threads", "1", "-m", "4", "--speed", "5", "--rate", "2",
              "--json")
    answers, s = lines(r)
    # 2 answers a second of wall time = one per 2.5 s of video at 5x (a little slack for timing)
    gaps = np.diff([a["t"] for a in answers])
    assert len(answers) >= 2 and gaps.min() >= 2.0, gaps
    assert s["skipped"] > 0 and adds_up(s)


class MJPEG:
    """A bounded multipart/x-mixed-replace JPEG stream on 127.0.0.1, as an IP camera serves it."""

    def __init__(self, count: int, fps: float) -> None:
        self.count, self.fps, self.sent = count, fps, 0
        jpegs = []
        for i in range(count):
            buf = io.BytesIO()
            Image.fromarray(circle(i, count)).save(buf, "JPEG")
            jpegs.append(buf.getvalue())
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for jpg in jpegs:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n"
                                         + f"Content-Length: {len(jpg)}\r\n\r\n".encode() + jpg + b"\r\n")
                        self.wfile.flush()
                        outer.sent += 1
                        time.sleep(1 / outer.fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client left (Ctrl-C)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> MJPEG:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_an_http_mjpeg_stream_is_answered_until_it_stops(shipped_bundle):
    pytest.importorskip("av", reason="the video extra (PyAV) reads streams")
    with MJPEG(count=60, fps=30) as cam:
        r = watch(cam.url, Q, "--bundle", shipped_bundle, "--threads", "1", "-m", "16", "--json", timeout=60)
    answers, s = lines(r)
    assert s["read"] == cam.sent == 60 and adds_up(s) and s["left"] == 0
    assert len(answers) == s["answered"] >= 3 and all(a["answer"] == "red" for a in answers)
    assert len(answers) + sum(a["dropped"] for a in answers) == 60
    assert all(0 <= a["t"] < 10 for a in answers)  # seconds since the stream's first frame


def test_ctrl_c_prints_a_summary_and_exits_0(shipped_bundle):
    pytest.importorskip("av", reason="the video extra (PyAV) reads streams")
    with MJPEG(count=3000, fps=30) as cam:  # 100 s: only Ctrl-C ends it in time
        p = subprocess.Popen([sys.executable, "-m", "mqt_edge", "watch", cam.url, Q, "--bundle", str(shipped_bundle),
                              "--threads", "1", "-m", "4", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            first = json.loads(p.stdout.readline())  # answering has begun
            time.sleep(0.5)
            p.send_signal(signal.SIGINT)
            out, errs = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 0, errs[-2000:]
    assert "Traceback" not in errs and first["answer"] == "red"
    s = json.loads(out.splitlines()[-1])["summary"]
    assert s["interrupted"] and s["answered"] >= 1 and adds_up(s) and s["read"] < 3000
    summary = [line for line in errs.splitlines() if line.startswith("watched")]
    assert len(summary) == 1 and "(interrupted)" in summary[0] and "mean latency" in summary[0], errs


def test_an_image_folder_answers_every_image_and_names_it(shipped_bundle, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "a.png")
    scene(seed=1).save(folder / "b.jpg")
    (folder / "c.png").write_bytes(b"not a png")  # a bad file fails alone; the watch goes on
    (folder / "notes.txt").write_text("not an image")
    r = watch(folder, Q, "--bundle", shipped_bundle, "--threads", "1", "-m", "4", "--json")
    answers, s = lines(r)
    assert [a["name"] for a in answers] == ["a.png", "b.jpg"] and answers[0]["answer"] == "red"
    assert s["read"] == 3 and s["failed"] == 1 and s["dropped"] == 0 and adds_up(s)
    assert any("c.png" in line and "not answered" in line for line in stderr_lines(r)), r.stderr
    r = watch(str(folder / "*.png"), Q, "--bundle", shipped_bundle, "--threads", "1", "-m", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("frame 0 (a.png): m=4") and r.stdout.splitlines()[0].endswith(": red"), r.stdout


@pytest.mark.parametrize("source, named", [
    ("missing.mp4", "source missing.mp4 does not exist"),
    ("/dev/video97", "no camera at /dev/video97"),
    ("97", "no camera at /dev/video97"),
    ("http://127.0.0.1:9/cam.mjpg", "cannot open stream http://127.0.0.1:9/cam.mjpg (Connection refused)"),
    ("ftp://camera/x", "unsupported scheme ftp://"),
    ("nowhere/*.jpg", "no file matches nowhere/*.jpg"),
    (str(Path(__file__).parent.parent / "README.md"), "cannot open video"),
    ("", "the source is empty"),
])
def test_a_source_that_cannot_be_opened_names_itself_and_the_fix(source, named):
    if source.startswith("http") or source.endswith(".md"):
        pytest.importorskip("av", reason="the video extra (PyAV) opens streams and videos")
    with pytest.raises(InputError) as info:
        open_source(source)
    assert named in str(info.value) and info.value.fix


def test_an_empty_folder_and_a_video_cut_before_its_first_frame(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no images"):
        open_source(tmp_path / "empty")
    av = pytest.importorskip("av", reason="the video extra (PyAV) writes the test video")
    with av.open(str(tmp_path / "whole.mkv"), "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(10):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(circle(i, 10), format="rgb24")))
        out.mux(stream.encode())
    # Matroska's header survives the cut, so FFmpeg opens the file and then finds no frame at all
    (tmp_path / "cut.mkv").write_bytes((tmp_path / "whole.mkv").read_bytes()[:1000])
    with open_source(tmp_path / "cut.mkv") as src, pytest.raises(InputError) as info:
        list(src.frames())
    assert str(info.value) == (f"video {tmp_path / 'cut.mkv'} gave no frame; check that the file is a video FFmpeg "
                               "can read (ffprobe FILE)")


@pytest.mark.parametrize("source", ["missing.mp4", "http://127.0.0.1:9/cam.mjpg"])
def test_the_command_says_it_in_one_line_before_loading_a_bundle(source, tmp_path):
    if source.startswith("http"):
        pytest.importorskip("av", reason="the video extra (PyAV) opens streams")
    # the bundle does not exist either: the source is checked first
    r = cli("watch", source, Q, "--bundle", tmp_path / "no-bundle")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = stderr_lines(r)
    assert len(err) == 1 and source in err[0] and ";" in err[0], r.stderr


def test_without_the_video_extra_a_video_says_what_to_install(tmp_path, video):
    code = ("import importlib.abc, sys\n"
            "class NoAV(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'av' or name.startswith('av.'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoAV())\n"
            f"sys.argv = ['mqt-edge', 'watch', {str(video)!r}, 'What?', '--bundle', {str(tmp_path)!r}]\n"
            "from mqt_edge.cli import main\nmain()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = stderr_lines(r)
    assert len(err) == 1 and "pip install 'mqt-edge[video]'" in err[0], r.stderr


@pytest.mark.parametrize("args, named", [(["--rate", "0"], "--rate 0"), (["--refine", "2", "-m", "4"], "refine=2")])
def test_bad_options_are_one_line(shipped_bundle, args, named):
    r = cli("watch", EXAMPLE, Q, "--bundle", shipped_bundle, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = stderr_lines(r)
    assert any(named in line for line in err) and sum(line.startswith("error") for line in err) == 1, r.stderr
