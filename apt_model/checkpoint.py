"""Checkpoints (resume) and exports (ship) of APT models.

Two on-disk forms:

* **Checkpoint** — one ``.pt`` file written by ``torch.save`` of a dict that holds only tensors and JSON-like
  primitives (dict / list / tuple / str / int / float / bool / None), so that it loads with
  ``torch.load(weights_only=True)``: loading never runs code from the file. Keys (``format_version`` 1):
  ``format_version, model_config, train_config, data_config, tokenizer_json, model_state, optimizer_state,
  scheduler_state, scaler_state, epoch, global_step, rng, history, dataset_sha256`` (``data_config`` and the
  training-state keys may be absent in a weights-only checkpoint; ``model_config``, ``tokenizer_json`` and
  ``model_state`` are required).
* **Export** — a directory with ``config.json`` (the model config plus ``format``/``format_version``),
  ``model.safetensors`` (weights; tied tensors stored once), ``tokenizer.json`` (Hugging Face ``tokenizers``
  format) and, when given, ``train_config.json`` / ``data_config.json``. Written as a whole through
  ``apt_model.io.atomic_dir``.

``load_model`` accepts either form, or a run directory (it picks ``final_model/`` and then ``final_model.pt``),
and checks that the tokenizer's vocabulary size equals the model config's ``vocab_size``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apt_model.config import ModelConfig
from apt_model.errors import CheckpointError, ConfigError
from apt_model.io import atomic_dir, atomic_path, dumps_json

if TYPE_CHECKING:
    import torch

    from apt_model.tokenizer import AptTokenizer

FORMAT_VERSION = 1
EXPORT_FORMAT = "apt-export"
REQUIRED_KEYS = ("model_config", "tokenizer_json", "model_state")
CONFIG_JSON = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_JSON = "tokenizer.json"
FINAL_CHECKPOINT = "final_model.pt"
FINAL_EXPORT = "final_model"


def _check_safe(obj: Any, where: str) -> None:
    """Refuse to write anything ``torch.load(weights_only=True)`` could not read back (a programming error)."""
    import torch

    if obj is None or isinstance(obj, str | bool | int | float | torch.Tensor | torch.dtype | torch.Size):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise TypeError(f"checkpoint {where}: key {key!r} is not a str/int")
            _check_safe(value, f"{where}.{key}")
        return
    if isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            _check_safe(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint {where}: {type(obj).__name__} cannot be stored (tensors and primitives only)"
    )


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` ``state`` (tensors and primitives only) to ``path``; returns the path."""
    import torch

    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise TypeError(f"checkpoint state lacks {', '.join(missing)}")
    state = {"format_version": FORMAT_VERSION, **state}
    _check_safe(state, "state")
    target = Path(path)
    with atomic_path(target) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:
            # torch's writer reports a short write (full disk, quota) as "unexpected pos N vs M": say what it is.
            if "unexpected pos" not in str(exc):
                raise
            full = shutil.disk_usage(tmp.parent).free < (64 << 20)
            code = errno.ENOSPC if full else errno.EIO
            raise OSError(
                code, f"{os.strerror(code)} (short write while saving the checkpoint)", str(target)
            ) from exc
    return target


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; never unpickles arbitrary objects.

    ``mmap``: map the file instead of reading it, so only the tensors used are read from disk (the model weights
    are a third of a checkpoint that also holds Adam's two moments).

    Raises ``CheckpointError`` (one line naming the file) for a missing, unreadable, foreign or unsafe file.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # any unpickling failure, including a refused global
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(
            f"{p}: not a loadable APT checkpoint (refused by the safe loader: {first[:200]})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{p}: not an APT checkpoint (top level is {type(state).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{p}: not an APT checkpoint (missing {', '.join(missing)})")
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format_version {version!r} is not supported (<= {FORMAT_VERSION})"
        )
    return state


def checkpoint_model_config(state: dict[str, Any], source: str | Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(state["model_config"])
    except ConfigError as exc:
        raise CheckpointError(f"{source}: bad model_config ({exc})") from None


def _tokenizer_from_json(text: Any, source: str | Path) -> AptTokenizer:
    from apt_model.tokenizer import AptTokenizer

    if not isinstance(text, str):
        raise CheckpointError(f"{source}: tokenizer is missing or not a JSON string")
    try:
        return AptTokenizer.from_json(text)
    except Exception as exc:
        raise CheckpointError(
            f"{source}: tokenizer cannot be loaded ({exc.__class__.__name__}: {exc})"
        ) from None


def _check_vocab(config: ModelConfig, tokenizer: AptTokenizer, source: str | Path) -> None:
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{source}: tokenizer vocabulary has {tokenizer.vocab_size} tokens but the model config "
            f"vocab_size is {config.vocab_size}"
        )


