"""Image input and the release's preprocessing, in numpy and Pillow only.

The runtime cannot import torch or transformers, so this module re-implements the two steps the
release applies (`image_aspect_ratio = "pad"`):

1. `expand2square`: pad to a square with the background colour `int(x * 255)` of the CLIP mean,
   image centred (offset `(long - short) // 2`);
2. `CLIPImageProcessor.preprocess`: shortest edge to `size` (PIL bicubic), centre crop, scale by
   1/255 (in float64, then float32, as transformers does), normalise with the CLIP mean/std.

tests/test_image.py holds it to transformers' CLIPImageProcessor bit for bit.

Memory: the work is bounded by what preprocessing will allocate, computed from the image header
before any pixel is decoded (`preprocess_pixels`): the decoded input, the padded square (a tall
image), or the one-axis-resized strip (a wide image) must each stay within `max_pixels` (64 MP, so
at most ~256 MB per RGB buffer at the default: Pillow keeps RGB at 4 bytes a pixel). The header is
read by our own probe over Pillow's JPEG, PNG, BMP and WebP openers (`_identify`), so our limit, not
Pillow's bomb check, answers at any declared size; after a big decode the freed memory is handed
back to the OS (`give_back_memory`). A wide image is never padded at full size: Pillow's
bicubic resize runs a horizontal pass then a vertical one, rows independent of each other, so
resizing the image's rows horizontally and adding the pad rows (a pad row resized once) gives
exactly the padded square's intermediate; the vertical pass then runs on that S x L strip. A tall
image's pad columns sit inside each row of the horizontal pass, so it is padded for real. The test
holds both paths to the full pad-then-resize bit for bit.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFile, ImageFilter

from .errors import ImageError, ImageTooLargeError

# Datasheet value of OpenAI CLIP, used when a vision tower ships no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# 64 megapixels: far above any camera frame, far below what a decompression bomb unpacks to.
DEFAULT_MAX_PIXELS = 64_000_000

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes `pixel_values`; recorded in bundles so a device repeats it exactly."""

    size: int  # shortest edge after resize
    crop: tuple[int, int]  # (height, width) of the centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_to_square: bool = True  # image_aspect_ratio == "pad"
    rescale: float = 1 / 255

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return tuple(int(x * 255) for x in self.mean)  # the release's exact rounding (floor)

    def to_dict(self) -> dict:
        return asdict(self) | {"pad_color": list(self.pad_color)}

    @classmethod
    def from_dict(cls, d: dict) -> ImageSpec:
        return cls(
            size=int(d["size"]),
            crop=tuple(d["crop"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            pad_to_square=bool(d["pad_to_square"]),
            rescale=float(d["rescale"]),
        )

    @classmethod
    def from_processor_config(
        cls, path: Path | None, image_size: int, pad_to_square: bool
    ) -> ImageSpec:
        """Read a CLIP `preprocessor_config.json`; fall back to OpenAI CLIP at `image_size`."""
        if path is None or not path.is_file():
            return cls(image_size, (image_size, image_size), CLIP_MEAN, CLIP_STD, pad_to_square)
        cfg = json.loads(path.read_text())
        size = cfg.get("size", image_size)
        size = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
        crop = cfg.get("crop_size", size)
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        if not cfg.get("do_center_crop", True):
            crop = (size, size)
        return cls(
            size=int(size),
            crop=crop,
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
            pad_to_square=pad_to_square,
            rescale=float(cfg.get("rescale_factor", 1 / 255)),
        )


SizeCheck = Optional[Callable[[tuple[int, int]], None]]

# What the docs promise. Other Pillow plugins stay out: some run the decoder (or Ghostscript, for EPS)
# while opening, and some answer with Pillow's own bomb check, which says nothing about our limit.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_PILLOW_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error,
                  Image.DecompressionBombError)


def load_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS, check: SizeCheck = None) -> Image.Image:
    """Return an RGB PIL image from a path, encoded bytes, a PIL image or an HxWx3 uint8 array (RGB order).

    check((w, h)) runs on the size before any pixel is decoded (preprocess's memory budget)."""
    if isinstance(image, (str, Path)):
        return _open(Path(image), max_pixels, check)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(_identify(io.BytesIO(image), "the image", max_pixels, check), "the image")
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels, "image", check)
        _check_mode(image, "image")
        try:  # a lazily opened file is decoded here: a truncated one must not escape as OSError
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
        except _PILLOW_ERRORS as exc:
            raise ImageError(f"cannot read the PIL image ({exc})", "pass a complete, valid image") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(
                f"image array has dtype {image.dtype} and shape {tuple(image.shape)}",
                "pass an HxWx3 uint8 RGB array (OpenCV frames are BGR: use frame[..., ::-1])",
            )
        _check_pixels((image.shape[1], image.shape[0]), max_pixels, "image array", check)
        return Image.fromarray(np.ascontiguousarray(image))  # (H, W, 3) uint8 -> RGB
    raise ImageError(
        f"cannot use an image of type {type(image).__name__}",
        "pass a file path, encoded image bytes, a PIL.Image or an HxWx3 uint8 numpy array",
    )


