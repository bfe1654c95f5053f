"""Write a copy of an HLBD Hardcore file whose products of two-digit multipliers are answered in worked steps.

The earlier notes on issue 6 named a worked-steps answer as one of two ways to close physics, unmeasured: every miss
left is a product of a held-out pair (work, distance, rectangle areas, ×), and written in one go the first digit of
such a product needs every carry. Here the answer to ``a × b`` with ``b ≥ 10`` (b the second number as the question
writes it) becomes the two partial products and their sum — ``37 × 14`` → ``148+370=518`` — so the model composes
one-digit multiplications and one addition instead of recalling the product. Every other answer (quotients, facts,
sums, products with a one-digit multiplier) stays as it is; inputs and the split too. The data spec fixes plain
integer answers, so this is a measurement for a product decision, not a product format.

Scores on such a copy: ``apt verify``'s exact match asks for every step (strict); ``final_scores`` also counts a
worked answer whose last number is right. A worked answer shows the products of the multiplicand with each digit
of the multiplier, so some held-out pairs' products (37 × 4 is a step of a training 37 × 14) appear in training
targets; ``final_scores`` reports the held-out problems whose own product is not so shown (``clean``) on their own.

With ``--aux`` every answer stays plain, and each training product of a two-digit multiplier gets a second row: its
question with ``STEPS_MARKER`` appended, answered in steps (a side task; the val split, and so every score, is the
spec's plain format): does learning the steps help the plain answer? ``--aux --modules physics,geometry`` mixes
the two: those modules' products answered in steps, and twins for the other modules' (arithmetic's answers stay
plain, its × practised in steps beside them).

    python bench/worked_steps.py hardcore.json hardcore_worked.json
    python bench/worked_steps.py --modules physics,geometry hardcore.json hardcore_worked.json  # × stays plain
    python bench/worked_steps.py --aux hardcore.json hardcore_aux.json
    python bench/worked_steps.py --aux --modules physics,geometry hardcore.json hardcore_mixed.json
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apt_model.data.pairs import normalize_text  # noqa: E402
from apt_model.data.steps import PRODUCT_TEMPLATES, product_operands, worked_answer  # noqa: E402
from apt_model.errors import DataError  # noqa: E402
from apt_model.io import atomic_write_text, dumps_json  # noqa: E402
from bench.hlbd_kinds import breakdown  # noqa: E402
from bench.reverse_digits import load_generated, refresh_content_hash, val_inputs  # noqa: E402

# What worked_answer writes for a multi-digit multiplier (a formula fact such as "W = Fs" also holds "=").
WORKED = re.compile(r"\d+\+\d+=\d+")


def checked_product(module: str, row: Mapping[str, Any], operands: tuple[int, int]) -> None:
    """DataError naming ``row`` unless its answer is the product of ``operands`` (a file edited by hand)."""
    a, b = operands
    if str(a * b) != str(row["output"]):
        raise DataError(f"{module}: {row['input']!r} answers {row['output']!r}, not {a} × {b}")


def training_steps_products(
    doc: Mapping[str, Any], modules: Iterable[str] | None = None
) -> Iterator[tuple[str, dict[str, Any], tuple[int, int]]]:
    """(module, row, operands) of every training product of ``doc`` (in ``modules`` when given) with a multi-digit
    multiplier: the rows a worked answer writes in steps."""
    val = val_inputs(doc)
    for module, rows in doc["data"].items():
        if modules is not None and module not in modules:
            continue
        for row in rows:
            text = normalize_text(row["input"])
            operands = None if text in val else product_operands(module, text)
            if operands is not None and operands[1] >= 10:
                yield module, row, operands


def final_answer(text: str) -> str:
    """The last number of a worked answer (the whole text of any other answer)."""
    return text.rsplit("=", 1)[-1] if WORKED.fullmatch(text) else text


def chosen_modules(modules: Iterable[str] | None) -> list[str]:
    """``modules`` sorted (all of PRODUCT_TEMPLATES when None); DataError unless they are some of PRODUCT_TEMPLATES."""
    chosen = sorted(PRODUCT_TEMPLATES if modules is None else set(modules))
    if not chosen or not set(chosen) <= set(PRODUCT_TEMPLATES):
        raise DataError(f"worked-steps modules must be some of {', '.join(PRODUCT_TEMPLATES)}, not {chosen}")
    return chosen


def worked_document(doc: dict[str, Any], modules: Iterable[str] | None = None) -> dict[str, Any]:
    """A copy of a Hardcore document with every product of a multi-digit multiplier answered in worked steps; only
    in ``modules`` (of PRODUCT_TEMPLATES) when given — arithmetic's answers are plain integers by the data spec."""
    chosen = chosen_modules(modules)
    out = copy.deepcopy(doc)
    for module, rows in out["data"].items():
        if module not in chosen:
            continue
        for row in rows:
            operands = product_operands(module, normalize_text(row["input"]))
            if operands is not None:
                checked_product(module, row, operands)
                row["output"] = worked_answer(*operands)
    md = out["metadata"]
    md.setdefault("params", {})["worked_steps"] = True if len(chosen) == len(PRODUCT_TEMPLATES) else chosen
    refresh_content_hash(out)
    return out


