"""The pixel limit through the Pipeline API and over HTTP (issue 25, defect 5).

One limit (`DEFAULT_MAX_PIXELS`, 64 MP) for both, decided from the header at any declared size: over
HTTP it is a 413 `image_too_large` naming the limit and the fix, never Pillow's bomb check reported
as an unreadable image (400). The app runs in this process through Starlette's TestClient (no port),
on the shipped model; each test runs under a 60 s alarm (TestClient has no timeout of its own).
"""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

import pytest

from PIL import Image

from test_image import declaring

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'mqt-edge[serve]')")
pytest.importorskip("httpx", reason="httpx is not installed (dev extra)")

from fastapi.testclient import TestClient  # noqa: E402

from mqt_edge.errors import ImageTooLargeError  # noqa: E402
from mqt_edge.image import DEFAULT_MAX_PIXELS  # noqa: E402
from mqt_edge.pipeline import Pipeline  # noqa: E402
from mqt_edge.serve import ServeConfig, create_app  # noqa: E402

EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "shapes.png"
Q = "What color is the circle?"
SIDES = [9000, 13000, 14000, 20000]  # 81 to 400 MP: Pillow's own check used to answer from ~179 MP


def url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def chat(image_url: str) -> dict:
    return {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": Q}, {"type": "image_url", "image_url": {"url": image_url}}]}]}


@pytest.fixture(autouse=True)
def bounded():
    def expire(*_):
        raise TimeoutError("the test ran past 60 s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def client(shipped_bundle):
    app = create_app(ServeConfig(bundle=str(shipped_bundle), model_name="m", max_new_tokens=4))
    with TestClient(app, raise_server_exceptions=False) as c:
        deadline = time.monotonic() + 120
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load in 120 s"
            time.sleep(0.2)
        yield c


def test_the_api_refuses_by_the_header_at_any_size(shipped_bundle):
    with Pipeline.load(shipped_bundle) as pipe:
        assert pipe.max_pixels == DEFAULT_MAX_PIXELS
        for side in SIDES:
            with pytest.raises(ImageTooLargeError, match=f"{side * side:,} pixels, over the limit of 64,000,000"):
                pipe.ask(declaring("PNG", side, side), Q, max_new_tokens=2)
        assert pipe.ask(EXAMPLE.read_bytes(), Q, max_new_tokens=4).answer.strip().lower().startswith("red")


@pytest.mark.parametrize("fmt, kind", [("PNG", "png"), ("JPEG", "jpeg"), ("BMP", "bmp")])
@pytest.mark.parametrize("side", SIDES)
def test_http_answers_413_image_too_large(client, fmt, kind, side):
    r = client.post("/v1/chat/completions", json=chat(url(declaring(fmt, side, side), kind)))
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["code"], err["type"], err["param"]) == ("image_too_large", "invalid_request_error", "messages")
    assert f"{side}x{side} = {side * side:,} pixels, over the limit of 64,000,000" in err["message"]
    assert "downscale the image and send it again" in err["message"] and "\n" not in err["message"]


def test_http_preprocessing_budget_is_413_too(client, tmp_path):
    """A 1 x 20000 strip is within the pixel limit, but padding it to a square is not (refused in look)."""
    Image.new("RGB", (1, 20000), (9, 9, 9)).save(tmp_path / "tall.png")
    r = client.post("/v1/chat/completions", json=chat(url((tmp_path / "tall.png").read_bytes())))
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
    assert "needs a 20000x20000 buffer" in r.json()["error"]["message"]


def test_http_still_answers_a_normal_image_and_a_corrupt_one_is_400(client):
    r = client.post("/v1/chat/completions", json=chat(url(EXAMPLE.read_bytes())))
    assert r.status_code == 200, r.text
    cut = EXAMPLE.read_bytes()[:-200]
    r = client.post("/v1/chat/completions", json=chat(url(cut)))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", r.text
    assert "truncated" in r.json()["error"]["message"]
