from __future__ import annotations

import time

import pytest
import torch

from apt_model.model.autopoietic import (
    AutopoieticTransform,
    autopoietic_probs,
    autopoietic_transform,
    batched_quantile,
    masked_softmax,
)
from tests.model.reference_transform import reference_probs


def _params(hidden: int = 16, seed: int = 0, tau: float = 1.2) -> AutopoieticTransform:
    torch.manual_seed(seed)
    mod = AutopoieticTransform(hidden, init_tau=tau, eps=1e-6)
    with torch.no_grad():
        # Non-zero biases so every MLP branch (clamps, relu) is exercised.
        mod.b1.uniform_(-1.0, 1.0)
        mod.b2.fill_(0.1)
    return mod


def _masks(kind: str, b: int, lq: int, lk: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    causal = torch.ones(lq, lk, dtype=torch.bool).triu(1)[None]
    kp = torch.zeros(b, lk, dtype=torch.bool)
    qp = torch.zeros(b, lq, dtype=torch.bool)
    for i in range(b):
        n = int(torch.randint(1, lk, (1,), generator=gen))
        kp[i, n:] = True
        qp[i, min(n, lq) :] = True
    pad = kp[:, None, :] | qp[:, :, None]
    if kind == "causal":
        return causal
    if kind == "padding":
        return pad
    return causal | pad


def _scores(
    b: int, h: int, lq: int, lk: int, masked: torch.Tensor | None, gen: torch.Generator, scale: float = 3.0
):
    s = torch.randn(b, h, lq, lk, generator=gen) * scale
    if masked is not None:
        s = s.masked_fill(masked[:, None], float("-inf"))
    return s


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("kind", ["none", "causal", "padding", "both"])
@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_batched_matches_reference(kind: str, scale: float) -> None:
    gen = torch.Generator().manual_seed(hash((kind, scale)) % 1000)
    b, h, lq, lk = 4, 3, 9, 9
    masked = _masks(kind, b, lq, lk, gen)
    s = _scores(b, h, lq, lk, masked, gen, scale)
    mod = _params()
    ours = mod(s, masked)
    ref = reference_probs(s, masked, mod.tau, mod.w1, mod.b1, mod.w2, mod.b2, 1e-6)
    assert ours.shape == ref.shape
    assert torch.isfinite(ours).all()
    assert _rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("lq,lk", [(5, 11), (12, 3), (1, 1), (1, 6), (6, 1)])
def test_rectangular_and_degenerate_shapes_match_reference(lq: int, lk: int) -> None:
    gen = torch.Generator().manual_seed(lq * 100 + lk)
    b, h = 3, 2
    kp = torch.zeros(b, lk, dtype=torch.bool)
    if lk > 2:
        kp[0, -2:] = True
    masked = kp[:, None, :].expand(b, lq, lk)
    s = _scores(b, h, lq, lk, masked, gen)
    mod = _params(hidden=20, tau=1.4)
    ours = mod(s, masked)
    ref = reference_probs(s, masked, mod.tau, mod.w1, mod.b1, mod.w2, mod.b2, 1e-6)
    assert torch.isfinite(ours).all()
    assert _rel_err(ours, ref) < 1e-5


def test_tau_below_one_and_large_eps_match_reference() -> None:
    gen = torch.Generator().manual_seed(5)
    s = _scores(2, 4, 6, 6, None, gen)
    mod = _params(tau=0.3)
    for eps in (1e-6, 0.3, 2.0):
        mod.eps = eps
        ref = reference_probs(s, None, mod.tau, mod.w1, mod.b1, mod.w2, mod.b2, eps)
        assert _rel_err(mod(s, None), ref) < 1e-5


def test_step12_fallback_to_m_when_f_is_not_finite() -> None:
    gen = torch.Generator().manual_seed(6)
    s = _scores(3, 2, 5, 5, None, gen)
    mod = _params()
    with torch.no_grad():
        mod.w2.fill_(float("nan"))  # the MLP output is NaN → T, F are NaN everywhere
    ours = mod(s, None)
    ref = reference_probs(s, None, mod.tau, mod.w1, mod.b1, mod.w2, mod.b2, 1e-6)
    assert torch.isfinite(ours).all()
    assert _rel_err(ours, ref) < 1e-5
    # the fallback is per batch element: F = clamp(M) → out_h = clamp(M) + 0.2 (S_h - M)
    sc = s.clamp(-15, 15)
    m = sc.mean(1, keepdim=True)
    expected = torch.softmax((m.clamp(-10, 10) + 0.2 * (sc - m)).clamp(-15, 15), -1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_statistics_are_per_batch_element() -> None:
    gen = torch.Generator().manual_seed(7)
    s = _scores(4, 2, 6, 6, None, gen)
    mod = _params()
    full = mod(s, None)
    for i in range(4):
        torch.testing.assert_close(mod(s[i : i + 1], None), full[i : i + 1], rtol=1e-5, atol=1e-7)


def test_masked_positions_exactly_zero_and_fully_masked_rows_zero() -> None:
    gen = torch.Generator().manual_seed(8)
    b, h, n_len = 3, 2, 7
    masked = _masks("both", b, n_len, n_len, gen)
    masked[1] = True  # an all-padding sequence: every row fully masked
    s = _scores(b, h, n_len, n_len, masked, gen)
    mod = _params()
    p = mod(s, masked)
    assert torch.isfinite(p).all()
    m4 = masked[:, None].expand_as(p)
    assert (p[m4] == 0).all()
    row_dead = masked.all(-1)[:, None].expand(b, h, n_len)
    sums = p.sum(-1)
    assert (sums[row_dead] == 0).all()
    torch.testing.assert_close(sums[~row_dead], torch.ones_like(sums[~row_dead]))
    logits = mod.logits(s, masked)
    assert torch.isneginf(logits[m4]).all()


def test_gradients_reach_tau_and_mlp_and_are_finite() -> None:
    gen = torch.Generator().manual_seed(9)
    b, h, n_len = 3, 4, 8
    masked = _masks("both", b, n_len, n_len, gen)
    s = _scores(b, h, n_len, n_len, None, gen, 1.5).requires_grad_(True)
    # Default initialisation ("typical"): with large MLP biases step 5's clamp saturates and cuts the MLP off.
    torch.manual_seed(0)
    mod = AutopoieticTransform(16, init_tau=1.2)
    p = mod(s.masked_fill(masked[:, None], float("-inf")), masked)
    weights = torch.randn(p.shape, generator=gen)
    (p * weights).sum().backward()
    for name, param in mod.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0


def test_gradients_finite_with_fully_masked_rows() -> None:
    gen = torch.Generator().manual_seed(10)
    masked = torch.zeros(2, 5, 5, dtype=torch.bool)
    masked[0, 3:, :] = True
    masked[0, :, 3:] = True
    masked[1] = True
    s = torch.randn(2, 2, 5, 5, generator=gen, requires_grad=True)
    mod = _params()
    p = mod(s.masked_fill(masked[:, None], float("-inf")), masked)
    (p * torch.randn(p.shape, generator=gen)).sum().backward()
    assert torch.isfinite(s.grad).all()
    assert all(torch.isfinite(q.grad).all() for q in mod.parameters())


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 257])
def test_batched_quantile_matches_torch_quantile(n: int) -> None:
    x = torch.randn(5, n)
    ours = batched_quantile(x.reshape(5, 1, n), (0.0, 0.25, 0.5, 0.75, 1.0))
    for q, got in zip((0.0, 0.25, 0.5, 0.75, 1.0), ours, strict=True):
        torch.testing.assert_close(got, torch.quantile(x, q, dim=1, interpolation="linear"))