# Appended to a question to ask for its steps in the --aux side task (its characters join the tokenizer's vocabulary).
STEPS_MARKER = "（写出步骤）"


def aux_document(doc: dict[str, Any], modules: Iterable[str] | None = None) -> dict[str, Any]:
    """A copy of a Hardcore document with a steps-marked twin, answered in steps, of every training product of a
    multi-digit multiplier (in ``modules`` when given); the original rows and the val split unchanged."""
    chosen = chosen_modules(modules)
    out = copy.deepcopy(doc)
    twins: dict[str, list[dict[str, str]]] = {}
    for module, row, operands in training_steps_products(out, chosen):
        checked_product(module, row, operands)
        twins.setdefault(module, []).append(
            {"input": row["input"] + STEPS_MARKER, "output": worked_answer(*operands)}
        )
    for module, rows in twins.items():
        out["data"][module].extend(rows)
    added = sum(map(len, twins.values()))
    md = out["metadata"]
    md.setdefault("params", {})["aux_steps"] = True if len(chosen) == len(PRODUCT_TEMPLATES) else chosen
    # The counts the loader checks against the rows (a mismatch is its "edited after generation" warning).
    if isinstance(md.get("total_samples"), int):
        md["total_samples"] += added
    if isinstance(md.get("split_counts"), dict) and isinstance(md["split_counts"].get("train"), int):
        md["split_counts"]["train"] += added
    for module, rows in twins.items():
        count = md.get("counts", {}).get(module)
        if isinstance(count, dict):
            count.update(
                {k: count[k] + len(rows) for k in ("train", "total") if isinstance(count.get(k), int)}
            )
    refresh_content_hash(out)
    return out


def mixed_document(doc: dict[str, Any], modules: Iterable[str]) -> dict[str, Any]:
    """``modules``' products answered in worked steps, and a steps-marked twin of each training product of the
    other modules of PRODUCT_TEMPLATES (whose answers stay plain)."""
    worked = chosen_modules(modules)
    rest = sorted(set(PRODUCT_TEMPLATES) - set(worked))
    if not rest:
        raise DataError(
            "steps twins beside worked answers need a module left plain: --modules names them all"
        )
    return aux_document(worked_document(doc, worked), rest)


