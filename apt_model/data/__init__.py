"""HLBD datasets: generate (seeded, deduplicated, split, with provenance), write atomically, load, summarise.

- ``generate(kind, seed=42, size="default", val_fraction=0.1) -> dict``: the JSON document (``hardcore.py``,
  ``full.py`` describe each format, split and provenance);
- ``write_dataset(doc, path)``: canonical JSON (``apt_model.io.dumps_json``), written atomically;
- ``load_dataset(path) -> HLBDDataset`` (``loader.py``);
- ``summarize(dataset) -> dict``: counts, duplicates, vocabulary size, length percentiles.
"""

from __future__ import annotations

import os
from typing import Any

from apt_model.data.full import generate_full
from apt_model.data.hardcore import generate_hardcore
from apt_model.data.loader import dataset_sha256, load_dataset
from apt_model.data.pairs import (
    FULL_MODULES,
    GENERATOR_VERSION,
    SIZES,
    SPLITS,
    TAGS,
    Duplicate,
    HLBDDataset,
    Pair,
    check_params,
    normalize_text,
)
from apt_model.errors import ConfigError

KINDS: tuple[str, ...] = ("hardcore", "full")

__all__ = [
    "FULL_MODULES",
    "GENERATOR_VERSION",
    "KINDS",
    "SIZES",
    "SPLITS",
    "TAGS",
    "Duplicate",
    "HLBDDataset",
    "Pair",
    "dataset_sha256",
    "generate",
    "load_dataset",
    "normalize_text",
    "summarize",
    "write_dataset",
]


def generate(kind: str, seed: int = 42, size: str = "default", val_fraction: float = 0.1) -> dict[str, Any]:
    """Generate an HLBD document; bad parameters raise ``ConfigError`` before any work."""
    if kind not in KINDS:
        raise ConfigError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    check_params(seed, size, val_fraction)
    if kind == "hardcore":
        return generate_hardcore(seed=seed, size=size, val_fraction=val_fraction)
    return generate_full(seed=seed, size=size, val_fraction=val_fraction)


def write_dataset(doc: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """Write ``doc`` as canonical JSON, atomically; returns the file's sha256."""
    from apt_model.io import atomic_write_bytes, dumps_json, sha256_bytes

    data = dumps_json(doc).encode("utf-8")
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    ordered = sorted(values)

    def pct(q: float) -> int:
        # Nearest-rank: an actual observed length, no interpolation.
        return ordered[max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))]

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": ordered[-1]}


def summarize(dataset: HLBDDataset) -> dict[str, Any]:
    """Per-module and per-split counts, duplicates, tokenizer vocabulary size and token-length percentiles."""
    from apt_model.tokenizer import AptTokenizer

    modules: dict[str, dict[str, int]] = {}
    for p in dataset.pairs:
        row = modules.setdefault(p.module, {"train": 0, "val": 0, "total": 0})
        row[p.split] += 1
        row["total"] += 1
    tok = AptTokenizer.build(dataset.texts())
    return {
        "path": dataset.path,
        "format": dataset.format,
        "sha256": dataset.sha256,
        "pairs": len(dataset.pairs),
        "splits": {s: sum(1 for p in dataset.pairs if p.split == s) for s in SPLITS},
        "split_source": dataset.split_source,
        "modules": modules,
        "duplicates": len(dataset.duplicates),
        "conflicting_duplicates": sum(1 for d in dataset.duplicates if not d.same_output),
        "vocab_size": tok.vocab_size,
        "input_tokens": _percentiles([len(tok.encode(p.input)) for p in dataset.pairs]),
        "output_tokens": _percentiles([len(tok.encode(p.output)) for p in dataset.pairs]),
        "generator_version": dataset.metadata.get("generator_version"),
        "seed": dataset.metadata.get("seed"),
        "warnings": list(dataset.warnings),
    }