def test_batched_quantile_beyond_torch_quantile_limit() -> None:
    # torch.quantile refuses inputs over 16M elements; the sort-based one does not.
    x = torch.rand(1, 4100, 4100)
    q25, q75 = batched_quantile(x, (0.25, 0.75))
    assert abs(float(q25[0]) - 0.25) < 2e-3 and abs(float(q75[0]) - 0.75) < 2e-3


def test_functional_equals_module_and_bf16_input() -> None:
    gen = torch.Generator().manual_seed(11)
    masked = _masks("causal", 2, 6, 6, gen)
    s = _scores(2, 2, 6, 6, masked, gen)
    mod = _params()
    f = autopoietic_probs(s, masked, mod.tau, mod.w1, mod.b1, mod.w2, mod.b2, eps=1e-6)
    torch.testing.assert_close(f, mod(s, masked), rtol=0, atol=0)
    pb = mod(s.bfloat16(), masked)
    assert pb.dtype == torch.bfloat16
    assert (pb[masked[:, None].expand_as(pb)] == 0).all()
    torch.testing.assert_close(pb.float(), f, atol=2e-2, rtol=5e-2)
    logits = autopoietic_transform(s, masked, mod.tau, mod.w1, mod.b1, mod.w2, mod.b2, eps=1e-6)
    torch.testing.assert_close(masked_softmax(logits, masked), f)


def test_initialisation() -> None:
    torch.manual_seed(0)
    mod = AutopoieticTransform(64, init_tau=1.3)
    assert float(mod.tau) == pytest.approx(1.3)
    assert mod.w1.shape == (64, 1) and mod.w2.shape == (1, 64)
    bound = (6 / 65) ** 0.5
    assert mod.w1.abs().max() <= bound and mod.w2.abs().max() <= bound
    assert (mod.b1 == 0).all() and (mod.b2 == 0).all()


@pytest.mark.slow
def test_compiles_fullgraph_on_cpu() -> None:
    gen = torch.Generator().manual_seed(12)
    masked = _masks("both", 2, 6, 6, gen)
    s = _scores(2, 2, 6, 6, masked, gen)
    mod = _params()
    eager = mod(s, masked)
    t0 = time.perf_counter()
    compiled = torch.compile(
        lambda x, mk: autopoietic_probs(x, mk, mod.tau, mod.w1, mod.b1, mod.w2, mod.b2, eps=1e-6),
        fullgraph=True,
    )
    out = compiled(s, masked)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert time.perf_counter() - t0 < 120
