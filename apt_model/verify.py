"""Verification: what did the model actually learn?

The reference "verifier" ran one non-autoregressive forward pass and scored "expected is a substring of the output".
Here every prompt is decoded **autoregressively** (greedy, EOS stop, length limit) through ``model.generate`` and
scored by **exact match after whitespace normalisation** (``normalize_text`` on both sides); the reference's looser
substring score is reported beside it so the two can be compared, never instead of it.

Mode collapse rule (documented, used by ``apt diagnose`` too): over the scored predictions, take the most frequent
normalised prediction. The model is *collapsed* when that single answer

* accounts for at least ``COLLAPSE_MIN_SHARE`` (30 %) of all predictions, **and**
* was produced for at least ``COLLAPSE_MIN_COUNT`` (20) prompts, **and**
* is wrong for at least ``COLLAPSE_MIN_WRONG`` (50 %) of the prompts it was given for

(the last condition keeps a dataset whose true answer really is "3" for a third of its prompts from being flagged).
The same rule is applied per module and reported there.

Batching (speed without changing answers): rows of one batch share their encoded prompt length exactly, so no
prompt is ever padded and each answer is what unbatched decoding gives (the autopoietic statistics would otherwise
see the padding); within a length, rows are sorted by their decode limit so a batch stops early once every row emitted
EOS. On a GPU every batch is decoded at the same row count (``fixed_rows``: a short batch is filled with copies of
its first row, whose answers are dropped): matrix kernels picked for another row count can round differently (on
the CPU the Playground model's logits for the same rows differ by ~1e-7 between batches of 5 and 37 rows), and a
near-tie answer would then depend on which prompts shared its batch. On the CPU, where the filler rows would cost
real time, batches keep their natural size. The default limit per prompt is its expected answer's length + EOS +
``MAX_NEW_TOKENS_MARGIN`` (an answer needing more tokens cannot be an exact match, so the limit never changes the exact
score). Decoding runs under ``torch.inference_mode``.

Shape (``pad_to``, ``apt verify --pad-to SRC,TGT``; off by default): compiled GPU training pads every batch to one
shape (``--max-src-len``, ``--max-tgt-len``), so the autopoietic statistics the model learned from always spanned
that padded matrix, and an unpadded prompt is a slightly different input. With ``pad_to`` every prompt is
right-padded to SRC tokens and every decoder prefix to TGT positions, the logits read at the prefix's last real
position: the answer still depends on its own prompt alone. On the H200, over fourteen models of the README recipe
scored both ways, it moved physics' exact match by −0.5 to +2.7 points, +0.6 on average (``BENCHMARKS.md``).
Models trained with per-batch padding (CPU runs) saw varying shapes; leave it off for them.
"""

from __future__ import annotations

import difflib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apt_model.data.pairs import normalize_text
from apt_model.errors import AptError, CheckpointError, ConfigError, DataError
from apt_model.io import atomic_write_json, atomic_write_text, sha256_file

REPORT_JSON = "verification_report.json"
REPORT_MD = "verification_report.md"
SCHEMA_VERSION = 1

COLLAPSE_MIN_SHARE = 0.30
COLLAPSE_MIN_COUNT = 20
COLLAPSE_MIN_WRONG = 0.50
COLLAPSE_RULE = (
    f"most frequent prediction >= {COLLAPSE_MIN_SHARE:.0%} of predictions AND >= {COLLAPSE_MIN_COUNT} prompts "
    f"AND wrong for >= {COLLAPSE_MIN_WRONG:.0%} of them"
)
# Room past the longest expected answer, so an answer that runs on is seen as wrong rather than cut to look right.
MAX_NEW_TOKENS_MARGIN = 4
N_FAILURES = 25
SPLITS = ("train", "val", "all")


