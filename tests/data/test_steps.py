"""apt_model.data.steps: the generator's products recognised from their questions, and their worked answers."""

from __future__ import annotations

from collections import Counter

from apt_model.data import generate
from apt_model.data.steps import product_operands, staged_output, steps_prefix, worked_answer


def test_every_product_the_generator_writes_is_recognised_with_its_operands() -> None:
    doc = generate("hardcore", size="default")
    found: Counter[str] = Counter()
    for module, rows in doc["data"].items():
        for row in rows:
            operands = product_operands(module, row["input"])
            if operands is not None:
                assert operands[0] * operands[1] == int(row["output"]), row
                found[module] += 1
    assert set(found) == {"arithmetic", "physics", "geometry"}
    # Work and distance are 2 of physics' 5 computed kinds at 80 problems each; ×: 400 problems.
    assert found["physics"] == 160 and found["arithmetic"] == 400 and found["geometry"] > 100


def test_questions_that_are_not_products_have_no_operands() -> None:
    for module, text in (
        ("arithmetic", "12 + 15 = ?"),
        ("arithmetic", "48 ÷ 12 = ?"),
        ("geometry", "长12宽5的长方形周长是多少？"),
        ("physics", "已知s = 60m，t = 12s，求v（m/s）"),
        ("zodiac", "12 × 15 = ?"),  # another module's question
    ):
        assert product_operands(module, text) is None, text
    assert product_operands("geometry", "边长为13的正方形面积是多少？") == (13, 13)
    assert product_operands("physics", "以12m/s的速度运动15秒，路程是多少米？") == (12, 15)


def test_worked_answers_and_their_prefix() -> None:
    assert worked_answer(37, 14) == "148+370=518"
    assert worked_answer(37, 4) == "148"  # one-digit multiplier: the plain product
    assert worked_answer(12, 30) == "0+360=360"
    assert steps_prefix("arithmetic", "37 × 14 = ?", "518") == "148+370="
    assert steps_prefix("arithmetic", "37  ×  14 = ?", "518") == "148+370="  # whitespace normalised
    assert steps_prefix("arithmetic", "37 × 4 = ?", "148") is None
    assert steps_prefix("arithmetic", "37 × 14 = ?", "519") is None  # not its product: left as it is


def test_staged_output_removes_the_prefix_from_the_front() -> None:
    assert [staged_output("148+370=", "518", f) for f in (0.0, 0.25, 0.5, 0.99, 1.0)] == [
        "148+370=518",
        "8+370=518",
        "370=518",
        "=518",
        "518",
    ]
    assert staged_output(None, "鼠", 0.0) == "鼠"
