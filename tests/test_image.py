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
    with pytest.raises(ImageError, match="cannot read image"):
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