@dataclass
class VerifyReport:
    """The result of one verification. ``to_dict`` is what ``verification_report.json`` holds."""

    model: str
    dataset: str
    dataset_sha256: str | None
    split: str
    overall: dict[str, Any]
    modules: dict[str, dict[str, Any]]
    collapse: dict[str, Any]
    failures: list[dict[str, Any]]
    gate: dict[str, Any]
    settings: dict[str, Any]
    timing: dict[str, float]
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------- inputs
def parse_thresholds(items: Sequence[str] | None, *, min_overall: float | None = None) -> dict[str, float]:
    """``["arithmetic=0.9", "overall=0.5"]`` → ``{"arithmetic": 0.9, "overall": 0.5}``; ConfigError on bad items."""
    out: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--threshold {item!r}: expected MODULE=X, e.g. arithmetic=0.9")
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"--threshold {item!r}: {value!r} is not a number") from None
    if min_overall is not None:
        out["overall"] = float(min_overall)
    return check_thresholds(out)


def check_thresholds(
    thresholds: dict[str, float] | None, modules: Sequence[str] | None = None
) -> dict[str, float]:
    """Validate values (fractions in [0, 1]) and, when ``modules`` is given, that every key names one (or overall)."""
    out: dict[str, float] = {}
    for name, value in (thresholds or {}).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"threshold {name!r}: expected a number in [0, 1] (got {value!r})")
        if not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"threshold {name!r}: {value} is not a fraction in [0, 1] (0.9 means 90 %)")
        out[str(name)] = float(value)
    if modules is not None:
        unknown = sorted(set(out) - set(modules) - {"overall"})
        if unknown:
            raise ConfigError(
                f"threshold for unknown module(s) {', '.join(unknown)}; the dataset has: {', '.join(sorted(modules))}"
            )
    return out


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use cpu)")
    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:N, auto)") from None
    return device


def normalize(text: str) -> str:
    """The documented whitespace normalisation, applied to expected and predicted answers alike."""
    return normalize_text(text)


# -------------------------------------------------------------------------------------------------------- scoring
def score(expected: str, got: str) -> tuple[bool, bool]:
    """(exact match, reference substring score) after normalising both sides."""
    e, g = normalize(expected), normalize(got)
    return e == g, e in g


def detect_collapse(predictions: Sequence[str], expected: Sequence[str]) -> dict[str, Any]:
    """Apply the module docstring's collapse rule to normalised predictions; returns the evidence either way."""
    n = len(predictions)
    preds = [normalize(p) for p in predictions]
    counts = Counter(preds)
    info: dict[str, Any] = {
        "collapsed": False,
        "rule": COLLAPSE_RULE,
        "n": n,
        "n_distinct": len(counts),
        "answer": None,
        "count": 0,
        "share": 0.0,
        "wrong_share": 0.0,
        "top": [[a, c] for a, c in counts.most_common(5)],
    }
    if not n:
        return info
    answer, count = counts.most_common(1)[0]
    wrong = sum(1 for p, e in zip(preds, expected, strict=True) if p == answer and normalize(e) != answer)
    share, wrong_share = count / n, wrong / count
    info.update(answer=answer, count=count, share=round(share, 4), wrong_share=round(wrong_share, 4))
    info["collapsed"] = (
        share >= COLLAPSE_MIN_SHARE and count >= COLLAPSE_MIN_COUNT and wrong_share >= COLLAPSE_MIN_WRONG
    )
    return info


def _accuracy(rows: list[tuple[bool, bool]]) -> dict[str, Any]:
    n = len(rows)
    exact = sum(e for e, _ in rows)
    sub = sum(s for _, s in rows)
    return {
        "n": n,
        "exact_count": exact,
        "substring_count": sub,
        "exact": round(exact / n, 6) if n else 0.0,
        "substring": round(sub / n, 6) if n else 0.0,
    }


