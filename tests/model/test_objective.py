from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apt_model.config import model_preset
from apt_model.errors import DataError
from apt_model.model.apt import APTModel
from apt_model.model.objective import seq2seq_loss

PAD, BOS, EOS, V = 0, 2, 3, 16


def _model(seed: int = 0, **kw) -> APTModel:
    torch.manual_seed(seed)
    return APTModel(model_preset("tiny", vocab_size=V, **kw)).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, V, (3, 6), generator=g)
    src[1, 4:] = PAD
    out = torch.randint(4, V, (3, 5), generator=g)
    out[2, 3:] = PAD
    lengths = (out != PAD).sum(1)
    tgt_in = torch.cat([torch.full((3, 1), BOS), out], 1)
    tgt_out = torch.cat([out, torch.full((3, 1), PAD)], 1)
    tgt_out[torch.arange(3), lengths] = EOS
    return src, tgt_in, tgt_out


def test_loss_is_mean_ce_over_non_pad_targets() -> None:
    model = _model()
    src, tgt_in, tgt_out = _batch()
    res = seq2seq_loss(model, src, tgt_in, tgt_out, pad_id=PAD)
    logits = model(src, tgt_in)
    keep = tgt_out != PAD
    expected = F.cross_entropy(logits[keep], tgt_out[keep])
    torch.testing.assert_close(res.loss, expected)
    assert int(res.n_tokens) == int(keep.sum()) == 3 * 6 - 2
    assert int(res.n_correct) == int((logits.argmax(-1) == tgt_out)[keep].sum())
    assert isinstance(res.n_tokens, torch.Tensor) and isinstance(res.n_correct, torch.Tensor)


def test_changing_one_target_changes_only_its_term() -> None:
    model = _model()
    src, tgt_in, tgt_out = _batch()
    base = seq2seq_loss(model, src, tgt_in, tgt_out, pad_id=PAD)
    logits = model(src, tgt_in)
    logp = logits.log_softmax(-1)
    tgt2 = tgt_out.clone()
    tgt2[0, 2] = 4 if tgt_out[0, 2] != 4 else 5
    changed = seq2seq_loss(model, src, tgt_in, tgt2, pad_id=PAD)
    n = float(base.n_tokens)
    delta = (-logp[0, 2, tgt2[0, 2]] + logp[0, 2, tgt_out[0, 2]]) / n
    torch.testing.assert_close(changed.loss - base.loss, delta, rtol=1e-4, atol=1e-6)


def test_padding_targets_ignored_and_label_smoothing() -> None:
    model = _model()
    src, tgt_in, tgt_out = _batch()
    base = seq2seq_loss(model, src, tgt_in, tgt_out, pad_id=PAD)
    # label smoothing follows F.cross_entropy over the non-pad targets only
    logits = model(src, tgt_in)
    keep = tgt_out != PAD
    smooth = seq2seq_loss(model, src, tgt_in, tgt_out, pad_id=PAD, label_smoothing=0.1)
    torch.testing.assert_close(smooth.loss, F.cross_entropy(logits[keep], tgt_out[keep], label_smoothing=0.1))
    assert not torch.allclose(smooth.loss, base.loss)
    empty = seq2seq_loss(model, src, tgt_in, torch.full_like(tgt_out, PAD), pad_id=PAD)
    assert float(empty.loss.detach()) == 0.0 and int(empty.n_tokens) == 0


def test_shape_errors() -> None:
    model = _model()
    src, tgt_in, tgt_out = _batch()
    with pytest.raises(DataError, match="tgt_out"):
        seq2seq_loss(model, src, tgt_in, tgt_out[:, :-1], pad_id=PAD)
    with pytest.raises(DataError, match="src"):
        seq2seq_loss(model, src[:2], tgt_in, tgt_out, pad_id=PAD)


@pytest.mark.parametrize("use_autopoietic", [True, False])
def test_tiny_model_overfits_eight_pairs(use_autopoietic: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n, ls, lo = 8, 6, 5
    src = torch.randint(4, V, (n, ls), generator=g)
    outs = [
        torch.randint(4, V, (int(torch.randint(2, lo + 1, (1,), generator=g)),), generator=g)
        for _ in range(n)
    ]
    tgt_in = torch.full((n, lo + 1), PAD)
    tgt_out = torch.full((n, lo + 1), PAD)
    for i, o in enumerate(outs):
        tgt_in[i, 0] = BOS
        tgt_in[i, 1 : len(o) + 1] = o
        tgt_out[i, : len(o)] = o
        tgt_out[i, len(o)] = EOS
    model = _model(seed=0, use_autopoietic=use_autopoietic)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        res = seq2seq_loss(model, src, tgt_in, tgt_out, pad_id=PAD)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        if float(res.loss) < 0.02:
            break
    assert float(res.loss) < 0.05
    assert int(res.n_correct) == int(res.n_tokens)
    model.eval()
    gen = model.generate(src, max_new_tokens=lo + 2, bos_id=BOS, eos_id=EOS)
    for i, o in enumerate(outs):
        assert gen[i, : len(o) + 1].tolist() == [*o.tolist(), EOS]
