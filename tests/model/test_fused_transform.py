"""The fused (Triton) autopoietic transform against the torch one, values and gradients.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which executes the same kernel code
with NumPy; the GPU machine runs the compiled kernels (``tests/training/test_fastpath.py`` and ``bench/``). The
reference is :func:`apt_model.model.autopoietic._autopoietic_probs` (itself checked against the per-sample loop of
the spec in ``test_autopoietic.py``) evaluated in float64, and the fused kernel must be as close to it as torch's own
float32 evaluation is, within a small factor.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from apt_model.config import TrainConfig
from apt_model.errors import ConfigError
from apt_model.model import autopoietic, fused_transform
from apt_model.training.loop import resolve_transform_kernel

PARAM_NAMES = ("tau", "w1", "b1", "w2", "b2")


@pytest.fixture(scope="module")
def device() -> torch.device:
    """Where the kernels run: the GPU when there is one, else Triton's interpreter on the CPU (tests/conftest.py
    sets ``TRITON_INTERPRET=1`` before Triton is first imported)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and Triton's interpreter was not switched on before Triton was imported")
    return torch.device("cpu")


def _case(
    seed: int,
    shape: tuple[int, int, int, int],
    mask: str | None,
    scale: float,
    device: torch.device,
    hidden: int = 16,
    eps: float = 1e-6,
):
    b, h, lq, lk = shape
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, lq, lk, generator=g) * scale
    masked = None
    if mask == "causal":
        masked = torch.ones(lq, lk, dtype=torch.bool).triu(1)[None]
    elif mask == "keys":
        kp = torch.zeros(b, lk, dtype=torch.bool)
        kp[0, -2:] = True
        masked = kp[:, None, :]
    elif mask == "padding":  # key and query padding: the last element's last query rows are fully masked
        kp = torch.zeros(b, lk, dtype=torch.bool)
        kp[0, -2:] = True
        qp = torch.zeros(b, lq, dtype=torch.bool)
        qp[-1, -2:] = True
        masked = kp[:, None, :] | qp[:, :, None]
    if masked is not None:
        scores = scores.masked_fill(masked.unsqueeze(1), float("-inf"))
    torch.manual_seed(seed)
    # eps sets step 3's e = clamp(eps, 0.05, 0.8): the weight of the MLP's path back onto the scores.
    mod = autopoietic.AutopoieticTransform(hidden, eps=eps)
    with torch.no_grad():
        mod.b1.normal_(0.0, 0.5, generator=g)
        mod.b2.fill_(0.05 * (seed % 3 - 1))
        mod.tau.fill_(1.0 + 0.15 * (seed % 5))
    params = [getattr(mod, n).detach().to(device) for n in PARAM_NAMES]
    grad_out = torch.randn(b, h, lq, lk, generator=g, dtype=torch.float64).to(device)
    masked = None if masked is None else masked.to(device)
    return scores.to(device), masked, params, mod.eps, grad_out


def _grads(fn, scores, masked, params, eps, grad_out, dtype):
    s = scores.detach().to(dtype).clone().requires_grad_(True)
    ps = [p.to(dtype).clone().requires_grad_(True) for p in params]
    out = fn(s, masked, *ps, eps)
    (out.double() * grad_out).sum().backward()
    return out.detach().double(), [s.grad.double(), *(p.grad.double() for p in ps)]


def _torch_probs(s, masked, tau, w1, b1, w2, b2, eps):
    return autopoietic._autopoietic_probs(s, masked, tau, w1, b1, w2, b2, eps=eps)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


CASES = [
    (1, (2, 2, 8, 8), None, 0.3, 1e-6),
    (2, (2, 4, 6, 10), "keys", 3.0, 1e-6),
    (3, (2, 3, 7, 7), "causal", 1.0, 1e-6),
    (4, (3, 2, 7, 5), "padding", 1.0, 1e-6),
    (
        5,
        (2, 8, 16, 16),
        None,
        0.05,
        1e-6,
    ),  # small scores: the element MLP and the gate are in their linear range
    (
        6,
        (2, 2, 9, 12),
        "padding",
        20.0,
        1e-6,
    ),  # large scores: clamps at +-15 and the fallback-free saturation
    (7, (1, 2, 5, 1), None, 1.0, 1e-6),  # Lk == 1: the entropy ratio is 0
    (8, (2, 2, 24, 40), "padding", 1.0, 1e-6),  # tile padding in both directions (32 x 64)
    (9, (2, 4, 12, 12), "causal", 0.1, 0.8),  # e = 0.8: the MLP's path back onto the scores weighs 16x more
    (10, (2, 4, 12, 12), None, 0.3, 0.5),
]


