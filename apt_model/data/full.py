"""HLBD Full generator and the record → pairs rule with dynamic language tags.

File shape: ``{"metadata": {...}, "samples": [record, ...]}`` with records exactly as ``shared/spec/hlbd.md`` shows
(one concept at 8 levels, see ``concepts.py``). Each record yields seven pairs:

- ``full_record``: ``概念: {concept} [EMOJI] {字卡} {emoji} [PHRASE] {短语} 句法结构: {数学}`` →
  ``[PY] {拼音} [EN] {英文} {中文} [JP] {日文} [KR] {韩文}``;
- ``full_emoji`` / ``full_phrase`` / ``full_en`` / ``full_py`` / ``full_jp`` / ``full_kr``: ``[TAG] {level value}`` →
  the level-6 Chinese sentence.

Split (stored as ``metadata.splits.val``, the sorted list of val pair inputs, like Hardcore): record pairs always
train; a seeded choice of per-level pairs goes to val, at most 3 of a concept's 6, so every held-out pair belongs to a
concept whose record pair and other levels are trained on. Val therefore tests cross-level association: answering
``[JP] ビデオ通話`` with the sentence after seeing that Japanese only inside the record pair's output and the sentence
only as the answer to the concept's other tags. The number of val pairs is ``round(val_fraction × all pairs)``
(capped by the 3-per-concept rule). Loaders of files without ``splits`` hash each per-level input instead.

``size``: ``small`` uses the first 24 concepts; ``default``, ``large``, ``xl`` and ``xxl`` use the whole table (it is
hand-written, so the larger sizes cannot be larger). ``metadata.content_sha256`` = sha256 of
``dumps_json({"samples": ..., "val": ...})``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from apt_model.data.concepts import CONCEPTS
from apt_model.data.pairs import FULL_MODULES, GENERATOR_VERSION, check_params
from apt_model.io import dumps_json, sha256_bytes

# Level key → the field names it must hold (the loader checks these).
LEVEL_FIELDS: dict[str, tuple[str, ...]] = {
    "level_1": ("字卡", "emoji"),
    "level_2": ("短语",),
    "level_3": ("数学",),
    "level_4": ("拼音",),
    "level_5": ("英文",),
    "level_6": ("中文",),
    "level_7": ("日文",),
    "level_8": ("韩文",),
}

# Per-level pair module → (tag, level, field).
LEVEL_PAIRS: dict[str, tuple[str, str, str]] = {
    "full_emoji": ("[EMOJI]", "level_1", "emoji"),
    "full_phrase": ("[PHRASE]", "level_2", "短语"),
    "full_en": ("[EN]", "level_5", "英文"),
    "full_py": ("[PY]", "level_4", "拼音"),
    "full_jp": ("[JP]", "level_7", "日文"),
    "full_kr": ("[KR]", "level_8", "韩文"),
}
assert tuple(["full_record", *LEVEL_PAIRS]) == FULL_MODULES

_SMALL_CONCEPTS = 24
_MAX_VAL_LEVELS_PER_CONCEPT = 3


def record_pairs(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(module, input, output)`` for one (already validated) record, in ``FULL_MODULES`` order."""
    lv = {key: record[key] for key in LEVEL_FIELDS}
    sentence = lv["level_6"]["中文"]
    pairs = [
        (
            "full_record",
            f"概念: {record['concept']} [EMOJI] {lv['level_1']['字卡']} {lv['level_1']['emoji']} "
            f"[PHRASE] {lv['level_2']['短语']} 句法结构: {lv['level_3']['数学']}",
            f"[PY] {lv['level_4']['拼音']} [EN] {lv['level_5']['英文']} {sentence} "
            f"[JP] {lv['level_7']['日文']} [KR] {lv['level_8']['韩文']}",
        )
    ]
    for module, (tag, level, key) in LEVEL_PAIRS.items():
        pairs.append((module, f"{tag} {lv[level][key]}", sentence))
    return pairs


def content_sha256(samples: list[dict[str, Any]], val: Iterable[str]) -> str:
    return sha256_bytes(dumps_json({"samples": samples, "val": sorted(val)}).encode("utf-8"))


def generate_full(seed: int = 42, size: str = "default", val_fraction: float = 0.1) -> dict[str, Any]:
    """The HLBD Full document for these parameters (see the module docstring)."""
    check_params(seed, size, val_fraction)
    rng = random.Random(seed)
    concepts = CONCEPTS[:_SMALL_CONCEPTS] if size == "small" else CONCEPTS
    samples = [c.record() for c in concepts]

    per_record = [record_pairs(r) for r in samples]
    n_pairs = sum(len(p) for p in per_record)
    n_val = max(1, round(float(val_fraction) * n_pairs))
    candidates = [(ci, li) for ci in range(len(samples)) for li in range(1, len(FULL_MODULES))]
    rng.shuffle(candidates)
    taken: dict[int, int] = {}
    val: set[str] = set()
    for ci, li in candidates:
        if len(val) >= n_val:
            break
        if taken.get(ci, 0) >= _MAX_VAL_LEVELS_PER_CONCEPT:
            continue
        taken[ci] = taken.get(ci, 0) + 1
        val.add(per_record[ci][li][1])

    counts = {m: {"train": 0, "val": 0, "total": 0} for m in FULL_MODULES}
    seen: set[str] = set()
    for pairs in per_record:
        for module, text, _ in pairs:
            if text in seen:  # the table keeps every level unique; guard against a future edit
                raise RuntimeError(f"full: input {text!r} generated twice")
            seen.add(text)
            counts[module]["val" if text in val else "train"] += 1
            counts[module]["total"] += 1
    val_sorted = sorted(val)
    metadata = {
        "name": "HLBD Full Dataset",
        "version": "1.0",
        "description": "One concept at 8 levels (字卡+emoji, 短语, 数学, 拼音, 英文, 中文, 日文, 韩文); pairs use the "
        "dynamic tags [EMOJI] [PHRASE] [EN] [PY] [JP] [KR]; seeded train/val split in metadata.splits.",
        "generator": "apt_model.data.full",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "params": {"size": size, "val_fraction": float(val_fraction)},
        "total_samples": len(samples),
        "total_pairs": n_pairs,
        "modules": list(FULL_MODULES),
        "counts": counts,
        "split_counts": {"train": n_pairs - len(val_sorted), "val": len(val_sorted)},
        "splits": {
            "val": val_sorted,
            "rule": "record pairs train; seeded per-level pairs held out, at most 3 of a concept's 6 levels",
        },
        "content_sha256": content_sha256(samples, val_sorted),
    }
    return {"metadata": metadata, "samples": samples}
