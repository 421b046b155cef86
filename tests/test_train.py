"""Matryoshka training: the recipe runs, learns, and saves a checkpoint that loads back exactly."""

import pytest
import torch

from conftest import scene
from mqt_edge.errors import InputError
from mqt_edge.model import MQTLlava
from mqt_edge.train import StageConfig, save_checkpoint, synthetic_examples, train_stage


def test_stages_learn_and_the_checkpoint_round_trips(tiny_ckpt, tmp_path):
    model = MQTLlava.from_pretrained(tiny_ckpt, dtype=torch.float32)
    frozen_vision = {k: v.clone() for k, v in model.vision.state_dict().items()}
    data = synthetic_examples(0)
    seen_m = []
    l1 = train_stage(model, StageConfig(1, steps=12, batch_size=4, lr=2e-3, train=("mqt", "llm"), warmup=2), data,
                     on_step=lambda s, loss, m: seen_m.append(m))
    assert set(seen_m) == {256}  # stage 1: every query
    assert sum(l1[-3:]) / 3 < 0.8 * sum(l1[:3]) / 3  # it learns (the answer prior, at least)
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in frozen_vision.items())  # frozen part
    seen_m.clear()
    train_stage(model, StageConfig(2, steps=6, batch_size=2, lr=1e-3, train=("mqt",)), data, seed=3,
                on_step=lambda s, loss, m: seen_m.append(m))
    assert all(m % 2 == 0 and 2 <= m <= 256 for m in seen_m) and len(set(seen_m)) > 1  # stage 2: m ~ U{2..M}
    out = save_checkpoint(model, tmp_path / "trained")
    again = MQTLlava.from_pretrained(out, dtype=torch.float32)
    im = scene(seed=2)
    assert torch.allclose(again.encode_image(im, tokens=64), model.encode_image(im, tokens=64), atol=1e-6)
    q = "What color is the circle?"
    assert again.generate(im, q, tokens=16, max_new_tokens=6).token_ids == \
        model.generate(im, q, tokens=16, max_new_tokens=6).token_ids


def test_bad_stage_configs():
    with pytest.raises(InputError):
        StageConfig(3, steps=1)
    with pytest.raises(InputError):
        StageConfig(1, steps=1, train=("eyes",))
