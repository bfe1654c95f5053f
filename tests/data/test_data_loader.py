"""Loading both HLBD formats: reference-shaped files, duplicates, split rules and ≥ 20 malformed files."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from apt_model.data import dataset_sha256, load_dataset, summarize, write_dataset
from apt_model.data.concepts import CONCEPTS
from apt_model.data.loader import MAX_TEXT_CHARS
from apt_model.errors import DataError
from apt_model.io import sha256_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_spec_example_hardcore_file_loads_and_trusts_data() -> None:
    ds = load_dataset(FIXTURES / "hlbd_hardcore_spec.json")
    assert ds.format == "hardcore"
    assert ds.modules == ["geometry", "arithmetic", "zodiac", "physics", "reverse_english"]
    assert [(p.input, p.output) for p in ds.pairs][-1] == ("我爱你的英文是？", "I love you")
    assert any("reverse_english" in w for w in ds.warnings)
    assert ds.sha256 == sha256_file(FIXTURES / "hlbd_hardcore_spec.json")


def test_reference_575_shape_reports_duplicates_and_yields_each_input_once(reference_575: Any) -> None:
    path, expected = reference_575
    ds = load_dataset(path)
    assert len(ds.pairs) == expected["distinct"] == 501
    assert len(ds.duplicates) == expected["duplicates"] == 74
    assert sum(not d.same_output for d in ds.duplicates) == expected["conflicting"]
    inputs = [p.input for p in ds.pairs]
    assert len(inputs) == len(set(inputs))
    assert "reverse_english" in ds.modules  # present in data although metadata.modules omits it
    assert len([p for p in ds.pairs if p.module == "reverse_english"]) == 71
    # The first occurrence is the one kept: the conflicting repeat's answer never becomes a pair.
    conflict = next(d for d in ds.duplicates if not d.same_output)
    kept = next(p for p in ds.pairs if p.input == conflict.input)
    assert kept.output != "999"
    assert conflict.path.startswith("$.data.physics[") and conflict.first_path == "$.data.physics[9]"
    # No split stored: assigned by hash, with both splits populated and no input in both.
    assert ds.split_source == "hash"
    assert 20 <= len(ds.val) <= 90
    assert not {p.input for p in ds.train} & {p.input for p in ds.val}
    summary = summarize(ds)
    assert summary["duplicates"] == 74 and summary["conflicting_duplicates"] == 1
    assert summary["pairs"] == 501


def test_hash_split_does_not_depend_on_order(tmp_path: Path, reference_575_doc: Any) -> None:
    doc, _ = reference_575_doc
    shuffled = {"metadata": doc["metadata"], "data": {}}
    rng = random.Random(0)
    for module in reversed(list(doc["data"])):
        rows = list(doc["data"][module])
        rng.shuffle(rows)
        shuffled["data"][module] = rows
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    b.write_text(json.dumps(shuffled, ensure_ascii=False), encoding="utf-8")
    split_a = {p.input: p.split for p in load_dataset(a).pairs}
    split_b = {p.input: p.split for p in load_dataset(b).pairs}
    assert split_a == split_b


def test_generated_split_is_read_back_exactly(hardcore_doc: dict, default_datasets: dict) -> None:
    ds = default_datasets["hardcore"]
    assert ds.split_source == "file" and not ds.warnings and not ds.duplicates
    assert sorted(p.input for p in ds.val) == hardcore_doc["metadata"]["splits"]["val"]
    assert not {p.input for p in ds.train} & {p.input for p in ds.val}
    assert {p.module for p in ds.val} == set(hardcore_doc["data"])
    assert len(ds.pairs) == hardcore_doc["metadata"]["total_samples"]


def test_whitespace_is_normalised_and_bom_tolerated(tmp_path: Path) -> None:
    doc = {
        "data": {
            "arithmetic": [
                {"input": "  1 +\t2\n= ? ", "output": " 3 "},
                {"input": "1 + 2 = ?", "output": "3"},
            ]
        }
    }
    path = tmp_path / "ws.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode("utf-8"))
    ds = load_dataset(path)
    assert [(p.input, p.output) for p in ds.pairs] == [("1 + 2 = ?", "3")]
    assert len(ds.duplicates) == 1 and ds.duplicates[0].same_output


def test_edited_generated_file_warns_about_content_hash(tmp_path: Path) -> None:
    from apt_model.data import generate

    doc = generate("hardcore", size="small")
    doc["data"]["arithmetic"][0]["output"] = "12345"
    path = tmp_path / "edited.json"
    write_dataset(doc, path)
    ds = load_dataset(path)
    assert any("content_sha256" in w for w in ds.warnings)


def test_dataset_sha256(default_files: dict) -> None:
    assert dataset_sha256(default_files["hardcore"]) == sha256_file(default_files["hardcore"])
    with pytest.raises(DataError):
        dataset_sha256(default_files["hardcore"].parent / "nope.json")


# ---------------------------------------------------------------------------------------------- malformed files
def _hc(rows: Any, module: str = "arithmetic") -> dict[str, Any]:
    return {"metadata": {"name": "x"}, "data": {module: rows}}


def _record(**changes: Any) -> dict[str, Any]:
    rec = CONCEPTS[0].record()
    for key, value in changes.items():
        if value is None:
            rec.pop(key)
        else:
            rec[key] = value
    return rec


_OK = {"input": "1 + 1 = ?", "output": "2"}

# name → (file content: bytes, or a JSON-able document, or a callable making the path), expected fragment
MALFORMED: dict[str, tuple[Any, str]] = {
    "not_json": (b"{not json", "not valid JSON"),
    "truncated_json": (b'{"data": {"arithmetic": [', "not valid JSON"),
    "not_utf8": ('{"data": {"a": [{"input": "\xff", "output": "1"}]}}'.encode("latin-1"), "not UTF-8"),
    "empty_file": (b"", "empty file"),
    "top_level_array": ([{"input": "a", "output": "b"}], "$: expected an object"),
    "top_level_string": ("hello", "$: expected an object"),
    "unknown_format": ({"metadata": {}, "rows": []}, '$: unknown format: expected "data"'),
    "both_formats": ({"data": {"a": [_OK]}, "samples": [_record()]}, "$: unknown format"),
    "metadata_not_object": ({"metadata": [], "data": {"a": [_OK]}}, "$.metadata: expected an object"),
    "data_not_object": ({"data": [_OK]}, "$.data: expected an object, got an array"),
    "data_empty": ({"data": {}}, "$.data: expected at least one module"),
    "module_not_list": (
        {"data": {"arithmetic": {"input": "a", "output": "b"}}},
        "$.data.arithmetic: expected an array",
    ),
    "module_empty_list": (_hc([]), "$.data.arithmetic: expected a non-empty array"),
    "module_name_blank": ({"data": {" ": [_OK]}}, '$.data[" "]: module name'),
    "sample_not_object": (_hc([_OK, "1 + 2 = ?"]), "$.data.arithmetic[1]: expected an object, got a string"),
    "missing_input": (_hc([_OK, {"output": "3"}]), "$.data.arithmetic[1].input: missing"),
    "missing_output": (_hc([{"input": "1 + 2 = ?"}]), "$.data.arithmetic[0].output: missing"),
    "input_not_string": (
        _hc([{"input": 12, "output": "3"}]),
        "$.data.arithmetic[0].input: expected a non-empty string",
    ),
    "output_number": (
        _hc([{"input": "12 + 34 = ?", "output": 46}]),
        "$.data.arithmetic[0].output: expected a non-empty",
    ),
    "output_null": (
        _hc([{"input": "a", "output": None}]),
        "$.data.arithmetic[0].output: expected a non-empty string, got null",
    ),
    "output_empty": (
        _hc([_OK, _OK, {"input": "b", "output": ""}]),
        "$.data.arithmetic[2].output: expected a non-empty",
    ),
    "input_whitespace_only": (
        _hc([{"input": " \n\t ", "output": "x"}]),
        "$.data.arithmetic[0].input: expected a non-empty",
    ),
    "huge_input": (
        _hc([{"input": "1" * (MAX_TEXT_CHARS + 1), "output": "x"}]),
        f"$.data.arithmetic[0].input: string of {MAX_TEXT_CHARS + 1} characters exceeds",
    ),
    "duplicate_key": (
        b'{"data": {"arithmetic": [{"input": "a", "output": "b"}], "arithmetic": []}}',
        '$.data: key "arithmetic" appears more than once',
    ),
    "samples_not_list": ({"samples": {"concept": "x"}}, "$.samples: expected an array"),
    "samples_empty": ({"metadata": {}, "samples": []}, "$.samples: expected a non-empty array"),
    "full_record_not_object": ({"samples": [_record(), 5]}, "$.samples[1]: expected an object, got a number"),
    "full_missing_level": ({"samples": [_record(level_4=None)]}, "$.samples[0].level_4: missing level"),
    "full_level_not_object": (
        {"samples": [_record(level_5="Video chat")]},
        "$.samples[0].level_5: expected an object",
    ),
    "full_missing_field": (
        {"samples": [_record(level_1={"字卡": "视频聊天"})]},
        "$.samples[0].level_1.emoji: missing",
    ),
    "full_missing_concept": ({"samples": [_record(concept=None)]}, "$.samples[0].concept: missing"),
    "splits_not_object": (
        {"metadata": {"splits": ["a"]}, "data": {"a": [_OK]}},
        "$.metadata.splits: expected an object",
    ),
    "splits_val_not_list": (
        {"metadata": {"splits": {"val": "x"}}, "data": {"a": [_OK]}},
        "$.metadata.splits.val: expected an array",
    ),
    "splits_val_unknown_input": (
        {"metadata": {"splits": {"val": ["1 + 1 = ?", "nope"]}}, "data": {"a": [_OK]}},
        '$.metadata.splits.val[1]: "nope" is not an input',
    ),
    "deep_nesting": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
}


def _make(tmp_path: Path, name: str, content: Any) -> Path:
    path = tmp_path / f"{name}.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return path


SPECIAL_PATHS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing_file": (lambda d: d / "missing.json", "no such file"),
    "directory": (lambda d: (d / "adir.json").mkdir() or d / "adir.json", "is a directory"),
}


def test_at_least_twenty_malformed_cases() -> None:
    assert len(MALFORMED) + len(SPECIAL_PATHS) >= 20


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_gives_one_line_error_with_file_and_path(tmp_path: Path, name: str) -> None:
    content, fragment = MALFORMED[name]
    path = _make(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message


@pytest.mark.parametrize("name", sorted(SPECIAL_PATHS))
def test_unreadable_paths(tmp_path: Path, name: str) -> None:
    make, fragment = SPECIAL_PATHS[name]
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and fragment in message, message


def test_json_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = _make(tmp_path, "bad", b'{\n  "data": {\n    "a": [,]\n  }\n}')
    with pytest.raises(DataError, match=r"at line 3 column \d+"):
        load_dataset(path)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_cli_inspect_rejects_malformed_file(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from apt_model.cli import main

    content, fragment = MALFORMED[name]
    path = _make(tmp_path, name, content)
    before = path.read_bytes()
    assert main(["data", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1 and fragment in err
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