@pytest.mark.parametrize(("seed", "shape", "mask", "scale", "eps"), CASES)
def test_fused_transform_matches_the_torch_transform_in_value_and_gradient(
    device, seed, shape, mask, scale, eps
) -> None:
    scores, masked, params, eps, grad_out = _case(seed, shape, mask, scale, device, eps=eps)
    ref_out, ref_grads = _grads(_torch_probs, scores, masked, params, eps, grad_out, torch.float64)
    _, t32_grads = _grads(_torch_probs, scores, masked, params, eps, grad_out, torch.float32)
    out, grads = _grads(
        fused_transform.fused_autopoietic_probs, scores, masked, params, eps, grad_out, torch.float32
    )
    # Probabilities: float32 rounding of values in [0, 1].
    assert (out - ref_out).abs().max().item() < 1e-6
    if masked is not None:  # masked entries (and fully masked rows) are exactly zero
        assert (out.masked_select(masked.unsqueeze(1).expand_as(out)) == 0).all()
    for name, got, t32, ref in zip(("scores", *PARAM_NAMES), grads, t32_grads, ref_grads, strict=True):
        # As close to the float64 gradient as torch's float32 evaluation, up to a small factor (the sums run
        # in another order), and never worse than 2e-5 relative where torch itself is that close.
        assert _rel_err(got, ref) <= max(10 * _rel_err(t32, ref), 2e-5), name
    # A test that cannot pass vacuously: the scores get a gradient (except with one key, whose probability is 1).
    assert (ref_grads[0].abs().max() > 0) == (shape[-1] > 1)


