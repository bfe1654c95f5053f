"""HLBD Hardcore generator: size, dedup, correctness of computed answers, and a split that tests generalisation."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import pytest

from apt_model.data import GENERATOR_VERSION, generate
from apt_model.data import hardcore as hc
from apt_model.errors import ConfigError
from apt_model.io import dumps_json

# Each physics formula's template fields and its answer.
_PHYSICS_FORMULAS = {
    "speed": (("s", "t"), lambda f: f["s"] // f["t"]),
    "distance": (("v", "t"), lambda f: f["v"] * f["t"]),
    "density": (("m", "V"), lambda f: f["m"] // f["V"]),
    "pressure": (("F", "S"), lambda f: f["F"] // f["S"]),
    "work": (("F", "s"), lambda f: f["F"] * f["s"]),
}


def _rows(doc: dict[str, Any], module: str) -> list[dict[str, str]]:
    return doc["data"][module]


def _split_of(doc: dict[str, Any]) -> dict[str, str]:
    val = set(doc["metadata"]["splits"]["val"])
    return {
        r["input"]: ("val" if r["input"] in val else "train") for rows in doc["data"].values() for r in rows
    }


def _template_regex(template: str, names: tuple[str, ...]) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name in names:
        pattern = pattern.replace(re.escape("{" + name + "}"), rf"(?P<{name}>\d+)")
    return re.compile(pattern + "$")


def test_default_has_5000_distinct_inputs_over_five_modules(hardcore_doc: dict) -> None:
    inputs = [r["input"] for rows in hardcore_doc["data"].values() for r in rows]
    assert len(inputs) == len(set(inputs)), "inputs must be deduplicated across the whole dataset"
    assert len(set(inputs)) >= 5000
    assert list(hardcore_doc["data"]) == list(hc.MODULES)
    for module in hc.MODULES:
        assert len(hardcore_doc["data"][module]) >= 100, module


def test_answers_are_short_plain_strings(hardcore_doc: dict) -> None:
    for module, rows in hardcore_doc["data"].items():
        for r in rows:
            assert set(r) == {"input", "output"}
            assert isinstance(r["output"], str) and r["output"].strip() == r["output"] != ""
            assert len(r["output"]) <= 40, (module, r)
            assert r["input"].strip() == r["input"] != ""


def test_reference_examples_are_generated(hardcore_doc: dict) -> None:
    pairs = {r["input"]: r["output"] for rows in hardcore_doc["data"].values() for r in rows}
    assert pairs["三角形有几条边？"] == "3"
    assert pairs["鼠后面是什么生肖？"] == "牛"
    assert pairs["猪后面是什么生肖？"] == "鼠"  # wraps around
    assert pairs["水的沸点是多少摄氏度？"] == "100"
    assert pairs["我爱你的英文是？"] == "I love you"
    assert pairs["五边形的内角和是多少度？"] == "540"


def test_every_question_type_has_at_least_four_phrasings() -> None:
    tables: list[tuple[str, ...]] = [
        *hc._ARITH_TEMPLATES.values(),
        *(t for t, _ in hc._SHAPE_TEMPLATES.values()),
        *(t for t, _ in hc._REGULAR_TEMPLATES.values()),
        hc._FORMULA_TEMPLATES,
        hc._ANGLE_TEMPLATES,
        *hc._SQUARE_TEMPLATES.values(),
        *hc._RECT_TEMPLATES.values(),
        hc._TRIANGLE_TEMPLATES,
        hc._RIGHT_TEMPLATES,
        hc._ZODIAC_NEXT,
        hc._ZODIAC_PREV,
        hc._ZODIAC_NTH,
        hc._ZODIAC_POSITION,
        hc._ZODIAC_AFTER_K,
        hc._ZODIAC_BEFORE_K,
        *(t for _, _, t in hc._ZODIAC_SINGLE),
        *(t for _, _, t in hc._PHYSICS_FACTS),
        hc._UNIT_TEMPLATES,
        *hc._PHYSICS_COMPUTED.values(),
        hc._ENGLISH_TEMPLATES,
    ]
    for templates in tables:
        assert len(templates) >= 4, templates
        assert len(set(templates)) == len(templates), templates


def test_arithmetic_answers_are_correct_and_in_range(sized_hardcore_doc: dict) -> None:
    ops = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "×": lambda a, b: a * b,
        "÷": lambda a, b: a // b,
    }
    patterns = [(op, _template_regex(t, ("a", "b"))) for op, ts in hc._ARITH_TEMPLATES.items() for t in ts]
    # xxl: every × and ÷ of operands up to 99 (products up to 9,801); every other size keeps all numbers within 100.
    wide = sized_hardcore_doc["metadata"]["params"]["size"] == "xxl"
    seen_ops, seen_wide = set(), set()
    for r in _rows(sized_hardcore_doc, "arithmetic"):
        matches = [(op, m) for op, p in patterns if (m := p.match(r["input"]))]
        assert len(matches) == 1, r
        op, m = matches[0]
        a, b = int(m["a"]), int(m["b"])
        if op in "+-" or not wide:
            assert max(a, b) <= 100 and int(r["output"]) <= 100
        elif op == "×":
            assert max(a, b) <= 99
        else:
            assert b <= 99 and a // b <= 99
        if wide and ((op == "×" and int(r["output"]) > 100) or (op == "÷" and a > 100)):
            seen_wide.add(op)
        if op == "÷":
            assert a % b == 0
        assert r["output"] == str(ops[op](a, b)), r
        seen_ops.add(op)
    assert seen_ops == set(ops)
    assert seen_wide == ({"×", "÷"} if wide else set())


def test_no_arithmetic_operand_pair_of_val_appears_in_train(sized_hardcore_doc: dict) -> None:
    split = _split_of(sized_hardcore_doc)
    keys: dict[str, set[tuple[int, int]]] = {"train": set(), "val": set()}
    for r in _rows(sized_hardcore_doc, "arithmetic"):
        numbers = [int(n) for n in re.findall(r"\d+", r["input"])]
        assert len(numbers) == 2, r
        keys[split[r["input"]]].add((min(numbers), max(numbers)))
    assert len(keys["val"]) >= 100
    assert keys["val"].isdisjoint(keys["train"])


def test_geometry_computed_numbers_held_out(sized_hardcore_doc: dict) -> None:
    split = _split_of(sized_hardcore_doc)
    families: dict[str, dict[str, set]] = defaultdict(lambda: {"train": set(), "val": set()})
    square = [_template_regex(t, ("a",)) for ts in hc._SQUARE_TEMPLATES.values() for t in ts]
    rect = [_template_regex(t, ("a", "b")) for ts in hc._RECT_TEMPLATES.values() for t in ts]
    tri = [_template_regex(t, ("x", "y")) for t in hc._TRIANGLE_TEMPLATES]
    right = [_template_regex(t, ("x",)) for t in hc._RIGHT_TEMPLATES]
    for r in _rows(sized_hardcore_doc, "geometry"):
        s, text, out = split[r["input"]], r["input"], int(r["output"]) if r["output"].isdigit() else None
        if m := next((p.match(text) for p in square if p.match(text)), None):
            a = int(m["a"])
            assert out in (a * a, 4 * a) and 1 <= a <= 50
            families["square"][s].add(a)
        elif m := next((p.match(text) for p in rect if p.match(text)), None):
            a, b = int(m["a"]), int(m["b"])
            assert out in (a * b, 2 * (a + b)) and 1 <= b < a <= 30
            families["rect"][s].add((a, b))
        elif m := next((p.match(text) for p in tri if p.match(text)), None):
            x, y = int(m["x"]), int(m["y"])
            assert out == 180 - x - y > 0
            families["triangle"][s].add(tuple(sorted((x, y, out))))
        elif m := next((p.match(text) for p in right if p.match(text)), None):
            x = int(m["x"])
            assert out == 90 - x
            families["right"][s].add(min(x, out))
    for name in ("square", "rect", "triangle"):
        fam = families[name]
        assert fam["val"] and fam["train"], name
        assert fam["val"].isdisjoint(fam["train"]), name


def test_physics_computed_answers_correct_and_held_out(sized_hardcore_doc: dict) -> None:
    split = _split_of(sized_hardcore_doc)
    patterns = [
        (names, fn, _template_regex(t, names))
        for kind, (names, fn) in _PHYSICS_FORMULAS.items()
        for t in hc._PHYSICS_COMPUTED[kind]
    ]
    keys: dict[str, set] = {"train": set(), "val": set()}
    n = 0
    for r in _rows(sized_hardcore_doc, "physics"):
        for names, fn, p in patterns:
            if m := p.match(r["input"]):
                fields = {k: int(m[k]) for k in names}
                assert r["output"] == str(fn(fields)), r
                keys[split[r["input"]]].add(tuple(sorted(fields.values())))
                n += 1
                break
    assert n >= 300
    assert keys["val"].isdisjoint(keys["train"])


def test_fact_modules_hold_out_phrasings_of_facts_seen_in_training(sized_hardcore_doc: dict) -> None:
    split = _split_of(sized_hardcore_doc)
    groups: list[list[str]] = []
    for zh, _ in hc.english_vocabulary():
        groups.append([t.format(zh=zh) for t in hc._ENGLISH_TEMPLATES])
    for x in hc.ZODIAC:
        groups.append([t.format(x=x) for t in hc._ZODIAC_NEXT])
        groups.append([t.format(x=x) for t in hc._ZODIAC_PREV])
        for k in range(2, 6):
            groups.append([t.format(x=x, k=k) for t in hc._ZODIAC_AFTER_K])
    groups += [list(t) for _, _, t in hc._PHYSICS_FACTS]
    held_out = 0
    for group in groups:
        present = [g for g in group if g in split]
        assert len(present) == len(group), group  # all phrasings generated (no collision dropped one)
        train = [g for g in group if split[g] == "train"]
        val = [g for g in group if split[g] == "val"]
        assert len(train) >= 2, group
        held_out += bool(val)
    assert held_out >= len(groups) // 5  # held-out phrasings are common, not a corner case


def test_split_proportions_and_metadata(hardcore_doc: dict) -> None:
    md = hardcore_doc["metadata"]
    rows = {m: len(v) for m, v in hardcore_doc["data"].items()}
    assert md["generator_version"] == GENERATOR_VERSION
    assert md["seed"] == 42 and md["params"] == {"size": "default", "val_fraction": 0.1}
    assert md["total_samples"] == sum(rows.values())
    assert md["modules"] == list(hc.MODULES)
    assert {m: c["total"] for m, c in md["counts"].items()} == rows
    val = md["splits"]["val"]
    assert val == sorted(val)
    assert md["split_counts"] == {"train": md["total_samples"] - len(val), "val": len(val)}
    assert sum(c["val"] for c in md["counts"].values()) == len(val)
    assert 0.06 <= len(val) / md["total_samples"] <= 0.14
    for module, c in md["counts"].items():
        assert c["val"] > 0 and c["train"] > c["val"], module
    assert md["content_sha256"] == hc.content_sha256(hardcore_doc["data"], val)


def test_same_seed_same_bytes_other_seed_differs() -> None:
    a = dumps_json(generate("hardcore", seed=3, size="small"))
    b = dumps_json(generate("hardcore", seed=3, size="small"))
    c = dumps_json(generate("hardcore", seed=4, size="small"))
    assert a == b
    assert a != c


def test_val_fraction_changes_only_the_split_of_fact_modules() -> None:
    lo = generate("hardcore", size="small", val_fraction=0.05)
    hi = generate("hardcore", size="small", val_fraction=0.3)
    assert lo["data"]["zodiac"] == hi["data"]["zodiac"]
    assert len(hi["metadata"]["splits"]["val"]) > 2 * len(lo["metadata"]["splits"]["val"])


def test_size_scales_computed_problems() -> None:
    totals = {
        s: generate("hardcore", size=s)["metadata"]["total_samples"]
        for s in ("small", "default", "large", "xl", "xxl")
    }
    assert totals["small"] < totals["default"] < totals["large"] < totals["xl"] < totals["xxl"]
    # A size only adds problems: the smaller sizes' files are unchanged by the larger ones' existence.
    assert totals["large"] == 12726


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"size": "huge"}, "size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 0.5}, "val_fraction"),
        ({"val_fraction": "0.1"}, "val_fraction"),
    ],
)
def test_bad_parameters_raise_config_error(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        generate("hardcore", **kwargs)


def test_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="kind"):
        generate("hardcore_full")


def test_no_shown_number_pair_of_val_appears_in_any_training_problem(sized_hardcore_doc: dict) -> None:
    """Across modules: a held-out rectangle 12 × 5 must not be a training "12 × 5 = ?" or a training distance at
    12 m/s for 5 s (generator 1.0.0 drew the hold-out per module and leaked most val products into training)."""
    split = _split_of(sized_hardcore_doc)
    two_number = (
        [_template_regex(t, ("a", "b")) for ts in hc._ARITH_TEMPLATES.values() for t in ts]
        + [_template_regex(t, ("a", "b")) for ts in hc._RECT_TEMPLATES.values() for t in ts]
        + [
            _template_regex(t, names)
            for kind, (names, _) in _PHYSICS_FORMULAS.items()
            for t in hc._PHYSICS_COMPUTED[kind]
        ]
    )
    keys: dict[str, set[tuple[int, ...]]] = {"train": set(), "val": set()}
    modules: set[str] = set()
    for module in ("arithmetic", "geometry", "physics"):
        for r in _rows(sized_hardcore_doc, module):
            if m := next((p.match(r["input"]) for p in two_number if p.match(r["input"])), None):
                keys[split[r["input"]]].add(tuple(sorted(int(v) for v in m.groupdict().values())))
                modules.add(module)
    assert modules == {"arithmetic", "geometry", "physics"}
    assert len(keys["val"]) >= 50
    assert keys["val"].isdisjoint(keys["train"])


def _val_problems(doc: dict, module: str) -> set[tuple[tuple[int, ...], str]]:
    """A module's val problems as (sorted numbers shown, answer): the same problem under any phrasing."""
    split = _split_of(doc)
    return {
        (tuple(sorted(int(n) for n in re.findall(r"\d+", r["input"]))), r["output"])
        for r in _rows(doc, module)
        if split[r["input"]] == "val" and re.search(r"\d", r["input"])
    }


def test_xxl_adds_only_arithmetic_and_holds_out_xls_other_val_problems() -> None:
    xl, xxl = generate("hardcore", size="xl"), generate("hardcore", size="xxl")
    # Geometry is generated before arithmetic, so it is identical; physics draws its phrasings after arithmetic's
    # samples, so only its wording may differ: its val problems (numbers and answers) are xl's.
    assert xl["data"]["geometry"] == xxl["data"]["geometry"]
    for module in ("zodiac", "reverse_english"):
        assert xl["data"][module] == xxl["data"][module]
    assert _val_problems(xl, "physics") == _val_problems(xxl, "physics")
    assert xl["metadata"]["counts"]["physics"] == xxl["metadata"]["counts"]["physics"]
    # So a model trained on xxl can be scored on xl's val: none of its inputs is a training input of xxl.
    xxl_train = {r["input"] for rows in xxl["data"].values() for r in rows} - set(
        xxl["metadata"]["splits"]["val"]
    )
    assert not xxl_train & set(xl["metadata"]["splits"]["val"])
    assert xxl["metadata"]["counts"]["arithmetic"]["total"] > xl["metadata"]["counts"]["arithmetic"]["total"]
