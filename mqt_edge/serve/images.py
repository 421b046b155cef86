"""`image_url` to image bytes: data URLs always, local files under --media-dir, http(s) only when allowed.

Remote fetching is off by default: a server that fetches any URL a client names can be turned on its
own network (SSRF). Local paths must resolve (symlinks followed) inside the media directory.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

from PIL import Image

from ..errors import ImageError, ImageTooLargeError
from ..image import load_image, verify_image
from .errors import APIError

PARAM = "messages"


@dataclass(frozen=True)
class ImageBytes:
    data: bytes
    sha256: str  # content hash: the session cache's key for "the same image"


def _decode_data_url(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:"):
        raise APIError(400, "a data URL must look like data:image/png;base64,...", "invalid_image", PARAM)
    if not head.endswith(";base64"):
        raise APIError(400, "only base64 data URLs are supported (data:image/...;base64,...)", "invalid_image", PARAM)
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the image data URL is not valid base64", "invalid_image", PARAM) from None


def _local(path: str, media_dir: str | None) -> bytes:
    if media_dir is None:
        raise APIError(400, "local image paths are off on this server", "image_source_refused", PARAM)
    root = Path(media_dir).resolve()
    target = (root / path).resolve()  # an absolute path replaces root; `..` and symlinks are resolved
    if not target.is_relative_to(root):
        raise APIError(400, "the image path is outside the server's media directory", "image_source_refused", PARAM)
    if not target.is_file():
        raise APIError(400, "no image file at that path in the media directory", "invalid_image", PARAM)
    return target.read_bytes()


def _remote(url: str, allowed: bool, timeout_s: float, limit: int) -> bytes:
    if not allowed:
        raise APIError(400, "remote image URLs are off on this server (start it with --allow-remote-images, "
                       "or send the image as a data URL)", "image_source_refused", PARAM)
    import httpx

    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=False) as r:
            if r.status_code != 200:
                raise APIError(400, f"fetching the image URL gave HTTP {r.status_code}", "invalid_image", PARAM)
            out = bytearray()
            for chunk in r.iter_bytes():
                out += chunk
                if len(out) > limit:
                    raise APIError(413, f"the remote image is over {limit:,} bytes", "image_too_large", PARAM)
            return bytes(out)
    except httpx.HTTPError as exc:
        raise APIError(400, f"cannot fetch the image URL ({type(exc).__name__})", "invalid_image", PARAM) from None


def fetch(url: str, media_dir: str | None, allow_remote: bool, remote_timeout_s: float, limit: int) -> ImageBytes:
    scheme = urlparse(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
    if scheme == "data":
        data = _decode_data_url(url)
    elif scheme == "file":
        data = _local(unquote(urlparse(url).path), media_dir)
    elif scheme in ("http", "https"):
        data = _remote(url, allow_remote, remote_timeout_s, limit)
    elif scheme == "":
        data = _local(url, media_dir)
    else:
        raise APIError(400, f"image URL scheme {scheme!r} is not supported (use data:, file: or https:)",
                       "invalid_image", PARAM)
    if not data:
        raise APIError(400, "the image is empty", "invalid_image", PARAM)
    return ImageBytes(data, hashlib.sha256(data).hexdigest())


def check_image(img: ImageBytes, max_pixels: int) -> None:
    """Refuse a bad or too large image before the request waits for a slot; keep none of its pixels."""
    with _as_api_error():
        verify_image(img.data, max_pixels)


def open_image(img: ImageBytes, max_pixels: int) -> Image.Image:
    """Decode with the pixel limit checked on the header, before any pixel is unpacked.

    The server hands pipelines `img.data` instead, so that preprocess owns the decoded pixels and
    gives them back; this is for callers that want the picture itself."""
    with _as_api_error():
        return load_image(img.data, max_pixels)


@contextlib.contextmanager
def _as_api_error() -> Iterator[None]:
    """The library's image errors, worded for a client: a size over the limit is a 413."""
    try:
        yield
    except ImageTooLargeError as exc:
        raise APIError(413, f"{exc.problem}; downscale the image and send it again",
                       "image_too_large", PARAM) from None
    except ImageError as exc:
        raise APIError(400, f"{exc.problem}; send a complete JPEG, PNG, BMP or WebP image",
                       "invalid_image", PARAM) from None
