from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apt_model.config import model_preset
from apt_model.model.apt import APTModel
from apt_model.model.dropout import ScheduledDropout, enable_dropout_schedule, set_dropout_on

V = 24


def _model(use_autopoietic: bool = True, dropout: float = 0.3) -> APTModel:
    torch.manual_seed(0)
    return APTModel(
        model_preset("tiny", vocab_size=V, dropout=dropout, use_autopoietic=use_autopoietic)
    ).train()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, V, (3, 8), generator=g)
    src[0, 5:] = 0
    tgt = torch.randint(4, V, (3, 6), generator=g)
    tgt[2, 4:] = 0
    return src, tgt


def _logits(model: APTModel, seed: int = 5) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(*_batch())


def test_without_a_schedule_it_is_f_dropout_and_the_switch_is_ignored() -> None:
    x = torch.randn(4, 7)
    d = ScheduledDropout(0.4).train()
    torch.manual_seed(3)
    expected = F.dropout(x, 0.4, True)
    torch.manual_seed(3)
    assert torch.equal(d(x), expected)
    d.on.fill_(0.0)  # not gated: the switch means nothing
    torch.manual_seed(3)
    assert torch.equal(d(x), expected)
    assert torch.equal(d.eval()(x), x)


def test_scheduled_switch_on_is_f_dropout_off_is_identity() -> None:
    x = torch.randn(4, 7)
    d = ScheduledDropout(0.4).train()
    holder = torch.nn.Sequential(d)
    assert enable_dropout_schedule(holder) == 1
    torch.manual_seed(3)
    expected = F.dropout(x, 0.4, True)
    torch.manual_seed(3)
    assert torch.equal(d(x), expected)
    set_dropout_on(holder, False)
    assert torch.equal(d(x), x)
    set_dropout_on(holder, True)
    torch.manual_seed(3)
    assert torch.equal(d(x), expected)
    assert "on" not in holder.state_dict() and "0.on" not in holder.state_dict()


@pytest.mark.parametrize("use_autopoietic", [True, False])
def test_model_with_dropout_off_is_the_model_without_dropout(use_autopoietic: bool) -> None:
    """Every dropout site (embedding, residuals, feed-forward, attention probabilities) obeys the switch."""
    model = _model(use_autopoietic)
    n_sites = enable_dropout_schedule(model)
    # embedding + per encoder layer (residual, ff, self-attn) + per decoder layer (residual, ff, self, cross)
    assert n_sites == 1 + 2 * 3 + 2 * 4
    with_dropout = _logits(model)
    set_dropout_on(model, False)
    off = _logits(model)
    plain = _model(use_autopoietic, dropout=0.0)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(off, _logits(plain), rtol=0, atol=1e-6)
    assert (with_dropout - off).abs().max() > 1e-2
    set_dropout_on(model, True)
    torch.testing.assert_close(_logits(model), with_dropout, rtol=0, atol=0)


def test_unscheduled_model_matches_the_state_dict_and_dropout_of_before() -> None:
    """The schedule adds no checkpoint keys, and without it the forward draws what nn.Dropout drew."""
    model = _model()
    assert not any(k.endswith(".on") or k == "on" for k in model.state_dict())
    a = _logits(model)
    enable_dropout_schedule(model)
    torch.testing.assert_close(_logits(model), a, rtol=0, atol=0)  # gated, on: the same draws


def test_switching_does_not_recompile() -> None:
    """The switch is a tensor read by the compiled graph: flipping it reuses the graph and changes its result."""
    compiles = 0

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        nonlocal compiles
        compiles += 1
        return gm.forward

    model = _model()
    enable_dropout_schedule(model)
    eager_on, compiled = _logits(model), torch.compile(model, backend=counting_backend, dynamic=False)
    torch._dynamo.reset()
    on = _logits(compiled)
    set_dropout_on(model, False)
    off = _logits(compiled)
    set_dropout_on(model, True)
    on_again = _logits(compiled)
    assert compiles == 1
    torch.testing.assert_close(on, eager_on, rtol=0, atol=1e-6)
    torch.testing.assert_close(on_again, on, rtol=0, atol=0)
    set_dropout_on(model, False)
    torch.testing.assert_close(off, _logits(model), rtol=0, atol=1e-6)
    assert (on - off).abs().max() > 1e-2
