"""Load either HLBD file format into an ``HLBDDataset`` of typed pairs — or refuse it with one line.

Formats (``shared/spec/hlbd.md``): Hardcore ``{"metadata", "data": {module: [{"input", "output"}]}}`` and Full
``{"metadata", "samples": [record]}``. ``metadata`` is optional; ``metadata.modules`` is informational only (files in
the wild omit modules that ``data`` has: ``data`` is trusted, the omission becomes a warning).

Texts are whitespace-normalised (``pairs.normalize_text``). An input seen before is a duplicate: the first occurrence
is kept, later ones are listed in ``dataset.duplicates`` and never trained on.

Split: ``metadata.splits.val`` (written by our generators) lists the val inputs; without it the loader hashes each
input (``pairs.hash_split``, Full record pairs always train), so the split never depends on order.

Every problem raises ``DataError("<file>: <JSON path>: <what is wrong>")``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from apt_model.data import full as full_mod
from apt_model.data import hardcore as hardcore_mod
from apt_model.data.pairs import Duplicate, HLBDDataset, Pair, hash_split, normalize_text
from apt_model.errors import ConfigError, DataError
from apt_model.io import sha256_bytes

MAX_TEXT_CHARS = 10_000  # a longer "question" is a broken file, not a training pair
MAX_FILE_BYTES = 512 * 1024 * 1024
DEFAULT_VAL_FRACTION = 0.1


class _JsonObject(dict):  # type: ignore[type-arg]
    """A JSON object that remembers keys given twice (``json`` would silently keep the last)."""

    duplicate_keys: list[str]


def _object_hook(items: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    obj.duplicate_keys = []
    for key, value in items:
        if key in obj:
            obj.duplicate_keys.append(key)
        obj[key] = value
    return obj


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
    }.get(type(value), "an object" if isinstance(value, dict) else type(value).__name__)


def _short(text: str, limit: int = 40) -> str:
    return json.dumps(text if len(text) <= limit else text[:limit] + "…", ensure_ascii=False)


class _Reader:
    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, path: str, message: str) -> DataError:
        return DataError(f"{self.name}: {path}: {message}")

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected an object, got {_type_name(value)}")
        dups = getattr(value, "duplicate_keys", None)
        if dups:
            raise self.fail(path, f"key {_short(dups[0])} appears more than once")
        return value

    def array(self, value: Any, path: str, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(path, f"expected an array of {what}, got {_type_name(value)}")
        if not value:
            raise self.fail(path, f"expected a non-empty array of {what}")
        return value

    def text(self, container: dict[str, Any], key: str, path: str) -> str:
        here = _key(path, key)
        if key not in container:
            raise self.fail(here, "missing (expected a non-empty string)")
        value = container[key]
        if not isinstance(value, str):
            raise self.fail(here, f"expected a non-empty string, got {_type_name(value)}")
        if len(value) > MAX_TEXT_CHARS:
            raise self.fail(here, f"string of {len(value)} characters exceeds the limit of {MAX_TEXT_CHARS}")
        text = normalize_text(value)
        if not text:
            raise self.fail(here, "expected a non-empty string")
        return text


def _read_json(p: Path, name: str) -> tuple[Any, bytes]:
    if not p.exists():
        raise DataError(f"{name}: no such file")
    if p.is_dir():
        raise DataError(f"{name}: is a directory, expected an HLBD JSON file")
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise DataError(f"{name}: file of {size} bytes exceeds the limit of {MAX_FILE_BYTES}")
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"{name}: cannot read ({exc.__class__.__name__}: {exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM (files saved by Windows editors)
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise DataError(f"{name}: empty file, expected an HLBD JSON document")
    try:
        return json.loads(text, object_pairs_hook=_object_hook), raw
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{name}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise DataError(f"{name}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal past Python's int-conversion limit
        raise DataError(f"{name}: unreadable JSON value ({str(exc).splitlines()[0]})") from None


def dataset_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the dataset file's bytes (the identity used by caching and checkpoints)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    return sha256_bytes(p.read_bytes())


def load_dataset(path: str | os.PathLike[str], *, val_fraction: float = DEFAULT_VAL_FRACTION) -> HLBDDataset:
    """Load an HLBD Hardcore or Full file. ``val_fraction`` applies only to files that carry no split."""
    if not 0.0 < val_fraction < 0.5:
        raise ConfigError(f"val_fraction: must be in (0, 0.5), got {val_fraction!r}")
    name = os.fspath(path)
    doc, raw = _read_json(Path(path), name)
    r = _Reader(name)
    if not isinstance(doc, dict):
        raise r.fail(
            "$", f'expected an object with "data" (Hardcore) or "samples" (Full), got {_type_name(doc)}'
        )
    r.obj(doc, "$")
    has_data, has_samples = "data" in doc, "samples" in doc
    if has_data == has_samples:
        found = "both" if has_data else "neither"
        raise r.fail("$", f'unknown format: expected "data" (Hardcore) or "samples" (Full), found {found}')
    metadata: dict[str, Any] = {}
    if "metadata" in doc:
        metadata = dict(r.obj(doc["metadata"], "$.metadata"))
    val_listed = _read_splits(r, metadata)

    if has_data:
        ds = _load_hardcore(r, doc["data"], metadata, val_listed, val_fraction)
    else:
        ds = _load_full(r, doc["samples"], metadata, val_listed, val_fraction)
    ds.path = name
    ds.sha256 = sha256_bytes(raw)
    _check_provenance(ds, doc, val_listed)
    return ds


def _read_splits(r: _Reader, metadata: dict[str, Any]) -> list[str] | None:
    if "splits" not in metadata:
        return None
    splits = r.obj(metadata["splits"], "$.metadata.splits")
    if "val" not in splits:
        raise r.fail("$.metadata.splits.val", "missing (expected an array of val inputs)")
    values = splits["val"]
    if not isinstance(values, list):
        raise r.fail("$.metadata.splits.val", f"expected an array of strings, got {_type_name(values)}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise r.fail(f"$.metadata.splits.val[{i}]", f"expected a string, got {_type_name(v)}")
    return values


class _Collector:
    """Dedup + split assignment shared by both formats."""

    def __init__(self, r: _Reader, val_listed: list[str] | None, val_fraction: float) -> None:
        self.r = r
        self.val = {normalize_text(v) for v in val_listed} if val_listed is not None else None
        self.val_fraction = val_fraction
        self.pairs: list[Pair] = []
        self.first: dict[str, tuple[str, str]] = {}  # input -> (path, output)
        self.duplicates: list[Duplicate] = []

    def add(self, text: str, output: str, module: str, path: str, hashable: bool = True) -> None:
        seen = self.first.get(text)
        if seen is not None:
            self.duplicates.append(Duplicate(text, path, seen[0], seen[1] == output))
            return
        self.first[text] = (path, output)
        if self.val is not None:
            split = "val" if text in self.val else "train"
        else:
            split = hash_split(text, self.val_fraction) if hashable else "train"
        self.pairs.append(Pair(text, output, module, split))

    def check_val_listed(self, val_listed: list[str] | None) -> None:
        for i, v in enumerate(val_listed or []):
            if normalize_text(v) not in self.first:
                raise self.r.fail(f"$.metadata.splits.val[{i}]", f"{_short(v)} is not an input of this file")


def _load_hardcore(
    r: _Reader, data: Any, metadata: dict[str, Any], val_listed: list[str] | None, val_fraction: float
) -> HLBDDataset:
    data = r.obj(data, "$.data")
    if not data:
        raise r.fail("$.data", "expected at least one module, got an empty object")
    c = _Collector(r, val_listed, val_fraction)
    for module, rows in data.items():
        mpath = _key("$.data", module)
        if not module.strip():
            raise r.fail(mpath, "module name must be a non-empty string")
        r.array(rows, mpath, "{input, output} objects")
        for i, row in enumerate(rows):
            rpath = f"{mpath}[{i}]"
            row = r.obj(row, rpath)
            text = r.text(row, "input", rpath)
            output = r.text(row, "output", rpath)
            c.add(text, output, module, rpath)
    c.check_val_listed(val_listed)
    ds = HLBDDataset(
        pairs=c.pairs,
        metadata=metadata,
        duplicates=c.duplicates,
        format="hardcore",
        split_source="file" if val_listed is not None else "hash",
    )
    listed = metadata.get("modules")
    if isinstance(listed, list):
        missing = [m for m in data if m not in listed]
        if missing:
            ds.warnings.append(f"metadata.modules omits {', '.join(missing)} (data has it; data is trusted)")
    return ds


def _load_full(
    r: _Reader, samples: Any, metadata: dict[str, Any], val_listed: list[str] | None, val_fraction: float
) -> HLBDDataset:
    r.array(samples, "$.samples", "concept records")
    c = _Collector(r, val_listed, val_fraction)
    for i, record in enumerate(samples):
        rpath = f"$.samples[{i}]"
        record = r.obj(record, rpath)
        clean: dict[str, Any] = {"concept": r.text(record, "concept", rpath)}
        for level, fields in full_mod.LEVEL_FIELDS.items():
            lpath = _key(rpath, level)
            if level not in record:
                raise r.fail(lpath, f"missing level (expected an object with {', '.join(fields)})")
            obj = r.obj(record[level], lpath)
            clean[level] = {f: r.text(obj, f, lpath) for f in fields}
        for module, text, output in full_mod.record_pairs(clean):
            c.add(
                normalize_text(text),
                normalize_text(output),
                module,
                f"{rpath} ({module})",
                module != "full_record",
            )
    c.check_val_listed(val_listed)
    return HLBDDataset(
        pairs=c.pairs,
        metadata=metadata,
        duplicates=c.duplicates,
        format="full",
        split_source="file" if val_listed is not None else "hash",
    )


def _check_provenance(ds: HLBDDataset, doc: dict[str, Any], val_listed: list[str] | None) -> None:
    """Provenance mismatches do not stop training, but they are worth saying."""
    md = ds.metadata
    expected = md.get("content_sha256")
    if isinstance(expected, str) and val_listed is not None:
        if ds.format == "hardcore":
            actual = hardcore_mod.content_sha256(doc["data"], val_listed)
        else:
            actual = full_mod.content_sha256(doc["samples"], val_listed)
        if actual != expected:
            ds.warnings.append(
                "metadata.content_sha256 does not match the content (file edited after generation?)"
            )
    total = md.get("total_samples")
    records = len(doc["samples"]) if ds.format == "full" else len(ds.pairs) + len(ds.duplicates)
    if isinstance(total, int) and not isinstance(total, bool) and total != records:
        ds.warnings.append(f"metadata.total_samples is {total} but the file holds {records}")
