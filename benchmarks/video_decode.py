"""PyAV against OpenCV (headless) as the decoder of `mqt-edge watch`: speed, MJPEG over HTTP.

    pip install av opencv-python-headless
    python benchmarks/video_decode.py --repeats 5

Writes a 10 s, 30 fps video (a red circle moving on white) with PyAV, then decodes it to RGB arrays
with each library in turn, interleaved (A B A B ...), so both see the same load on a shared CPU.
Then serves a bounded MJPEG stream (multipart/x-mixed-replace) on 127.0.0.1 and counts the frames
each library reads from it. Install sizes are measured apart (docs/watch.md says how).
"""

from __future__ import annotations

import argparse
import http.server
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def frames(n: int, width: int, height: int):
    for i in range(n):
        im = Image.new("RGB", (width, height), "white")
        x = int((width - 80) * i / max(1, n - 1))
        ImageDraw.Draw(im).ellipse([x, height // 2 - 40, x + 80, height // 2 + 40], fill="red")
        yield np.asarray(im)


def write_video(path: Path, seconds: int, fps: int, width: int, height: int, codec: str) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for rgb in frames(seconds * fps, width, height):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def decode_av(path: str) -> int:
    import av

    n = 0
    with av.open(path) as c:
        for frame in c.decode(video=0):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


def decode_av_reused(path: str) -> int:
    """As mqt_edge.sources reads: one VideoReformatter for the whole stream, decoding threads on."""
    import av
    from av.video.reformatter import VideoReformatter

    n, rgb = 0, VideoReformatter()
    with av.open(path) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in c.decode(stream):
            rgb.reformat(frame, format="rgb24").to_ndarray()
            n += 1
    return n


def decode_cv(path: str) -> int:
    import cv2

    cap = cv2.VideoCapture(path)
    n = 0
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        n += 1
    cap.release()
    return n


def decode_av_counting(url: str) -> int:
    """PyAV reports the end of an HTTP stream as an error (EIO) after its last frame: count first."""
    import av

    n = 0
    try:
        with av.open(url) as c:
            for _ in c.decode(video=0):
                n += 1
    except av.error.FFmpegError:
        pass
    return n


def serve_mjpeg(count: int) -> tuple[http.server.ThreadingHTTPServer, str]:
    jpegs = []
    for rgb in frames(count, 320, 240):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG")
        jpegs.append(buf.getvalue())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            for jpg in jpegs:
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n"
                                 + f"Content-Length: {len(jpg)}\r\n\r\n".encode() + jpg + b"\r\n")
                time.sleep(1 / 30)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--codec", default="libx264", help="libx264 | mpeg4 | mjpeg")
    args = ap.parse_args()
    import av
    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"circle.{'avi' if args.codec == 'mjpeg' else 'mp4'}"
        write_video(path, 10, 30, args.width, args.height, args.codec)
        readers = {f"PyAV {av.__version__}, frame.to_ndarray(format='rgb24')": decode_av,
                   f"PyAV {av.__version__}, one VideoReformatter (mqt-edge)": decode_av_reused,
                   f"OpenCV {cv2.__version__}, read() + cvtColor": decode_cv}
        times = {name: [] for name in readers}
        for _ in range(args.repeats):
            for name, fn in readers.items():
                t0 = time.perf_counter()
                n = fn(str(path))
                times[name].append(time.perf_counter() - t0)
                assert n == 300, (name, n)
        print(f"10 s, 30 fps, {args.width}x{args.height}, {args.codec}: decode to RGB, median of {args.repeats}")
        for name, t in times.items():
            print(f"  {name}: {1000 * statistics.median(t):.0f} ms ({300 / statistics.median(t):.0f} frames/s)")
    for name, fn in ((f"PyAV {av.__version__}", decode_av_counting), (f"OpenCV {cv2.__version__}", decode_cv)):
        server, url = serve_mjpeg(30)
        try:
            t0 = time.perf_counter()
            n = fn(url)
            print(f"  {name} MJPEG over HTTP: {n}/30 frames in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:
            print(f"  {name} MJPEG over HTTP: failed ({type(exc).__name__}: {exc})")
        finally:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()
