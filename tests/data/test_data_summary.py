"""summarize(): counts, duplicates, vocabulary size and nearest-rank length percentiles."""

from __future__ import annotations

import json
from pathlib import Path

from apt_model.data import load_dataset, summarize


def test_summary_of_a_known_file(tmp_path: Path) -> None:
    rows = [{"input": "a" * n, "output": "b" * (n % 3 + 1)} for n in range(1, 101)]
    rows.append({"input": "a" * 7, "output": "c"})  # duplicate input with another answer
    doc = {
        "metadata": {"splits": {"val": ["a" * n for n in range(1, 11)]}},
        "data": {"m1": rows[:60], "m2": rows[60:]},
    }
    path = tmp_path / "known.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    s = summarize(load_dataset(path))
    assert s["format"] == "hardcore" and s["pairs"] == 100 and s["split_source"] == "file"
    assert s["splits"] == {"train": 90, "val": 10}
    assert s["modules"] == {
        "m1": {"train": 50, "val": 10, "total": 60},
        "m2": {"train": 40, "val": 0, "total": 40},
    }
    assert s["duplicates"] == 1 and s["conflicting_duplicates"] == 1
    assert (
        s["vocab_size"] == 10 + 2
    )  # reserved tokens + {a, b}; the dropped duplicate's "c" is not trained on
    assert s["input_tokens"] == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert s["output_tokens"]["max"] == 3


def test_summary_of_default_datasets(default_datasets: dict) -> None:
    hc = summarize(default_datasets["hardcore"])
    assert hc["pairs"] >= 5000 and set(hc["modules"]) == {
        "geometry",
        "arithmetic",
        "zodiac",
        "physics",
        "reverse_english",
    }
    assert hc["splits"]["train"] + hc["splits"]["val"] == hc["pairs"]
    assert hc["generator_version"] and hc["seed"] == 42 and hc["warnings"] == []
    assert hc["input_tokens"]["max"] <= 64  # fits DataConfig.max_src_len
    full = summarize(default_datasets["full"])
    assert full["vocab_size"] > hc["vocab_size"] // 2 and full["output_tokens"]["max"] <= 64
