"""ROS 2 front end: `python -m mqt_edge.ros2` or `mqt-edge ros2` (the node is in `node.py`).

This module imports no ROS package: `image_from_ros` works on anything shaped like a
`sensor_msgs/Image` or `sensor_msgs/CompressedImage`, so it is tested without rclpy and a camera
driver's frames are converted with numpy alone (no cv_bridge, which PyPI does not carry).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from ..errors import ImageError
from ..image import DEFAULT_MAX_PIXELS, load_image


class RosImageError(ImageError):
    """A ROS image message the node cannot turn into RGB pixels; `kind` names the check that failed
    (the node counts and rate-limits its log lines per kind)."""

    def __init__(self, problem: str, fix: str | None = None, kind: str = "image") -> None:
        super().__init__(problem, fix)
        self.kind = kind


# encoding -> (channels, bytes per channel, the channels that give R, G, B). The 16-bit encodings
# are kept to their high byte, which is the only place `is_bigendian` changes the result.
ENCODINGS: dict[str, tuple[int, int, tuple[int, int, int]]] = {
    "rgb8": (3, 1, (0, 1, 2)),
    "bgr8": (3, 1, (2, 1, 0)),
    "rgba8": (4, 1, (0, 1, 2)),
    "bgra8": (4, 1, (2, 1, 0)),
    "mono8": (1, 1, (0, 0, 0)),
    "rgb16": (3, 2, (0, 1, 2)),
    "bgr16": (3, 2, (2, 1, 0)),
    "rgba16": (4, 2, (0, 1, 2)),
    "bgra16": (4, 2, (2, 1, 0)),
    "mono16": (1, 2, (0, 0, 0)),
}
COMPRESSED = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}  # words in CompressedImage.format -> Pillow


def _bytes(data: Any) -> np.ndarray:
    """A message's `data` (bytes, array.array('B') in rclpy, a list of ints, numpy) as uint8."""
    try:
        return np.frombuffer(memoryview(data).cast("B"), np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def image_from_ros(msg: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`sensor_msgs/Image` (rgb8, bgr8, rgba8, bgra8, mono8 and their 16-bit forms) or
    `sensor_msgs/CompressedImage` (jpeg, png) -> a new HxWx3 uint8 RGB array.

    Rows may be padded (`step` > width x pixel size); 16-bit data honours `is_bigendian`.
    Raises `RosImageError`, one line, for anything else."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return _from_compressed(msg, max_pixels)
    encoding = str(getattr(msg, "encoding", ""))
    if encoding not in ENCODINGS:
        raise RosImageError(f"image encoding '{encoding}' is not supported",
                            f"publish one of {', '.join(ENCODINGS)}, or a jpeg/png CompressedImage",
                            "image_encoding")
    channels, depth, rgb = ENCODINGS[encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h < 1 or w < 1:
        raise RosImageError(f"{encoding} image is empty ({w}x{h})", "publish an image with at least one pixel",
                            "image_empty")
    row = w * channels * depth
    if step < row:
        raise RosImageError(f"{encoding} image has step {step}, less than width x pixel size = {row}",
                            "set step to the row length in bytes", "image_step")
    data = _bytes(msg.data)
    if data.size < h * step:
        raise RosImageError(f"{encoding} image has {data.size} bytes of data, fewer than height x step = "
                            f"{h} x {step} = {h * step}", "publish whole frames", "image_data")
    rows = data[: h * step].reshape(h, step)[:, :row]  # drop the padding at the end of each row
    if depth == 2:
        order = ">u2" if msg.is_bigendian else "<u2"
        rows = (np.ascontiguousarray(rows).view(order) >> 8).astype(np.uint8)
    pixels = rows.reshape(h, w, channels)
    return np.ascontiguousarray(pixels[:, :, list(rgb)])


def _from_compressed(msg: Any, max_pixels: int) -> np.ndarray:
    fmt = str(msg.format).lower()
    words = fmt.replace(";", " ").split()
    pil_format = next((COMPRESSED[word] for word in words if word in COMPRESSED), None)
    if pil_format is None:
        raise RosImageError(f"compressed image format '{msg.format}' is not supported", "publish jpeg or png",
                            "compressed_format")
    from PIL import Image, UnidentifiedImageError

    try:
        opened = Image.open(io.BytesIO(_bytes(msg.data).tobytes()), formats=[pil_format])
        return np.asarray(load_image(opened, max_pixels)).copy()
    except ImageError as exc:
        raise RosImageError(f"compressed image: {exc.problem}", exc.fix, "compressed_data") from None
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise RosImageError(f"compressed image ({msg.format}, {len(msg.data)} bytes) cannot be decoded: {exc}",
                            "publish a whole jpeg or png", "compressed_data") from None


__all__ = ["ENCODINGS", "RosImageError", "image_from_ros"]
