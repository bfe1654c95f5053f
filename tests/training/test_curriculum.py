"""apt_model.training.curriculum: worked steps for the first epochs, removed evenly, plain answers at the end."""

from __future__ import annotations

import pytest

from apt_model.data.pairs import Pair
from apt_model.errors import ConfigError, DataError
from apt_model.training.batching import Batcher, build_tokenizer, encode_pairs
from apt_model.training.curriculum import StepsCurriculum

PAIRS = [
    Pair("37 × 14 = ?", "518", "arithmetic", "train"),
    Pair("37 × 4 = ?", "148", "arithmetic", "train"),  # one-digit multiplier: plain throughout
    Pair("猪后面是什么生肖？", "鼠", "zodiac", "train"),
]
LENGTHS = {"max_src_len": 24, "max_tgt_len": 16}


def _tokenizer(pairs: list[Pair]) -> object:
    return build_tokenizer([*pairs, Pair("10 + 2 = ?", "12", "arithmetic", "train")])  # "+", "=", every digit


def curriculum(full: int = 2, ramp: int = 3, pairs: list[Pair] = PAIRS, **lengths: int) -> StepsCurriculum:
    tok = _tokenizer(pairs)
    limits = {**LENGTHS, **lengths}
    return StepsCurriculum(
        full, ramp, pairs, encode_pairs(pairs, tok, **limits), tok, max_tgt_len=limits["max_tgt_len"]
    )


def test_fraction_keeps_the_steps_then_removes_them_evenly_then_stays_plain() -> None:
    assert [curriculum(2, 3).fraction(e) for e in range(7)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [curriculum(2, 0).fraction(e) for e in range(3)] == [0.0, 0.0, 1.0]
    assert [curriculum(0, 1).fraction(e) for e in range(2)] == [0.5, 1.0]


def test_only_products_of_a_two_digit_multiplier_are_staged() -> None:
    c = curriculum()
    assert c.rows == 1
    assert c.outputs(0.0) == ["148+370=518", "148", "鼠"]
    assert c.outputs(0.5) == ["370=518", "148", "鼠"]
    assert c.outputs(1.0) == ["518", "148", "鼠"]
    assert c.examples(1.0) == encode_pairs(PAIRS, c.tokenizer, **LENGTHS)  # plain: apt train's own encoding
    for fraction in (0.0, 0.2, 0.5, 0.9):  # the sliced ids are the staged texts' encodings
        assert c.examples(fraction) == encode_pairs(
            [
                Pair(p.input, out, p.module, p.split)
                for p, out in zip(PAIRS, c.outputs(fraction), strict=True)
            ],
            c.tokenizer,
            **LENGTHS,
        )
    assert c.describe() == {
        "worked_steps_epochs": 2,
        "worked_steps_ramp": 3,
        "rows": 1,
        "plain_from_epoch": 6,
        "mean_target_chars": {"steps": 11.0, "plain": 3.0},
    }


def test_apply_gives_the_batcher_each_stage_once() -> None:
    c = curriculum(1, 1)
    batcher = Batcher(encode_pairs(PAIRS, c.tokenizer, **LENGTHS), 2, pad_id=0, bos_id=2, eos_id=3, **LENGTHS)
    plain_batch = batcher.collate_indices([0, 1])  # builds the padded table of the plain targets
    changed = [c.apply(batcher, epoch) for epoch in range(4)]
    assert changed == [True, True, True, False]  # fractions 0, 0.5, 1, 1
    assert c.tokenizer.decode(list(batcher.examples[0].out)) == "518"
    c.apply(batcher, 0)
    steps_batch = batcher.collate_indices([0, 1])
    assert c.tokenizer.decode(steps_batch.tgt_out[0].tolist()) == "148+370=518"  # the table was built again
    assert not plain_batch.tgt_out.equal(steps_batch.tgt_out)
    with pytest.raises(ValueError, match="2 rows for a batcher of 3"):
        batcher.replace_examples(batcher.examples[:2])
    slow = curriculum(0, 7)  # fractions 1/8, 2/8, …: "148+370=" loses a character an epoch
    assert [slow.apply(batcher, epoch) for epoch in range(3)] == [True, True, True]
    slower = curriculum(0, 20)  # 1/21, 2/21: no whole character yet, so the table stays
    assert [slower.apply(batcher, epoch) for epoch in range(4)] == [True, False, True, False]


def test_refuses_what_it_cannot_train() -> None:
    with pytest.raises(ConfigError, match="no product of a two-digit multiplier"):
        curriculum(pairs=PAIRS[1:])
    with pytest.raises(
        ConfigError, match=r"longest worked answer is 11 tokens; .*max_tgt_len=8 .*raise it to 12"
    ):
        curriculum(max_tgt_len=8)
    no_plus = build_tokenizer(PAIRS)  # the data has no "+" anywhere
    with pytest.raises(DataError, match="lacks a character of '148\\+370='"):
        StepsCurriculum(1, 1, PAIRS, encode_pairs(PAIRS, no_plus, **LENGTHS), no_plus, max_tgt_len=16)


def test_the_table_updated_in_place_is_the_table_built_afresh() -> None:
    pairs = [
        Pair(f"{a} × {b} = ?", str(a * b), "arithmetic", "train") for a in (7, 37, 99) for b in (3, 14, 98)
    ]
    pairs.append(Pair("猪后面是什么生肖？", "鼠", "zodiac", "train"))
    c = curriculum(1, 9, pairs)
    common = dict(pad_id=0, bos_id=2, eos_id=3, pad_mode="fixed", **LENGTHS)
    batcher = Batcher(encode_pairs(pairs, c.tokenizer, **LENGTHS), 4, **common)
    everything = list(range(len(pairs)))
    for epoch in range(11):
        c.apply(batcher, epoch)
        batcher.collate_indices(everything)  # the table exists from here on: later stages update it in place
        fresh = Batcher(batcher.examples, 4, **common).collate_indices(everything)
        got = batcher.collate_indices(everything)
        assert got.tgt_in.equal(fresh.tgt_in) and got.tgt_out.equal(fresh.tgt_out), epoch
        assert got.src.equal(fresh.src) and got.n_tokens == fresh.n_tokens


def test_a_target_wider_than_the_table_rebuilds_it() -> None:
    c = curriculum(1, 1)
    batcher = Batcher(encode_pairs(PAIRS, c.tokenizer, **LENGTHS), 2, pad_id=0, bos_id=2, eos_id=3, **LENGTHS)
    c.apply(batcher, 2)  # plain targets, then a table only as wide as they are
    batcher.collate_indices([0, 1, 2])
    steps = c.examples(0.0)
    batcher.replace_examples(steps, changed=[0])  # 11 ids do not fit: built again, not cut short
    assert c.tokenizer.decode(batcher.collate_indices([0]).tgt_out[0].tolist()) == "148+370=518"


def test_a_new_batcher_gets_the_epochs_targets_whatever_the_last_one_held() -> None:
    c = curriculum(1, 1)
    common = dict(pad_id=0, bos_id=2, eos_id=3, **LENGTHS)
    first = Batcher(encode_pairs(PAIRS, c.tokenizer, **LENGTHS), 2, **common)
    assert c.apply(first, 0)  # a run stopped in epoch 1, on the worked answers
    second = Batcher(encode_pairs(PAIRS, c.tokenizer, **LENGTHS), 2, **common)  # plain, as prepare() encodes
    assert c.apply(second, 0)
    assert c.tokenizer.decode(list(second.examples[0].out)) == "148+370=518"
