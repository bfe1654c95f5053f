"""bench/reverse_digits.py: the answers' digit runs reversed, everything else (inputs, split, loadability) kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apt_model.data import generate, load_dataset, write_dataset
from bench.reverse_digits import main, reverse_digit_runs, reverse_document
from tests.bench.rewrite_cases import BAD_FILES, assert_refuses_bad_file, assert_refuses_rewritten_file


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", "4201"),
        ("70", "07"),
        ("-12", "-21"),
        ("3.14 m", "3.41 m"),
        ("a12b345", "a21b543"),
        ("子鼠", "子鼠"),
    ],
)
def test_reverses_each_run_of_digits_and_is_its_own_inverse(text: str, expected: str) -> None:
    assert reverse_digit_runs(text) == expected
    assert reverse_digit_runs(expected) == text


def test_the_copy_loads_cleanly_with_the_same_inputs_split_and_answers_read_back(tmp_path: Path) -> None:
    doc = generate("hardcore", size="small")
    src, dst = tmp_path / "hc.json", tmp_path / "rev.json"
    write_dataset(doc, src)
    assert main([str(src), str(dst)]) == 0
    before, after = load_dataset(src), load_dataset(dst)
    assert after.warnings == []  # content hash recomputed: no "edited after generation" warning
    assert [(p.input, p.module, p.split) for p in after.pairs] == [
        (p.input, p.module, p.split) for p in before.pairs
    ]
    assert [reverse_digit_runs(p.output) for p in after.pairs] == [p.output for p in before.pairs]
    assert sum(p.output != q.output for p, q in zip(before.pairs, after.pairs, strict=True)) > 100
    assert json.loads(dst.read_text())["metadata"]["params"]["reverse_digits"] is True
    assert doc == json.loads(src.read_text())  # the source document is not modified in place
    assert reverse_document(doc)["metadata"]["splits"] == doc["metadata"]["splits"]


def test_refuses_a_file_reversed_already_and_leaves_it_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refuses_rewritten_file(main, main, "its answers are reversed already", tmp_path, capsys)


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
def test_bad_files_exit_2_and_write_nothing(
    content: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refuses_bad_file(main, content, message, tmp_path, capsys)