def evaluate_gate(
    thresholds: dict[str, float], overall: dict[str, Any], modules: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Exact-match accuracy against each threshold; ``missed`` lists every key below its bar."""
    missed = []
    for name, required in sorted(thresholds.items()):
        actual = overall["exact"] if name == "overall" else modules[name]["exact"]
        if actual < required:
            missed.append({"key": name, "required": required, "actual": actual})
    return {
        "passed": not missed,
        "missed": missed,
        "thresholds": dict(sorted(thresholds.items())),
        "metric": "exact",
    }


def select_failures(rows: list[dict[str, Any]], limit: int = N_FAILURES) -> list[dict[str, Any]]:
    """The worst wrong answers: least similar to the expected first, taken round-robin so every module shows."""
    by_module: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["exact"]:
            continue
        sim = difflib.SequenceMatcher(
            None, normalize(r["expected"]), normalize(r["got"]), autojunk=False
        ).ratio()
        entry = {
            "module": r["module"],
            "input": r["input"],
            "expected": r["expected"],
            "got": r["got"],
            "similarity": round(sim, 4),
        }
        by_module.setdefault(r["module"], []).append(entry)
    for entries in by_module.values():
        entries.sort(key=lambda x: (x["similarity"], x["input"]))
    out: list[dict[str, Any]] = []
    depth = 0
    while len(out) < limit and any(depth < len(v) for v in by_module.values()):
        for name in sorted(by_module):
            if depth < len(by_module[name]) and len(out) < limit:
                out.append(by_module[name][depth])
        depth += 1
    return out


# ------------------------------------------------------------------------------------------------------- decoding
def plan_batches(src_lengths: Sequence[int], limits: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of row indices: rows of one batch share their encoded length exactly (so no row is ever padded
    and its answer equals unbatched decoding), sorted by decode limit so a batch's rows finish together."""
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(src_lengths):
        groups.setdefault(n, []).append(i)
    batches = []
    for n in sorted(groups):
        rows = sorted(groups[n], key=lambda i: (limits[i], i))
        batches += [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
    return batches


def resolve_fixed_rows(fixed_rows: bool | None, device: str) -> bool:
    """``fixed_rows`` as given, or by default on CUDA devices (see the module docstring)."""
    return str(device).startswith("cuda") if fixed_rows is None else fixed_rows


def check_pad_to(pad_to: tuple[int, int] | None) -> None:
    """``pad_to`` is ``None`` or two positive integers (source length, target length)."""
    if pad_to is None:
        return
    ok = isinstance(pad_to, tuple | list) and len(pad_to) == 2
    ok = ok and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in pad_to)
    if not ok:
        raise ConfigError(f"--pad-to {pad_to!r}: must be two positive integers, SRC,TGT")


def parse_pad_to(text: str | None) -> tuple[int, int] | None:
    """``"40,24"`` → ``(40, 24)``; ``None`` or ``"none"`` → ``None``."""
    if text is None or text.strip().lower() == "none":
        return None
    try:
        pad_to = tuple(int(x) for x in text.split(","))
        check_pad_to(pad_to)  # type: ignore[arg-type]
    except (ValueError, ConfigError):
        # The user's text in the message, not the tuple it parsed to.
        raise ConfigError(f"--pad-to {text!r}: must be two positive integers, SRC,TGT") from None
    return pad_to  # type: ignore[return-value]


def decode_greedy(
    model: Any,
    tokenizer: Any,
    inputs: Sequence[str],
    *,
    max_new_tokens: int | Sequence[int],
    batch_size: int = 256,
    device: str = "cpu",
    max_src_len: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    fixed_rows: bool | None = None,
    pad_to: tuple[int, int] | None = None,
) -> tuple[list[str], int]:
    """Greedy autoregressive answers for ``inputs`` (in input order) and how many prompts had to be truncated.

    ``max_new_tokens`` is one limit or one per row; a batch decodes up to the largest limit of its rows (see
    ``plan_batches`` for how rows are grouped). Every answer is cut at its first EOS. ``fixed_rows``: decode every
    batch at ``batch_size`` rows (default: on CUDA devices; see the module docstring). ``pad_to``: (source, target)
    lengths to pad every prompt and decoder prefix to, as in training with fixed-shape batches (see the module
    docstring); ``None`` decodes unpadded.
    """
    import torch

    fixed_rows = resolve_fixed_rows(fixed_rows, device)

    bos_id, eos_id, pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    encoded = [list(tokenizer.encode(text)) for text in inputs]
    truncated = 0
    if max_src_len is not None:
        for i, ids in enumerate(encoded):
            if len(ids) > max_src_len:
                encoded[i] = ids[:max_src_len]
                truncated += 1
    for i, ids in enumerate(encoded):
        if not ids:  # an empty prompt still needs one position for the encoder to attend to
            encoded[i] = [tokenizer.unk_id]
    limits = [max_new_tokens] * len(encoded) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    answers: list[str] = [""] * len(encoded)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    done = 0
    try:
        with torch.inference_mode():
            for idx in plan_batches([len(e) for e in encoded], limits, batch_size):
                filled = idx + [idx[0]] * (batch_size - len(idx)) if fixed_rows else idx
                src = torch.tensor([encoded[i] for i in filled], dtype=torch.long, device=device)
                if pad_to is not None and src.shape[1] < pad_to[0]:
                    src = torch.nn.functional.pad(src, (0, pad_to[0] - src.shape[1]), value=pad_id)
                limit = max(limits[i] for i in idx)
                out = model.generate(
                    src,
                    max_new_tokens=limit,
                    bos_id=bos_id,
                    eos_id=eos_id,
                    **({} if pad_to is None else {"tgt_len": pad_to[1]}),
                )
                for row, ids in zip(idx, out[: len(idx)].cpu().tolist(), strict=True):
                    if eos_id in ids:  # generate pads after EOS; cut there so nothing past the answer counts
                        ids = ids[: ids.index(eos_id)]
                    answers[row] = tokenizer.decode(ids)
                done += len(idx)
                if progress is not None:
                    progress(done, len(encoded))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return answers, truncated


# ------------------------------------------------------------------------------------------------------ the entry
def _select_pairs(dataset: Any, split: str, sample: int | None, seed: int) -> list[Any]:
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    pairs = list(dataset.pairs if split == "all" else getattr(dataset, split))
    if not pairs:
        where = getattr(dataset, "path", None) or "dataset"
        raise DataError(f"{where}: no {split!r} pairs to verify (try --split all)")
    if sample is not None:
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
            raise ConfigError(f"--sample {sample!r}: must be a positive integer")
        if sample < len(pairs):
            keep = sorted(random.Random(seed).sample(range(len(pairs)), sample))
            pairs = [pairs[i] for i in keep]
    return pairs


def _load_dataset(dataset: Any) -> tuple[Any, str, str | None]:
    if not isinstance(dataset, str | Path):
        return dataset, str(getattr(dataset, "path", None) or "<in-memory dataset>"), None
    path = Path(dataset)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    from apt_model.data import load_dataset

    return load_dataset(path), str(path), sha256_file(path)


def _load_model(model: Any, device: str) -> tuple[Any, str]:
    if not isinstance(model, str | Path):
        # An already loaded model (``LoadedModel`` or anything with .model and .tokenizer): the pipeline passes one.
        if not (hasattr(model, "model") and hasattr(model, "tokenizer")):
            raise ConfigError(f"model: expected a path or a loaded model, got {type(model).__name__}")
        return model, str(getattr(model, "source", None) or type(model.model).__name__)
    path = Path(model)
    if not path.exists():
        raise CheckpointError(
            f"{path}: model not found (expected a .pt checkpoint, an export dir or a run dir)"
        )
    from apt_model.checkpoint import load_model

    return load_model(path, device=device), str(path)


def verify_model(
    model: str | Path | Any,
    dataset: str | Path | Any,
    *,
    split: str = "val",
    sample: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
    thresholds: dict[str, float] | None = None,
    device: str = "cpu",
    n_failures: int = N_FAILURES,
    progress: Callable[[int, int], None] | None = None,
    fixed_rows: bool | None = None,
    pad_to: tuple[int, int] | None = None,
) -> VerifyReport:
    """Decode every selected pair greedily and score it; see the module docstring for the rules."""
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r}: must be a positive integer")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ConfigError(f"--max-new-tokens {max_new_tokens!r}: must be a positive integer")
    thresholds = check_thresholds(thresholds)
    check_pad_to(pad_to)
    device = resolve_device(device)
    data, dataset_name, dataset_sha = _load_dataset(dataset)
    pairs = _select_pairs(data, split, sample, seed)
    module_names = sorted({p.module for p in data.pairs})
    thresholds = check_thresholds(thresholds, module_names)
    selected = {p.module for p in pairs}
    absent = sorted(k for k in thresholds if k != "overall" and k not in selected)
    if absent:
        # The module exists in the dataset but not in this split/sample: a gate on it cannot be judged.
        raise ConfigError(f"threshold for module(s) {', '.join(absent)} with no pairs in split {split!r}")
    loaded, model_name = _load_model(model, device)
    net, tok = loaded.model, loaded.tokenizer
    cfg = getattr(loaded, "config", None) or getattr(net, "config", None)
    max_len = getattr(cfg, "max_len", None)
    if pad_to is not None and max_len is not None and max(pad_to) > int(max_len):
        raise ConfigError(f"--pad-to {pad_to[0]},{pad_to[1]}: longer than the model's max_len {max_len}")

    if max_new_tokens is not None:
        limits = [max_new_tokens] * len(pairs)
    else:
        # Per prompt: its expected answer's length + a margin. An answer that needs more tokens than that
        # cannot be an exact match anyway, so the limit never changes the exact score; it only stops a model
        # that never emits EOS from decoding every prompt to the longest answer of the dataset.
        limits = [len(tok.encode(p.output)) + 1 + MAX_NEW_TOKENS_MARGIN for p in pairs]
    if max_len is not None:
        # The decoder sees [BOS] + generated tokens, so it can emit at most max_len tokens.
        limits = [min(n, int(max_len)) for n in limits]

    fixed_rows = resolve_fixed_rows(fixed_rows, device)
    started = time.perf_counter()
    answers, truncated = decode_greedy(
        net,
        tok,
        [p.input for p in pairs],
        max_new_tokens=limits,
        batch_size=batch_size,
        device=device,
        max_src_len=max_len,
        progress=progress,
        fixed_rows=fixed_rows,
        pad_to=pad_to,
    )
    seconds = time.perf_counter() - started

    rows: list[dict[str, Any]] = []
    per_module: dict[str, list[tuple[bool, bool]]] = {}
    for p, got in zip(pairs, answers, strict=True):
        exact, sub = score(p.output, got)
        rows.append({"module": p.module, "input": p.input, "expected": p.output, "got": got, "exact": exact})
        per_module.setdefault(p.module, []).append((exact, sub))
    overall = _accuracy([r for v in per_module.values() for r in v])
    modules = {name: _accuracy(per_module[name]) for name in sorted(per_module)}

    collapse = detect_collapse(answers, [p.output for p in pairs])
    collapse["modules"] = {}
    for name in modules:
        sel = [(a, p.output) for a, p in zip(answers, pairs, strict=True) if p.module == name]
        mod = detect_collapse([a for a, _ in sel], [e for _, e in sel])
        modules[name]["top_answer"] = mod["answer"]
        modules[name]["top_answer_share"] = mod["share"]
        if mod["collapsed"]:
            collapse["modules"][name] = {k: mod[k] for k in ("answer", "count", "share", "wrong_share")}

    gate = evaluate_gate(thresholds, overall, modules)

    return VerifyReport(
        model=model_name,
        dataset=dataset_name,
        dataset_sha256=dataset_sha,
        split=split,
        overall=overall,
        modules=modules,
        collapse=collapse,
        failures=select_failures(rows, n_failures),
        gate=gate,
        settings={
            "batch_size": batch_size,
            "fixed_rows": fixed_rows,
            "max_new_tokens": max_new_tokens
            if max_new_tokens is not None
            else f"expected answer length + {MAX_NEW_TOKENS_MARGIN} (per prompt, <= {max(limits)})",
            "sample": sample,
            "seed": seed,
            "device": device,
            "decoding": "greedy autoregressive (model.generate), EOS stop",
            "truncated_inputs": truncated,
            "model_max_len": max_len,
            "pad_to": None if pad_to is None else list(pad_to),
        },
        timing={
            "seconds": round(seconds, 3),
            "pairs_per_s": round(len(pairs) / seconds, 1) if seconds > 0 else 0.0,
        },
    )


