"""Batches: teacher-forcing layout, truncation, padding shapes, seeded per-epoch order."""

from __future__ import annotations

import pytest
import torch

from apt_model.data import Pair
from apt_model.training.batching import Batcher, Example, build_tokenizer, collate, encode_pairs

PAIRS = [
    Pair(f"{a} + {b} = ?", str(a + b), "arithmetic", "train") for a in range(12) for b in range(0, 60, 7)
]


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return build_tokenizer([*PAIRS, Pair("鼠后面是什么生肖？", "牛", "zodiac", "val")])


def test_tokenizer_covers_all_texts_and_is_order_independent(tok) -> None:  # type: ignore[no-untyped-def]
    assert "牛" in tok.vocab and "鼠" in tok.vocab
    assert build_tokenizer(list(reversed(PAIRS))).to_json() == build_tokenizer(PAIRS).to_json()


def test_teacher_forcing_layout(tok) -> None:  # type: ignore[no-untyped-def]
    pairs = [Pair("1 + 2 = ?", "3", "a", "train"), Pair("11 + 22 = ?", "33", "a", "train")]
    ex = encode_pairs(pairs, tok, max_src_len=64, max_tgt_len=64)
    batch = collate(ex, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    assert batch.src.shape == (2, 16)  # longest 11 → rounded up to 8
    assert batch.tgt_in.shape == batch.tgt_out.shape == (2, 8)
    assert batch.src[0, :9].tolist() == tok.encode("1 + 2 = ?") and (batch.src[0, 9:] == tok.pad_id).all()
    three = tok.encode("33")
    assert batch.tgt_in[1, :3].tolist() == [tok.bos_id, *three]
    assert batch.tgt_out[1, :3].tolist() == [*three, tok.eos_id]
    assert (batch.tgt_out[1, 3:] == tok.pad_id).all()
    assert batch.n_tokens == 2 + 3 == int((batch.tgt_out != tok.pad_id).sum())
    # the answer never reaches the encoder
    assert tok.encode("33")[0] not in batch.src[1].tolist() or "3" in "11 + 22 = ?"


def test_truncation_keeps_eos_within_max_tgt_len(tok) -> None:  # type: ignore[no-untyped-def]
    long = [Pair("1" * 50, "2" * 50, "a", "train")]
    ex = encode_pairs(long, tok, max_src_len=10, max_tgt_len=6)
    assert len(ex[0].src) == 10 and len(ex[0].out) == 5
    b = collate(ex, pad_id=0, bos_id=tok.bos_id, eos_id=tok.eos_id, max_src_len=10, max_tgt_len=6)
    assert b.src.shape == (1, 10) and b.tgt_out.shape == (1, 6)  # rounding capped at the max lengths
    assert b.tgt_out[0, -1].item() == tok.eos_id


def _batcher(tok, mode: str = "bucket", bs: int = 8) -> Batcher:  # type: ignore[no-untyped-def]
    ex = encode_pairs(PAIRS, tok, max_src_len=20, max_tgt_len=6)
    return Batcher(ex, bs, tok.pad_id, tok.bos_id, tok.eos_id, 20, 6, seed=3, pad_mode=mode, bucket_batches=4)


def test_epoch_order_is_seeded_and_covers_every_example_once(tok) -> None:  # type: ignore[no-untyped-def]
    b = _batcher(tok)
    e0, e0_again, e1 = b.epoch_indices(0), b.epoch_indices(0), b.epoch_indices(1)
    assert e0 == e0_again and e0 != e1
    assert sorted(i for batch in e0 for i in batch) == list(range(len(PAIRS)))
    assert len(e0) == len(b) == -(-len(PAIRS) // 8)
    batches = b.epoch(1)
    assert all(torch.equal(x.src, y.src) for x, y in zip(batches, b.epoch(1), strict=True))


def test_bucketing_reduces_padding(tok) -> None:  # type: ignore[no-untyped-def]
    def pad_fraction(batches) -> float:  # type: ignore[no-untyped-def]
        total = sum(x.src.numel() for x in batches)
        return sum(int((x.src == tok.pad_id).sum()) for x in batches) / total

    ex = encode_pairs(PAIRS, tok, max_src_len=20, max_tgt_len=6)
    unsorted = [
        collate([ex[i] for i in idx], pad_id=0, bos_id=2, eos_id=3, pad_multiple=1)
        for idx in torch.randperm(len(ex), generator=torch.Generator().manual_seed(0)).split(8)
    ]
    bucketed = Batcher(ex, 8, 0, 2, 3, 20, 6, seed=0, pad_multiple=1, bucket_batches=100).epoch(0)
    assert pad_fraction(bucketed) < pad_fraction(unsorted)


def test_fixed_padding_gives_one_shape(tok) -> None:  # type: ignore[no-untyped-def]
    b = _batcher(tok, "fixed")
    shapes = {(x.src.shape[1], x.tgt_in.shape[1]) for x in b.epoch(0)}
    assert shapes == {(20, 6)}
    assert {x.src.shape[1] for x in b.eval_batches()} == {20}
    assert all(x.src.shape[1] % 8 == 0 for x in _batcher(tok).epoch(0))


def test_fixed_mode_fills_short_batches_with_rows_that_change_neither_loss_nor_gradient(tok) -> None:  # type: ignore[no-untyped-def]
    """Compiled steps pad to one shape: the short last batch gets all-padding rows instead of a new shape."""
    from apt_model.config import model_preset
    from apt_model.model import APTModel
    from apt_model.training.loop import compute_loss

    ex = encode_pairs(PAIRS[:5], tok, max_src_len=32, max_tgt_len=8)
    fixed = Batcher(ex, 4, tok.pad_id, tok.bos_id, tok.eos_id, 32, 8, pad_mode="fixed")
    batches = fixed.epoch(0)
    assert [b.src.shape for b in batches] == [(4, 32), (4, 32)]
    short = fixed.collate(ex[:1])
    plain = collate(ex[:1], pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, src_len=32, tgt_len=8)
    assert short.src.shape == (4, 32) and short.n_tokens == plain.n_tokens
    assert (short.tgt_out[1:] == tok.pad_id).all() and (short.src[1:] == tok.pad_id).all()

    torch.manual_seed(0)
    model = APTModel(model_preset("tiny", vocab_size=tok.vocab_size))
    losses, grads = [], []
    for batch in (plain, short):
        model.zero_grad()
        loss = compute_loss(model, batch, pad_id=tok.pad_id).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_grouped_plan_keeps_each_steps_batches_at_similar_lengths() -> None:
    # 64 batches of 8 rows with lengths 1..40: a data-parallel step takes 4 consecutive batches, one per rank.
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 41, (512,), generator=gen).tolist()
    ex = [Example(src=(5,) * n, out=(6,)) for n in lengths]
    b = Batcher(ex, 8, 0, 2, 3, 64, 4, seed=1, bucket_batches=10)

    def step_spread(plan: list[list[int]]) -> int:
        longest = [max(lengths[i] for i in batch) for batch in plan]
        return sum(max(s) - min(s) for s in (longest[k : k + 4] for k in range(0, len(longest), 4)))

    plain, grouped = b.epoch_indices(3), b.epoch_indices(3, group=4)
    assert b.epoch_indices(3, group=1) == plain  # single process: the plan is unchanged
    assert grouped == b.epoch_indices(3, group=4) and grouped != b.epoch_indices(4, group=4)
    assert sorted(i for batch in grouped for i in batch) == list(range(512))
    assert all(len(batch) == 8 for batch in grouped)
    assert step_spread(grouped) * 2 < step_spread(plain)  # 178 vs 399 here
    with pytest.raises(ValueError, match="group"):
        b.epoch_indices(0, group=0)


def _same_batch(a, b) -> None:  # type: ignore[no-untyped-def]
    for name in ("src", "tgt_in", "tgt_out"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.long and x.is_contiguous(), name
        assert torch.equal(x, y), name
    assert a.n_tokens == b.n_tokens


@pytest.mark.parametrize("pad_mode", ["bucket", "fixed"])
def test_batches_cut_from_the_padded_table_equal_row_by_row_collation(pad_mode: str) -> None:
    """epoch() and eval_batches() cut batches out of rows padded once; every batch must be what collate() builds
    from the same rows: widths rounded past the widest example, short fixed batches, empty answers."""
    gen = torch.Generator().manual_seed(3)
    ex = [
        Example(
            tuple(
                torch.randint(4, 50, (int(torch.randint(1, 23, (), generator=gen)),), generator=gen).tolist()
            ),
            tuple(
                torch.randint(4, 50, (int(torch.randint(0, 7, (), generator=gen)),), generator=gen).tolist()
            ),
        )
        for _ in range(101)
    ]
    b = Batcher(ex, 8, 0, 1, 2, max_src_len=24, max_tgt_len=9, pad_mode=pad_mode, bucket_batches=3)
    for epoch in range(3):
        plan = b.epoch_indices(epoch)
        for idx, batch in zip(plan, b.epoch(epoch), strict=True):
            _same_batch(batch, b.collate([ex[i] for i in idx]))
    order = sorted(range(len(ex)), key=lambda i: len(ex[i].src) + len(ex[i].out))
    for s, batch in zip(range(0, len(ex), 8), b.eval_batches(), strict=True):
        _same_batch(batch, b.collate([ex[i] for i in order[s : s + 8]]))
    # One row and three rows; a row repeated (the DeepSpeed worker's filler micro-batch reuses a row).
    for idx in ([5], [7, 7, 1]):
        _same_batch(b.collate_indices(idx), b.collate([ex[i] for i in idx]))


def test_batches_cut_from_the_padded_table_refuse_rows_past_a_fixed_shape() -> None:
    long_row = [Example(tuple(range(4, 34)), (5,)), Example((4,), (5,))]
    fixed = Batcher(long_row, 2, 0, 1, 2, max_src_len=24, max_tgt_len=9, pad_mode="fixed")
    with pytest.raises(ValueError, match="exceed the padded shape"):
        fixed.collate_indices([0, 1])
    with pytest.raises(ValueError, match="exceed the padded shape"):
        fixed.collate(long_row)
    assert fixed.collate_indices([1]).src.shape == (2, 24)
    with pytest.raises(ValueError, match="at least one row"):
        fixed.collate_indices([])
