"""The APT encoder-decoder (spec: ``shared/spec/apt-model.md``, "Architecture").

Token embedding (``padding_idx = config.pad_id``, N(0, ``embedding_init_std``) — 0.02 by default, padding row
zero) + sinusoidal positions (no √d scaling) → dropout; post-LayerNorm encoder layers (self-attention, GELU
feed-forward) and decoder layers (causal self-attention, cross-attention, feed-forward), a final LayerNorm after each
stack; the output projection is the embedding matrix itself (tied, no bias), so the state dict has one copy of it.

Padding is derived inside from ``ids == config.pad_id`` (keys *and* queries of the autopoietic attention
are masked at padding positions, see ``attention.py``). Inputs longer than ``config.max_len`` raise
``ConfigError``.

Properties of the spec's transform that callers should know (they follow from statistics taken over
each batch element's whole ``[Lq, Lk]`` score matrix, masked entries included):

* with ``use_autopoietic=True`` the decoder is *not* strictly causal: tokens after position ``t`` change
  a few per-sequence scalars (mean, norm, quantiles, ...) used at position ``t``. The plain path is causal.
* the padded length of a sequence changes its logits slightly (padding adds ``-10`` entries to the
  statistics), although the *content* at padding positions never does.

Hence :meth:`APTModel.generate` re-runs the decoder on the whole prefix every step (exactly what a loop
over ``forward`` on the growing prefix computes); only the encoder output and the cross-attention key /
value projections are computed once and reused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apt_model.config import ModelConfig
from apt_model.errors import ConfigError, DataError
from apt_model.model.attention import AutopoieticAttention
from apt_model.model.dropout import ScheduledDropout

__all__ = ["APTModel", "DecoderLayer", "EncoderLayer", "sinusoidal_positions"]


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """``[max_len, d_model]``: ``sin(pos / 10000^(2i/d))`` at even, ``cos`` at odd feature indices."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
    return pe.float()


