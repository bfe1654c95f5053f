"""Fixtures for the HLBD data tests: generated default datasets and a reference-shaped 575-record file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from apt_model.data import generate, load_dataset, write_dataset

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

ZODIAC = "鼠牛虎兔龙蛇马羊猴鸡狗猪"


@pytest.fixture(scope="session")
def hardcore_doc() -> dict[str, Any]:
    return generate("hardcore")


@pytest.fixture(scope="session", params=["default", "large", "xl", "xxl"])
def sized_hardcore_doc(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The Hardcore document at each size whose computed problems the split must hold out alike."""
    return generate("hardcore", size=request.param)


@pytest.fixture(scope="session")
def full_doc() -> dict[str, Any]:
    return generate("full")


@pytest.fixture(scope="session")
def default_files(
    tmp_path_factory: pytest.TempPathFactory, hardcore_doc: dict, full_doc: dict
) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hlbd")
    paths = {"hardcore": d / "hardcore.json", "full": d / "full.json"}
    write_dataset(hardcore_doc, paths["hardcore"])
    write_dataset(full_doc, paths["full"])
    return paths


@pytest.fixture(scope="session")
def default_datasets(default_files: dict[str, Path]) -> dict[str, Any]:
    return {kind: load_dataset(p) for kind, p in default_files.items()}


def reference_575_document() -> tuple[dict[str, Any], dict[str, int]]:
    """A file shaped like the reference's small HLBD Hardcore: 575 records, 501 distinct inputs, no dedup, and
    ``reverse_english`` present in ``data`` but missing from ``metadata.modules``.

    Returns the document and the expected numbers (distinct inputs, duplicates, conflicting duplicates).
    """
    data: dict[str, list[dict[str, str]]] = {m: [] for m in ("geometry", "arithmetic", "zodiac", "physics")}
    data["reverse_english"] = []

    arithmetic = [(a, b) for a in range(1, 19) for b in range(1, 11)]  # 180 distinct
    for a, b in arithmetic:
        data["arithmetic"].append({"input": f"{a} + {b} = ?", "output": str(a + b)})
    for a, b in arithmetic[:20]:  # the reference repeated some questions verbatim
        data["arithmetic"].append({"input": f"{a} + {b} = ?", "output": str(a + b)})

    for side in range(1, 101):  # 100 distinct
        data["geometry"].append({"input": f"边长为{side}的正方形周长是多少？", "output": str(4 * side)})
    for side in range(1, 21):
        data["geometry"].append({"input": f"边长为{side}的正方形周长是多少？", "output": str(4 * side)})

    phrasings = (
        "{x}后面是什么生肖？",
        "{x}的下一个生肖是什么？",
        "{x}前面是什么生肖？",
        "{x}的上一个生肖是什么？",
    )
    zodiac_rows = []
    for t_index, template in enumerate(phrasings):
        step = 1 if t_index < 2 else -1
        for i, x in enumerate(ZODIAC):
            zodiac_rows.append({"input": template.format(x=x), "output": ZODIAC[(i + step) % 12]})
    zodiac_rows += [{"input": f"第{n}个生肖是什么？", "output": ZODIAC[n - 1]} for n in range(1, 13)]
    zodiac_rows += [{"input": f"{x}是第几个生肖？", "output": str(i + 1)} for i, x in enumerate(ZODIAC)]
    zodiac_rows += [{"input": f"生肖{x}排在第几位？", "output": str(i + 1)} for i, x in enumerate(ZODIAC[:8])]
    assert len(zodiac_rows) == 80
    data["zodiac"] = zodiac_rows + [dict(r) for r in zodiac_rows[:20]]

    physics = [
        {"input": f"质量为{m}kg的物体受到的重力是多少N？", "output": str(10 * m)} for m in range(1, 71)
    ]
    data["physics"] = physics + [dict(r) for r in physics[:9]]
    # One repeated question with a different answer: kept first, reported as conflicting.
    data["physics"].append({"input": physics[9]["input"], "output": "999"})

    words = [(f"词{i}", f"Word {i}") for i in range(71)]
    data["reverse_english"] = [{"input": f"{zh}的英文是？", "output": en} for zh, en in words]
    data["reverse_english"] += [dict(r) for r in data["reverse_english"][:4]]

    total = sum(len(rows) for rows in data.values())
    doc = {
        "metadata": {
            "name": "HLBD Hardcore Dataset",
            "version": "1.0",
            "description": "reference-shaped fixture",
            "total_samples": total,
            "modules": ["geometry", "arithmetic", "zodiac", "physics"],
        },
        "data": data,
    }
    return doc, {"total": total, "distinct": 501, "duplicates": total - 501, "conflicting": 1}


@pytest.fixture()
def reference_575_doc() -> tuple[dict[str, Any], dict[str, int]]:
    return reference_575_document()


@pytest.fixture()
def reference_575(tmp_path: Path, reference_575_doc: Any) -> tuple[Path, dict[str, int]]:
    doc, expected = reference_575_doc
    path = tmp_path / "HLBD_Hardcore_small.json"
    # Written the way the reference wrote it: plain json.dump, insertion order, not our canonical form.
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=2), encoding="utf-8")
    return path, expected
