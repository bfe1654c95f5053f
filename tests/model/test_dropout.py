"""The model's dropout (apt_model.model.dropout): the keep mask's kernel, its op, and where each path is taken.

Without a GPU the Triton kernel runs under Triton's interpreter (tests/conftest.py), the same kernel code as on the
GPU; the CUDA tests at the end run the op compiled, as the training step does.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from apt_model.config import model_preset
from apt_model.model import APTModel
from apt_model.model import dropout as apt_dropout

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernel_mask(n: int, p: float, seed: int, device: str = DEVICE) -> torch.Tensor:
    """The Triton kernel's mask for ``n`` entries (compiled on a GPU, else under the interpreter on the CPU)."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter was not switched on before Triton was imported")
    from apt_model.model import _dropout_triton as kernels

    out = torch.empty(n, dtype=torch.bool, device=device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    block = apt_dropout.BLOCK
    kernels.keep_mask_kernel[(-(-n // block),)](seed_t, out.view(torch.uint8), n, apt_dropout.keep_threshold(p), BLOCK=block)  # fmt: skip
    return out


def test_threshold_rounds_p_to_sixteen_bits() -> None:
    assert apt_dropout.keep_threshold(0.1) == 6554  # kept with probability 1 - 6554/65536 = 0.899994
    assert apt_dropout.keep_threshold(0.0) == 0
    assert apt_dropout.keep_threshold(0.5) == 32768


def test_kernel_keeps_each_of_the_eight_draws_of_a_philox_call_at_the_right_rate() -> None:
    """Each entry of a group of eight reads a different half-word of the Philox output; a wrong shift or a signed
    half-word would bias one of the eight positions (e.g. to never kept), which the per-position rates show."""
    n, p = 16 * 2048, 0.25
    keep = _kernel_mask(n, p, seed=1234).float().cpu()
    assert abs(keep.mean().item() - 0.75) < 0.01
    by_lane = keep.view(-1, 8).mean(0)
    assert torch.all((by_lane - 0.75).abs() < 0.03), by_lane
    # The eight entries of a group are independent (no half-word read twice): P(both kept) = 0.75² for each pair.
    lanes = keep.view(-1, 8)
    both = lanes.T @ lanes / lanes.shape[0]
    off_diagonal = both[~torch.eye(8, dtype=torch.bool)]
    assert torch.all((off_diagonal - 0.5625).abs() < 0.03), both


def test_kernel_mask_follows_the_seed_and_a_short_last_block_is_written_alone() -> None:
    a = _kernel_mask(5000, 0.1, seed=7)
    b = _kernel_mask(5000, 0.1, seed=7)
    c = _kernel_mask(5000, 0.1, seed=8)
    assert torch.equal(a, b)
    # Two independent masks at p = 0.1 agree on 0.9² + 0.1² = 82% of the entries.
    assert abs((a == c).float().mean().item() - 0.82) < 0.03
    # Entry i's draw depends on the seed and i alone: a shorter tensor is a prefix of a longer one.
    assert torch.equal(_kernel_mask(2100, 0.1, seed=7), a[:2100])


def test_kernel_keeps_everything_at_p_zero() -> None:
    assert bool(_kernel_mask(3000, 0.0, seed=3).all())


def test_mask_op_off_cuda_draws_sixteen_bits_per_entry() -> None:
    torch.manual_seed(0)
    x = torch.empty(200, 300)
    keep = apt_dropout.keep_mask(x, 0.3)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    torch.manual_seed(0)
    bits = torch.randint(0, 65536, x.shape, dtype=torch.int32)
    assert torch.equal(keep, bits >= apt_dropout.keep_threshold(0.3))


def test_mask_op_schema_and_fake_tensor() -> None:
    torch.library.opcheck(
        torch.ops.apt.dropout_keep_mask.default,
        (torch.empty(4, 6), 0.2),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_dropout_off_cuda_is_torchs_own() -> None:
    """CPU runs keep torch's dropout exactly (DeepSpeed's parity with Playground is measured on the CPU)."""
    x = torch.randn(64, 32)
    torch.manual_seed(3)
    ours = apt_dropout.dropout(x, 0.2, True)
    torch.manual_seed(3)
    assert torch.equal(ours, F.dropout(x, 0.2, True))
    assert apt_dropout.dropout(x, 0.2, False) is x
    assert apt_dropout.dropout(x, 0.0, True) is x


def test_compiled_mask_is_drawn_once_and_reused_by_the_backward() -> None:
    """Under the min-cut partitioner (what inductor uses), the mask must be saved for the backward, not recomputed
    there (a second draw would be a different mask): the gradient is exactly the output's zero pattern times the
    scale. The op's CPU path stands in for the kernel here; the CUDA test below runs the kernel under inductor."""

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * apt_dropout.keep_mask(x.detach(), 0.5) * 2.0

    compiled = torch.compile(f, backend="aot_eager_decomp_partition", dynamic=False)
    x = torch.randn(4096, requires_grad=True)
    y = compiled(x)
    y.backward(torch.ones_like(y))
    kept = y != 0
    assert 0.4 < kept.float().mean().item() < 0.6
    assert torch.equal(x.grad, torch.where(kept, 2.0 * torch.cos(x.detach()), torch.zeros_like(x)))


def test_dropout_modules_are_the_models_and_leave_its_state_dict_alone() -> None:
    model = APTModel(model_preset("tiny", dropout=0.1))
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    drops = [m for m in model.modules() if isinstance(m, apt_dropout.Dropout)]
    assert drops and all(m.p == 0.1 for m in drops)
    assert not any("dropout" in key for key in model.state_dict())


def test_implementation_switch_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="mask, torch"):
        apt_dropout.set_implementation("fast")


@cuda_only
def test_kernel_on_cuda_matches_the_interpreter_rule() -> None:
    """The compiled kernel: the rates per position, and a mask that follows its seed."""
    keep = _kernel_mask(1 << 20, 0.1, seed=99, device="cuda").float()
    assert abs(keep.mean().item() - 0.9) < 0.002
    assert torch.all((keep.view(-1, 8).mean(0) - 0.9).abs() < 0.005)
    assert torch.equal(_kernel_mask(4097, 0.1, seed=99, device="cuda"), keep[:4097].bool())


@cuda_only
def test_dropout_on_cuda_compiled_matches_eager_and_its_gradient_uses_the_same_mask() -> None:
    """On CUDA the model's dropout takes the mask kernel. Its seed comes from ATen's generator, so with the same
    torch seed the inductor-compiled function draws the masks eager draws; the backward reuses the forward's."""
    cuda = torch.device("cuda")

    def f(x: torch.Tensor) -> torch.Tensor:
        return apt_dropout.dropout(F.gelu(x), 0.1, True)

    x = torch.randn(256, 1024, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(11)
    eager = f(x)
    compiled = torch.compile(f, dynamic=False)
    torch.manual_seed(11)
    y = compiled(x)
    torch.testing.assert_close(y, eager)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.01
    g = torch.randn_like(y)
    y.backward(g)
    expected = torch.ops.aten.gelu_backward(g.float() * kept / 0.9, x.detach().float()).to(torch.bfloat16)
    torch.testing.assert_close(x.grad, expected, rtol=2e-2, atol=2e-2)
    torch.manual_seed(12)
    assert not torch.equal(compiled(x) != 0, kept)