@pytest.mark.parametrize("mask", ["causal", "padding"])
def test_masked_entries_count_as_minus_inf_whatever_the_scores_hold_there(device, mask) -> None:
    """The attention hands the transform its raw scores (no masked fill first): both kernels, fused and torch, take
    masked entries as the spec's -inf, so the raw values there change nothing and get no gradient."""
    filled, masked, params, eps, grad_out = _case(31, (2, 4, 12, 12), mask, 2.0, device)
    raw = torch.where(
        masked.unsqueeze(1), torch.randn(filled.shape, generator=torch.Generator().manual_seed(5)).to(device) * 9,
        filled,
    )  # fmt: skip
    assert torch.isfinite(raw).all()
    for fn in (fused_transform.fused_autopoietic_probs, _torch_probs):
        out_f, grads_f = _grads(fn, filled, masked, params, eps, grad_out, torch.float32)
        out_r, grads_r = _grads(fn, raw, masked, params, eps, grad_out, torch.float32)
        torch.testing.assert_close(out_r, out_f, rtol=0, atol=1e-7)
        for got, want in zip(grads_r, grads_f, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        assert (grads_r[0].masked_select(masked.unsqueeze(1).expand_as(raw)) == 0).all()


def test_gradient_through_the_element_mlp_reaches_the_scores_exactly(device, monkeypatch) -> None:
    """The MLP's share of the scores' gradient (A0 -> MLP -> gate) is small next to the rest, so the comparison above
    would not see an error in it: isolate it (the torch gradient with and without A0 detached) and compare there."""
    scores, masked, params, eps, grad_out = _case(21, (2, 4, 12, 12), "causal", 1.0, device, eps=0.8)
    # A small MLP output keeps the gate (clamp(1 + 2.5 A, 0.5, 1.5)) off its bounds, where gradient flows.
    params[2], params[3] = params[2] * 0.1, params[3] * 0.2  # b1, w2
    _, (ref_ds, *_) = _grads(_torch_probs, scores, masked, params, eps, grad_out, torch.float64)
    library_mlp = autopoietic.element_mlp
    monkeypatch.setattr(autopoietic, "element_mlp", lambda a0, *w: library_mlp(a0.detach(), *w))
    _, (no_mlp_ds, *_) = _grads(_torch_probs, scores, masked, params, eps, grad_out, torch.float64)
    monkeypatch.undo()
    through_mlp = ref_ds - no_mlp_ds
    assert through_mlp.abs().max() > 1e-4 * ref_ds.abs().max()  # the path carries gradient here
    _, (ds, *_) = _grads(
        fused_transform.fused_autopoietic_probs, scores, masked, params, eps, grad_out, torch.float32
    )
    assert (ds - ref_ds).abs().max() < 2e-3 * through_mlp.abs().max()


@pytest.mark.parametrize("shape", [(2, 4, 12, 12), (3, 2, 24, 40)])
def test_element_mlp_parameter_gradients_summed_over_many_programs(device, shape) -> None:
    """The MLP's parameter gradients are sums over every entry of the batch, made by many programs of 128 entries
    and added up afterwards. In the cases above the gate mostly saturates and those gradients are 0; here a small
    MLP output keeps it in range (as in the test above), with 3 and 23 programs."""
    scores, masked, params, eps, grad_out = _case(41, shape, "padding", 1.0, device, eps=0.8)
    params[2], params[3] = params[2] * 0.1, params[3] * 0.2  # b1, w2
    _, ref = _grads(_torch_probs, scores, masked, params, eps, grad_out, torch.float64)
    _, t32 = _grads(_torch_probs, scores, masked, params, eps, grad_out, torch.float32)
    _, got = _grads(
        fused_transform.fused_autopoietic_probs, scores, masked, params, eps, grad_out, torch.float32
    )
    for name, g, g32, r in zip(PARAM_NAMES[1:4], got[2:5], t32[2:5], ref[2:5], strict=True):
        assert (r != 0).sum() >= r.numel() // 2, name  # most units get a gradient: the test can fail
        assert _rel_err(g, r) <= max(10 * _rel_err(g32, r), 2e-5), name


def test_fused_transform_in_bfloat16_stays_within_bfloat16_of_float32(device) -> None:
    scores, masked, params, eps, grad_out = _case(11, (2, 4, 24, 40), "padding", 1.0, device)
    out32, grads32 = _grads(
        fused_transform.fused_autopoietic_probs, scores, masked, params, eps, grad_out, torch.float32
    )
    s = scores.to(torch.bfloat16).requires_grad_(True)
    ps = [p.clone().requires_grad_(True) for p in params]  # parameters stay float32, as under autocast
    out = fused_transform.fused_autopoietic_probs(s, masked, *ps, eps)
    assert out.dtype == torch.bfloat16
    (out.double() * grad_out).sum().backward()
    assert (out.double() - out32).abs().max().item() < 2e-2 * out32.abs().max().item()
    assert _rel_err(s.grad.double(), grads32[0]) < 5e-2
    assert _rel_err(ps[0].grad.double(), grads32[1]) < 5e-2  # tau


def test_fused_transform_reads_any_strides_and_writes_float16(device) -> None:
    """Scores and the incoming gradient as non-contiguous views (the kernels take strides), and float16 scores."""
    scores, masked, params, eps, grad_out = _case(16, (2, 3, 10, 10), "causal", 1.0, device)
    ref, ref_grads = _grads(
        fused_transform.fused_autopoietic_probs, scores, masked, params, eps, grad_out, torch.float32
    )
    # The same values laid out [B, Lq, H, Lk] and viewed back as [B, H, Lq, Lk]; the gradient as a transpose.
    s = scores.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert not s.is_contiguous()
    ps = [p.clone().requires_grad_(True) for p in params]
    out = fused_transform.fused_autopoietic_probs(s, masked, *ps, eps)
    g = grad_out.float().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not g.is_contiguous()
    out.backward(g)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-7)
    for got, want in zip([s.grad, *(p.grad for p in ps)], ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)

    s16 = scores.to(torch.float16).requires_grad_(True)
    out16 = fused_transform.fused_autopoietic_probs(s16, masked, *params, eps)
    assert out16.dtype == torch.float16
    (out16.double() * grad_out).sum().backward()
    assert (out16.double() - ref).abs().max().item() < 2e-3
    assert _rel_err(s16.grad.double(), ref_grads[0]) < 1e-2


@pytest.mark.parametrize("fuse", [False, True])
def test_tuple_reductions_and_one_at_a_time_give_the_same_numbers(device, monkeypatch, fuse) -> None:
    """The statistics kernels' independent sums as one tuple reduction (the GPU's default) or one by one (the
    interpreter's default, see fused_transform.FUSE_REDUCTIONS): both match torch, whichever device runs the tests."""
    monkeypatch.setattr(fused_transform, "FUSE_REDUCTIONS", fuse)
    scores, masked, params, eps, grad_out = _case(18, (1, 2, 5, 6), "padding", 1.0, device, eps=0.5)
    ref_out, ref_grads = _grads(_torch_probs, scores, masked, params, eps, grad_out, torch.float64)
    _, t32_grads = _grads(_torch_probs, scores, masked, params, eps, grad_out, torch.float32)
    out, grads = _grads(
        fused_transform.fused_autopoietic_probs, scores, masked, params, eps, grad_out, torch.float32
    )
    assert (out - ref_out).abs().max().item() < 1e-6
    for name, got, t32, ref in zip(("scores", *PARAM_NAMES), grads, t32_grads, ref_grads, strict=True):
        assert _rel_err(got, ref) <= max(10 * _rel_err(t32, ref), 2e-5), name


