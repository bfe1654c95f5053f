"""Diagnose a setup, a dataset, a checkpoint, a run and a verification — and say how to fix what is wrong.

Every finding has a severity (``error``: the result cannot be trusted or the run cannot work; ``warning``: likely a
problem; ``info``: context), the check that produced it, a one-line message, the evidence (numbers, examples) and
a concrete fix. ``diagnose`` only reads: it never writes into the run, dataset or model folders.

Rules (thresholds are module constants so tests and docs can name them):

* environment — Python, torch, CUDA devices and memory, which optional stacks are installed (info; torch missing is
  an error).
* data — duplicate inputs (same answer: info; two answers for one question: warning), train/val leakage (the same
  normalised input in both splits, or the same up to case, spaces and punctuation: error), characters the
  model's tokenizer maps to ``[UNK]`` (warning), encoded lengths against the model's ``max_len`` (warning when
  something does not fit), an empty validation split (warning), a dataset that changed since training (warning).
* checkpoint — loads with the safe loader (error if not), every weight finite (Inf/NaN: error), tokenizer vocabulary
  = config ``vocab_size`` = embedding rows (mismatch: error).
* run (``experiment_report.json``) — status failed (error), stale while "running" (warning), NaN/Inf losses or NaN
  events (error), skipped steps (warning), divergence (last train loss above the first: error; ≥ 1.5× the best:
  warning), plateau (best train loss improved < 1 % over the last ``max(5, n/4)`` epochs while val token accuracy
  < 95 %: warning), grad-norm spikes (> 10× the median: warning), overfitting (val loss ≥ 20 % above its best while
  train loss kept falling: warning), learning rate different from the cosine-warm-restart schedule recomputed from
  the report's config (warning), listed checkpoints missing (warning).
* verification — mode collapse (error; per module: warning), gate missed (warning), answers that contain the
  expected text but run on (substring − exact ≥ 25 points: warning), weakest module (info).
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import statistics
import sys
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apt_model.data.pairs import normalize_text
from apt_model.errors import AptError, CheckpointError, ConfigError, DataError

SEVERITIES = ("error", "warning", "info")
REPORT_FILE = "experiment_report.json"
VERIFICATION_FILE = "verification_report.json"

STALE_AFTER_S = 600.0
DIVERGE_FACTOR = 1.5
DIVERGE_MIN_DELTA = 0.1
PLATEAU_MIN_EPOCHS = 5
PLATEAU_MIN_IMPROVEMENT = 0.01
PLATEAU_ACC_OK = 0.95
GRAD_SPIKE_FACTOR = 10.0
OVERFIT_FACTOR = 1.2
LR_RTOL = 1e-3
RUN_ON_GAP = 0.25

EXTRAS = {
    "deepspeed": "deepspeed",
    "transformers": "hf",
    "azure.ai.ml": "azure",
    "mlflow": None,
    "prefect": None,
}


@dataclass
class Finding:
    severity: str  # error | warning | info
    check: str  # e.g. "data.leakage"
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- small helpers
def _num(x: Any) -> float | None:
    """A report value as a float: the strings "nan"/"inf"/"-inf" (how reports store them) included; else None."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, int | float):
        return float(x)
    if isinstance(x, str) and x.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(x.strip().lower().replace("infinity", "inf"))
    return None


def _finite(xs: Iterable[float | None]) -> list[float]:
    return [x for x in xs if x is not None and math.isfinite(x)]


def _loose_key(text: str) -> str:
    """Case, whitespace and punctuation stripped: two inputs with the same key ask the same thing."""
    t = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in t if not (ch.isspace() or unicodedata.category(ch).startswith("P")))


def _parse_time(s: Any) -> datetime | None:
    if not isinstance(s, str):
        return None
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable {what} ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a {what} (top level is {type(data).__name__})")
    return data


def read_experiment_report(path: str | Path) -> dict[str, Any]:
    """An ``experiment_report.json`` (file or run folder) as a dict; ConfigError naming the file when unusable."""
    p = Path(path)
    if p.is_dir():
        p = p / REPORT_FILE
    data = read_json_file(p, "experiment report")
    if not isinstance(data.get("epochs", []), list):
        raise ConfigError(f"{p}: not an experiment report ($.epochs is not a list)")
    return data


