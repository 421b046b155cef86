"""Property test: image headers that lie about their size, and data cut short or corrupt.

Real small PNG, JPEG, BMP and WebP files have their declared width and height rewritten (a PNG IHDR,
a JPEG SOF, a BMP info header, a WebP VP8/VP8L/VP8X header), their pixel data replaced or their
bytes cut at any point. Whatever comes in, the API answers an RGB image within the limit or one
line of ImageError, ImageTooLargeError when a complete header declares more pixels than the limit;
the server's check answers 400 invalid_image or 413 image_too_large. Never another exception, a
MemoryError or a hang: each example runs under a 5 s alarm, and the limit is 250,000 pixels so that
no real buffer is large whatever the header says. Bounded: 150 examples per format, ~10 s in all.
"""

from __future__ import annotations

import io
import signal
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from mqt_edge.errors import ImageError, ImageTooLargeError
from mqt_edge.image import load_image, verify_image
from mqt_edge.serve.errors import APIError
from mqt_edge.serve.images import ImageBytes, check_image

LIMIT = 250_000  # 500 x 500: the buffers stay small whatever a header claims
BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def at_most(seconds: int):
    """A hang fails the example instead of the test run (Unix, main thread: where pytest runs)."""

    def expire(*_):
        raise TimeoutError(f"decoding took over {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def encoded(fmt: str, wh=(24, 16), **kw) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def judge(data: bytes, declared: tuple[int, int] | None) -> str:
    """Run both front doors on the bytes; return what happened, having checked that it is allowed."""
    with at_most(5):
        try:
            im = load_image(data, LIMIT)
            assert im.mode == "RGB" and im.width * im.height <= LIMIT
            api = "ok"
        except ImageTooLargeError as exc:
            assert "over the limit of 250,000" in str(exc) and "\n" not in str(exc)
            api = "too large"
        except ImageError as exc:
            assert str(exc) and "\n" not in str(exc)
            api = "refused"
        try:
            check_image(ImageBytes(data, ""), LIMIT)
            http = "ok"
        except APIError as exc:
            assert (exc.status, exc.code) in {(400, "invalid_image"), (413, "image_too_large")}, exc.message
            assert "\n" not in exc.message
            http = {413: "too large", 400: "refused"}[exc.status]
    if declared is not None and declared[0] * declared[1] > LIMIT:
        assert api == http == "too large", (declared, api, http)
    assert api == http or (api, http) == ("refused", "ok"), (api, http)  # a JPEG's 1/8-scale check reads less
    return api


# Declared sizes: tiny, around the limit, far over it, and the fields' extremes.
def dims(top: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 64), st.integers(400, 700), st.integers(0, top), st.sampled_from([top, top - 1]))


def cut_or_not(data: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.just(data), st.integers(0, len(data)).map(lambda n: data[:n]))


PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type: depths


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@BOUNDED
@given(w=dims(2**31 - 1), h=dims(2**31 - 1), depth=st.sampled_from([1, 2, 4, 8, 16, 3]),
       ctype=st.sampled_from([0, 2, 3, 4, 6, 5]), pixels=st.binary(max_size=300), packed=st.booleans(),
       data=st.data())
def test_png_headers_that_lie(w, h, depth, ctype, pixels, packed, data):
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
    body = b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IDAT", zlib.compress(pixels) if packed else pixels)
    whole = body + png_chunk(b"IEND", b"")
    cut = data.draw(cut_or_not(whole))
    valid_header = depth in PNG_DEPTHS.get(ctype, ())
    judge(cut, (w, h) if len(cut) >= len(body) and valid_header else None)


@BOUNDED
@given(w=dims(65535), h=dims(65535), progressive=st.booleans(), grey=st.booleans(), data=st.data())
def test_jpeg_sof_that_lies(w, h, progressive, grey, data):
    src = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    buf = io.BytesIO()
    (src.convert("L") if grey else src).save(buf, format="JPEG", progressive=progressive)
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", h, w)  # SOF: length, precision, height, width
    cut = data.draw(cut_or_not(bytes(raw)))
    judge(cut, (w, h) if len(cut) == len(raw) and w and h else None)


@BOUNDED
@given(w=st.integers(-(2**31), 2**31 - 1), h=st.integers(-(2**31), 2**31 - 1),
       bits=st.sampled_from([1, 4, 8, 16, 24, 32, 0, 7]), data=st.data())
def test_bmp_headers_that_lie(w, h, bits, data):
    raw = bytearray(encoded("BMP"))
    raw[18:26] = struct.pack("<ii", w, h)  # BITMAPINFOHEADER: width, height (negative: top-down)
    raw[28:30] = struct.pack("<H", bits)
    cut = data.draw(cut_or_not(bytes(raw)))
    declared = (w, abs(h)) if len(cut) == len(raw) and bits in (1, 4, 8, 16, 24, 32) and w > 0 else None
    judge(cut, declared)


@pytest.mark.skipif(not features.check("webp"), reason="this Pillow is built without WebP")
@BOUNDED
@given(kind=st.sampled_from(["VP8 ", "VP8L", "VP8X"]), w=dims(16384), h=dims(16384), data=st.data())
def test_webp_headers_that_lie(kind, w, h, data):
    if kind == "VP8X":  # an extended header in front of a lossy frame: it names the canvas
        frame = encoded("WEBP", quality=50)[12:]
        vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0" * 4 + (max(w, 1) - 1).to_bytes(3, "little") + (
            max(h, 1) - 1).to_bytes(3, "little")
        raw = bytearray(b"RIFF" + struct.pack("<I", 4 + len(vp8x) + len(frame)) + b"WEBP" + vp8x + frame)
        declared = (max(w, 1), max(h, 1))
    elif kind == "VP8L":
        raw = bytearray(encoded("WEBP", lossless=True))
        w, h = max(1, min(w, 16384)), max(1, min(h, 16384))
        raw[21:25] = ((w - 1) | (h - 1) << 14 | (raw[24] >> 4) << 28).to_bytes(4, "little")
        declared = (w, h)
    else:
        raw = bytearray(encoded("WEBP", quality=50))
        w, h = min(w, 16383), min(h, 16383)
        raw[26:30] = struct.pack("<HH", w, h)  # 14-bit sizes, scale bits 0
        declared = (w, h) if w and h else None
    cut = data.draw(cut_or_not(bytes(raw)))
    judge(cut, declared if len(cut) == len(raw) else None)


@BOUNDED
@given(st.binary(max_size=200))
def test_any_bytes(raw):
    judge(raw, None)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"] + (["WEBP"] if features.check("webp") else []))
def test_honest_small_images_decode(fmt):
    """The property above would also pass if everything were refused: the true files must decode."""
    assert judge(encoded(fmt), (24, 16)) == "ok"
    assert verify_image(encoded(fmt), LIMIT) == (24, 16)
