"""The APT tokenizer as ``transformers`` loads it: ``AutoTokenizer.from_pretrained(dir)``.

``tokenizer.json`` is :meth:`AptTokenizer.to_json` unchanged (a ``tokenizers`` WordLevel model, character-split,
no post-processor, so no BOS/EOS is added — as natively); ``tokenizer_config.json`` names
``PreTrainedTokenizerFast`` and the special tokens, so the loaded tokenizer pads with ``[PAD]`` (id 0) and knows
``[BOS]``/``[EOS]``/``[UNK]``. Its ``input_ids`` equal ``AptTokenizer.encode`` and its attention mask equals
``ids != pad_id``, which is what the model derives internally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apt_model.io import atomic_write_text, dumps_json
from apt_model.tokenizer import AptTokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)

__all__ = ["TOKENIZER_FILES", "save_tokenizer", "special_tokens", "tokenizer_config"]


def special_tokens(tokenizer: AptTokenizer) -> dict[str, str]:
    return {
        "pad_token": tokenizer.id_to_token(tokenizer.pad_id),
        "unk_token": tokenizer.id_to_token(tokenizer.unk_id),
        "bos_token": tokenizer.id_to_token(tokenizer.bos_id),
        "eos_token": tokenizer.id_to_token(tokenizer.eos_id),
    }


def tokenizer_config(tokenizer: AptTokenizer, *, model_max_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens(tokenizer),
        "model_max_length": int(model_max_length),
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def save_tokenizer(directory: str | Path, tokenizer: AptTokenizer, *, model_max_length: int) -> list[Path]:
    """Write the three tokenizer files into ``directory`` (each atomically); returns their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = {
        TOKENIZER_JSON: tokenizer.to_json(),
        TOKENIZER_CONFIG: dumps_json(tokenizer_config(tokenizer, model_max_length=model_max_length)),
        SPECIAL_TOKENS_MAP: dumps_json(special_tokens(tokenizer)),
    }
    out = []
    for name, text in files.items():
        atomic_write_text(d / name, text)
        out.append(d / name)
    return out
