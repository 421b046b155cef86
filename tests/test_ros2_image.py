"""`mqt_edge.ros2.image_from_ros` on plain objects shaped like sensor_msgs messages (no rclpy needed)."""

import array
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mqt_edge.errors import MQTEdgeError
from mqt_edge.ros2 import ENCODINGS, RosImageError, image_from_ros

H, W = 5, 7
RGB = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
RGB16 = np.random.default_rng(1).integers(0, 2**16, (H, W, 3), dtype=np.uint16)


def raw(encoding: str, pad: int = 0, bigendian: bool = False, data_type=bytes, rgb=RGB, rgb16=RGB16):
    """Encode the reference picture as a sensor_msgs/Image would carry it, rows padded by `pad` bytes."""
    channels, depth, _ = ENCODINGS[encoding]
    src = rgb16 if depth == 2 else rgb
    mono = np.round(src.astype(np.float64).mean(axis=2)).astype(src.dtype)
    pixels = {"rgb": src, "bgr": src[..., ::-1], "mon": mono[..., None]}[encoding[:3]]
    if channels == 4:
        alpha = np.full(src.shape[:2] + (1,), 9, src.dtype)
        pixels = np.concatenate([pixels, alpha], axis=2)
    if depth == 2:
        pixels = pixels.astype(">u2" if bigendian else "<u2")
    rows = pixels.reshape(H, -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((H, pad), 77, np.uint8)], axis=1)
    data = padded.tobytes()
    if data_type is array.array:
        data = array.array("B", data)  # what rclpy gives for uint8[] fields
    elif data_type is list:
        data = list(data)
    return SimpleNamespace(height=H, width=W, encoding=encoding, is_bigendian=int(bigendian),
                           step=padded.shape[1], data=data)


def expected(encoding: str) -> np.ndarray:
    if encoding.startswith("mono"):
        src = RGB16 if encoding.endswith("16") else RGB
        mono = np.round(src.astype(np.float64).mean(axis=2)).astype(src.dtype)
        out = np.repeat(mono[..., None], 3, axis=2)
    else:
        out = RGB16 if encoding.endswith("16") else RGB
    return (out >> 8).astype(np.uint8) if out.dtype == np.uint16 else out


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("pad", [0, 3, 64])
def test_every_encoding_gives_the_rgb_picture_with_padded_steps(encoding, pad):
    got = image_from_ros(raw(encoding, pad))
    assert got.dtype == np.uint8 and got.shape == (H, W, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected(encoding))


@pytest.mark.parametrize("encoding", ["rgb16", "bgra16", "mono16"])
def test_sixteen_bit_data_follows_is_bigendian(encoding):
    big, little = image_from_ros(raw(encoding, 2, bigendian=True)), image_from_ros(raw(encoding, 2))
    np.testing.assert_array_equal(big, expected(encoding))
    np.testing.assert_array_equal(little, expected(encoding))
    # the same bytes read with the other byte order are a different picture
    flipped = raw(encoding, 2, bigendian=True)
    flipped.is_bigendian = 0
    assert not np.array_equal(image_from_ros(flipped), expected(encoding))


@pytest.mark.parametrize("data_type", [bytes, array.array, list])
def test_data_as_rclpy_array_bytes_or_list(data_type):
    np.testing.assert_array_equal(image_from_ros(raw("bgr8", 5, data_type=data_type)), RGB)


def test_the_result_does_not_alias_the_message():
    msg = raw("rgb8", data_type=array.array)
    got = image_from_ros(msg)
    msg.data[0] ^= 0xFF  # a driver reusing its buffer must not change a frame being answered
    assert got[0, 0, 0] == RGB[0, 0, 0]


def compressed(fmt: str, pil_format: str, picture=RGB) -> SimpleNamespace:
    buf = io.BytesIO()
    options = {"quality": 95, "subsampling": 0} if pil_format == "JPEG" else {}
    Image.fromarray(picture).save(buf, format=pil_format, **options)
    return SimpleNamespace(format=fmt, data=array.array("B", buf.getvalue()))


def test_compressed_png_is_exact_and_jpeg_is_close():
    np.testing.assert_array_equal(image_from_ros(compressed("png", "PNG")), RGB)
    np.testing.assert_array_equal(image_from_ros(compressed("rgb8; png compressed bgr8", "PNG")), RGB)
    smooth = np.repeat(np.repeat(RGB, 16, axis=0), 16, axis=1)  # JPEG is lossy: compare a smooth picture
    got = image_from_ros(compressed("jpeg", "JPEG", smooth))
    assert got.shape == smooth.shape and np.abs(got.astype(int) - smooth).mean() < 3


@pytest.mark.parametrize("msg, match", [
    (SimpleNamespace(height=H, width=W, encoding="yuv422", is_bigendian=0, step=2 * W, data=bytes(2 * W * H)),
     "encoding 'yuv422' is not supported"),
    (SimpleNamespace(height=0, width=W, encoding="rgb8", is_bigendian=0, step=3 * W, data=b""), "empty"),
    (SimpleNamespace(height=H, width=0, encoding="rgb8", is_bigendian=0, step=0, data=b""), "empty"),
    (SimpleNamespace(height=H, width=W, encoding="rgb8", is_bigendian=0, step=3 * W,
                     data=bytes(3 * W * H - 1)), "fewer than height x step"),
    (SimpleNamespace(height=H, width=W, encoding="rgb8", is_bigendian=0, step=3 * W - 1,
                     data=bytes(3 * W * H)), "less than width x pixel size"),
    (SimpleNamespace(format="tiff", data=b"II*\x00"), "format 'tiff' is not supported"),
    (SimpleNamespace(format="jpeg", data=b"not a jpeg"), "cannot be decoded"),
    (SimpleNamespace(format="png", data=compressed("jpeg", "JPEG").data), "cannot be decoded"),
])
def test_bad_messages_are_refused_in_one_line(msg, match):
    with pytest.raises(RosImageError, match=match) as info:
        image_from_ros(msg)
    assert "\n" not in str(info.value) and ";" in str(info.value)  # problem; fix


def test_the_stream_api_and_the_node_never_import_torch():
    import subprocess
    import sys

    code = ("import sys, mqt_edge.watch, mqt_edge.ros2, mqt_edge.ros2.node, mqt_edge.cli; "
            "bad = [m for m in ('torch', 'transformers', 'rclpy') if m in sys.modules]; print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"  # rclpy too: it is imported when the node starts, not before


@pytest.mark.parametrize("options, match", [
    (dict(overlap="maybe"), "overlap 'maybe'"), (dict(rate=-1.0), "negative"),
    (dict(rate=2.0, every_n=3), "both rate and every_n"), (dict(m=16, refine=8), "not above"),
    (dict(image_topics=()), "distinct, non-empty"), (dict(image_topics=("front", " front ")), "distinct"),
    (dict(image_topics=("front", "")), "non-empty"),
])
def test_node_options_refuse_what_cannot_work(options, match):
    from mqt_edge.ros2.node import NodeOptions  # rclpy-free until the node starts

    with pytest.raises(MQTEdgeError, match=match):
        NodeOptions(**options).check()
    assert NodeOptions(m=16, refine=64, rate=2.0).check()