def _check_mode(image: Image.Image, what: str) -> None:
    # Pillow's RGB conversion clips 16-bit and float pixels (a white or black square), silently.
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        raise ImageError(
            f"{what} has {image.mode} pixels (16-bit or float)", "convert it to 8-bit RGB first"
        )


def _check_pixels(wh: tuple[int, int], max_pixels: int, what: str, check: SizeCheck = None) -> None:
    w, h = wh
    if w < 1 or h < 1:
        raise ImageError(f"{what} is empty ({w}x{h})", "pass an image with at least one pixel")
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}",
            "downscale it first, or raise max_pixels if the file is trusted",
        )
    if check is not None:
        check(wh)


@functools.cache
def _plugins() -> tuple[tuple[str, Callable, Optional[Callable]], ...]:
    Image.preinit()  # registers JPEG, PNG and BMP
    with contextlib.suppress(ImportError):  # registers WEBP (its opener needs Pillow built with libwebp)
        from PIL import WebPImagePlugin  # noqa: F401
    return tuple((f, *Image.OPEN[f]) for f in FORMATS if f in Image.OPEN)


def _webp_size(head: bytes) -> Optional[tuple[int, int]]:
    """The canvas a WebP header declares: Pillow's WebP opener allocates it, so it is checked first."""
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP" or len(head) < 30:
        return None
    kind = head[12:16]
    if kind == b"VP8X":  # 24-bit width - 1 and height - 1
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if kind == b"VP8L" and head[20] == 0x2F:  # 14-bit width - 1, then 14-bit height - 1
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # a key frame's 14-bit sizes
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


def _identify(fp: BinaryIO, what: str, max_pixels: int, check: SizeCheck = None) -> ImageFile.ImageFile:
    """Image.open for FORMATS without Pillow's bomb check: our own limit is checked on the size the
    header declares, before any pixel is decoded, at any declared size."""
    head = fp.read(32)
    if (declared := _webp_size(head)) is not None:
        _check_pixels(declared, max_pixels, what, check)
    for fmt, factory, accept in _plugins():
        verdict = accept is None or accept(head)
        if verdict and not isinstance(verdict, str):  # a str says why it cannot be opened (no libwebp)
            fp.seek(0)
            try:
                im = factory(fp, "")
            except Image.DecompressionBombError:  # WebP's opener checks past 2x Pillow's limit: only
                # reached with max_pixels raised above that, and its canvas is not allocated then
                raise ImageTooLargeError(f"{what} is a WebP image over Pillow's own pixel limit",
                                         "convert it to PNG or JPEG, or downscale it") from None
            except _PILLOW_ERRORS as exc:
                raise ImageError(f"cannot read {what}: {fmt} header: {exc}",
                                 "pass a valid JPEG, PNG, BMP or WebP file") from None
            _check_pixels(im.size, max_pixels, what, check)
            _check_mode(im, what)
            return im
    raise ImageError(f"{what} is not a JPEG, PNG, BMP or WebP image", "convert it to one of those formats")


def _decode(im: ImageFile.ImageFile, what: str) -> Image.Image:
    try:
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")  # no second copy of a large RGB image
    except _PILLOW_ERRORS as exc:
        raise ImageError(f"cannot read {what}: {exc}", "pass a complete, valid JPEG, PNG, BMP or WebP file") from None


