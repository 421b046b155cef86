"""Our reference against an independent implementation of the release, on checkpoints we did not write.

tests/release_reference.py writes tiny checkpoints in the release layout (its own code, no mqt_edge
import) and re-expresses the release's forward pass with nn.MultiheadAttention, CLIPImageProcessor
and cache-free greedy decoding.
"""

import pytest
import torch

from conftest import scene
from release_reference import ReleaseReference, write_release_checkpoint
from mqt_edge.model import MQTLlava

LAYOUTS = {
    "bin-2-shards-external-clip": dict(),
    "safetensors-1-file-embedded-clip": dict(weight_format="safetensors", num_shards=1, vision_in_checkpoint=True),
    "release-grid-16-to-24": dict(num_queries=256, clip_image_size=336, num_shards=3),
}
QUESTION = "What color is the circle?"


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(request, tmp_path_factory):
    ckpt = write_release_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", **LAYOUTS[request.param])
    ref = ReleaseReference(ckpt)
    ref.ckpt_dir = ckpt
    return ref, MQTLlava.from_pretrained(ckpt, dtype=torch.float32)


def test_dimensions_are_read_from_the_weights(pair):
    ref, ours = pair
    c = ours.mqt.config
    assert c.num_queries == ref.num_queries
    assert c.kv_dim == ref.config["mm_hidden_size"]
    assert c.key_grid == tuple(ref.grid)
    assert c.hidden_size == ref.config["hidden_size"]


def test_visual_tokens_match_to_1e_5(pair):
    ref, ours = pair
    M = ref.num_queries
    for seed in range(2):
        im = scene(seed=seed)
        for m in (1, 7, M):
            expected = ref.visual_tokens(im, m)
            got = ours.encode_image(im, m=m)
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() <= 1e-5, (m, seed)


def test_query_subset_matches_the_reference_rows(pair):
    ref, ours = pair
    im = scene(seed=3)
    expected = ref.visual_tokens(im, ref.num_queries)[5:20]
    assert (ours.encode_image(im, query_ids=range(5, 20)) - expected).abs().max().item() <= 1e-5


def test_prompt_ids_match_the_release_tokenisation(pair):
    ref, ours = pair
    before, after = ours.prompt_ids(QUESTION)
    assert before + [-200] + after == ref.prompt_ids(QUESTION)


@pytest.mark.parametrize("question", [QUESTION, "Describe  the\nscene, please: 3 cats?", "Qué color tiene?"])
def test_prompt_ids_match_transformers_llama_tokenizer(pair, question):
    """The release tokenises with the slow LlamaTokenizer (legacy) through tokenizer_image_token."""
    from transformers import LlamaTokenizer

    ref, ours = pair
    tok = LlamaTokenizer(vocab_file=str(ref.ckpt_dir / "tokenizer.model"), legacy=True)
    chunks = [tok(c).input_ids for c in ours.template.render(question).split("<image>")]
    expected = chunks[0] + [-200] + chunks[1][1:]  # BOS kept on the first chunk only
    before, after = ours.prompt_ids(question)
    assert before + [-200] + after == expected


def test_greedy_answer_matches(pair):
    ref, ours = pair
    for seed, m in ((0, 1), (1, ref.num_queries), (2, 7)):
        im = scene(seed=seed)
        expected = ref.greedy_ids(im, QUESTION, m, max_new_tokens=12)
        got = ours.generate(im, QUESTION, m=m, max_new_tokens=12)
        assert got.token_ids == expected, (seed, m)
        assert got.text == ref.answer(im, QUESTION, m, max_new_tokens=12)
