from __future__ import annotations

import pytest
import torch
from torch import nn

from apt_model.model.attention import AutopoieticAttention, build_mask


def _attn(use_autopoietic: bool = True, d: int = 16, h: int = 4, seed: int = 0) -> AutopoieticAttention:
    torch.manual_seed(seed)
    return AutopoieticAttention(d, h, use_autopoietic=use_autopoietic, hidden=16).eval()


def test_causal_and_key_padding_positions_have_exactly_zero_probability() -> None:
    attn = _attn()
    b, n_len = 3, 7
    x = torch.randn(b, n_len, 16)
    pad = torch.zeros(b, n_len, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 2:] = True
    _, p = attn(x, key_padding_mask=pad, query_padding_mask=pad, causal=True, return_probs=True)
    assert p.shape == (b, 4, n_len, n_len)
    future = torch.ones(n_len, n_len, dtype=torch.bool).triu(1)
    assert (p[:, :, future] == 0).all()
    keys = pad[:, None, None, :].expand_as(p)
    assert (p[keys] == 0).all()
    # non-padding query rows are distributions, padding query rows are all zero
    sums = p.sum(-1)
    qrows = pad[:, None, :].expand_as(sums)
    torch.testing.assert_close(sums[~qrows], torch.ones_like(sums[~qrows]))
    assert (sums[qrows] == 0).all()


def test_cross_attention_masks_source_padding_and_cached_kv_is_identical() -> None:
    attn = _attn()
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 8, 16)
    src_pad = torch.zeros(2, 8, dtype=torch.bool)
    src_pad[1, 3:] = True
    out, p = attn(x, mem, key_padding_mask=src_pad, return_probs=True)
    assert (p[1, :, :, 3:] == 0).all()
    out2 = attn(x, key_padding_mask=src_pad, kv=attn.project_kv(mem))
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_padding_content_does_not_leak_through_statistics() -> None:
    attn = _attn()
    x = torch.randn(2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[:, 4:] = True
    y1 = attn(x, key_padding_mask=pad, query_padding_mask=pad)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 16) * 10
    y2 = attn(x2, key_padding_mask=pad, query_padding_mask=pad)
    torch.testing.assert_close(y2[:, :4], y1[:, :4], rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_plain_path_matches_nn_multihead_attention(causal: bool) -> None:
    attn = _attn(use_autopoietic=False)
    ref = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.in_proj_weight)
        ref.in_proj_bias.copy_(attn.in_proj_bias)
        ref.out_proj.weight.copy_(attn.out_proj.weight)
        ref.out_proj.bias.copy_(attn.out_proj.bias)
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1) if causal else None
    expected, _ = ref(x, x, x, key_padding_mask=pad, attn_mask=mask, need_weights=False)
    got = attn(x, key_padding_mask=pad, causal=causal)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got2, p = attn(x, key_padding_mask=pad, causal=causal, return_probs=True)
    torch.testing.assert_close(got2, expected, rtol=1e-5, atol=1e-6)
    assert (p[1, :, :, 4:] == 0).all()


def test_plain_path_fully_masked_rows_are_zero_not_nan() -> None:
    attn = _attn(use_autopoietic=False)
    x, mem = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    src_pad = torch.zeros(2, 4, dtype=torch.bool)
    src_pad[0] = True
    out = attn(x, mem, key_padding_mask=src_pad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], attn.out_proj.bias.expand(3, 16))


def test_autopoietic_fully_masked_sequence_is_finite() -> None:
    attn = _attn()
    x = torch.randn(2, 4, 16, requires_grad=True)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[1] = True
    out = attn(x, key_padding_mask=pad, query_padding_mask=pad, causal=True)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_capture_probs_and_build_mask() -> None:
    attn = _attn()
    attn.capture_probs = True
    attn(torch.randn(1, 3, 16), causal=True)
    assert attn.last_probs is not None and attn.last_probs.shape == (1, 4, 3, 3)
    assert build_mask(3, 3) is None
    m = build_mask(3, 3, causal=True, key_padding_mask=torch.tensor([[False, False, True]]))
    assert m.tolist() == [[[False, True, True], [False, False, True], [False, False, True]]]
