"""Write a copy of an HLBD Hardcore file whose answers have every run of digits reversed (least significant first).

An exploration of the answer's digit order, the one lever on physics' unseen products that no earlier session measured
(BENCHMARKS.md): written most-significant digit first, the first digit of a product needs every carry before it;
least-significant first, each digit needs only the ones already written. Reversing each maximal digit run is its own
inverse and maps distinct answers to distinct answers, so exact match on the copy equals exact match of the
un-reversed outputs on the original — the question is only whether the model learns the reversed order better.
Inputs, the split (``metadata.splits.val`` lists inputs) and everything else stay as they are; ``content_sha256`` is
recomputed and ``metadata.params.reverse_digits`` set, so the loader accepts the file without a provenance warning.

    python bench/reverse_digits.py hardcore.json hardcore_rev.json
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apt_model.data import hardcore, load_dataset  # noqa: E402
from apt_model.data.pairs import normalize_text  # noqa: E402
from apt_model.errors import DataError  # noqa: E402
from apt_model.io import atomic_write_text, dumps_json  # noqa: E402

_DIGITS = re.compile(r"\d+")


def reverse_digit_runs(text: str) -> str:
    """``text`` with each maximal run of digits reversed: "1024" → "4201", "3.14 m" → "3.41 m"."""
    return _DIGITS.sub(lambda m: m.group(0)[::-1], text)


def reverse_document(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of a Hardcore document with every output's digit runs reversed and its content hash recomputed."""
    out = copy.deepcopy(doc)
    for rows in out["data"].values():
        for row in rows:
            row["output"] = reverse_digit_runs(str(row["output"]))
    out["metadata"].setdefault("params", {})["reverse_digits"] = True
    refresh_content_hash(out)
    return out


def refresh_content_hash(doc: dict[str, Any]) -> None:
    """Recompute ``doc``'s ``metadata.content_sha256`` (where it has one) after a rewrite of its data, so the
    loader accepts the copy without an "edited after generation" warning."""
    md = doc["metadata"]
    if isinstance(md.get("content_sha256"), str):
        md["content_sha256"] = hardcore.content_sha256(doc["data"], md["splits"]["val"])


def val_inputs(doc: Mapping[str, Any]) -> set[str]:
    """The normalised inputs ``doc``'s ``metadata.splits.val`` holds out."""
    return {normalize_text(t) for t in doc["metadata"]["splits"]["val"]}


def load_generated(src: Path) -> dict[str, Any]:
    """The document of ``src`` if it is generated HLBD Hardcore data (the loader's own checks, then a split in the
    file and generator params): what the answer rewrites of bench/ start from; DataError naming the problem
    otherwise."""
    split_in_file = load_dataset(src).split_source == "file"
    doc = json.loads(src.read_text(encoding="utf-8"))
    if not split_in_file or "data" not in doc or not isinstance(doc["metadata"].get("params"), dict):
        raise DataError(f"{src}: not generated HLBD Hardcore data (needs data, metadata.splits and .params)")
    return doc


def load_reversible(src: Path) -> dict[str, Any]:
    """``load_generated``'s document of ``src``, refused (DataError) if its answers are reversed already."""
    doc = load_generated(src)
    if doc["metadata"]["params"].get("reverse_digits"):
        raise DataError(f"{src}: its answers are reversed already")
    return doc


def reverse_file(src: Path, dst: Path) -> None:
    atomic_write_text(dst, dumps_json(reverse_document(load_reversible(src))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    args = p.parse_args(argv)
    try:
        reverse_file(args.src, args.dst)
    except DataError as exc:
        p.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