def _attention(config: ModelConfig) -> AutopoieticAttention:
    return AutopoieticAttention(
        config.d_model,
        config.n_heads,
        dropout=config.dropout,
        use_autopoietic=config.use_autopoietic,
        hidden=config.autopoietic_hidden,
        init_tau=config.init_tau,
        eps=config.eps,
    )


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = ScheduledDropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.gelu(self.linear1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = _attention(config)
        self.ff = FeedForward(config.d_model, config.d_ff, config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.eps)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.eps)
        self.dropout = ScheduledDropout(config.dropout)

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        a = self.self_attn(x, key_padding_mask=pad, query_padding_mask=pad)
        x = self.norm1(x + self.dropout(a))
        return self.norm2(x + self.dropout(self.ff(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = _attention(config)
        self.cross_attn = _attention(config)
        self.ff = FeedForward(config.d_model, config.d_ff, config.dropout)
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.eps)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.eps)
        self.norm3 = nn.LayerNorm(config.d_model, eps=config.eps)
        self.dropout = ScheduledDropout(config.dropout)

    def forward(
        self,
        y: Tensor,
        memory: Tensor,
        tgt_pad: Tensor,
        src_pad: Tensor,
        cross_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        a = self.self_attn(y, key_padding_mask=tgt_pad, query_padding_mask=tgt_pad, causal=True)
        y = self.norm1(y + self.dropout(a))
        c = self.cross_attn(y, memory, key_padding_mask=src_pad, query_padding_mask=tgt_pad, kv=cross_kv)
        y = self.norm2(y + self.dropout(c))
        return self.norm3(y + self.dropout(self.ff(y)))


class APTModel(nn.Module):
    """The APT encoder-decoder. ``forward(src_ids [B, Ls], tgt_in_ids [B, Lt]) -> logits [B, Lt, V]``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ConfigError(f"APTModel needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        self.register_buffer(
            "pos_encoding", sinusoidal_positions(config.max_len, config.d_model), persistent=False
        )
        self.dropout = ScheduledDropout(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.encoder_norm = nn.LayerNorm(config.d_model, eps=config.eps)
        self.decoder_norm = nn.LayerNorm(config.d_model, eps=config.eps)
        self.reset_embedding()

    def reset_embedding(self) -> None:
        nn.init.normal_(self.embedding.weight, mean=0.0, std=self.config.embedding_init_std)
        with torch.no_grad():
            self.embedding.weight[self.config.pad_id].zero_()

    @property
    def output_weight(self) -> Tensor:
        """The output projection ``[V, d]`` — the embedding matrix (tied)."""
        return self.embedding.weight

    def _check_ids(self, ids: Tensor, name: str) -> None:
        if ids.dim() != 2:
            raise DataError(f"{name} must be a [batch, length] tensor, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
            raise DataError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        if ids.shape[1] > self.config.max_len:
            raise ConfigError(
                f"{name} has length {ids.shape[1]} > ModelConfig.max_len={self.config.max_len}; "
                "raise max_len or shorten the sequences"
            )
        if ids.shape[1] == 0:
            raise DataError(f"{name} has length 0")

    def _embed(self, ids: Tensor) -> Tensor:
        x = self.embedding(ids)
        # In the parameters' dtype: DeepSpeed's bf16/fp16 modes cast parameters but not this buffer, and a float32
        # sum would then meet bf16 weights in the first projection.
        x = x + self.pos_encoding[: ids.shape[1]].to(x.dtype)
        return self.dropout(x)

    def encode(self, src_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder output ``[B, Ls, d]`` and the source padding mask ``[B, Ls]`` (``True`` at padding)."""
        self._check_ids(src_ids, "src_ids")
        src_pad = src_ids == self.config.pad_id
        x = self._embed(src_ids)
        for layer in self.encoder_layers:
            x = layer(x, src_pad)
        return self.encoder_norm(x), src_pad

    def precompute_cross_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention key/value heads of every decoder layer for ``memory`` (reused while decoding)."""
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder_layers]

    def decode_hidden(
        self,
        tgt_in_ids: Tensor,
        memory: Tensor,
        src_pad_mask: Tensor,
        *,
        cross_kv: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """Decoder output ``[B, Lt, d]`` (after the final LayerNorm), before the output projection."""
        self._check_ids(tgt_in_ids, "tgt_in_ids")
        tgt_pad = tgt_in_ids == self.config.pad_id
        y = self._embed(tgt_in_ids)
        for i, layer in enumerate(self.decoder_layers):
            y = layer(y, memory, tgt_pad, src_pad_mask, None if cross_kv is None else cross_kv[i])
        return self.decoder_norm(y)

    def decode(
        self,
        tgt_in_ids: Tensor,
        memory: Tensor,
        src_pad_mask: Tensor,
        *,
        cross_kv: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """Logits ``[B, Lt, V]`` for the decoder input given the encoder output."""
        h = self.decode_hidden(tgt_in_ids, memory, src_pad_mask, cross_kv=cross_kv)
        return F.linear(h, self.embedding.weight)

    def forward(self, src_ids: Tensor, tgt_in_ids: Tensor) -> Tensor:
        if src_ids.dim() == 2 and tgt_in_ids.dim() == 2 and src_ids.shape[0] != tgt_in_ids.shape[0]:
            raise DataError(
                f"batch sizes differ: src_ids {src_ids.shape[0]}, tgt_in_ids {tgt_in_ids.shape[0]}"
            )
        memory, src_pad = self.encode(src_ids)
        return self.decode(tgt_in_ids, memory, src_pad)

    @torch.no_grad()
    def generate(
        self,
        src_ids: Tensor,
        *,
        max_new_tokens: int,
        bos_id: int,
        eos_id: int,
        tgt_len: int | None = None,
    ) -> Tensor:
        """Greedy batched decoding → ``LongTensor [B, T]`` with ``T <= max_new_tokens``.

        The output starts after BOS (not included) and includes each row's EOS token; positions after a
        row's EOS hold ``pad_id``. Decoding stops as soon as every row has emitted EOS (so ``T`` can be
        shorter than ``max_new_tokens``); a row that never emits EOS has ``max_new_tokens`` tokens.

        Runs in eval mode (dropout off; the previous mode is restored). The encoder runs once and the
        cross-attention K/V projections are cached; the decoder self-attention is recomputed over the
        whole prefix each step, because the autopoietic statistics span all query rows — the result is
        exactly what greedy decoding with ``forward`` on the growing prefix gives.

        ``tgt_len``: run the decoder on the prefix right-padded to this many positions (while the prefix is
        shorter) and read the logits at its last real position. A model trained on batches padded to one shape
        saw every autopoietic statistic over that shape, padding included; this decodes in it.
        """
        cfg = self.config
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer (got {max_new_tokens!r})")
        if max_new_tokens > cfg.max_len:
            raise ConfigError(f"max_new_tokens={max_new_tokens} > ModelConfig.max_len={cfg.max_len}")
        for name, tok in (("bos_id", bos_id), ("eos_id", eos_id)):
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < cfg.vocab_size:
                raise ConfigError(f"{name} must be a token id in [0, {cfg.vocab_size}) (got {tok!r})")
        if tgt_len is not None and (isinstance(tgt_len, bool) or not isinstance(tgt_len, int) or tgt_len < 1):
            raise ConfigError(f"tgt_len must be a positive integer (got {tgt_len!r})")
        if tgt_len is not None and tgt_len > cfg.max_len:
            raise ConfigError(f"tgt_len={tgt_len} > ModelConfig.max_len={cfg.max_len}")
        was_training = self.training
        self.eval()
        try:
            memory, src_pad = self.encode(src_ids)
            cross_kv = self.precompute_cross_kv(memory)
            b = src_ids.shape[0]
            prefix = torch.full((b, 1), bos_id, dtype=torch.long, device=src_ids.device)
            finished = torch.zeros(b, dtype=torch.bool, device=src_ids.device)
            steps: list[Tensor] = []
            for step in range(max_new_tokens):
                # Full logits then the last real row: the same ops as forward(), so the argmax is identical.
                t = prefix.shape[1]
                tgt = prefix
                if tgt_len is not None and t < tgt_len:
                    tgt = F.pad(prefix, (0, tgt_len - t), value=cfg.pad_id)
                nxt = self.decode(tgt, memory, src_pad, cross_kv=cross_kv)[:, t - 1].argmax(dim=-1)
                nxt = torch.where(finished, torch.full_like(nxt, cfg.pad_id), nxt)
                steps.append(nxt)
                finished = finished | (nxt == eos_id)
                if step + 1 == max_new_tokens or bool(finished.all()):
                    break
                prefix = torch.cat([prefix, nxt[:, None]], dim=1)
            return torch.stack(steps, dim=1)
        finally:
            self.train(was_training)

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied output projection counted once)."""
        return sum(p.numel() for p in self.parameters())
