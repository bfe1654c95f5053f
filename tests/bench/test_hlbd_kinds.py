"""bench/hlbd_kinds.py: problem kinds of HLBD Hardcore, and quality_run's per-kind val breakdown."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from apt_model.data import hardcore as hc
from bench.hlbd_kinds import _PATTERNS, FACT, UNKNOWN, breakdown, classify, match
from bench.quality_run import val_by_kind

# What each computed kind's answer is, from the numbers its template was filled with.
ANSWERS: dict[str, dict[str, Callable[[dict[str, int]], int]]] = {
    "geometry": {
        "square-area": lambda f: f["a"] * f["a"],
        "square-perimeter": lambda f: 4 * f["a"],
        "rect-area": lambda f: f["a"] * f["b"],
        "rect-perimeter": lambda f: 2 * (f["a"] + f["b"]),
        "triangle": lambda f: 180 - f["x"] - f["y"],
        "right-triangle": lambda f: 90 - f["x"],
    },
    "physics": {
        "speed": lambda f: f["s"] // f["t"],
        "distance": lambda f: f["v"] * f["t"],
        "density": lambda f: f["m"] // f["V"],
        "pressure": lambda f: f["F"] // f["S"],
        "work": lambda f: f["F"] * f["s"],
        "weight": lambda f: f["m"] * 10,
    },
    "arithmetic": {
        "+": lambda f: f["a"] + f["b"],
        "-": lambda f: f["a"] - f["b"],
        "×": lambda f: f["a"] * f["b"],
        "÷": lambda f: f["a"] // f["b"],
    },
}


def _split_pool(taken: int, pool: int, kinds: tuple[str, str]) -> dict[str, int] | None:
    """Counts of a two-kind pool (area/perimeter): exact halves when the whole pool is sampled, else unknown."""
    return dict.fromkeys(kinds, pool // 2) if taken >= pool else None


def _expected_counts(size: str) -> dict[str, dict[str, int]]:
    """Per-kind counts from the generator's constants, capped by its candidate pools (same ranges as hardcore.py).

    Deduplication by input cannot drop a computed problem: sampled number tuples are distinct within a kind and
    every template of a kind writes all of its numbers, kinds differ in wording, so no two texts coincide. Facts are
    every phrasing of every fact, likewise distinct."""
    g, n = hc._GEOMETRY_COUNTS[size], hc._PHYSICS_COUNTS[size]
    square = _split_pool(g["square"], 2 * 50, ("square-area", "square-perimeter"))
    rect = _split_pool(g["rectangle"], 2 * sum(a - 1 for a in range(2, 31)), ("rect-area", "rect-perimeter"))
    assert square is not None and rect is not None, "size samples part of a pool: per-kind split is random"
    geometry_facts = (
        len(hc._SHAPES) * sum(len(t) for t, _ in hc._SHAPE_TEMPLATES.values())
        + len(hc._REGULAR) * sum(len(t) for t, _ in hc._REGULAR_TEMPLATES.values())
        + len(hc._FORMULAS) * len(hc._FORMULA_TEMPLATES)
        + len(hc._ANGLE_FACTS) * len(hc._ANGLE_TEMPLATES)
    )
    physics_pools = {"speed": 30 * 29, "distance": 29 * 29, "density": 20 * 19, "pressure": 50 * 9,
                     "work": 49 * 19, "weight": 100}  # fmt: skip
    physics_facts = sum(len(t) for _, _, t in hc._PHYSICS_FACTS) + len(hc._UNITS) * len(hc._UNIT_TEMPLATES)
    return {
        "geometry": {
            **square,
            **rect,
            "triangle": min(g["triangle"], sum(179 - x for x in range(1, 179))),
            "right-triangle": min(g["right"], 89),
            FACT: geometry_facts,
        },
        "physics": {**{k: min(n, pool) for k, pool in physics_pools.items()}, FACT: physics_facts},
        "arithmetic": {
            op: min(c, len(hc._arith_candidates(op, wide=size == "xxl")))
            for op, c in hc._ARITH_COUNTS[size].items()
        },
    }


@pytest.mark.parametrize("size", ["large", "xl", "xxl"])
def test_every_row_is_classified_consistently_and_counted_as_generated(size: str) -> None:
    doc = hc.generate_hardcore(42, size)
    counts: dict[str, Counter[str]] = {}
    for module in ANSWERS:
        counts[module] = Counter()
        for row in doc["data"][module]:
            kind, fields = match(module, row["input"])
            assert kind != UNKNOWN, (module, row)
            assert classify(module, row["input"]) == kind
            # Computed templates never overlap, so the first match is the only one.
            computed = {k for k, p in _PATTERNS[module] if k != FACT and p.fullmatch(row["input"])}
            assert computed == ({kind} if kind != FACT else set()), row
            if kind != FACT:
                assert str(ANSWERS[module][kind](fields)) == row["output"], (kind, row)
            counts[module][kind] += 1
    assert {m: dict(c) for m, c in counts.items()} == _expected_counts(size)
    # The numbers, spelled out: xl adds triangles and takes every physics problem there is.
    triangles, distance = {"large": (2000, 300), "xl": (8000, 841), "xxl": (8000, 841)}[size]
    assert _expected_counts(size)["geometry"]["triangle"] == triangles
    assert _expected_counts(size)["physics"]["distance"] == distance
    assert _expected_counts(size)["geometry"]["rect-area"] == 435


@pytest.mark.parametrize(
    ("module", "text", "expected", "kind"),
    [
        # Same numbers and answer (8), different kinds: the wording decides.
        ("geometry", "长2宽2的长方形面积是多少？", "8", "rect-area"),
        ("geometry", "长2宽2的长方形周长是多少？", "8", "rect-perimeter"),
        ("geometry", "正方形边长4，面积是多少？", "16", "square-area"),
        ("geometry", "边长为4的正方形周长是多少？", "16", "square-perimeter"),
        # Facts with numbers in the answer, and one with a digit in the question.
        ("geometry", "直角是多少度？", "90", FACT),
        ("geometry", "十二边形有几条对角线？", "54", FACT),
        ("physics", "声音在15℃空气中每秒传播约多少米？", "340", FACT),
        # Ends like the fact template "{x}是多少度？"; computed templates are tried first.
        ("geometry", "三角形的两个角分别是30度和40度，第三个角是多少度？", "110", "triangle"),
        ("physics", "已知m = 5kg，g = 10N/kg，求G（N）", "50", "weight"),
        ("arithmetic", "12除以3的商是多少？", "4", "÷"),
        ("zodiac", "鼠后面是什么生肖？", "牛", "zodiac"),
        ("geometry", "圆周率是多少？", "3.14", UNKNOWN),
    ],
)
def test_classify_examples(module: str, text: str, expected: str, kind: str) -> None:
    # ``expected`` documents that equal answers do not make equal kinds; classify never sees it.
    assert classify(module, text) == kind


def test_breakdown_counts_and_fractions() -> None:
    rows = [
        {"module": "arithmetic", "input": "1 + 2 = ?", "exact": True},
        {"module": "arithmetic", "input": "计算：5 + 2", "exact": False},
        {"module": "arithmetic", "input": "6 ÷ 3 = ?", "exact": True},
        {"module": "zodiac", "input": "鼠后面是什么生肖？", "exact": False},
    ]
    assert breakdown(rows) == {
        "arithmetic": {"+": {"n": 2, "exact": 0.5}, "÷": {"n": 1, "exact": 1.0}},
        "zodiac": {"zodiac": {"n": 1, "exact": 0.0}},
    }


def test_quality_run_val_by_kind() -> None:
    doc = hc.generate_hardcore(42, "small")
    val = set(doc["metadata"]["splits"]["val"])
    rows = {m: [r for r in doc["data"][m] if r["input"] in val] for m in doc["data"]}
    wrong = [rows["geometry"][0], rows["physics"][0], rows["physics"][1], rows["zodiac"][0]]
    modules = ["geometry", "physics", "physics", "zodiac"]
    failures = [{"module": m, "input": r["input"], "expected": r["output"], "got": "?", "similarity": 0.0}
                for m, r in zip(modules, wrong, strict=True)]  # fmt: skip
    out = val_by_kind(doc, failures)
    assert set(out) == {"geometry", "physics", "arithmetic"}  # zodiac is not broken down
    for module, kinds in out.items():
        assert sum(k["n"] for k in kinds.values()) == doc["metadata"]["counts"][module]["val"]
        expected_kinds = Counter(classify(module, r["input"]) for r in rows[module])
        assert {k: v["n"] for k, v in kinds.items()} == dict(expected_kinds)
    n_wrong = Counter(
        (m, classify(m, r["input"])) for m, r in zip(modules, wrong, strict=True) if m != "zodiac"
    )
    for (module, kind), k in n_wrong.items():
        n = out[module][kind]["n"]
        assert out[module][kind]["exact"] == round((n - k) / n, 6)
    assert all(v["exact"] == 1.0 for v in out["arithmetic"].values())
