from __future__ import annotations

import pytest
import torch
from torch import nn

from apt_model.config import DBCDACConfig
from apt_model.model.dbc_dac import (
    DBCDAC,
    clean_nonfinite_,
    clean_nonfinite_all_,
    lowrank_project,
    omega_shapes,
    orthonormal_basis,
    rank_for,
    stabilize,
    stabilize_batch,
    time_stabilize,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_matrices(count: int = 40):
    g = _gen(123)
    for i in range(count):
        m = int(torch.randint(2, 80, (1,), generator=g))
        n = int(torch.randint(2, 80, (1,), generator=g))
        x = torch.randn(m, n, generator=g)
        if i % 3 == 1:  # ill-conditioned: rapidly decaying spectrum
            u, _, vh = torch.linalg.svd(x, full_matrices=False)
            s = torch.logspace(0, -8, min(m, n))
            x = (u * s) @ vh
        if i % 3 == 2:  # heavy scale differences between rows
            x = x * torch.logspace(-6, 6, m)[:, None]
        yield x


def test_rank_for() -> None:
    assert rank_for(100, 300, 0.1) == 10
    assert rank_for(5, 3, 0.1) == 1
    assert rank_for(64, 64, 1.0) == 64


def test_projection_never_increases_norm_and_has_rank_r() -> None:
    gen = _gen(0)
    for x in _random_matrices():
        for ratio in (0.1, 0.3, 0.7):
            r = rank_for(*x.shape, ratio)
            p = lowrank_project(x, r, gen)
            assert float(p.norm()) <= float(x.norm()) * (1 + 1e-5) + 1e-30
            if i_full_rank(x) >= r:
                assert int(torch.linalg.matrix_rank(p.double(), rtol=1e-5)) == r


def i_full_rank(x: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(x.double(), rtol=1e-5))


def test_balanced_gn_r_norm_bounded_by_gn() -> None:
    """Steps 1-3 on random gradients: ‖Gn_r‖_F ≤ ‖Gn‖_F (the reference's output had 25x-1e5x the norm)."""
    cfg = DBCDACConfig()
    gen = _gen(1)
    for x in _random_matrices():
        d = x.sum(1)
        d = torch.where(d.abs() < cfg.threshold, cfg.threshold * torch.where(d >= 0, 1.0, -1.0), d)
        gn = x / d[:, None]
        r = rank_for(*x.shape, cfg.rank_ratio_proj)
        gn_r = lowrank_project(gn, r, gen)
        assert float(gn_r.norm()) <= float(gn.norm()) * (1 + 1e-5)


def test_stabilize_full_rank_is_identity_and_output_rank_bounded() -> None:
    g = torch.randn(30, 20, generator=_gen(2), dtype=torch.float64)
    full = DBCDACConfig(rank_ratio_proj=1.0, res_scale=0.0)
    torch.testing.assert_close(stabilize(g, full, _gen(3)), g, rtol=1e-9, atol=1e-9)
    cfg = DBCDACConfig(rank_ratio_proj=0.2, rank_ratio_res=0.1, res_scale=0.1, iterations=1)
    out = stabilize(g, cfg, _gen(4))
    assert out.shape == g.shape and out.dtype == g.dtype
    assert int(torch.linalg.matrix_rank(out.double(), rtol=1e-5)) <= 4 + 2
    # a rank-1 gradient (fully captured by the range finder) passes through unchanged
    low = torch.randn(30, 1, generator=_gen(5), dtype=torch.float64) @ torch.randn(
        1, 20, generator=_gen(6), dtype=torch.float64
    )
    torch.testing.assert_close(stabilize(low, cfg, _gen(7)), low, rtol=1e-9, atol=1e-9)


def test_zero_row_sums_use_signed_threshold() -> None:
    g = torch.tensor(
        [[1.0, -1.0, 0.5, -0.5], [2.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    out = stabilize(g, DBCDACConfig(rank_ratio_proj=1.0, res_scale=0.0), _gen(0))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, g, rtol=1e-6, atol=1e-9)


def test_bf16_gradient() -> None:
    g = torch.randn(40, 30, generator=_gen(8)).bfloat16()
    out = stabilize(g, DBCDACConfig(), _gen(9))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _model_with_grads(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(60, 50), nn.Linear(50, 3))
    # 64 rows: the first layer's gradient has rank 50, well above DBC-DAC's rank, so stabilising changes it.
    model(torch.randn(64, 60)).sum().backward()
    return model


def test_step_cleans_nonfinite_and_stabilizes_large_matrices_only() -> None:
    cfg = DBCDACConfig(min_numel=1000, every_n_steps=1)
    model = _model_with_grads()
    big, _, small, _ = model.parameters()
    big.grad[0, 0] = float("nan")
    small.grad[0, 0] = float("nan")
    small.grad[0, 1] = float("inf")
    small.grad[0, 2] = float("-inf")
    before_small = small.grad.clone()
    before_big = big.grad.clone()
    dbc = DBCDAC(cfg, seed=1)
    assert dbc.step(model.parameters(), optimizer_step=1)
    assert torch.isfinite(big.grad).all() and torch.isfinite(small.grad).all()
    assert small.grad[0, :3].tolist() == [0.0, 1.0, -1.0]
    torch.testing.assert_close(small.grad[:, 3:], before_small[:, 3:], rtol=0, atol=0)
    assert not torch.allclose(big.grad, torch.nan_to_num(before_big, nan=0.0))
    assert dbc.stats.stabilized == 1 and dbc.stats.cleaned == 3 and dbc.stats.applied_steps == 1


def test_cadence_and_disabled() -> None:
    dbc = DBCDAC(DBCDACConfig(every_n_steps=3, min_numel=1000))
    applied = []
    for step in range(1, 11):
        model = _model_with_grads(step)
        before = [p.grad.clone() for p in model.parameters()]
        did = dbc.step(model.parameters(), optimizer_step=step)
        changed = any(not torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))
        assert did == changed
        if did:
            applied.append(step)
    assert applied == [3, 6, 9]

    off = DBCDAC(DBCDACConfig(enabled=False, every_n_steps=1, min_numel=1))
    model = _model_with_grads()
    next(model.parameters()).grad[0, 0] = float("nan")
    before = [p.grad.clone() for p in model.parameters()]
    assert not off.step(model.parameters(), optimizer_step=5)
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b.nan_to_num(nan=123.0), p.grad.nan_to_num(nan=123.0))


def test_deterministic_and_resumable() -> None:
    cfg = DBCDACConfig(every_n_steps=1, min_numel=1000)

    def run(dbc: DBCDAC, step: int) -> torch.Tensor:
        model = _model_with_grads(0)
        dbc.step(model.parameters(), step)
        return next(model.parameters()).grad.clone()

    a, b = DBCDAC(cfg, seed=7), DBCDAC(cfg, seed=7)
    first_a = run(a, 1)
    assert torch.equal(first_a, run(b, 1))
    state = a.state_dict()
    c = DBCDAC(cfg, seed=0)
    c.load_state_dict(state)
    assert torch.equal(run(a, 2), run(c, 2))
    assert not torch.equal(first_a, run(a, 3))  # the generator advances


def test_batched_stabilize_matches_one_matrix_at_a_time() -> None:
    """Stacking same-shape gradients changes nothing but speed: each slice equals its own ``stabilize``."""
    cfg = DBCDACConfig(rank_ratio_proj=0.2, rank_ratio_res=0.1)
    grads = torch.randn(3, 40, 30, generator=_gen(11))
    batched = stabilize_batch(grads, cfg, _gen(12))
    # The batch draws its Gaussians in one call per projection: replay the same draws one matrix at a time.
    gen = _gen(12)
    omegas = (
        torch.randn(3, 30, 6, generator=gen),
        torch.randn(3, 30, 3, generator=gen),
    )  # ranks 0.2·30, 0.1·30
    for i in range(3):
        x = grads[i]
        d = x.sum(1)
        gn = x / d[:, None]
        q = torch.linalg.qr(gn @ omegas[0][i]).Q
        approx = q @ (q.T @ gn)
        q = torch.linalg.qr((gn - approx) @ omegas[1][i]).Q
        approx = approx + cfg.res_scale * q @ (q.T @ (gn - approx))
        torch.testing.assert_close(batched[i], d[:, None] * approx, rtol=1e-4, atol=1e-5)


def test_orthonormal_basis_is_orthonormal_and_a_contraction_when_rank_deficient() -> None:
    y = torch.randn(5, 200, 12, generator=_gen(13), dtype=torch.float64)
    q = orthonormal_basis(y)
    torch.testing.assert_close(
        q.mT @ q, torch.eye(12, dtype=torch.float64).expand(5, 12, 12), atol=1e-10, rtol=0
    )
    proj_y = q @ (q.mT @ y)
    torch.testing.assert_close(proj_y, y, atol=1e-9, rtol=1e-9)
    deficient = y.clone()
    deficient[:, :, 6:] = 0.0  # rank 6 of 12, and an all-zero matrix
    deficient[0] = 0.0
    qd = orthonormal_basis(deficient)
    assert torch.isfinite(qd).all() and torch.equal(qd[0], torch.zeros_like(qd[0]))
    assert float(torch.linalg.matrix_norm(qd.mT @ qd, ord=2).max()) <= 1.0 + 1e-12
    torch.testing.assert_close(qd @ (qd.mT @ deficient), deficient, atol=1e-9, rtol=1e-9)


def test_clean_nonfinite_and_timing() -> None:
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 2.0])
    assert clean_nonfinite_(x).tolist() == [0.0, 1.0, -1.0, 2.0]
    res = time_stabilize([(64, 48), (32, 32)], DBCDACConfig(), repeats=2)
    assert res["per_application_s"] > 0 and len(res["all_s"]) == 2


