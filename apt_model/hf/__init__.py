"""APT models in the Hugging Face ecosystem.

``import apt_model.hf`` registers the model with the Auto classes (no ``trust_remote_code``)::

    import apt_model.hf  # noqa: F401  — registers model_type "apt"
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained("hlbd_huggingface/final_model")
    tok = AutoTokenizer.from_pretrained("hlbd_huggingface/final_model")
    ids = tok(["3 + 4 = ?"], return_tensors="pt").input_ids
    print(tok.batch_decode(model.generate(ids, max_new_tokens=16), skip_special_tokens=True))

The directory format written by :func:`save_hf` (and by the ``huggingface`` backend's ``final_model/``):

* ``config.json`` — an ``APTConfig`` (``model_type: "apt"``): every ``ModelConfig`` field under its native
  name, the token ids ``generate`` needs, the ``transformers`` bookkeeping keys, and ``format: "apt-export"``;
* ``model.safetensors`` — the weights under the **native** ``APTModel`` key names (``embedding.weight``, ...):
  ``from_pretrained`` adds the ``model.`` prefix itself (``base_model_prefix``), and the file is byte-for-byte
  the kind :func:`apt_model.checkpoint.export_pretrained` writes;
* ``generation_config.json``; ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``;
* ``train_config.json`` / ``data_config.json`` when given.

:func:`convert_export` turns anything :func:`apt_model.checkpoint.load_model` reads (a Playground/DeepSpeed
export directory, a ``.pt`` checkpoint, a run directory) into that format. ``APTConfig`` also reads a native
export's ``config.json`` directly, so ``APTForConditionalGeneration.from_pretrained(native_export_dir)`` works
without conversion (only the Auto classes need ``model_type``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerFast

from apt_model.checkpoint import CONFIG_JSON, EXPORT_FORMAT, FORMAT_VERSION, WEIGHTS_FILE, load_model
from apt_model.config import ModelConfig
from apt_model.errors import CheckpointError
from apt_model.hf.modeling import (
    MODEL_TYPE,
    APTConfig,
    APTForConditionalGeneration,
    default_generation_config,
    hf_to_native_state,
    native_to_hf_state,
)
from apt_model.hf.tokenization import TOKENIZER_FILES, save_tokenizer
from apt_model.io import atomic_dir, dumps_json

if TYPE_CHECKING:
    import torch

    from apt_model.tokenizer import AptTokenizer

__all__ = [
    "MODEL_TYPE",
    "APTConfig",
    "APTForConditionalGeneration",
    "convert_export",
    "hf_config_dict",
    "hf_to_native_state",
    "native_to_hf_state",
    "register",
    "save_hf",
]

GENERATION_CONFIG = "generation_config.json"


def register() -> None:
    """Register ``model_type "apt"`` with AutoConfig / AutoModelForSeq2SeqLM / AutoTokenizer (idempotent)."""
    AutoConfig.register(MODEL_TYPE, APTConfig, exist_ok=True)
    AutoModelForSeq2SeqLM.register(APTConfig, APTForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(APTConfig, fast_tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)


register()


def hf_config_dict(model_config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` of the shared format: the transformers config plus the native export markers."""
    config = APTConfig.from_model_config(model_config)
    config.architectures = [APTForConditionalGeneration.__name__]
    data = config.to_diff_dict()
    # Every ModelConfig field explicitly, defaults included, so a native reader never depends on defaults.
    data.update(model_config.to_dict())
    data.update({"format": EXPORT_FORMAT, "format_version": FORMAT_VERSION})
    return data


def save_hf(
    directory: str | Path,
    model: torch.nn.Module,
    model_config: ModelConfig,
    tokenizer: AptTokenizer,
    *,
    extra_configs: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write a directory that ``AutoModelForSeq2SeqLM`` / ``AutoTokenizer.from_pretrained`` load (see the module
    docstring), replacing ``directory`` as a whole. ``model`` is a native ``APTModel`` or an
    ``APTForConditionalGeneration``."""
    from safetensors.torch import save_file

    native = model.model if isinstance(model, APTForConditionalGeneration) else model
    native = getattr(native, "_orig_mod", native)
    if tokenizer.vocab_size != model_config.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer vocabulary has {tokenizer.vocab_size} tokens but the model config "
            f"vocab_size is {model_config.vocab_size}"
        )
    target = Path(directory)
    with atomic_dir(target) as tmp:
        (tmp / CONFIG_JSON).write_text(dumps_json(hf_config_dict(model_config)), encoding="utf-8")
        gen = default_generation_config(APTConfig.from_model_config(model_config))
        (tmp / GENERATION_CONFIG).write_text(gen.to_json_string(use_diff=True), encoding="utf-8")
        # Contiguous copies: under DeepSpeed ZeRO the parameters are views into flat buffers, which safetensors
        # refuses. The native state dict holds no tied duplicates (the projection reuses the embedding).
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in native.state_dict().items()}
        save_file(
            state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"}
        )  # "pt": what transformers expects
        save_tokenizer(tmp, tokenizer, model_max_length=model_config.max_len)
        for name, data in (extra_configs or {}).items():
            (tmp / f"{name}.json").write_text(dumps_json(data), encoding="utf-8")
    return target


def convert_export(source: str | Path, out_dir: str | Path) -> Path:
    """Convert what ``load_model`` reads (native export dir, ``.pt`` checkpoint, run dir) into ``out_dir``."""
    import json

    if Path(out_dir).resolve() == Path(source).resolve():
        raise CheckpointError(f"{out_dir}: the output directory must differ from the source")
    loaded = load_model(source)
    extra: dict[str, dict[str, Any]] = {}
    if loaded.checkpoint is not None:
        for key in ("train_config", "data_config"):
            if isinstance(loaded.checkpoint.get(key), dict):
                extra[key] = loaded.checkpoint[key]
    else:
        for key in ("train_config", "data_config"):
            p = loaded.source / f"{key}.json"
            if p.is_file():
                try:
                    extra[key] = json.loads(p.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise CheckpointError(f"{p}: cannot read ({exc.__class__.__name__})") from None
    if Path(out_dir).resolve() == Path(loaded.source).resolve():
        raise CheckpointError(f"{out_dir}: the output directory must differ from the source")
    return save_hf(out_dir, loaded.model, loaded.config, loaded.tokenizer, extra_configs=extra)


def exported_files() -> tuple[str, ...]:
    """The files :func:`save_hf` always writes."""
    return (CONFIG_JSON, GENERATION_CONFIG, WEIGHTS_FILE, *TOKENIZER_FILES)
