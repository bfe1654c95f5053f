"""Worked steps of HLBD Hardcore's products, for the training's steps curriculum (``TrainConfig.worked_steps_*``).

A product whose multiplier (the second number the question writes) has two digits is written as its two partial
products and their sum: ``37 × 14`` → ``148+370=518``. The data spec fixes plain answers, and the data files keep
them; only the training targets of the curriculum's first epochs hold steps, shortened epoch by epoch to the plain
answer (``apt_model/training/curriculum.py``). Written in one go, most significant digit first, such a product of
an unseen pair must be recalled whole; learnt from steps that are then taken away, the model computes it
(BENCHMARKS.md, twenty-fifth to twenty-seventh sessions).

The products are recognised by the generator's own question templates (``apt_model.data.hardcore``): ×, a distance
from speed and time, work from force and distance, the areas of rectangles and squares. A row of any other data
whose question no such template writes, or whose answer is not the product, has no steps.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

from apt_model.data import hardcore as hc
from apt_model.data.pairs import normalize_text

# The templates whose answer is the product of the numbers the question shows (a square's area: its side twice).
PRODUCT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "arithmetic": hc._ARITH_TEMPLATES["×"],
    "physics": (*hc._PHYSICS_COMPUTED["distance"], *hc._PHYSICS_COMPUTED["work"]),
    "geometry": (*hc._SQUARE_TEMPLATES["area"], *hc._RECT_TEMPLATES["area"]),
}


def template_pattern(template: str, free: str = r"\d+") -> re.Pattern[str]:
    """A template of the generator as a regex: each ``{field}`` a named group matching ``free``."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(f"(?P<{field}>{free})")
    return re.compile("".join(parts))


def _patterns(templates: Iterable[str]) -> list[re.Pattern[str]]:
    return [template_pattern(t) for t in templates]


_PRODUCT_PATTERNS = {module: _patterns(templates) for module, templates in PRODUCT_TEMPLATES.items()}


def product_operands(module: str, text: str) -> tuple[int, int] | None:
    """The multiplicand and multiplier of a product question (normalised text), in the question's order; None for
    every other question."""
    for pattern in _PRODUCT_PATTERNS.get(module, ()):
        m = pattern.fullmatch(text)
        if m:
            values = [int(v) for v in m.groups()]
            return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])
    return None


def worked_answer(a: int, b: int) -> str:
    """``a × b`` as its partial products and their sum when ``b`` has two or more digits, else the plain product."""
    if b < 10:
        return str(a * b)
    return f"{a * (b % 10)}+{a * (b - b % 10)}={a * b}"


def steps_prefix(module: str, text: str, output: str) -> str | None:
    """What the worked answer writes before the plain ``output`` (``148+370=``), for a product of a two-digit
    multiplier answered with its product; None for every other row."""
    operands = product_operands(module, normalize_text(text))
    if operands is None or operands[1] < 10 or str(operands[0] * operands[1]) != output:
        return None
    worked = worked_answer(*operands)
    return worked[: len(worked) - len(output)]


def staged_output(prefix: str | None, output: str, fraction: float) -> str:
    """``output`` after what is left of its steps ``prefix`` once ``fraction`` of it is removed from the front."""
    if prefix is None or fraction >= 1.0:
        return output
    return prefix[int(fraction * len(prefix)) :] + output