def export_pretrained(
    directory: str | Path,
    model: torch.nn.Module,
    model_config: ModelConfig,
    tokenizer: AptTokenizer,
    *,
    extra_configs: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` + ``tokenizer.json`` (+ ``{name}.json`` for each extra
    config, e.g. ``train_config``) into ``directory``, replacing it as a whole."""
    from safetensors.torch import save_model

    _check_vocab(model_config, tokenizer, directory)
    target = Path(directory)
    with atomic_dir(target) as tmp:
        config = {**model_config.to_dict(), "format": EXPORT_FORMAT, "format_version": FORMAT_VERSION}
        (tmp / CONFIG_JSON).write_text(dumps_json(config), encoding="utf-8")
        # save_model (not save_file): the output projection is tied to the embedding, and safetensors
        # refuses shared storage unless the duplicates are dropped, which save_model does.
        save_model(_unwrap(model), str(tmp / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
        (tmp / TOKENIZER_JSON).write_text(tokenizer.to_json(), encoding="utf-8")
        for name, data in (extra_configs or {}).items():
            (tmp / f"{name}.json").write_text(dumps_json(data), encoding="utf-8")
    return target


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameters are saved: a ``torch.compile`` wrapper keeps it as ``_orig_mod``."""
    return getattr(model, "_orig_mod", model)


@dataclass
class LoadedModel:
    model: Any  # APTModel, in eval mode
    tokenizer: Any  # AptTokenizer
    config: ModelConfig
    source: Path  # the file or export directory actually read
    checkpoint: dict[str, Any] | None = None  # the full checkpoint dict when loaded from a .pt file


def resolve_model_path(path: str | Path) -> Path:
    """A ``.pt`` file or an export directory; a run directory resolves to its final export / checkpoint."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / CONFIG_JSON).is_file():
            return p
        if (p / FINAL_EXPORT / CONFIG_JSON).is_file():
            return p / FINAL_EXPORT
        if (p / FINAL_CHECKPOINT).is_file():
            return p / FINAL_CHECKPOINT
        raise CheckpointError(
            f"{p}: no model found (expected {CONFIG_JSON}, {FINAL_EXPORT}/ or {FINAL_CHECKPOINT} in the directory)"
        )
    raise CheckpointError(f"{p}: model path not found")


def epoch_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """``{N: path}`` of the run's epoch checkpoints, by epoch.

    ``checkpoint_epoch_{N}.pt`` files (Playground) and ``checkpoint_epoch_{N}/`` folders (DeepSpeed, published
    by a rename once every rank has written) both count; temporary files of interrupted writes never match.
    """
    found: dict[int, Path] = {}
    for p in Path(run_dir).glob("checkpoint_epoch_*"):
        suffix = p.name.removeprefix("checkpoint_epoch_")
        if p.is_file() and suffix.endswith(".pt"):
            suffix = suffix[: -len(".pt")]
        elif not p.is_dir():
            continue
        if suffix.isdigit():
            found[int(suffix)] = p
    return dict(sorted(found.items()))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of ``run_dir`` with the highest epoch N (what a retried run resumes from)."""
    found = epoch_checkpoints(run_dir)
    return found[max(found)] if found else None


def load_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Rebuild a model + tokenizer from a checkpoint file, an export directory or a run directory."""
    from apt_model.model import APTModel

    source = resolve_model_path(path)
    if source.is_file():
        state = load_checkpoint(source)
        config = checkpoint_model_config(state, source)
        tokenizer = _tokenizer_from_json(state["tokenizer_json"], source)
        _check_vocab(config, tokenizer, source)
        model = APTModel(config)
        try:
            model.load_state_dict(state["model_state"], strict=True)
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{source}: weights do not fit the model config ({first[:200]})") from None
        checkpoint: dict[str, Any] | None = state
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_model as st_load_model

        try:
            raw = json.loads((source / CONFIG_JSON).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{source / CONFIG_JSON}: cannot read ({exc.__class__.__name__})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source / CONFIG_JSON}: expected a JSON object")
        if raw.get("model_type") == "apt":
            # A transformers-format export (apt_model.hf) carries its keys beside the native ones: keep ours.
            raw = {k: raw[k] for k in (f.name for f in dataclasses.fields(ModelConfig)) if k in raw}
        raw = {k: v for k, v in raw.items() if k not in ("format", "format_version")}
        try:
            config = ModelConfig.from_dict(raw)
        except ConfigError as exc:
            raise CheckpointError(f"{source / CONFIG_JSON}: {exc}") from None
        tok_path = source / TOKENIZER_JSON
        try:
            tok_text = tok_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{tok_path}: cannot read ({exc.__class__.__name__})") from None
        tokenizer = _tokenizer_from_json(tok_text, tok_path)
        _check_vocab(config, tokenizer, source)
        model = APTModel(config)
        weights = source / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{weights}: weights file not found")
        try:
            st_load_model(model, str(weights), strict=True)
        except (RuntimeError, SafetensorError, OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{weights}: weights do not fit the model config ({first[:200]})") from None
        checkpoint = None
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=source, checkpoint=checkpoint)