@pytest.mark.parametrize("flat", [None, True, False])
def test_cleaning_all_at_once_equals_cleaning_each_tensor(flat: bool | None) -> None:
    """Both routes (flat buffer per dtype — the accelerator's — and in place) give nan_to_num_'s values in place."""
    g = _gen(5)
    specials = torch.tensor([float("nan"), float("inf"), float("-inf")])
    shapes = [
        ((7, 5), torch.float32),
        ((3,), torch.float32),
        ((), torch.float32),
        ((4, 6), torch.bfloat16),
        ((5,), torch.bfloat16),
        ((2, 9), torch.float32),
    ]
    tensors = []
    for shape, dtype in shapes:
        x = torch.randn(shape, generator=g).to(dtype)
        if x.dim():
            x.view(-1)[:3] = specials[: x.numel()].to(dtype)
        tensors.append(x)
    tensors.append(torch.randn(6, 4, generator=g).t())  # a non-contiguous view
    tensors[-1][0, :3] = specials
    tensors.append(tensors[0])  # the same tensor twice
    expected = [clean_nonfinite_(t.clone()) for t in tensors]
    storage_before = [t.data_ptr() for t in tensors]
    clean_nonfinite_all_(tensors, flat=flat)
    for got, want in zip(tensors, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    # In place: the caller's tensors (parameters' .grad) are the ones cleaned.
    assert [t.data_ptr() for t in tensors] == storage_before
    sparse = torch.sparse_coo_tensor([[0, 2]], torch.tensor([float("nan"), 3.0]), (4,))
    clean_nonfinite_all_([sparse], flat=flat)
    assert sparse._values().tolist() == [0.0, 3.0]


def test_flat_cleaning_leaves_large_tensors_out_of_the_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large gradients are cleaned in place: the flat buffer never holds a model's worth of gradients."""
    import apt_model.model.dbc_dac as dbc_dac

    monkeypatch.setattr(dbc_dac, "FLAT_CLEAN_MAX_NUMEL", 10)
    flattened: list[list[torch.Tensor]] = []
    real = dbc_dac._clean_flat_
    monkeypatch.setattr(dbc_dac, "_clean_flat_", lambda group: (flattened.append(list(group)), real(group)))
    big, small_a, small_b = torch.full((4, 4), float("nan")), torch.full((3,), float("inf")), torch.zeros(2)
    dbc_dac.clean_nonfinite_all_([big, small_a, small_b], flat=True)
    assert [[t.numel() for t in group] for group in flattened] == [[3, 2]]
    assert big.eq(0).all() and small_a.eq(1).all()


def test_predrawn_test_matrices_give_the_same_result_as_drawing_them() -> None:
    """The graphed path draws the Gaussian test matrices up front; in omega_shapes' order they are the same draws."""
    cfg = DBCDACConfig(iterations=2)
    g = torch.randn(3, 40, 24, generator=_gen(1))
    drawn = stabilize_batch(g, cfg, _gen(9))
    gen = _gen(9)
    omegas = [torch.empty(s) for s in omega_shapes(3, 40, 24, cfg)]
    for buf in omegas:
        torch.randn(buf.shape, generator=gen, out=buf)
    assert torch.equal(stabilize_batch(g, cfg, omegas=omegas), drawn)
    assert gen.get_state().equal(_drawn_state(cfg))
    with pytest.raises(ValueError, match="test matrices"):
        stabilize_batch(g, cfg, omegas=omegas[:1])


def _drawn_state(cfg: DBCDACConfig) -> torch.Tensor:
    gen = _gen(9)
    stabilize_batch(torch.randn(3, 40, 24, generator=_gen(1)), cfg, gen)
    return gen.get_state()


def _grads_pair(device: str, seed: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Two identical parameter sets with gradients: targets of two shapes (one group of two) and small ones."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 48), (64, 48), (48, 80), (7,), (5, 5)]
    a = [nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
    b = [nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
    for pa, pb in zip(a, b, strict=True):
        grad = torch.randn(pa.shape, generator=g).to(device)
        grad.view(-1)[0] = float("nan")
        pa.grad, pb.grad = grad.clone(), grad.clone()
    return a, b


def _refill(params: list[nn.Parameter], seed: int) -> None:
    """New gradients written into the same buffers, as the fast path's persistent .grad tensors are."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad.copy_(torch.randn(p.shape, generator=g))


def test_graph_mode_runs_eagerly_off_cuda() -> None:
    cfg = DBCDACConfig(min_numel=1000, every_n_steps=1)
    a, b = _grads_pair("cpu", 3)
    eager, graphed = DBCDAC(cfg, seed=4), DBCDAC(cfg, seed=4, cuda_graph=True)
    for step in (1, 2):
        eager.step(a, step)
        graphed.step(b, step)
        for pa, pb in zip(a, b, strict=True):
            assert torch.equal(pa.grad, pb.grad)
        _refill(a, step)
        _refill(b, step)
    assert graphed._captured is None
    assert (eager.stats.applied_steps, eager.stats.stabilized, eager.stats.cleaned) == (2, 6, 4)
    assert (graphed.stats.applied_steps, graphed.stats.stabilized, graphed.stats.cleaned) == (2, 6, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU machine)")
def test_graph_mode_replays_the_eager_numbers_on_cuda() -> None:
    cfg = DBCDACConfig(min_numel=1000, every_n_steps=1)
    a, b = _grads_pair("cuda", 3)
    eager, graphed = DBCDAC(cfg, seed=4), DBCDAC(cfg, seed=4, cuda_graph=True)
    for step in (1, 2, 3):
        eager.step(a, step)
        graphed.step(b, step)
        torch.cuda.synchronize()
        for pa, pb in zip(a, b, strict=True):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-7)
            assert torch.isfinite(pb.grad).all()
        _refill(a, 10 + step)
        _refill(b, 10 + step)
    assert graphed._captured is not None and graphed.cuda_graph
    assert eager.stats.applied_steps == graphed.stats.applied_steps == 3
    assert eager.stats.stabilized == graphed.stats.stabilized and eager.stats.cleaned == graphed.stats.cleaned
    # Same draws from the same generator: the saved state (resumption) is the same in both modes.
    assert eager.state_dict()["generator_states"]["cuda:0"].equal(
        graphed.state_dict()["generator_states"]["cuda:0"]
    )
    # New gradient buffers (set_to_none, another model): the old graph is not replayed on them.
    first = graphed._captured
    for pa, pb in zip(a, b, strict=True):
        pa.grad, pb.grad = pa.grad.clone(), pb.grad.clone()
    eager.step(a, 4)
    graphed.step(b, 4)
    assert graphed._captured is not first
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-7)
