"""The kind of an HLBD Hardcore problem (``rect-area``, ``speed``, ``×`` …), for per-kind accuracy breakdowns.

A kind is read off the question wording: every template of ``apt_model.data.hardcore`` is compiled into a regex
(number placeholders → ``\\d+``, name placeholders of fact templates → ``.+``), so e.g. a 2 × 2 rectangle's area
and perimeter (both 8) still fall into different kinds. Computed templates are tried before fact templates: a
fact pattern with a free name slot (``{x}是多少度？``) would also match the end of a triangle question.

Usage: ``classify("geometry", "长3宽2的长方形面积是多少？") == "rect-area"``; modules other than geometry,
physics and arithmetic are one kind, named after the module.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt_model.data import hardcore as hc
from apt_model.data.steps import template_pattern

FACT = "fact"
UNKNOWN = "unknown"  # an input of a classified module that no template produces (e.g. a reference file)


def _patterns(kinds: Mapping[str, Iterable[str]], facts: Iterable[str]) -> list[tuple[str, re.Pattern[str]]]:
    computed = [(kind, template_pattern(t)) for kind, templates in kinds.items() for t in templates]
    return computed + [(FACT, template_pattern(t, ".+")) for t in facts]


_PATTERNS: dict[str, list[tuple[str, re.Pattern[str]]]] = {
    "geometry": _patterns(
        {
            "square-area": hc._SQUARE_TEMPLATES["area"],
            "square-perimeter": hc._SQUARE_TEMPLATES["perimeter"],
            "rect-area": hc._RECT_TEMPLATES["area"],
            "rect-perimeter": hc._RECT_TEMPLATES["perimeter"],
            "triangle": hc._TRIANGLE_TEMPLATES,
            "right-triangle": hc._RIGHT_TEMPLATES,
        },
        [
            *(t for templates, _ in hc._SHAPE_TEMPLATES.values() for t in templates),
            *(t for templates, _ in hc._REGULAR_TEMPLATES.values() for t in templates),
            *hc._FORMULA_TEMPLATES,
            *hc._ANGLE_TEMPLATES,
        ],
    ),
    "physics": _patterns(
        hc._PHYSICS_COMPUTED,
        [*(t for _, _, templates in hc._PHYSICS_FACTS for t in templates), *hc._UNIT_TEMPLATES],
    ),
    "arithmetic": _patterns(hc._ARITH_TEMPLATES, []),
}


def match(module: str, text: str) -> tuple[str, dict[str, int]]:
    """The kind of ``text`` and the numbers its template was filled with (empty for facts and other modules)."""
    patterns = _PATTERNS.get(module)
    if patterns is None:
        return module, {}
    for kind, pattern in patterns:
        m = pattern.fullmatch(text)
        if m:
            return kind, {} if kind == FACT else {k: int(v) for k, v in m.groupdict().items()}
    return UNKNOWN, {}


def classify(module: str, text: str) -> str:
    """The kind of one problem, from its wording alone: an answer never tells kinds apart (square area 16 =
    perimeter 16)."""
    return match(module, text)[0]


def breakdown(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{module: {kind: {"n": count, "exact": fraction exact}}}`` of rows with module, input and exact."""
    tally: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        kind = classify(r["module"], r["input"])
        n_exact = tally.setdefault(r["module"], {}).setdefault(kind, [0, 0])
        n_exact[0] += 1
        n_exact[1] += bool(r["exact"])
    return {
        module: {kind: {"n": n, "exact": round(e / n, 6)} for kind, (n, e) in sorted(kinds.items())}
        for module, kinds in sorted(tally.items())
    }
