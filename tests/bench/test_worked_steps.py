"""bench/worked_steps.py: products of two-digit multipliers answered in steps, everything else kept; final-answer
scores and the held-out products a step shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from apt_model.data import generate, load_dataset, write_dataset
from apt_model.errors import DataError
from bench.reverse_digits import main as reverse_main
from bench.worked_steps import (
    STEPS_MARKER,
    WORKED,
    aux_document,
    final_answer,
    final_scores,
    main,
    mixed_document,
    product_operands,
    score_without_twins,
    shown_pairs,
    worked_answer,
    worked_document,
)
from tests.bench.rewrite_cases import BAD_FILES, assert_refuses_bad_file, assert_refuses_rewritten_file


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (37, 14, "148+370=518"),
        (37, 4, "148"),  # a one-digit multiplier: the plain product
        (4, 37, "28+120=148"),  # the second number is the multiplier, whatever its size
        (99, 99, "891+8910=9801"),
        (5, 20, "0+100=100"),
    ],
)
def test_worked_answer_is_the_partial_products_and_their_sum(a: int, b: int, expected: str) -> None:
    assert worked_answer(a, b) == expected
    assert int(final_answer(expected)) == a * b


@pytest.mark.parametrize(
    ("module", "text", "operands"),
    [
        ("arithmetic", "12 × 34 = ?", (12, 34)),
        ("physics", "以27m/s的速度运动21秒，路程是多少米？", (27, 21)),
        ("physics", "已知F = 37N，s = 14m，求W（J）", (37, 14)),
        ("geometry", "长3宽12的长方形面积是多少？", (3, 12)),
        ("geometry", "边长为48的正方形面积是多少？", (48, 48)),
        ("arithmetic", "12 + 34 = ?", None),
        ("geometry", "长3宽12的长方形周长是多少？", None),
        ("physics", "路程100米，用时20秒，速度是多少米每秒？", None),  # a quotient
        ("zodiac", "鼠后面是什么生肖？", None),
    ],
)
def test_product_operands_in_the_questions_order(
    module: str, text: str, operands: tuple[int, int] | None
) -> None:
    assert product_operands(module, text) == operands


def _written_copy(tmp_path: Path, size: str = "small") -> tuple[Path, Path, dict[str, Any]]:
    doc = generate("hardcore", size=size)
    src, dst = tmp_path / "hc.json", tmp_path / "worked.json"
    write_dataset(doc, src)
    assert main([str(src), str(dst)]) == 0
    return src, dst, doc


def test_the_copy_rewrites_only_products_of_multi_digit_multipliers(tmp_path: Path) -> None:
    src, dst, doc = _written_copy(tmp_path)
    before, after = load_dataset(src), load_dataset(dst)
    assert after.warnings == []  # content hash recomputed: no "edited after generation" warning
    assert [(p.input, p.module, p.split) for p in after.pairs] == [
        (p.input, p.module, p.split) for p in before.pairs
    ]
    changed = [(p, q) for p, q in zip(before.pairs, after.pairs, strict=True) if p.output != q.output]
    assert {p.module for p, _ in changed} == {"arithmetic", "geometry", "physics"}
    for p, q in changed:
        a, b = product_operands(p.module, p.input)
        assert b >= 10 and q.output == worked_answer(a, b) and final_answer(q.output) == p.output
    rewritten = [q for _, q in changed]
    assert [
        q for q in after.pairs if WORKED.fullmatch(q.output)
    ] == rewritten  # facts like "W = Fs" untouched
    assert json.loads(dst.read_text())["metadata"]["params"]["worked_steps"] is True
    assert doc == json.loads(src.read_text())  # the source document is not modified in place


def test_a_product_answered_wrong_is_named(tmp_path: Path) -> None:
    doc = generate("hardcore", size="small")
    row = next(r for r in doc["data"]["arithmetic"] if product_operands("arithmetic", r["input"]))
    row["output"] = str(int(row["output"]) + 1)
    with pytest.raises(DataError, match=r"not \d+ × \d+"):
        worked_document(doc)


@pytest.mark.parametrize("rewriter", [main, reverse_main])
def test_refuses_a_file_rewritten_already_and_leaves_it_alone(
    rewriter: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refuses_rewritten_file(rewriter, main, "its answers are rewritten already", tmp_path, capsys)


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
def test_bad_files_exit_2_and_write_nothing(
    content: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refuses_bad_file(main, content, message, tmp_path, capsys)


def _doc(train: list[tuple[str, str]], val: list[tuple[str, str]]) -> dict[str, Any]:
    rows = [{"input": t, "output": o} for t, o in train + val]
    return {"data": {"arithmetic": rows}, "metadata": {"splits": {"val": [t for t, _ in val]}}}


def test_shown_pairs_are_the_multiplicand_with_each_digit_of_training_multipliers() -> None:
    doc = _doc([("37 × 14 = ?", "148+370=518"), ("6 × 7 = ?", "42")], [("25 × 13 = ?", "75+250=325")])
    assert shown_pairs(doc) == {frozenset((37, 1)), frozenset((37, 4))}


def test_final_scores_count_a_right_last_number_and_keep_shown_products_apart() -> None:
    train = [("37 × 14 = ?", "148+370=518")]
    val = [
        ("4 × 37 = ?", "28+120=148"),  # 148 is a training step (37 × 4): not clean
        ("25 × 13 = ?", "75+250=325"),  # clean, a wrong step but the right product
        ("23 × 11 = ?", "23+230=253"),  # clean, wrong
        ("3 + 4 = ?", "7"),  # not a product
    ]
    doc = _doc(train, val)
    failures = [
        {"module": "arithmetic", "input": "25 × 13 = ?", "expected": "75+250=325", "got": "75+205=325"},
        {"module": "arithmetic", "input": "23 × 11 = ?", "expected": "23+230=253", "got": "23+230=263"},
    ]
    scores = final_scores(doc, failures, doc)
    assert scores["n"] == 4 and scores["overall"] == 0.75 and scores["modules"] == {"arithmetic": 0.75}
    assert scores["by_kind"]["arithmetic"]["×"] == {"n": 3, "exact": round(2 / 3, 6)}
    assert scores["clean_by_kind"]["arithmetic"]["×"] == {"n": 2, "exact": 0.5}
    # A plain answer must match whole, even when the model's text ends in it.
    plain_miss = [{"module": "arithmetic", "input": "3 + 4 = ?", "expected": "7", "got": "1+6=7"}]
    assert final_scores(doc, plain_miss, doc)["by_kind"]["arithmetic"]["+"] == {"n": 1, "exact": 0.0}
    assert final_answer("W = Fs") == "W = Fs" and final_answer("1+6=7") == "7"


def test_aux_keeps_every_answer_and_adds_a_steps_twin_of_each_training_product(tmp_path: Path) -> None:
    doc = generate("hardcore", size="small")
    src, dst = tmp_path / "hc.json", tmp_path / "aux.json"
    write_dataset(doc, src)
    assert main(["--aux", str(src), str(dst)]) == 0
    before, after = load_dataset(src), load_dataset(dst)
    assert after.warnings == []
    assert after.val == before.val  # the scores stay the plain format's
    plain = {(p.module, p.input): p.output for p in before.pairs}
    twins = [p for p in after.pairs if (p.module, p.input) not in plain]
    assert all(plain[(p.module, p.input)] == p.output for p in after.pairs if (p.module, p.input) in plain)
    expected = {
        (p.module, p.input + STEPS_MARKER)
        for p in before.train
        if (ops := product_operands(p.module, p.input)) is not None and ops[1] >= 10
    }
    assert {(p.module, p.input) for p in twins} == expected and len(expected) > 20
    for p in twins:
        a, b = product_operands(p.module, p.input.removesuffix(STEPS_MARKER))
        assert p.split == "train" and p.output == worked_answer(a, b)
    md = json.loads(dst.read_text())["metadata"]
    assert md["params"]["aux_steps"] is True
    for module, count in md["counts"].items():
        assert count["train"] == sum(p.module == module for p in after.train)
        assert count["total"] == count["train"] + count["val"]
    assert aux_document(doc)["metadata"]["splits"] == doc["metadata"]["splits"]
    with pytest.raises(SystemExit) as exc:  # and a twinned file is not rewritten again
        main([str(dst), str(tmp_path / "again.json")])
    assert exc.value.code == 2


def test_modules_limit_the_rewrite_and_leave_arithmetic_plain(tmp_path: Path) -> None:
    src, dst = tmp_path / "hc.json", tmp_path / "worked.json"
    write_dataset(generate("hardcore", size="small"), src)
    assert main(["--modules", "physics,geometry", str(src), str(dst)]) == 0
    before, after = load_dataset(src), load_dataset(dst)
    assert after.warnings == []
    changed = {p.module for p, q in zip(before.pairs, after.pairs, strict=True) if p.output != q.output}
    assert changed == {"physics", "geometry"}
    assert json.loads(dst.read_text())["metadata"]["params"]["worked_steps"] == ["geometry", "physics"]
    with pytest.raises(DataError, match="worked-steps modules"):
        worked_document(generate("hardcore", size="small"), ["zodiac"])


def test_aux_with_modules_answers_those_in_steps_and_twins_the_others(tmp_path: Path) -> None:
    src, dst = tmp_path / "hc.json", tmp_path / "mixed.json"
    write_dataset(generate("hardcore", size="small"), src)
    assert main(["--aux", "--modules", "physics,geometry", str(src), str(dst)]) == 0
    before, after = load_dataset(src), load_dataset(dst)
    assert after.warnings == []
    assert [(p.module, p.input) for p in after.val] == [(p.module, p.input) for p in before.val]
    plain = {(p.module, p.input): p for p in before.pairs}
    kept = [p for p in after.pairs if (p.module, p.input) in plain]
    changed = {p.module for p in kept if p.output != plain[(p.module, p.input)].output}
    assert changed == {"physics", "geometry"}  # arithmetic's own answers stay plain
    twins = [p for p in after.pairs if (p.module, p.input) not in plain]
    assert twins and {p.module for p in twins} == {"arithmetic"}
    assert all(WORKED.fullmatch(p.output) and p.input.endswith(STEPS_MARKER) for p in twins)
    params = json.loads(dst.read_text())["metadata"]["params"]
    assert params["worked_steps"] == ["geometry", "physics"] and params["aux_steps"] == ["arithmetic"]


def test_score_without_twins_counts_only_hlbds_own_training_rows() -> None:
    doc = aux_document(generate("hardcore", size="small"))
    twin = next(r for r in doc["data"]["arithmetic"] if r["input"].endswith(STEPS_MARKER))
    own = next(r for r in doc["data"]["arithmetic"] if not r["input"].endswith(STEPS_MARKER))
    failures = [
        {"module": "arithmetic", "input": twin["input"], "expected": twin["output"], "got": "0"},
        {"module": "arithmetic", "input": own["input"], "expected": own["output"], "got": "0"},
    ]
    score = score_without_twins(doc, failures)
    val = set(doc["metadata"]["splits"]["val"])
    n = sum(
        r["input"] not in val and not r["input"].endswith(STEPS_MARKER) for r in doc["data"]["arithmetic"]
    )
    assert score["modules"]["arithmetic"] == round(1 - 1 / n, 6)  # the twin's miss is not counted
    assert score["modules"]["zodiac"] == 1.0
    assert score["n"] == sum(len(r) for r in doc["data"].values()) - len(val) - sum(
        r["input"].endswith(STEPS_MARKER) for rows in doc["data"].values() for r in rows
    )


def test_twins_beside_worked_answers_need_a_module_left_plain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(DataError, match="a module left plain"):
        mixed_document(generate("hardcore", size="small"), ["arithmetic", "geometry", "physics"])
    src, dst = tmp_path / "hc.json", tmp_path / "mixed.json"
    write_dataset(generate("hardcore", size="small"), src)
    with pytest.raises(SystemExit) as exc:
        main(["--aux", "--modules", "arithmetic,physics,geometry", str(src), str(dst)])
    assert exc.value.code == 2
    assert "a module left plain" in capsys.readouterr().err
    assert not dst.exists()


@pytest.mark.parametrize("modules", ["zodiac", "physics,nope", ","])
def test_bad_modules_exit_2_and_write_nothing(
    modules: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "hc.json", tmp_path / "worked.json"
    write_dataset(generate("hardcore", size="small"), src)
    with pytest.raises(SystemExit) as exc:
        main(["--modules", modules, str(src), str(dst)])
    assert exc.value.code == 2
    assert "--modules" in capsys.readouterr().err
    assert not dst.exists()