# --------------------------------------------------------------------------------------------------- environment
def check_environment() -> list[Finding]:
    out = [
        Finding(
            "info",
            "env.python",
            f"Python {platform.python_version()} on {platform.system()} {platform.machine()}",
            {"executable": sys.executable},
        )
    ]
    if importlib.util.find_spec("torch") is None:
        out.append(
            Finding(
                "error",
                "env.torch",
                "torch is not installed",
                {},
                "pip install torch (CUDA hosts: the CUDA build)",
            )
        )
        return out
    import torch

    cuda = torch.cuda.is_available()
    out.append(
        Finding(
            "info",
            "env.torch",
            f"torch {torch.__version__}, CUDA {'available' if cuda else 'not available'}",
            {
                "torch": torch.__version__,
                "cuda_build": torch.version.cuda,
                "threads": torch.get_num_threads(),
            },
        )
    )
    if cuda:
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
        out.append(
            Finding(
                "info",
                "env.gpu",
                f"{len(gpus)} GPU(s): " + ", ".join(g["name"] for g in gpus),
                {"gpus": gpus},
            )
        )
    else:
        out.append(
            Finding(
                "info",
                "env.gpu",
                "no CUDA device: training and verification run on the CPU (fine for the tiny preset)",
                {},
                "for real runs use a host with a GPU and the CUDA build of torch",
            )
        )
    installed, missing = {}, {}
    for module, extra in EXTRAS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ModuleNotFoundError, ValueError):  # a missing parent package ("azure") raises
            found = False
        (installed if found else missing)[module] = extra
    out.append(
        Finding(
            "info",
            "env.extras",
            f"installed: {', '.join(installed) or 'none'}; missing: {', '.join(missing) or 'none'}",
            {"installed": sorted(installed), "missing": sorted(missing)},
            "; ".join(f"{m}: pip install 'apt-pipeline[{e}]'" for m, e in missing.items() if e)
            or ("; ".join(f"pip install {m}" for m in missing) if missing else ""),
        )
    )
    return out


# ----------------------------------------------------------------------------------------------------------- data
def check_dataset(dataset: Any, tokenizer: Any = None, max_len: int | None = None) -> list[Finding]:
    """Findings about a loaded ``HLBDDataset`` (and, given the model's tokenizer, about what the model can read)."""
    out: list[Finding] = []
    train, val = dataset.train, dataset.val
    per_module: dict[str, dict[str, int]] = {}
    for p in dataset.pairs:
        counts = per_module.setdefault(p.module, {"train": 0, "val": 0})
        counts[p.split] = counts.get(p.split, 0) + 1
    out.append(
        Finding(
            "info",
            "data.summary",
            f"{len(dataset.pairs)} pairs ({len(train)} train, {len(val)} val) in {len(per_module)} modules",
            {"path": dataset.path, "format": dataset.format, "modules": per_module},
        )
    )
    if not val:
        out.append(
            Finding(
                "warning",
                "data.no_val",
                "the dataset has no validation pairs: nothing measures generalisation",
                {"n_train": len(train)},
                "regenerate with `apt data generate` (it splits) or add metadata.splits to the file",
            )
        )

    dups = list(getattr(dataset, "duplicates", []) or [])
    conflicting = [d for d in dups if not d.same_output]
    if conflicting:
        out.append(
            Finding(
                "warning",
                "data.conflicting_duplicates",
                f"{len(conflicting)} inputs appear again with a different answer (the loader kept the first)",
                {
                    "examples": [
                        {"input": d.input, "kept": d.first_path, "dropped": d.path} for d in conflicting[:5]
                    ]
                },
                "fix the file so each question has one answer; exact match cannot reach 100 % otherwise",
            )
        )
    if len(dups) > len(conflicting):
        out.append(
            Finding(
                "info",
                "data.duplicates",
                f"{len(dups) - len(conflicting)} repeated inputs with the same answer were dropped by the loader",
                {"examples": [d.path for d in dups if d.same_output][:5]},
            )
        )

    train_inputs = {normalize_text(p.input): p for p in train}
    leaked = [p for p in val if normalize_text(p.input) in train_inputs]
    if leaked:
        out.append(
            Finding(
                "error",
                "data.leakage",
                f"{len(leaked)} validation inputs also appear in the training split: val scores overstate the model",
                {
                    "count": len(leaked),
                    "share_of_val": round(len(leaked) / len(val), 4),
                    "examples": [{"input": p.input, "module": p.module} for p in leaked[:5]],
                },
                "drop those pairs from one split (or regenerate with `apt data generate`, which splits by input)",
            )
        )
    leaked_inputs = {normalize_text(p.input) for p in leaked}
    loose_train = {_loose_key(p.input) for p in train}
    near = [
        p for p in val if normalize_text(p.input) not in leaked_inputs and _loose_key(p.input) in loose_train
    ]
    if near:
        out.append(
            Finding(
                "error",
                "data.near_leakage",
                f"{len(near)} validation inputs ask a training question again (equal up to case, spaces or "
                "punctuation): val scores overstate the model",
                {"count": len(near), "examples": [p.input for p in near[:5]]},
                "move them to the training split or drop them (the loader only deduplicates exact inputs)",
            )
        )

    if tokenizer is not None:
        out += _check_vocabulary_coverage(dataset, tokenizer)
        out += _check_lengths(dataset, tokenizer, max_len)
    return out


