"""The Matryoshka Query Transformer on its own: nesting, subsets, range checks, derived sizes."""

import numpy as np
import pytest
import torch

from mqt_edge.errors import TokensError
from mqt_edge.model.mqt import MatryoshkaQueryTransformer, MQTConfig


def random_mqt(M=64, D=96, hidden=80, heads=3, grid=(7, 5), seed=0):
    torch.manual_seed(seed)
    mqt = MatryoshkaQueryTransformer(MQTConfig(M, D, hidden, heads, grid))
    with torch.no_grad():
        for name, p in mqt.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.3 if p.ndim > 1 else 0.1)
    return mqt


@pytest.fixture
def mqt():
    return random_mqt()


def test_shapes_come_from_the_config_not_the_release_constants(mqt):
    feats = torch.randn(2, 35, 96)
    out = mqt(feats, m=10)
    assert out.shape == (2, 10, 80)
    assert mqt.key_positions().shape == (35, 96)
    assert mqt.key_positions().dtype == torch.float16


def test_nesting_every_m_is_a_prefix_of_M(mqt):
    # Large random weights make tokens of magnitude ~10: bound the error relative to that.
    feats = torch.randn(2, 35, 96)
    full = mqt(feats, m=64)
    scale = full.abs().max().item()
    for m in range(1, 65):
        diff = (mqt(feats, m=m) - full[:, :m]).abs().max().item()
        assert diff <= 1e-6 * scale, (m, diff, scale)


def test_subset_of_query_ids_gives_the_same_rows(mqt):
    feats = torch.randn(1, 35, 96)
    full = mqt(feats, m=64)
    tol = 1e-6 * full.abs().max().item()
    part = mqt(feats, query_ids=torch.arange(10, 23))
    assert (part - full[:, 10:23]).abs().max().item() <= tol
    scattered = [63, 0, 17]
    assert (mqt(feats, query_ids=scattered) - full[:, scattered]).abs().max().item() <= tol


@pytest.mark.parametrize("bad", [0, 65, -1, 2.5, True, "8"])
def test_m_outside_1_to_M_is_refused(mqt, bad):
    with pytest.raises(TokensError, match="1..64"):
        mqt(torch.randn(1, 35, 96), m=bad)


@pytest.mark.parametrize("ids", [[], [64], [-1, 3]])
def test_bad_query_ids_are_refused(mqt, ids):
    with pytest.raises(TokensError):
        mqt(torch.randn(1, 35, 96), query_ids=ids)


def test_matches_torch_multihead_attention(mqt):
    """Our explicit attention equals nn.MultiheadAttention with the same packed weights."""
    feats = torch.randn(1, 35, 96)
    ids = torch.arange(64)
    pos = mqt.pos_embed.half().float()
    q = mqt.ln_q(mqt.query + pos)
    k = mqt.ln_k(mqt.key_positions().float())
    v = mqt.ln_v(feats[0])
    ref = mqt.attn(q[:, None], k[:, None], v[:, None], need_weights=False)[0][:, 0] @ mqt.proj
    assert torch.allclose(mqt(feats, query_ids=ids)[0], ref, atol=1e-5)


def test_pos_embed_is_mae_sincos_width_first():
    from mqt_edge.model.mqt import sincos_pos_embed_2d

    emb = sincos_pos_embed_2d(8, 3)  # (9, 8): [sin w, cos w | sin h, cos h] per 2 frequencies
    row, col = 1, 2  # flattened row-major over (h, w)
    e = emb[row * 3 + col]
    omega = 1 / 10000 ** (np.arange(2) / 2)
    np.testing.assert_allclose(e[:4], np.r_[np.sin(col * omega), np.cos(col * omega)], rtol=1e-6)
    np.testing.assert_allclose(e[4:], np.r_[np.sin(row * omega), np.cos(row * omega)], rtol=1e-6)


def test_pos_embed_stays_fp16_rounded_after_float_conversion(mqt):
    mqt = mqt.float()
    assert mqt.pos_embed.dtype == torch.float32
    pos = mqt.pos_embed.detach().clone()
    perturbed = pos + pos.abs() * 1e-5  # below half an fp16 ulp, but a change in fp32
    assert not torch.equal(perturbed, pos)
    with torch.no_grad():
        base = mqt(torch.ones(1, 35, 96), m=4)
        mqt.pos_embed.copy_(perturbed)
        again = mqt(torch.ones(1, 35, 96), m=4)
    assert torch.equal(base, again)