def score_without_twins(doc: Mapping[str, Any], failures: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Train exact match of ``doc`` over its own rows, the steps-marked twins left out: the HLBD training split the
    quality line is about. ``failures``: a verification report's complete list of wrong training answers."""
    val = val_inputs(doc)
    n = Counter(
        module
        for module, rows in doc["data"].items()
        for row in rows
        if (text := normalize_text(row["input"])) not in val and not text.endswith(STEPS_MARKER)
    )
    wrong = Counter(f["module"] for f in failures if not normalize_text(f["input"]).endswith(STEPS_MARKER))
    total = n.total()
    return {
        "overall": round(1 - sum(wrong.values()) / total, 6) if total else None,
        "n": total,
        "modules": {m: round(1 - wrong.get(m, 0) / k, 6) for m, k in sorted(n.items())},
    }


def shown_pairs(doc: Mapping[str, Any]) -> set[frozenset[int]]:
    """The unordered pairs whose product a worked answer of ``doc``'s training split shows as a step: multiplicand
    times each digit of the multiplier (the tens step shows it times ten, the same fact)."""
    return {frozenset((a, int(d))) for _, _, (a, b) in training_steps_products(doc) for d in str(b)}


def final_scores(
    doc: Mapping[str, Any], failures: Iterable[Mapping[str, Any]], trained_on: Mapping[str, Any]
) -> dict[str, Any]:
    """Val exact match of ``doc`` (a worked copy) counting a worked answer right when its last number is: overall,
    per module, per kind, and per kind over the ``clean`` product problems — those whose own product no worked
    training answer of ``trained_on`` shows as a step (every product of a two-digit multiplier is clean: a step
    multiplies by one digit). ``failures``: a verification report's complete list of wrong answers."""
    shown = shown_pairs(trained_on)
    wrong = {
        (f["module"], normalize_text(f["input"]))
        for f in failures
        if not WORKED.fullmatch(f["expected"]) or final_answer(f["got"]) != final_answer(f["expected"])
    }
    val = val_inputs(doc)
    rows, clean = [], []
    for module, records in doc["data"].items():
        for r in records:
            text = normalize_text(r["input"])
            if text not in val:
                continue
            row = {"module": module, "input": text, "exact": (module, text) not in wrong}
            rows.append(row)
            operands = product_operands(module, text)
            if operands is not None and frozenset(operands) not in shown:
                clean.append(row)
    modules: dict[str, list[bool]] = {}
    for row in rows:
        modules.setdefault(row["module"], []).append(row["exact"])
    return {
        "overall": round(sum(r["exact"] for r in rows) / len(rows), 6) if rows else None,
        "n": len(rows),
        "modules": {m: round(sum(v) / len(v), 6) for m, v in sorted(modules.items())},
        "by_kind": breakdown(rows),
        "clean_by_kind": breakdown(clean),
    }


def parse_modules(text: str) -> list[str]:
    """``--modules``' comma-separated list, checked against PRODUCT_TEMPLATES (argparse's error on a bad one)."""
    modules = [m.strip() for m in text.split(",") if m.strip()]
    if not modules or not set(modules) <= set(PRODUCT_TEMPLATES):
        raise argparse.ArgumentTypeError(f"{text!r}: must be some of {','.join(PRODUCT_TEMPLATES)}")
    return modules


def load_workable(src: Path) -> dict[str, Any]:
    """``load_generated``'s document of ``src``, refused (DataError) if any answer rewrite of bench/ made it."""
    doc = load_generated(src)
    params = doc["metadata"]["params"]
    if params.get("worked_steps") or params.get("reverse_digits") or params.get("aux_steps"):
        raise DataError(f"{src}: its answers are rewritten already")
    return doc


def worked_file(src: Path, dst: Path, modules: Iterable[str] | None = None) -> None:
    atomic_write_text(dst, dumps_json(worked_document(load_workable(src), modules)))


def aux_file(src: Path, dst: Path, modules: Iterable[str] | None = None) -> None:
    """Twins of every module's products; with ``modules``, those answered in steps and twins for the rest
    (mixed_document)."""
    doc = load_workable(src)
    atomic_write_text(dst, dumps_json(aux_document(doc) if modules is None else mixed_document(doc, modules)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--aux", action="store_true", help="keep the answers; add steps-marked twins answered in steps"
    )
    p.add_argument(
        "--modules",
        type=parse_modules,
        default=None,
        help=f"comma-separated modules whose products get worked answers (default all: {','.join(PRODUCT_TEMPLATES)}); "
        "with --aux the other modules' products get the twins",
    )
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    args = p.parse_args(argv)
    try:
        if args.aux:
            aux_file(args.src, args.dst, args.modules)
        else:
            worked_file(args.src, args.dst, args.modules)
    except DataError as exc:
        p.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
