"""Preprocessing: bit-exact with the release's expand2square + transformers' CLIPImageProcessor."""

import numpy as np
import pytest
from PIL import Image

from conftest import scene
from mqt_edge.errors import ImageError
from mqt_edge.image import ImageSpec, load_image, preprocess

SPEC = ImageSpec(336, (336, 336), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def release_pixels(image: Image.Image, size=336, crop=(336, 336)) -> np.ndarray:
    """expand2square as the release writes it, then transformers' own CLIPImageProcessor."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": crop[0], "width": crop[1]})
    bg = tuple(int(x * 255) for x in proc.image_mean)
    w, h = image.size
    if w != h:
        sq = Image.new(image.mode, (max(w, h),) * 2, bg)
        sq.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        image = sq
    return proc.preprocess(image, return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("wh", [(200, 120), (120, 200), (336, 336), (37, 901), (1000, 999), (2, 7)])
def test_matches_clip_image_processor_exactly(wh):
    im = scene(*wh) if min(wh) > 40 else Image.new("RGB", wh, (10, 200, 30))
    ours = preprocess(im, SPEC)
    assert ours.shape == (1, 3, 336, 336) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, release_pixels(im))


def test_no_padding_and_a_real_centre_crop():
    spec = ImageSpec(224, (200, 180), SPEC.mean, SPEC.std, pad_to_square=False)
    im = scene(300, 180)
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 200, "width": 180})
    np.testing.assert_array_equal(preprocess(im, spec), proc.preprocess(im, return_tensors="np")["pixel_values"])


def test_pad_colour_is_the_floored_clip_mean():
    assert SPEC.pad_color == (122, 116, 104)
    assert ImageSpec.from_dict(SPEC.to_dict()) == SPEC


def test_path_pil_and_array_give_the_same_pixels(tmp_path):
    im = scene()
    im.save(tmp_path / "a.png")
    a = preprocess(tmp_path / "a.png", SPEC)
    np.testing.assert_array_equal(a, preprocess(im, SPEC))
    np.testing.assert_array_equal(a, preprocess(np.asarray(im), SPEC))
    np.testing.assert_array_equal(a, preprocess(str(tmp_path / "a.png"), SPEC))


def test_rgba_and_greyscale_are_converted_like_the_release(tmp_path):
    im = scene().convert("RGBA")
    np.testing.assert_array_equal(preprocess(im, SPEC), release_pixels(im.convert("RGB")))
    grey = scene().convert("L")
    assert load_image(grey).mode == "RGB"


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="is not a JPEG, PNG, BMP or WebP image"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(ImageError, match="image not found"):
        load_image(tmp_path / "missing.png")
    scene().save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("RGB", (4000, 3000)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="over the limit"):
        load_image(tmp_path / "big.png", max_pixels=10_000_000)
    assert load_image(tmp_path / "big.png", max_pixels=12_000_000).size == (4000, 3000)


@pytest.mark.parametrize(
    "arr", [np.zeros((10, 10, 3), np.float32), np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8)]
)
def test_arrays_must_be_hxwx3_uint8(arr):
    with pytest.raises(ImageError, match="HxWx3 uint8"):
        load_image(arr)


def test_other_types_are_refused():
    with pytest.raises(ImageError, match="cannot use an image of type"):
        load_image(42)


def pad_then_resize(im: Image.Image, spec: ImageSpec) -> np.ndarray:
    """The straightforward order, for shapes too big for CLIPImageProcessor in a fast test."""
    w, h = im.size
    side = max(w, h)
    sq = Image.new("RGB", (side, side), spec.pad_color)
    sq.paste(im, ((side - w) // 2, (side - h) // 2))
    if side != spec.size:
        sq = sq.resize((spec.size, spec.size), resample=Image.Resampling.BICUBIC)
    return np.asarray(sq)


def strip(wh, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("wh", [(901, 37), (2000, 3), (3001, 1), (337, 5), (335, 100), (400, 399), (60, 7)])
def test_wide_images_are_never_padded_at_full_size_and_match_exactly(wh):
    """The wide path (rows resized, then pad rows added) against the release's pad-then-resize."""
    im = strip(wh, seed=sum(wh))
    np.testing.assert_array_equal(preprocess(im, SPEC), release_pixels(im))


@pytest.mark.parametrize("wh", [(4000, 3), (7000, 2), (5003, 1)])
def test_long_wide_strips_match_pad_then_resize(wh):
    im = strip(wh)
    x = preprocess(im, SPEC)
    pixels = (x[0].transpose(1, 2, 0) * np.asarray(SPEC.std, np.float32) + np.asarray(SPEC.mean, np.float32))
    expected = pad_then_resize(im, SPEC)
    ref = (expected.astype(np.float64) * SPEC.rescale).astype(np.float32)
    ref = (ref - np.asarray(SPEC.mean, np.float32)) / np.asarray(SPEC.std, np.float32)
    np.testing.assert_array_equal(x[0], ref.transpose(2, 0, 1))
    assert pixels.shape == (336, 336, 3)


PEAK = r"""
import sys
from PIL import Image
from mqt_edge.errors import ImageError
from mqt_edge.image import ImageSpec, preprocess, CLIP_MEAN, CLIP_STD
w, h, pad = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "pad"
Image.new("RGB", (w, h), (30, 140, 200)).save(sys.argv[1])
try:
    print("ok", preprocess(sys.argv[1], ImageSpec(336, (336, 336), CLIP_MEAN, CLIP_STD, pad)).shape)
except ImageError as exc:
    print("refused:", exc)
print(next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


@pytest.mark.parametrize("wh, pad, outcome, peak_limit_mb", [
    ((20000, 1), "pad", "ok", 120),  # was 1.6 GB and 9 s: padded to 20000 x 20000 first
    ((1, 20000), "pad", "refused: image 1x20000 needs a 20000x20000 buffer", 60),
    ((20000, 1), "nopad", "refused: image 20000x1 needs a 6720000x336 buffer", 60),
    ((190000, 1), "pad", "ok", 60 + 3 * 64 * 1.3),  # the budget: one 64 MP RGB buffer (190000 x 336)
])
def test_preprocessing_memory_is_bounded_before_decoding(tmp_path, wh, pad, outcome, peak_limit_mb):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "s.png"), *map(str, wh), pad],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result, peak_mb = r.stdout.splitlines()
    assert result.startswith(outcome), result
    assert int(peak_mb) < peak_limit_mb, f"peak RSS {peak_mb} MB"


def test_a_truncated_file_opened_by_the_caller_is_an_image_error(tmp_path):
    scene().save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot read the PIL image"):
        preprocess(Image.open(tmp_path / "cut.png"), SPEC)


# -- the pixel limit, decided from the header (issue 25, defect 5) ------------------------------------

def declaring(fmt: str, w: int, h: int) -> bytes:
    """A small real file of `fmt` whose header declares w x h (only the header is read before the check)."""
    import io
    import struct

    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 30)).save(buf, format=fmt)
    raw = bytearray(buf.getvalue())
    if fmt == "PNG":
        import zlib

        raw[16:24] = struct.pack(">II", w, h)
        raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))  # IHDR's CRC
    elif fmt == "JPEG":
        sof = raw.index(b"\xff\xc0")
        raw[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    else:  # BMP
        raw[18:26] = struct.pack("<ii", w, h)
    return bytes(raw)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
@pytest.mark.parametrize("side", [9000, 13000, 14000, 20000, 65000])
def test_the_pixel_limit_answers_at_any_declared_size(tmp_path, fmt, side):
    """Above ~179 MP Pillow's own bomb check used to answer first, as an unreadable image."""
    import warnings

    from mqt_edge.errors import ImageTooLargeError

    data = declaring(fmt, side, side)
    (tmp_path / "big").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor Pillow's DecompressionBombWarning on the way
        for source in (data, tmp_path / "big"):
            with pytest.raises(ImageTooLargeError) as info:
                preprocess(source, SPEC)
            msg = str(info.value)
            assert f"{side}x{side} = {side * side:,} pixels, over the limit of 64,000,000" in msg, msg
            assert "downscale it first, or raise max_pixels" in msg and "\n" not in msg


def test_a_raised_limit_is_not_overruled_by_pillows(tmp_path):
    """15000 x 12000 (180 MP) is past Pillow's 179 MP: with max_pixels above it, the header is accepted
    and the (truncated) data is what is refused. The declared buffer is never filled: a few MB."""
    data = declaring("PNG", 15000, 12000)
    with pytest.raises(ImageError, match="cannot read the image: image file is truncated"):
        load_image(data, max_pixels=200_000_000)


def test_other_formats_are_refused_by_name(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.gif")
    with pytest.raises(ImageError, match=r"is not a JPEG, PNG, BMP or WebP image; convert it"):
        load_image(tmp_path / "a.gif")


def test_encoded_bytes_are_an_image_input(tmp_path):
    scene().save(tmp_path / "a.png")
    np.testing.assert_array_equal(preprocess((tmp_path / "a.png").read_bytes(), SPEC), preprocess(scene(), SPEC))
