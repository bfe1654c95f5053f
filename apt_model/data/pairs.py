"""Typed training pairs and the in-memory dataset both HLBD formats load into.

Text normalisation is defined here once: ``normalize_text(s) == " ".join(s.split())`` — runs of whitespace become
one space, leading/trailing whitespace goes. The loader stores normalised text in every ``Pair``, the tokenizer
encodes normalised text, so ``decode(encode(x)) == normalize_text(x)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

SPLITS: tuple[str, str] = ("train", "val")

# Dynamic language tags of HLBD Full. Each is one token for the tokenizer; `[PY]` is pinyin.
TAGS: tuple[str, ...] = ("[EMOJI]", "[PHRASE]", "[EN]", "[PY]", "[JP]", "[KR]")

# Full pair modules: one pair per record plus one per tagged level.
FULL_MODULES: tuple[str, ...] = (
    "full_record",
    "full_emoji",
    "full_phrase",
    "full_en",
    "full_py",
    "full_jp",
    "full_kr",
)


def normalize_text(text: str) -> str:
    """The documented whitespace normalisation: ``" ".join(text.split())``."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Pair:
    input: str
    output: str
    module: str
    split: str  # "train" | "val"


@dataclass(frozen=True)
class Duplicate:
    """A later occurrence of an input already seen; it is not trained on."""

    input: str
    path: str  # JSON path of the dropped occurrence, e.g. "$.data.zodiac[12]"
    first_path: str  # JSON path of the occurrence that was kept
    same_output: bool  # False: the file gives one question two answers


@dataclass
class HLBDDataset:
    pairs: list[Pair]
    metadata: dict[str, Any]
    path: str | None = None
    duplicates: list[Duplicate] = field(default_factory=list)
    format: Literal["hardcore", "full"] = "hardcore"
    sha256: str | None = None  # of the file's bytes, when loaded from a file
    split_source: str = "file"  # "file": metadata.splits; "hash": assigned by the loader's hash rule
    # Usable-but-odd things, e.g. metadata.modules omits a module that data has.
    warnings: list[str] = field(default_factory=list)

    @property
    def train(self) -> list[Pair]:
        return [p for p in self.pairs if p.split == "train"]

    @property
    def val(self) -> list[Pair]:
        return [p for p in self.pairs if p.split == "val"]

    @property
    def modules(self) -> list[str]:
        """Modules in the order they first appear."""
        return list(dict.fromkeys(p.module for p in self.pairs))

    def texts(self) -> list[str]:
        """Every input and output, e.g. to build a tokenizer."""
        out: list[str] = []
        for p in self.pairs:
            out.append(p.input)
            out.append(p.output)
        return out

    def __len__(self) -> int:
        return len(self.pairs)


# Bump when generated content changes for the same seed and parameters (it is part of each file's provenance).
# 1.1.0: one hold-out draw per shown number pair across modules (1.0.0 drew per module, so e.g. a val rectangle's
# product could be a training multiplication).
# 1.2.0: xxl's × and ÷ take every two-digit operand pair (1.1.0's xxl stopped at 70); the other sizes are unchanged.
GENERATOR_VERSION = "1.2.0"

SIZES: tuple[str, ...] = ("small", "default", "large", "xl", "xxl")


def check_params(seed: int, size: str, val_fraction: float) -> None:
    """Validate generator parameters (the same bounds as ``DataConfig``) before any work starts."""
    from apt_model.errors import ConfigError

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
    if size not in SIZES:
        raise ConfigError(f"size: must be one of {', '.join(SIZES)}, got {size!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float):
        raise ConfigError(f"val_fraction: expected a number, got {val_fraction!r}")
    if not 0.0 < float(val_fraction) < 0.5:
        raise ConfigError(f"val_fraction: must be in (0, 0.5), got {val_fraction!r}")


def unit_hash(*parts: object) -> float:
    """A number in [0, 1) fixed by ``parts`` alone — never by order, process or PYTHONHASHSEED."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(text: str, val_fraction: float) -> str:
    """The loader's split for files that carry none: a hash bucket of the (normalised) input."""
    return "val" if unit_hash("hlbd-split", text) < val_fraction else "train"