# -------------------------------------------------------------------------------------------------------- writing
def _md_cell(text: Any) -> str:
    s = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "⏎")
    return s if len(s) <= 80 else s[:77] + "..."


def render_markdown(report: VerifyReport | dict[str, Any]) -> str:
    d = report.to_dict() if isinstance(report, VerifyReport) else report
    o = d["overall"]
    lines = [
        "# Verification report",
        "",
        f"- model: `{d['model']}`",
        f"- dataset: `{d['dataset']}` (split `{d['split']}`, {o['n']} pairs)",
        f"- decoding: {d['settings'].get('decoding', 'greedy')}; new-token limit: {d['settings'].get('max_new_tokens')}",
        f"- **exact match: {o['exact']:.2%}** ({o['exact_count']}/{o['n']}); "
        f"substring (reference's score): {o['substring']:.2%}",
        f"- time: {d['timing'].get('seconds', 0):.1f} s ({d['timing'].get('pairs_per_s', 0)} pairs/s)",
    ]
    gate = d["gate"]
    if gate["thresholds"]:
        status = "PASSED" if gate["passed"] else "MISSED"
        lines.append(f"- gate: **{status}**")
        for m in gate["missed"]:
            lines.append(f"  - `{m['key']}`: {m['actual']:.2%} < required {m['required']:.2%}")
    c = d["collapse"]
    if c.get("collapsed"):
        lines += [
            "",
            f"> **Mode collapse:** the answer `{_md_cell(c['answer'])}` was given for {c['count']} of {c['n']} prompts "
            f"({c['share']:.0%}), wrong for {c['wrong_share']:.0%} of them. Rule: {c['rule']}.",
        ]
    for name, m in (c.get("modules") or {}).items():
        lines.append(f"> collapse in `{name}`: `{_md_cell(m['answer'])}` for {m['share']:.0%} of its prompts")
    lines += [
        "",
        "## Per module",
        "",
        "| module | n | exact | substring | most frequent answer |",
        "|---|---:|---:|---:|---|",
    ]
    for name, m in d["modules"].items():
        top = (
            f"`{_md_cell(m.get('top_answer'))}` ({m.get('top_answer_share', 0):.0%})"
            if m.get("top_answer")
            else ""
        )
        lines.append(f"| {_md_cell(name)} | {m['n']} | {m['exact']:.2%} | {m['substring']:.2%} | {top} |")
    lines += ["", "## Worst failures", ""]
    if d["failures"]:
        lines += ["| module | input | expected | got |", "|---|---|---|---|"]
        for f in d["failures"]:
            lines.append(
                f"| {_md_cell(f['module'])} | {_md_cell(f['input'])} | {_md_cell(f['expected'])} | "
                f"{_md_cell(f['got']) or '*(empty)*'} |"
            )
    else:
        lines.append("None: every answer matched exactly.")
    return "\n".join(lines) + "\n"


def write_report(report: VerifyReport | dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``verification_report.json`` and ``.md`` into ``out_dir`` (atomically, each)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    d = report.to_dict() if isinstance(report, VerifyReport) else report
    paths = {"json": out / REPORT_JSON, "markdown": out / REPORT_MD}
    atomic_write_json(paths["json"], d)
    atomic_write_text(paths["markdown"], render_markdown(d))
    return paths


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a ``verification_report.json`` (a file, or a folder holding one); AptError when unusable."""
    import json

    p = Path(path)
    if p.is_dir():
        p = p / REPORT_JSON
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AptError(f"{p}: verification report not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AptError(f"{p}: not a readable verification report ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not {"overall", "modules", "collapse"} <= set(data):
        raise AptError(f"{p}: not a verification report (needs overall, modules, collapse)")
    return data