def _check_vocabulary_coverage(dataset: Any, tokenizer: Any) -> list[Finding]:
    unk = tokenizer.unk_id
    oov: dict[str, int] = {}
    where = {"input": 0, "output": 0}
    for p in dataset.pairs:
        for side in ("input", "output"):
            text = getattr(p, side)
            if unk in tokenizer.encode(text):
                where[side] += 1
                for ch in text:
                    if not ch.isspace() and unk in tokenizer.encode(ch):
                        oov[ch] = oov.get(ch, 0) + 1
    if not (where["input"] or where["output"]):
        return []
    top = sorted(oov.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    return [
        Finding(
            "warning",
            "data.oov",
            f"{len(oov)} characters are outside the model's vocabulary (read as [UNK]) in "
            f"{where['input']} inputs and {where['output']} outputs",
            {
                "characters": [[c, n] for c, n in top],
                "inputs_affected": where["input"],
                "outputs_affected": where["output"],
            },
            "build the tokenizer from this dataset (retrain), or verify on the dataset the model was trained on; "
            "an answer with an [UNK] character can never be produced exactly",
        )
    ]


def _percentiles(xs: list[int]) -> dict[str, int]:
    s = sorted(xs)

    def q(f: float) -> int:
        return s[min(len(s) - 1, round(f * (len(s) - 1)))]

    return {"p50": q(0.5), "p95": q(0.95), "p99": q(0.99), "max": s[-1]}


def _check_lengths(dataset: Any, tokenizer: Any, max_len: int | None) -> list[Finding]:
    if not dataset.pairs:
        return []
    src = [len(tokenizer.encode(p.input)) for p in dataset.pairs]
    tgt = [len(tokenizer.encode(p.output)) + 1 for p in dataset.pairs]  # + [BOS] / [EOS]
    ev = {"input_tokens": _percentiles(src), "target_tokens": _percentiles(tgt), "model_max_len": max_len}
    out = [
        Finding(
            "info",
            "data.lengths",
            f"input length p95 {ev['input_tokens']['p95']}, target p95 "
            f"{ev['target_tokens']['p95']} tokens (model max_len {max_len})",
            ev,
        )
    ]
    if max_len is not None:
        long_src = sum(1 for n in src if n > max_len)
        long_tgt = sum(1 for n in tgt if n > max_len)
        if long_src or long_tgt:
            out.append(
                Finding(
                    "warning",
                    "data.too_long",
                    f"{long_src} inputs and {long_tgt} answers do not fit the model's max_len {max_len}",
                    {**ev, "inputs_too_long": long_src, "targets_too_long": long_tgt},
                    "raise model max_len (retrain) or shorten those pairs; they are truncated and cannot be answered",
                )
            )
    return out


# ----------------------------------------------------------------------------------------------------- checkpoint
def _raw_model_files(source: Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(model config dict, tokenizer JSON text, tensors by name) without building the model."""
    from apt_model import checkpoint as ck

    if source.is_file():
        state = ck.load_checkpoint(source)
        cfg = state.get("model_config")
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{source}: model_config is not a mapping")
        tensors = state.get("model_state")
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{source}: model_state is not a mapping of tensors")
        return cfg, state.get("tokenizer_json"), tensors
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_json_file(source / ck.CONFIG_JSON, "model config")
    cfg = {k: v for k, v in cfg.items() if k not in ("format", "format_version")}
    try:
        tok = (source / ck.TOKENIZER_JSON).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{source / ck.TOKENIZER_JSON}: cannot read ({exc.__class__.__name__})"
        ) from None
    try:
        tensors = load_file(str(source / ck.WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{source / ck.WEIGHTS_FILE}: cannot read weights ({exc.__class__.__name__})"
        ) from None
    return cfg, tok, tensors


def check_checkpoint(path: str | Path) -> tuple[list[Finding], Any]:
    """Findings about a model file or folder, and the ``LoadedModel`` when it loads cleanly (else None)."""
    import torch

    from apt_model import checkpoint as ck

    out: list[Finding] = []
    try:
        source = ck.resolve_model_path(path)
        cfg, tok_json, tensors = _raw_model_files(source)
    except AptError as exc:
        out.append(
            Finding(
                "error",
                "checkpoint.load",
                f"the model cannot be loaded: {exc}",
                {"path": str(path)},
                "point --model at a .pt checkpoint, an export folder or a run folder written by `apt train`",
            )
        )
        return out, None

    bad: dict[str, dict[str, int]] = {}
    n_params = 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        n_params += t.numel()
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad[name] = {
                "nan": int(torch.isnan(t).sum()),
                "inf": int(torch.isinf(t).sum()),
                "numel": t.numel(),
            }
    if bad:
        out.append(
            Finding(
                "error",
                "checkpoint.nonfinite_weights",
                f"{len(bad)} weight tensors hold NaN/Inf values: every output of this model is meaningless",
                {"path": str(source), "tensors": dict(list(sorted(bad.items()))[:10])},
                "use an earlier checkpoint (before the loss went non-finite) and retrain with a lower lr, "
                "gradient clipping and precision fp32/bf16 (nan_policy stop keeps such weights from being saved)",
            )
        )

    vocab_cfg = cfg.get("vocab_size")
    vocab_tok = None
    try:
        tokenizer = ck._tokenizer_from_json(tok_json, source)
        vocab_tok = tokenizer.vocab_size
    except CheckpointError as exc:
        out.append(
            Finding("error", "checkpoint.tokenizer", str(exc), {"path": str(source)}, "re-export the model")
        )
    rows = None
    for name, t in tensors.items():
        if (
            name.endswith("embedding.weight")
            or name.endswith("embed.weight")
            or ("embed" in name and t.ndim == 2)
        ):
            rows = int(t.shape[0])
            break
    sizes = {"config_vocab_size": vocab_cfg, "tokenizer_vocab_size": vocab_tok, "embedding_rows": rows}
    known = {v for v in sizes.values() if v is not None}
    if len(known) > 1:
        out.append(
            Finding(
                "error",
                "checkpoint.vocab_mismatch",
                f"vocabulary sizes disagree: config {vocab_cfg}, tokenizer {vocab_tok}, embedding {rows}",
                {"path": str(source), **sizes},
                "the tokenizer saved with the model must be the one it was trained with; re-export from the "
                "training checkpoint (or retrain with the tokenizer built from the dataset)",
            )
        )
    if any(f.severity == "error" for f in out):
        return out, None
    try:
        loaded = ck.load_model(source, device="cpu")
    except AptError as exc:
        out.append(
            Finding(
                "error",
                "checkpoint.load",
                f"the model cannot be loaded: {exc}",
                {"path": str(source)},
                "re-export the model from its training checkpoint",
            )
        )
        return out, None
    out.append(
        Finding(
            "info",
            "checkpoint.summary",
            f"{source.name}: {n_params:,} parameters, d_model {cfg.get('d_model')}, "
            f"{cfg.get('n_encoder_layers')}+{cfg.get('n_decoder_layers')} layers, vocab {vocab_cfg}, "
            f"max_len {cfg.get('max_len')}",
            {"path": str(source), "n_parameters": n_params, "config": cfg},
        )
    )
    return out, loaded


# ------------------------------------------------------------------------------------------------------------ run
def expected_lr(
    step: int,
    *,
    base_lr: float,
    min_lr: float,
    t0: int,
    t_mult: int,
    steps_per_epoch: int,
    warmup_steps: int = 0,
) -> float:
    """The LR ``training/schedule.py`` sets for optimizer step ``step`` (0-based), recomputed independently:
    CosineAnnealingWarmRestarts at fractional epoch ``step / steps_per_epoch``, times linear warmup."""
    epoch = step / steps_per_epoch
    if epoch >= t0:
        if t_mult == 1:
            t_cur, t_i = epoch % t0, float(t0)
        else:
            n = int(math.log(epoch / t0 * (t_mult - 1) + 1, t_mult))
            t_cur = epoch - t0 * (t_mult**n - 1) / (t_mult - 1)
            t_i = float(t0 * t_mult**n)
    else:
        t_cur, t_i = epoch, float(t0)
    lr = min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * t_cur / t_i)) / 2
    if warmup_steps > 0 and step < warmup_steps:
        lr *= (step + 1) / warmup_steps
    return lr


def check_run(
    report: dict[str, Any],
    *,
    path: str = REPORT_FILE,
    now: datetime | None = None,
    stale_after: float = STALE_AFTER_S,
) -> list[Finding]:
    out: list[Finding] = []
    epochs = [r for r in report.get("epochs") or [] if isinstance(r, dict)]
    status = report.get("status")
    final = report.get("final") or {}
    train = [_num(r.get("train_loss")) for r in epochs]
    val = [_num(r.get("val_loss")) for r in epochs]
    acc = [_num(r.get("val_token_acc")) for r in epochs]
    gnorm = [_num(r.get("grad_norm")) for r in epochs]
    ep = [r.get("epoch", i + 1) for i, r in enumerate(epochs)]

    ft, fv = _finite(train), _finite(val)
    out.append(
        Finding(
            "info",
            "run.summary",
            f"{report.get('backend', '?')} run, status {status}, {len(epochs)} epochs; last train loss "
            f"{format(ft[-1], '.4g') if ft else 'n/a'}, best val loss {format(min(fv), '.4g') if fv else 'n/a'}",
            {
                "path": path,
                "status": status,
                "epochs": len(epochs),
                "global_step": epochs[-1].get("global_step") if epochs else 0,
            },
        )
    )
    if status == "failed":
        out.append(
            Finding(
                "error",
                "run.failed",
                f"the run failed: {final.get('error', 'no error recorded')}",
                {"final": final},
                "read the error, fix its cause and resume with --resume from the last checkpoint",
            )
        )
    elif status == "running":
        updated = _parse_time(report.get("updated_at"))
        age = ((now or datetime.now(UTC)) - updated).total_seconds() if updated else None
        if age is not None and age > stale_after:
            out.append(
                Finding(
                    "warning",
                    "run.stale",
                    f"status is running but the report was last written {age:.0f} s ago",
                    {"updated_at": report.get("updated_at"), "age_s": round(age)},
                    "the process probably died: check it, then resume from the last checkpoint",
                )
            )
    elif status != "finished":
        out.append(
            Finding(
                "warning", "run.status", f"unknown status {status!r}", {}, "expected running/finished/failed"
            )
        )
    if not epochs:
        out.append(Finding("warning", "run.no_epochs", "no epoch has finished yet: nothing to judge", {}, ""))

    # Non-finite values: a single NaN makes every later number meaningless.
    bad_epochs = [
        {"epoch": e, "train_loss": r.get("train_loss"), "val_loss": r.get("val_loss")}
        for e, r, t, v in zip(ep, epochs, train, val, strict=True)
        if (t is not None and not math.isfinite(t)) or (v is not None and not math.isfinite(v))
    ]
    batch = [
        (_num(b[1]), b[0])
        for b in report.get("batch_losses") or []
        if isinstance(b, list | tuple) and len(b) >= 2
    ]
    bad_batches = [[s, v] for v, s in batch if v is not None and not math.isfinite(v)]
    nan_events = report.get("nan_events") or []
    if bad_epochs or bad_batches or nan_events:
        out.append(
            Finding(
                "error",
                "run.nonfinite_loss",
                f"non-finite loss: {len(bad_epochs)} epochs, {len(bad_batches)} logged batches, "
                f"{len(nan_events)} NaN events",
                {"epochs": bad_epochs[:10], "batches": bad_batches[:10], "nan_events": nan_events[:10]},
                "lower the learning rate, keep gradient clipping on (clip_grad_norm 1.0), train in fp32 or bf16 "
                "instead of fp16, and resume from the last checkpoint before the first NaN",
            )
        )
    skipped = sum(int(r.get("skipped_steps") or 0) for r in epochs)
    if skipped:
        out.append(
            Finding(
                "warning",
                "run.skipped_steps",
                f"{skipped} optimizer steps were skipped for a non-finite loss",
                {
                    "per_epoch": {
                        str(e): r.get("skipped_steps")
                        for e, r in zip(ep, epochs, strict=True)
                        if r.get("skipped_steps")
                    }
                },
                "a few skips under fp16 are normal; many mean the lr is too high or fp16 overflows — use bf16",
            )
        )

    # Divergence: judged on the finite train losses.
    tl = [(e, t) for e, t in zip(ep, train, strict=True) if t is not None and math.isfinite(t)]
    if len(tl) >= 3:
        first, last = tl[0][1], tl[-1][1]
        best_e, best = min(tl, key=lambda x: x[1])
        if last > first:
            out.append(
                Finding(
                    "error",
                    "run.diverged",
                    f"train loss ended above where it started ({last:.4g} > {first:.4g})",
                    {"first": first, "last": last, "best": best, "best_epoch": best_e},
                    "lower lr (e.g. ÷3), check the data pipeline, resume from the best checkpoint",
                )
            )
        elif last > DIVERGE_FACTOR * best and last - best > DIVERGE_MIN_DELTA:
            out.append(
                Finding(
                    "warning",
                    "run.diverging",
                    f"train loss rose to {last:.4g}, {last / best:.1f}× its best {best:.4g} (epoch {best_e})",
                    {"best": best, "best_epoch": best_e, "last": last},
                    "lower lr or min_lr; if the rise follows a warm restart, a smaller base lr tames it",
                )
            )

        # Plateau: no progress over the recent window while the model is still not good.
        window = max(PLATEAU_MIN_EPOCHS, len(tl) // 4)
        if len(tl) > window:
            before = min(t for _, t in tl[:-window])
            within = min(t for _, t in tl[-window:])
            improvement = (before - within) / before if before > 0 else 0.0
            last_acc = next((a for a in reversed(acc) if a is not None and math.isfinite(a)), None)
            still_bad = last_acc < PLATEAU_ACC_OK if last_acc is not None else within > 0.1
            if improvement < PLATEAU_MIN_IMPROVEMENT and still_bad:
                out.append(
                    Finding(
                        "warning",
                        "run.plateau",
                        f"train loss improved {improvement:.1%} over the last {window} epochs "
                        f"(val token acc {last_acc if last_acc is not None else 'n/a'})",
                        {
                            "window": window,
                            "best_before": before,
                            "best_within": within,
                            "val_token_acc": last_acc,
                        },
                        "raise lr or model size, check the data for contradictions, or stop: more epochs won't help",
                    )
                )

    # Grad-norm spikes (per-epoch means, so a spike here is a big one).
    g = [(e, x) for e, x in zip(ep, gnorm, strict=True) if x is not None]
    gbad = [e for e, x in g if not math.isfinite(x)]
    gf = [(e, x) for e, x in g if math.isfinite(x)]
    if gbad:
        out.append(
            Finding(
                "error",
                "run.nonfinite_grad",
                f"non-finite grad norm in epochs {gbad[:10]}",
                {"epochs": gbad},
                "see run.nonfinite_loss: lower lr, clip, avoid fp16",
            )
        )
    if len(gf) >= 5:
        med = statistics.median(x for _, x in gf)
        spikes = [[e, x] for e, x in gf if med > 0 and x > GRAD_SPIKE_FACTOR * med]
        if spikes:
            out.append(
                Finding(
                    "warning",
                    "run.grad_spikes",
                    f"{len(spikes)} epochs had a grad norm over {GRAD_SPIKE_FACTOR:.0f}× the median {med:.3g}",
                    {"median": med, "spikes": spikes[:10]},
                    "lower lr, keep clip_grad_norm at 1.0, enable DBC-DAC, look for outlier pairs in the data",
                )
            )

    # Overfitting: val loss rises from its best while the train loss keeps falling.
    vl = [(i, v) for i, v in enumerate(val) if v is not None and math.isfinite(v)]
    if len(vl) >= 3:
        bi, bv = min(vl, key=lambda x: x[1])
        li, lv = vl[-1]
        t_at_best, t_last = train[bi], train[li]
        if (
            lv > OVERFIT_FACTOR * bv
            and li > bi
            and t_at_best is not None
            and t_last is not None
            and math.isfinite(t_at_best)
            and math.isfinite(t_last)
            and t_last < t_at_best
        ):
            out.append(
                Finding(
                    "warning",
                    "run.overfitting",
                    f"val loss rose to {lv:.4g} from its best {bv:.4g} (epoch {ep[bi]}) while train loss fell "
                    f"to {t_last:.4g}",
                    {
                        "best_val": bv,
                        "best_epoch": ep[bi],
                        "last_val": lv,
                        "train_at_best": t_at_best,
                        "train_last": t_last,
                    },
                    f"use the checkpoint nearest epoch {ep[bi]}, add data or dropout, or stop earlier",
                )
            )

    out += _check_schedule(report, epochs)

    missing = [
        c.get("path")
        for c in report.get("checkpoints") or []
        if isinstance(c, dict) and c.get("path") and not Path(c["path"]).exists()
    ]
    if missing:
        out.append(
            Finding(
                "warning",
                "run.missing_checkpoints",
                f"{len(missing)} listed checkpoints are gone",
                {"paths": missing[:10]},
                "resume and verification need them: restore or re-train",
            )
        )
    return out


def _check_schedule(report: dict[str, Any], epochs: list[dict[str, Any]]) -> list[Finding]:
    sched = report.get("schedule") or {}
    tcfg = (report.get("config") or {}).get("train") or {}
    if sched.get("kind") != "cosine_warm_restarts" or not epochs:
        return []
    try:
        base = float(tcfg.get("lr", sched.get("base_lr")))
        min_lr = float(tcfg.get("min_lr", sched.get("min_lr")))
        t0 = int(tcfg.get("t0", sched.get("t0")))
        t_mult = int(tcfg.get("t_mult", sched.get("t_mult")))
        warmup = int(tcfg.get("warmup_steps", sched.get("warmup_steps", 0)) or 0)
    except (TypeError, ValueError):
        return [
            Finding(
                "warning",
                "run.lr_schedule",
                "the report lacks the schedule's settings (lr, min_lr, t0, t_mult)",
                {"schedule": sched},
                "",
            )
        ]
    out: list[Finding] = []
    declared = {
        "base_lr": sched.get("base_lr"),
        "min_lr": sched.get("min_lr"),
        "t0": sched.get("t0"),
        "t_mult": sched.get("t_mult"),
    }
    configured = {"base_lr": base, "min_lr": min_lr, "t0": t0, "t_mult": t_mult}
    differs = {
        k: [declared[k], configured[k]]
        for k in declared
        if declared[k] is not None
        and not math.isclose(float(declared[k]), float(configured[k]), rel_tol=1e-9)
    }
    if differs:
        out.append(
            Finding(
                "warning",
                "run.lr_schedule",
                "the schedule block disagrees with the training config",
                {"schedule_vs_config": differs},
                "the trainer must build its scheduler from TrainConfig",
            )
        )
    stepping = sched.get("stepping")
    spe = sched.get("steps_per_epoch") or (report.get("runtime") or {}).get("steps_per_epoch")
    mismatches = []
    for row in epochs:
        lr, gs = _num(row.get("lr")), row.get("global_step")
        if lr is None or not isinstance(gs, int) or gs < 1:
            continue
        if stepping == "per_step" and isinstance(spe, int) and spe > 0:
            exp = expected_lr(
                gs - 1,
                base_lr=base,
                min_lr=min_lr,
                t0=t0,
                t_mult=t_mult,
                steps_per_epoch=spe,
                warmup_steps=warmup,
            )
        elif stepping == "per_epoch":
            exp = expected_lr(
                int(row.get("epoch", 1)) - 1,
                base_lr=base,
                min_lr=min_lr,
                t0=t0,
                t_mult=t_mult,
                steps_per_epoch=1,
            )
        else:
            return [
                *out,
                Finding("info", "run.lr_schedule", f"stepping {stepping!r}: LR not recomputed", {}, ""),
            ]
        if not (math.isfinite(lr) and math.isclose(lr, exp, rel_tol=LR_RTOL, abs_tol=1e-12)):
            mismatches.append({"epoch": row.get("epoch"), "lr": lr, "expected": exp})
    if mismatches:
        out.append(
            Finding(
                "warning",
                "run.lr_schedule",
                f"learning rate differs from the configured cosine warm restarts in {len(mismatches)} of "
                f"{len(epochs)} epochs",
                {"mismatches": mismatches[:10], "t0": t0, "t_mult": t_mult, "lr": base, "min_lr": min_lr},
                "the scheduler must be stepped with global_step / steps_per_epoch before each optimizer step "
                "and restored on resume",
            )
        )
    from apt_model.training.schedule import restart_epochs

    planned = int(tcfg.get("epochs", len(epochs)) or len(epochs))
    want = restart_epochs(t0, t_mult, planned)
    got = sched.get("restart_epochs")
    if isinstance(got, list) and got != want:
        out.append(
            Finding(
                "warning",
                "run.lr_restarts",
                f"restart epochs {got} != {want} for T_0={t0}, T_mult={t_mult}",
                {"reported": got, "expected": want},
                "fix the schedule description in the report",
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------- verification
def check_verification(ver: dict[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    overall = ver.get("overall") or {}
    modules = ver.get("modules") or {}
    c = ver.get("collapse") or {}
    if c.get("collapsed"):
        out.append(
            Finding(
                "error",
                "verify.collapse",
                f"mode collapse: the model answers {c.get('answer')!r} to {c.get('share', 0):.0%} of prompts "
                f"({c.get('count')} of {c.get('n')}), wrong for {c.get('wrong_share', 0):.0%} of them",
                {k: c.get(k) for k in ("answer", "count", "n", "share", "wrong_share", "rule", "top")},
                (
                    "the empty answer means EOS comes first: the model has not learned the answers yet; "
                    if c.get("answer") == ""
                    else ""
                )
                + "the model learned the answer prior, not the questions: train longer or at a lower lr, check that "
                "the encoder sees the input (source padding/masks), and balance the modules",
            )
        )
    for name, m in (c.get("modules") or {}).items():
        if c.get("collapsed") and m.get("answer") == c.get("answer"):
            continue  # already said by the overall collapse
        out.append(
            Finding(
                "warning",
                "verify.module_collapse",
                f"module {name}: answer {m.get('answer')!r} for {m.get('share', 0):.0%} of its prompts",
                {"module": name, **m},
                f"more or more varied {name} training pairs; train longer",
            )
        )
    gate = ver.get("gate") or {}
    if gate.get("missed"):
        out.append(
            Finding(
                "warning",
                "verify.gate",
                "verification gate missed: "
                + ", ".join(f"{m['key']} {m['actual']:.1%} < {m['required']:.1%}" for m in gate["missed"]),
                {"missed": gate["missed"]},
                "train longer or on more data before promoting this model",
            )
        )
    n = overall.get("n") or 0
    exact, sub = overall.get("exact"), overall.get("substring")
    if (
        isinstance(exact, int | float)
        and isinstance(sub, int | float)
        and n >= 20
        and sub - exact >= RUN_ON_GAP
    ):
        out.append(
            Finding(
                "warning",
                "verify.run_on",
                f"answers contain the expected text but add more: substring {sub:.1%} vs exact {exact:.1%}",
                {"exact": exact, "substring": sub, "n": n},
                "the model has not learned to stop: check that targets end with [EOS] and train longer",
            )
        )
    scored = [
        (k, v.get("exact"))
        for k, v in modules.items()
        if isinstance(v, dict) and isinstance(v.get("exact"), int | float)
    ]
    if scored:
        name, worst = min(scored, key=lambda kv: kv[1])
        out.append(
            Finding(
                "info",
                "verify.summary",
                f"exact match {_pct(exact)} overall on {n} pairs; weakest module {name} ({worst:.1%})",
                {"overall": overall, "per_module_exact": dict(scored)},
                f"add training pairs or epochs aimed at {name}" if worst < 1.0 else "",
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------- entry
def diagnose(
    run_dir: str | Path | None = None,
    dataset: str | Path | None = None,
    model: str | Path | None = None,
    verification: str | Path | None = None,
    *,
    environment: bool = True,
    stale_after: float = STALE_AFTER_S,
) -> list[Finding]:
    """Run every check that the given inputs allow; errors first. Raises ``AptError`` for paths that do not exist.

    From a run folder it also takes the dataset (the report's ``dataset.path``), the model (``final_model``) and
    ``verification_report.json`` when those exist and were not given explicitly.
    """
    run = Path(run_dir) if run_dir is not None else None
    if run is not None and not run.is_dir():
        raise ConfigError(f"--run {run}: not a directory")
    if run is not None and not (run / REPORT_FILE).is_file():
        raise ConfigError(f"--run {run}: no {REPORT_FILE} in it (is it a training output folder?)")
    if dataset is not None and not Path(dataset).is_file():
        raise DataError(f"--dataset {dataset}: file not found")
    if model is not None and not Path(model).exists():
        raise CheckpointError(f"--model {model}: not found")
    if verification is not None and not Path(verification).exists():
        raise ConfigError(f"--verification {verification}: not found")

    findings: list[Finding] = check_environment() if environment else []
    report = read_experiment_report(run) if run is not None else None

    # Inferred inputs.
    dataset_from_run = False
    if dataset is None and report is not None:
        dpath = (report.get("dataset") or {}).get("path")
        if dpath and Path(dpath).is_file():
            dataset, dataset_from_run = Path(dpath), True
        elif dpath:
            findings.append(
                Finding(
                    "warning",
                    "data.missing",
                    f"the run's dataset {dpath} is gone; data not checked",
                    {"path": dpath},
                    "pass --dataset FILE",
                )
            )
    if model is None and run is not None:
        from apt_model.checkpoint import FINAL_CHECKPOINT, FINAL_EXPORT

        if (run / FINAL_EXPORT).is_dir() or (run / FINAL_CHECKPOINT).is_file():
            model = run
    if verification is None and run is not None and (run / VERIFICATION_FILE).is_file():
        verification = run / VERIFICATION_FILE

    loaded = None
    if model is not None:
        ck_findings, loaded = check_checkpoint(model)
        findings += ck_findings

    if dataset is not None:
        from apt_model.data import load_dataset

        try:
            data = load_dataset(dataset)
        except AptError as exc:
            if not dataset_from_run:
                raise
            findings.append(
                Finding("error", "data.load", f"the run's dataset cannot be loaded: {exc}", {}, "")
            )
            data = None
        if data is not None:
            tok = loaded.tokenizer if loaded is not None else None
            max_len = loaded.config.max_len if loaded is not None else None
            findings += check_dataset(data, tok, max_len)
            want = (report or {}).get("dataset", {}).get("sha256") if report else None
            if want and data.sha256 and want != data.sha256:
                findings.append(
                    Finding(
                        "warning",
                        "data.changed",
                        "the dataset file differs from the one the run trained on",
                        {"trained_sha256": want, "file_sha256": data.sha256, "path": str(dataset)},
                        "verify against the exact training file, or retrain",
                    )
                )

    if report is not None:
        findings += check_run(report, path=str(run / REPORT_FILE), stale_after=stale_after)

    if verification is not None:
        from apt_model.verify import load_report

        findings += check_verification(load_report(verification))

    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: order[f.severity])


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def findings_to_json(findings: list[Finding]) -> dict[str, Any]:
    counts = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
    return {"counts": counts, "ok": counts["error"] == 0, "findings": [f.to_dict() for f in findings]}


def _pct(x: Any) -> str:
    return format(x, ".1%") if isinstance(x, int | float) else "n/a"


def _short(obj: Any, limit: int = 240) -> str:
    s = json.dumps(obj, ensure_ascii=False, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def format_findings(findings: list[Finding], *, verbose: bool = True) -> str:
    """Readable text: one block per finding, errors first, then a count line."""
    lines = []
    for f in findings:
        lines.append(f"{f.severity.upper():<8}{f.check}: {f.message}")
        if verbose and f.evidence and f.severity != "info":
            lines.append(f"{'':8}evidence: {_short(f.evidence)}")
        if f.fix and f.severity != "info":
            lines.append(f"{'':8}fix: {f.fix}")
    c = findings_to_json(findings)["counts"]
    lines.append(f"{c['error']} error(s), {c['warning']} warning(s), {c['info']} info")
    return "\n".join(lines) + "\n"