@pytest.mark.parametrize("bad_weight", [float("nan"), float("inf")])
def test_fused_transform_falls_back_to_the_head_mean_like_torch_when_the_mlp_is_not_finite(
    device, bad_weight
) -> None:
    """Non-finite MLP weights take the kernels' term-by-term loop (torch's NaN and inf arithmetic), not the fast one."""
    scores, masked, params, eps, _ = _case(12, (2, 2, 8, 8), "causal", 1.0, device)
    params[1] = params[1].clone()
    # w1: NaN makes A, and with it most of F, NaN -> step 12 takes clamp(M). inf: z = +-inf, or NaN where A0 = 0.
    params[1][0, 0] = bad_weight
    expected = _torch_probs(scores, masked, *params, eps)
    got = fused_transform.fused_autopoietic_probs(scores, masked, *params, eps)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("save_mlp", [True, False])
def test_custom_op_registration_passes_torch_opcheck(device, save_mlp) -> None:
    """Schema, fake (meta) implementation and autograd registration, as torch.compile relies on them."""
    scores, masked, params, eps, _ = _case(13, (2, 2, 6, 6), "padding", 1.0, device)
    args = (scores.requires_grad_(True), masked, *(p.requires_grad_(True) for p in params), eps, save_mlp)
    torch.library.opcheck(fused_transform.autopoietic_probs_op, args)


def test_saved_or_recomputed_element_mlp_give_the_same_numbers(device, monkeypatch) -> None:
    """The backward takes step 4's A_pre and derivative from the forward (the default) or recomputes them: the
    same float operations, so the same numbers. The MLP kept in range (as above), so its gradients are not all 0."""
    scores, masked, params, eps, grad_out = _case(43, (2, 4, 12, 12), "padding", 1.0, device, eps=0.8)
    params[2], params[3] = params[2] * 0.1, params[3] * 0.2  # b1, w2
    monkeypatch.setattr(fused_transform, "SAVE_MLP", True)
    out, grads = _grads(
        fused_transform.fused_autopoietic_probs, scores, masked, params, eps, grad_out, torch.float32
    )
    monkeypatch.setattr(fused_transform, "SAVE_MLP", False)
    out2, grads2 = _grads(
        fused_transform.fused_autopoietic_probs, scores, masked, params, eps, grad_out, torch.float32
    )
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-7)
    assert grads[3].abs().max() > 0  # the MLP's parameters get gradient here
    for got, want in zip(grads2, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_forward_without_gradient_keeps_nothing_for_the_backward(device) -> None:
    """Evaluation (no gradient) does not pay for the maps only a backward reads."""
    scores, masked, params, eps, _ = _case(44, (2, 2, 6, 6), "padding", 1.0, device)
    with torch.no_grad():
        *_, saved = fused_transform.autopoietic_probs_op(scores, masked, *params, eps, False)
    assert saved.numel() == 0
    *_, saved = fused_transform.autopoietic_probs_op(scores, masked, *params, eps, True)
    assert saved.shape == (2, 2, 6, 6)


def test_compiled_graph_keeps_the_fused_op_whole(device) -> None:
    scores, masked, params, eps, grad_out = _case(14, (2, 2, 6, 6), "causal", 1.0, device)
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def fn(s, *ps):
        return fused_transform.fused_autopoietic_probs(s, masked, *ps, eps)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, backend=recording_backend, fullgraph=True)
        out, grads = _grads(
            lambda s, _m, *ps: compiled(s, *ps[:-1]), scores, masked, params, eps, grad_out, torch.float32
        )
    finally:
        torch._dynamo.reset()
    eager_out, eager_grads = _grads(
        fused_transform.fused_autopoietic_probs, scores, masked, params, eps, grad_out, torch.float32
    )
    torch.testing.assert_close(out, eager_out)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)
    (gm,) = graphs
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.apt.autopoietic_probs.default in targets


