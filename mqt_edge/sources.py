"""Frame sources for `mqt-edge watch`: a V4L2 camera, a video file, an RTSP or HTTP(S) stream
(MJPEG over HTTP included), an image folder or a glob, each read as a stream of `SourceFrame`s.

    with open_source("rtsp://cam.local/stream") as src:
        for f in src.frames():
            f.image, f.t  # HxWx3 uint8 RGB (or an image file's path), seconds since the first frame

Decoding is PyAV's (the `video` extra; docs/watch.md has the measurements that chose it over
OpenCV), imported only when a camera, a video or a stream is opened: image folders and globs need
no extra. Opening checks everything a user can get wrong and raises one line naming the source and
the fix, so `watch` fails before it loads a bundle. Once frames flow, a decoding or network error
ends the source: a camera unplugged or an HTTP stream that stops is the end of the watch, and
`ended` keeps the reason.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError, require

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
KINDS = ("camera", "stream", "video", "images")
OPEN_TIMEOUT_S = 10.0  # connecting to a stream or camera; then each read may wait as long
_SOURCE_HELP = "pass /dev/videoN (or N), a video file, an rtsp:// or http(s):// URL, an image folder or a glob"


@dataclass
class SourceFrame:
    image: Any  # HxWx3 uint8 RGB array, or the path of an image file (the pipeline reads it)
    t: float | None  # seconds: the video's timestamp, or since a live source's first frame
    name: str | None = None  # the image file's name, for folders and globs


@dataclass
class Source:
    """An opened source. `frames()` is read once, on one thread; `close()` ends it."""

    spec: str  # as the user gave it
    kind: str  # one of KINDS
    paths: list[Path] = field(default_factory=list)  # images: the files, in order
    container: Any = None  # camera, stream, video: the PyAV container
    ended: str | None = None  # why a camera or stream stopped early (a decoding or network error)
    read: int = 0  # frames read so far
    _reading: bool = field(default=False, repr=False)
    _close_asked: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def live(self) -> bool:
        """Frames arrive in real time (a camera or stream), not as fast as they can be read."""
        return self.kind in ("camera", "stream")

    def frames(self, speed: float = 0.0) -> Iterator[SourceFrame]:
        """Every frame in order. speed: a video file is read at `speed` times its frame rate, as
        the camera that recorded it would deliver it (0: as fast as it decodes; live sources and
        image folders are never paced)."""
        inner = self._images() if self.kind == "images" else self._decoded()
        if speed and self.kind == "video":
            inner = _paced(inner, speed)
        with self._lock:
            if self.container is None and self.kind != "images":
                raise InputError(f"the source {self.spec} is closed", "open it again with open_source()")
            self._reading = True
        try:
            for frame in inner:
                self.read += 1
                yield frame
            if self.read == 0 and self.kind != "images":  # e.g. a file cut short: FFmpeg says nothing
                raise InputError(f"{self.kind} {self.spec} gave no frame", _fix(self.kind))
        finally:
            with self._lock:
                self._reading = False
            if self._close_asked:
                self.close()

    def _images(self) -> Iterator[SourceFrame]:
        for p in self.paths:
            yield SourceFrame(p, None, p.name)

    def _decoded(self) -> Iterator[SourceFrame]:
        av = require("av", "video")
        from av.video.reformatter import VideoReformatter

        # One reformatter for the whole stream: PyAV's frame.to_ndarray(format=...) builds a new
        # swscale context per frame, 4-6x slower at 640x480 (docs/watch.md).
        rgb, stream, start = VideoReformatter(), self.container.streams.video[0], None
        stream.thread_type = "AUTO"
        try:
            for frame in self.container.decode(stream):
                if frame.time is not None and not self.live:
                    t = float(frame.time)
                else:  # live: arrival time (a camera's pts may count from boot)
                    start = start if start is not None else time.monotonic()
                    t = time.monotonic() - start
                yield SourceFrame(rgb.reformat(frame, format="rgb24").to_ndarray(), round(t, 4))
        except av.error.FFmpegError as exc:
            if self.read == 0:
                raise InputError(f"{self.kind} {self.spec} gave no frame ({_reason(exc)})", _fix(self.kind)) from None
            self.ended = _reason(exc)

    def close(self) -> None:
        """Free the decoder. Called from another thread while a read is in flight, it only asks:
        the reading thread closes it when its read returns (FFmpeg must not free under a read)."""
        with self._lock:
            self._close_asked = True
            if self._reading or self.container is None:
                return
            container, self.container = self.container, None
        container.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _paced(frames: Iterator[SourceFrame], speed: float) -> Iterator[SourceFrame]:
    """Hold each frame until its timestamp (divided by speed) has passed since the first; a reader
    that falls behind is never made to wait."""
    start = None
    for f in frames:
        if f.t is not None:
            now = time.monotonic()
            start = start if start is not None else now - f.t / speed
            wait = start + f.t / speed - now
            if wait > 0:
                time.sleep(wait)
        yield f


def kind_of(spec: str) -> str:
    """Which of KINDS a SOURCE argument names, from its text and the file system alone."""
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", spec)
    if scheme:
        if scheme.group(1).lower() not in STREAM_SCHEMES:
            raise InputError(f"source {spec}: unsupported scheme {scheme.group(1)}://",
                             f"use one of {', '.join(s + '://' for s in STREAM_SCHEMES)}, or a path")
        return "stream"
    if spec.isdigit() or re.fullmatch(r"/dev/video\d+", spec):
        return "camera"
    if any(c in spec for c in "*?[") and not Path(spec).exists():
        return "images"
    p = Path(spec)
    if p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES:
        return "images"
    return "video"


def open_source(spec: str | int, timeout: float = OPEN_TIMEOUT_S) -> Source:
    """Open a SOURCE argument (see the module's docstring), or raise one line naming it and the fix."""
    spec = str(spec).strip()
    if not spec:
        raise InputError("the source is empty", _SOURCE_HELP)
    kind = kind_of(spec)
    if kind == "images":
        return Source(spec, kind, paths=_image_paths(spec))
    if kind == "camera":
        spec = f"/dev/video{spec}" if spec.isdigit() else spec
        if not Path(spec).exists():
            raise InputError(f"no camera at {spec}", "list the cameras with: ls /dev/video* (or v4l2-ctl --list-devices)")
    elif kind == "video" and not Path(spec).is_file():
        raise InputError(f"source {spec} does not exist", _SOURCE_HELP)
    return Source(spec, kind, container=_open_av(spec, kind, timeout))


def _image_paths(spec: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not found:
            raise InputError(f"the folder {spec} has no images ({', '.join(IMAGE_SUFFIXES)})",
                             "point at a folder of images, or use a glob such as 'frames/*.jpg'")
        return found
    if p.is_file():
        return [p]
    found = sorted(Path(f) for f in glob.glob(os.path.expanduser(spec)) if Path(f).is_file())
    if not found:
        raise InputError(f"no file matches {spec}", "check the pattern (quote it so the shell leaves it alone)")
    return found


def _open_av(spec: str, kind: str, timeout: float):
    av = require("av", "video")
    av.logging.set_level(None)  # FFmpeg's own log lines would break the one-line errors
    options = {"rtsp_transport": "tcp"} if spec.lower().startswith("rtsp") else {}
    try:
        container = av.open(spec, format="v4l2" if kind == "camera" else None, options=options,
                            timeout=(timeout, timeout))
    except av.error.FFmpegError as exc:
        raise InputError(f"cannot open {kind} {spec} ({_reason(exc)})", _fix(kind)) from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{kind} {spec} has no video stream", _SOURCE_HELP)
    return container


def _reason(exc: Exception) -> str:
    """FFmpeg's reason without the path PyAV appends (the message names the source already)."""
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split())


def _fix(kind: str) -> str:
    return {
        "camera": "check that no other program holds the camera and that you may read it (the video group)",
        "stream": "check the URL and that the stream is up (curl -I URL)",
        "video": "check that the file is a video FFmpeg can read (ffprobe FILE)",
    }.get(kind, _SOURCE_HELP)
