"""The APT model as a ``transformers`` model: ``APTConfig`` + ``APTForConditionalGeneration``.

``APTForConditionalGeneration`` holds the native :class:`apt_model.model.APTModel` as ``self.model``; it adds no
parameters, so its state dict is the native one with every key prefixed by ``model.`` (``base_model_prefix``).
:func:`native_to_hf_state` / :func:`hf_to_native_state` convert between the two key sets losslessly.

Generation: the decoder self-attention has no KV cache — the autopoietic statistics span the whole decoder
prefix, so every step re-runs the decoder over the full prefix (``use_cache`` is off); the encoder runs once and
its output (with the source padding mask) is reused through ``encoder_outputs``. Greedy ``generate()`` returns
``[decoder_start (BOS)] + tokens`` — the native :meth:`APTModel.generate` tokens with BOS in front.

Padding is derived from ``pad_id`` inside the model (as natively): ``attention_mask`` / ``decoder_attention_mask``
are accepted for API compatibility and must agree with ``input_ids != pad_id`` (the tokenizer's masks do).

Registration with the Auto classes happens on ``import apt_model.hf`` (see ``apt_model/hf/__init__.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from apt_model.config import ModelConfig
from apt_model.errors import ConfigError
from apt_model.model import APTModel
from apt_model.tokenizer import BOS_ID, EOS_ID

__all__ = [
    "MODEL_TYPE",
    "APTConfig",
    "APTEncoderOutput",
    "APTForConditionalGeneration",
    "hf_to_native_state",
    "native_to_hf_state",
]

MODEL_TYPE = "apt"
PREFIX = "model."
# Keys of a native export's config.json that are not ModelConfig fields (apt_model.checkpoint writes them).
NATIVE_FORMAT_KEYS = ("format", "format_version")
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class APTConfig(PreTrainedConfig):
    """Every :class:`ModelConfig` field (same names and defaults) plus the token ids ``generate`` needs.

    Accepts a native export's ``config.json`` as is (``format``/``format_version`` are dropped), and validates
    through ``ModelConfig`` so a bad value is a ``ConfigError`` naming the field.
    """

    model_type = MODEL_TYPE
    attribute_map = {  # noqa: RUF012 - the transformers convention for aliases
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_encoder_layers",
        "max_position_embeddings": "max_len",
    }

    vocab_size: int = 30522
    d_model: int = 768
    n_encoder_layers: int = 12
    n_decoder_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    dropout: float = 0.1
    eps: float = 1e-6
    alpha: float = 0.1
    init_tau: float = 1.0
    sr_ratio: int = 4
    use_autopoietic: bool = True
    max_len: int = 512
    pad_id: int = 0
    embedding_init_std: float = 0.02
    # The AptTokenizer's fixed ids.
    pad_token_id: int | None = None
    bos_token_id: int | None = BOS_ID
    eos_token_id: int | None = EOS_ID
    decoder_start_token_id: int | None = BOS_ID
    is_encoder_decoder: bool = True
    use_cache: bool = False
    tie_word_embeddings: bool = False  # the output projection *is* the embedding inside APTModel

    def __post_init__(self, **kwargs: Any) -> None:
        for key in NATIVE_FORMAT_KEYS:
            kwargs.pop(key, None)
        self.pad_token_id = self.pad_id
        self.use_cache = False  # no decoder KV cache: see the module docstring
        self.to_model_config()  # validation
        super().__post_init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({name: getattr(self, name) for name in MODEL_FIELDS})

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> APTConfig:
        return cls(**config.to_dict(), **kwargs)


@dataclass
class APTEncoderOutput(BaseModelOutput):
    """The encoder output plus the source padding mask (``True`` at padding) the decoder needs."""

    padding_mask: Tensor | None = None


class _Encoder(torch.nn.Module):
    """``get_encoder()``: runs ``APTModel.encode`` once for ``generate``. Holds no parameters of its own."""

    def __init__(self, owner: APTForConditionalGeneration) -> None:
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> APTEncoderOutput:
        memory, pad = self._owner[0].model.encode(input_ids)
        return APTEncoderOutput(last_hidden_state=memory, padding_mask=pad)


class APTPreTrainedModel(PreTrainedModel):
    config_class = APTConfig
    config: APTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["EncoderLayer", "DecoderLayer"]  # noqa: RUF012

    def _init_weights(self, module: torch.nn.Module) -> None:
        # The native modules initialise themselves in their constructors (the spec's init, incl. the zero
        # padding row and tau); transformers' generic init would overwrite that. Only what from_pretrained
        # materialises empty needs values here: the sinusoidal position table (a non-persistent buffer).
        if isinstance(module, APTModel):
            from apt_model.model.apt import sinusoidal_positions

            table = sinusoidal_positions(module.config.max_len, module.config.d_model)
            with torch.no_grad():
                module.pos_encoding.copy_(table.to(module.pos_encoding.device))


class APTForConditionalGeneration(APTPreTrainedModel, GenerationMixin):
    """The native ``APTModel`` behind the ``transformers`` seq2seq interface (``forward``, ``generate``)."""

    def __init__(self, config: APTConfig) -> None:
        super().__init__(config)
        self.model = APTModel(config.to_model_config())
        self._encoder = _Encoder(self)
        self.post_init()

    @property
    def native(self) -> APTModel:
        return self.model

    # -- transformers plumbing -------------------------------------------------------------------------------
    def get_encoder(self, modality: str | None = None) -> torch.nn.Module:
        return self._encoder

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embedding

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embedding = value  # type: ignore[assignment]

    def get_output_embeddings(self) -> None:
        return None  # the projection is the input embedding itself (F.linear on it), not a module

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _shift_right(self, labels: Tensor) -> Tensor:
        """``[BOS] + labels[:-1]`` with ignored positions (-100) turned into padding."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id or BOS_ID)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_id)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        encoder_outputs: APTEncoderOutput | BaseModelOutput | tuple[Tensor, ...] | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        """Logits ``[B, Lt, V]`` for ``decoder_input_ids`` (or ``labels`` shifted right); the loss is the mean CE
        over targets that are neither ``-100`` nor padding (the native objective's reduction)."""
        if decoder_input_ids is None:
            if labels is None:
                raise ConfigError("APTForConditionalGeneration.forward needs decoder_input_ids or labels")
            decoder_input_ids = self._shift_right(labels)
        if encoder_outputs is None:
            if input_ids is None:
                raise ConfigError("APTForConditionalGeneration.forward needs input_ids or encoder_outputs")
            memory, src_pad = self.model.encode(input_ids)
        else:
            memory = encoder_outputs[0]
            src_pad = getattr(encoder_outputs, "padding_mask", None)
            if src_pad is None:
                if input_ids is not None:
                    src_pad = input_ids == self.config.pad_id
                elif attention_mask is not None:
                    src_pad = attention_mask == 0
                else:
                    raise ConfigError(
                        "encoder_outputs without a padding mask need input_ids or attention_mask"
                    )
        logits = self.model.decode(decoder_input_ids, memory, src_pad)
        loss = None
        if labels is not None:
            target = labels.masked_fill(labels == self.config.pad_id, -100).reshape(-1)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target, ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=memory)

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        encoder_outputs: APTEncoderOutput | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # The whole decoder prefix every step (no cache): the autopoietic statistics span all of it.
        return {
            "decoder_input_ids": input_ids,
            "encoder_outputs": encoder_outputs,
            "attention_mask": attention_mask,
        }

    def native_generate(self, input_ids: Tensor, *, max_new_tokens: int) -> Tensor:
        """The native greedy decoder (``APTModel.generate``): tokens after BOS, padded after EOS."""
        return self.model.generate(
            input_ids,
            max_new_tokens=max_new_tokens,
            bos_id=int(self.config.bos_token_id if self.config.bos_token_id is not None else BOS_ID),
            eos_id=int(self.config.eos_token_id if self.config.eos_token_id is not None else EOS_ID),
        )

    @classmethod
    def from_native(cls, model: APTModel) -> APTForConditionalGeneration:
        """Wrap a native model (shares its parameters; nothing is copied)."""
        native = getattr(model, "_orig_mod", model)
        hf = cls(APTConfig.from_model_config(native.config))
        hf.model = native
        hf.generation_config = default_generation_config(hf.config)
        return hf


def default_generation_config(config: APTConfig) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        use_cache=False,
    )


def native_to_hf_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Native ``APTModel`` state dict → ``APTForConditionalGeneration`` keys (``model.`` prefix)."""
    return {PREFIX + k: v for k, v in state.items()}


def hf_to_native_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``APTForConditionalGeneration`` state dict → native keys; refuses keys outside ``model.``."""
    foreign = sorted(k for k in state if not k.startswith(PREFIX))
    if foreign:
        raise ConfigError(f"not an APTForConditionalGeneration state dict (unexpected key {foreign[0]!r})")
    return {k[len(PREFIX) :]: v for k, v in state.items()}