def test_kernel_choice_is_torch_off_cuda_and_triton_cannot_be_forced_there(monkeypatch) -> None:
    monkeypatch.setattr(fused_transform, "_kernel", "auto")
    scores = torch.zeros(1, 1, 4, 4)
    assert not fused_transform.uses_fused(scores)  # CPU tensors always take the torch ops
    assert resolve_transform_kernel("auto", torch.device("cpu")) == "torch"
    assert resolve_transform_kernel("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="transform_kernel='triton' needs a CUDA device"):
        resolve_transform_kernel("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="transform kernel must be one of auto, triton, torch"):
        fused_transform.set_transform_kernel("cuda")
    with pytest.raises(ConfigError, match="transform_kernel"):
        TrainConfig(transform_kernel="fast")
    fused_transform.set_transform_kernel("auto")


def test_tiles_beyond_the_register_budget_or_other_dtypes_take_the_torch_ops() -> None:
    side = math.isqrt(fused_transform.MAX_TILE)
    assert fused_transform.fits_fused(64, 64, torch.bfloat16)
    assert fused_transform.fits_fused(side, side, torch.float32)
    assert fused_transform.fits_fused(5, 1, torch.float16)  # padded up to the 16-wide minimum tile
    assert not fused_transform.fits_fused(side + 1, side, torch.float32)
    assert not fused_transform.fits_fused(64, 64, torch.float64)


# --------------------------------------------------------------------------- the model with its transforms fused


@pytest.fixture
def fused_model_transforms(device, monkeypatch):
    """Route the model's transforms through the fused op on ``device`` (on the CPU, under Triton's interpreter),
    with the library's own size rule, as ``auto`` does on CUDA."""
    from apt_model.config import model_preset
    from apt_model.model.apt import APTModel

    calls = {"n": 0}

    def fused_when_it_fits(scores):
        ok = fused_transform.fits_fused(scores.shape[-2], scores.shape[-1], scores.dtype)
        calls["n"] += ok
        return ok

    torch.manual_seed(0)
    model = APTModel(model_preset("tiny", vocab_size=64)).to(device)
    # Two sequences (the interpreter runs one program per sequence, in turn): padding in the source (keys of the
    # encoder and of cross-attention) of one and in the target (decoder queries) of the other.
    src = torch.randint(4, 64, (2, 9), device=device)
    src[0, 6:] = model.config.pad_id
    tgt = torch.randint(4, 64, (2, 7), device=device)
    tgt[1, 5:] = model.config.pad_id
    use_fused = lambda on: monkeypatch.setattr(  # noqa: E731
        autopoietic, "uses_fused", fused_when_it_fits if on else (lambda scores: False)
    )
    return model, src, tgt, use_fused, calls


def _loss_and_grads(model, src, tgt):
    model.zero_grad(set_to_none=True)
    logits = model(src, tgt)
    loss = logits.float().log_softmax(-1).mean()
    loss.backward()
    return logits.detach(), {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_model_with_fused_transforms_matches_the_model_with_torch_transforms(fused_model_transforms) -> None:
    model, src, tgt, use_fused, calls = fused_model_transforms
    use_fused(False)
    logits_ref, grads_ref = _loss_and_grads(model, src, tgt)
    use_fused(True)
    logits, grads = _loss_and_grads(model, src, tgt)
    assert calls["n"] == 6  # 2 encoder self, 2 decoder self (causal), 2 cross
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and any("transform" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # Greedy decoding (growing decoder lengths, cached cross-attention keys) gives the same tokens.
    model.eval()
    with torch.no_grad():
        model.embedding.weight.mul_(30)  # sharper logits: varied tokens from an untrained model
        got = model.generate(src, max_new_tokens=3, bos_id=2, eos_id=3)
        use_fused(False)
        expected = model.generate(src, max_new_tokens=3, bos_id=2, eos_id=3)
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_compiled_model_keeps_one_fused_op_per_transform(fused_model_transforms) -> None:
    model, src, tgt, use_fused, _ = fused_model_transforms
    use_fused(False)
    logits_ref, grads_ref = _loss_and_grads(model, src, tgt)
    use_fused(True)
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
        logits, grads = _loss_and_grads(compiled, src, tgt)
    finally:
        torch._dynamo.reset()
    # The compiled model with the fused op gives the eager torch-transform model's numbers.
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(grads_ref)
    for name, g in grads.items():
        torch.testing.assert_close(
            g, grads_ref[name.removeprefix("_orig_mod.")], rtol=1e-4, atol=1e-6, msg=name
        )
    (gm,) = graphs
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.apt.autopoietic_probs.default]
    assert len(ops) == 6


def test_launch_settings_from_the_command_line_are_checked() -> None:
    """What bench/train_step.py --fused-setting and bench/transform.py --sweep take: a known knob and an integer."""
    assert fused_transform.parse_launch_setting("MLP_BLOCK=64") == ("MLP_BLOCK", 64)
    assert fused_transform.parse_launch_setting("SAVE_MLP=0") == ("SAVE_MLP", 0)
    for bad in ("NO_SUCH_KNOB=2", "MLP_BLOCK=x", "MLP_BLOCK=-1", "MLP_BLOCK", "mlp_block=64"):
        with pytest.raises(ValueError, match="expected KNOB=N"):
            fused_transform.parse_launch_setting(bad)