def verify_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(w, h) of an encoded image that is within max_pixels and decodes to its end; no pixels are kept.

    A JPEG decodes at 1/8 scale (every byte is still read, so truncation shows, into 1/64 of the
    pixels); the memory of a big decode is handed back before this returns."""
    im = _identify(io.BytesIO(data), "the image", max_pixels)
    wh = im.size
    if im.format == "JPEG":
        im.draft("RGB", (1, 1))  # the smallest scale libjpeg offers
    _decode(im, "the image")
    del im
    if wh[0] * wh[1] >= GIVE_BACK_PIXELS:
        give_back_memory()
    return wh


def _open(path: Path, max_pixels: int, check: SizeCheck = None) -> Image.Image:
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image", "pass an image file")
    if not path.is_file():
        raise ImageError(f"image not found: {path}", "check the path")
    what = f"image {path}"
    try:
        with path.open("rb") as fp:
            return _decode(_identify(fp, what, max_pixels, check), what)
    except OSError as exc:  # opening or reading the file itself (a permission, a vanished file)
        raise ImageError(f"cannot read {what}: {exc.strerror or exc}", "check the file and its permissions") from None


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), color)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def _resized_size(wh: tuple[int, int], size: int) -> tuple[int, int]:
    """(w, h) after the shortest edge goes to `size` (transformers' rounding: int of the long side)."""
    w, h = wh
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


def preprocess_pixels(wh: tuple[int, int], spec: ImageSpec) -> tuple[int, int]:
    """(w, h) of the largest buffer preprocessing allocates for a w x h input, besides the input."""
    w, h = wh
    if not spec.pad_to_square:
        return _resized_size(wh, spec.size)
    if h >= w:  # tall (or square): padded to h x h for real
        return (h, h)
    return (spec.size, w)  # wide: rows resized to S wide, then the S x w strip with its pad rows


def _check_budget(wh: tuple[int, int], spec: ImageSpec, max_pixels: int) -> None:
    bw, bh = preprocess_pixels(wh, spec)
    if bw * bh > max_pixels:
        raise ImageTooLargeError(
            f"image {wh[0]}x{wh[1]} needs a {bw}x{bh} buffer ({bw * bh:,} pixels) to preprocess, "
            f"over the limit of {max_pixels:,}",
            "crop it closer to a square (a tall image is padded to one), or raise max_pixels if the file is trusted",
        )


def _pad_wide_and_resize(im: Image.Image, spec: ImageSpec) -> Image.Image:
    """expand_to_square + resize to S x S for w > h, without the w x w square (exact, see the top)."""
    w, h = im.size
    S, top = spec.size, (w - h) // 2
    rows = im.resize((S, h), resample=Image.Resampling.BICUBIC)  # horizontal pass only
    pad_row = Image.new(im.mode, (w, 1), spec.pad_color).resize((S, 1), resample=Image.Resampling.BICUBIC)
    strip = pad_row.resize((S, w), resample=Image.Resampling.NEAREST)  # (S wide, L tall): that row, repeated
    strip.paste(rows, (0, top))  # the square after its horizontal pass, one buffer of S x L pixels
    return strip.resize((S, S), resample=Image.Resampling.BICUBIC)  # vertical pass only


def preprocess(image: ImageInput, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image -> `pixel_values` float32 (1, 3, H, W), exactly as the release computes it."""
    im = load_image(image, max_pixels, check=lambda wh: _check_budget(wh, spec, max_pixels))
    decoded_here = im is not image and not isinstance(image, np.ndarray)
    big = im.width * im.height >= GIVE_BACK_PIXELS
    x = _pixel_values(im, spec)
    del im  # the decoded image goes here, so that its pages can be handed back below
    if decoded_here and big:
        give_back_memory()
    return x


def _pixel_values(im: Image.Image, spec: ImageSpec) -> np.ndarray:
    w, h = im.size
    if spec.pad_to_square and w > h and w != spec.size:
        im = _pad_wide_and_resize(im, spec)
    else:
        if spec.pad_to_square:
            im = expand_to_square(im, spec.pad_color)
        size = _resized_size(im.size, spec.size)  # PIL wants (w, h)
        if size != im.size:
            im = im.resize(size, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(im)  # (H, W, 3) uint8
    ch, cw = spec.crop
    top, left = (arr.shape[0] - ch) // 2, (arr.shape[1] - cw) // 2
    if top < 0 or left < 0:
        raise ImageError(
            f"crop {ch}x{cw} is larger than the resized image {arr.shape[0]}x{arr.shape[1]}",
            "fix the vision tower's preprocessor_config.json (crop_size must not exceed size)",
        )
    arr = arr[top : top + ch, left : left + cw]
    x = (arr.astype(np.float64) * spec.rescale).astype(np.float32)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, H, W)


# Above ~4 MP (12 MB of RGB) a decode's freed blocks are worth handing back; below, the heap reuses them.
GIVE_BACK_PIXELS = 4_000_000


@functools.cache
def _malloc_trim() -> Optional[Callable[[int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:  # glibc only: musl (Alpine) has no malloc_trim and returns freed memory by itself
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def give_back_memory() -> None:
    """Return the heap's free pages to the OS after a big image is gone.

    Pillow allocates an image in 16 MB blocks; after the first is freed, glibc's adaptive mmap
    threshold rises above that size and the later blocks come from the heap (a worker thread's
    arena, in the server), where freed pages stay resident for reuse: ~175-255 MB after 64 MP.
    malloc_trim(0) releases the free pages of every arena; it is a no-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def sample_images(n: int = 3, seed: int = 0) -> list[Image.Image]:
    """Real-looking sample images (parity checks, calibration, benchmarks): gradients, shapes,
    texture and noise, in several aspect ratios."""
    rng = np.random.default_rng(seed)
    sizes = [(480, 320), (256, 384), (640, 640), (333, 201)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        base = rng.uniform(60, 200, 3)
        tilt = rng.uniform(-80, 80, (2, 3))
        arr = base + x[..., None] * tilt[0] + y[..., None] * tilt[1]
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 6))):
            cx, cy, r = rng.integers(0, w), rng.integers(0, h), int(rng.integers(10, min(w, h) // 3))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            [d.ellipse, d.rectangle][int(rng.integers(0, 2))]([cx - r, cy - r, cx + r, cy + r], fill=color)
        im = im.filter(ImageFilter.GaussianBlur(0.8))
        noisy = np.asarray(im, np.float32) + rng.normal(0, 4, (h, w, 3))
        out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return out
