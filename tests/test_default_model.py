"""The shipped default model: small, documented, and right about the README's sample image."""

import json
from pathlib import Path

import pytest
import torch

from conftest import cli, stderr_lines
from mqt_edge.defaults import DEFAULT_MODEL, default_model
from mqt_edge.evaluate import first_word

pytestmark = pytest.mark.skipif(
    default_model() is None,
    reason="no default model in mqt_edge/assets/default-model (a source tree without the shipped model)",
)

EXAMPLE = Path(__file__).parent.parent / "examples" / "shapes.png"
# examples/shapes.png: a red circle on the left, a blue square on the right (see examples/README.md).
# Five of these need binding (a bag of the colours and kinds present cannot answer them). Left/right
# questions are left out: the default model has not learned them (held-out side questions 5/15, at
# chance; docs/training.md, "Known limits"), so asking it here would test luck.
FACTS = {
    "What color is the circle?": "red",
    "What color is the square?": "blue",
    "How many shapes are there?": "two",
    "Is there a red circle?": "yes",
    "Is there a green triangle?": "no",
    "Is there a blue circle?": "no",
    "What shape is the blue object?": "square",
    "What shape is the red object?": "circle",
}


def test_the_default_model_ships_small_and_documented():
    assert default_model() == DEFAULT_MODEL
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MB"
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["mm_num_queries"] == 256 if "mm_num_queries" in config else True
    recipe = config["mqt_edge_train"]
    for key in ("seed", "stage0_steps", "stage1_steps", "stage2_steps", "batch_size", "lr", "examples_seen"):
        assert key in recipe, key


@pytest.fixture(scope="module")
def default():
    from mqt_edge.model import MQTLlava

    return MQTLlava.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)


def test_the_default_model_keeps_the_release_architecture(default):
    assert default.num_queries == 256
    assert default.mqt.config.key_grid == (24, 24)  # CLIP-style ViT at 336 px with 14 px patches
    assert default.template.name == "llava_v1"


@pytest.mark.parametrize("question", list(FACTS))
def test_the_default_model_answers_the_sample_image(default, question):
    answer = default.generate(EXAMPLE, question, m=256, max_new_tokens=4).text
    assert first_word(answer) == FACTS[question], answer


def test_export_with_no_model_exports_the_default_and_answers(tmp_path):
    bundle = tmp_path / "bundle"
    r = cli("export", "--out", str(bundle), "--max-tokens", "256")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["max_tokens"] == 256 and manifest["llm"]["quant"] == "q4_k_m"
    r = cli("run", str(EXAMPLE), "What color is the circle?", "--bundle", str(bundle), "--json")
    assert r.returncode == 0, stderr_lines(r)
    out = json.loads(r.stdout)
    assert first_word(out["answer"]) == "red", out
