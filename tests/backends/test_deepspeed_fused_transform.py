"""The fused transform's custom op under DeepSpeed ZeRO-3 with parameter and optimizer offload.

ZeRO-3 keeps each parameter partitioned and gathers it around its module's forward and backward through hooks; the
fused op receives the transform's parameters as inputs and saves them for its backward, as ``F.linear`` does. On the
CPU its kernels run under Triton's interpreter (``tests/conftest.py``), so this checks the op's autograd with
DeepSpeed's gathering and offload in one process (world size 1, gloo), against the torch transform in the same
engine set-up. The GPU machine runs the 2-GPU line itself (``bench/gpu_suite.sh deepspeed-fused``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("triton")

from apt_model.backends.deepspeed_worker import _patch_zero_dim_broadcast, import_deepspeed
from apt_model.config import model_preset
from apt_model.model import autopoietic, fused_transform
from apt_model.model.apt import APTModel

VOCAB = 64
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_process_group(monkeypatch) -> Iterator[None]:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(
            "runs the kernels under Triton's interpreter on the CPU; the GPU machine runs the real line"
        )
    for key, value in {
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    import_deepspeed()
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _train(fused: bool, monkeypatch) -> tuple[list[float], dict[str, torch.Tensor]]:
    import deepspeed

    calls = {"n": 0}

    def fused_when_it_fits(scores: torch.Tensor) -> bool:
        ok = fused_transform.fits_fused(scores.shape[-2], scores.shape[-1], scores.dtype)
        calls["n"] += ok
        return ok

    monkeypatch.setattr(autopoietic, "uses_fused", fused_when_it_fits if fused else (lambda scores: False))
    torch.manual_seed(0)
    model = APTModel(model_preset("tiny", vocab_size=VOCAB))
    config = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu"},
            "offload_optimizer": {"device": "cpu"},
        },
        # torch's AdamW, as the backend passes it.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    _patch_zero_dim_broadcast()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, VOCAB, (2, 9), generator=g)
    src[0, 6:] = model.config.pad_id
    tgt = torch.randint(4, VOCAB, (2, 7), generator=g)
    losses = []
    for _ in range(STEPS):
        logits = engine(src, tgt)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), tgt.reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    # Six transforms (2 encoder self, 2 decoder self, 2 cross) per forward, every step.
    assert calls["n"] == (6 * STEPS if fused else 0)
    return losses, params


@pytest.mark.slow
def test_fused_op_trains_under_zero3_with_offload_like_the_torch_transform(
    one_process_group, monkeypatch
) -> None:
    torch_losses, torch_params = _train(False, monkeypatch)
    fused_losses, fused_params = _train(True, monkeypatch)
    assert torch_losses[-1] < torch_losses[0]  # it trains
    torch.testing.assert_close(fused_losses, torch_losses, rtol=1e-5, atol=1e-6)
    assert fused_params.keys() == torch_params.keys()
    # After two AdamW steps (lr 1e-2): float32 rounding differences in the gradients, not different training.
    for name, value in fused_params.items():
        torch.testing.assert_close(value, torch_params[name], rtol=0, atol=1e-3, msg=name)
    # The transform's own parameters moved (AdamW's first steps are ~lr each): the comparison above would see an
    # update the fused op's gradients failed to make.
    torch.manual_seed(0)
    initial = dict(APTModel(model_preset("tiny", vocab_size=VOCAB)).named_parameters())
    transform_w1 = [n for n in torch_params if n.endswith("transform.w1")]
    assert len(transform_w1) == 6
    for name in transform_w1:
        assert (torch_params[name] - initial[name]).abs().max() > 5e-3, name
