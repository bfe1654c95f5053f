"""HLBD pairs → padded tensor batches for the seq2seq objective.

* The encoder reads ``src = encode(input)`` truncated to ``max_src_len``; the decoder is teacher-forced on
  ``tgt_in = [BOS] + out`` and predicts ``tgt_out = out + [EOS]``, where ``out = encode(output)`` truncated to
  ``max_tgt_len - 1`` tokens, so both decoder sequences fit ``max_tgt_len``. The answer never reaches the encoder.
* The tokenizer is built from **all** texts of the dataset (train and val, inputs and outputs): its ids depend
  only on the character set, never on order.
* Batch order is seeded per epoch (``torch.Generator().manual_seed(seed + epoch)``), so the batches of epoch
  ``k`` are the same whether or not the run was resumed in between.
* Padding mode ``"bucket"`` (default): indices are shuffled, cut into chunks of ``bucket_batches`` batches,
  sorted by length inside each chunk (so a batch holds similar lengths), the batches shuffled again, and each
  batch padded to its longest row rounded up to a multiple of ``pad_multiple`` (8) — few distinct shapes. For
  data-parallel training, ``epoch_indices(epoch, group=world_size)`` keeps the batches of one step together.
  Mode ``"fixed"``: every batch is padded to ``(max_src_len, max_tgt_len)`` — one shape, for compiled graphs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

PAD_MODES = ("bucket", "fixed")


@dataclass(frozen=True)
class Example:
    src: tuple[int, ...]
    out: tuple[int, ...]  # the answer's ids, without BOS/EOS


@dataclass
class Batch:
    src: torch.Tensor  # [B, Ls] long
    tgt_in: torch.Tensor  # [B, Lt] long, [BOS] + out
    tgt_out: torch.Tensor  # [B, Lt] long, out + [EOS]
    n_tokens: int  # non-pad target tokens

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.src.to(device, non_blocking=non_blocking),
            self.tgt_in.to(device, non_blocking=non_blocking),
            self.tgt_out.to(device, non_blocking=non_blocking),
            self.n_tokens,
        )

    @property
    def size(self) -> int:
        return int(self.src.shape[0])


def build_tokenizer(pairs: Iterable[Any]) -> Any:
    """``AptTokenizer.build`` over every input and output text of the dataset (both splits)."""
    from apt_model.tokenizer import AptTokenizer

    texts: list[str] = []
    for pair in pairs:
        texts.append(pair.input)
        texts.append(pair.output)
    return AptTokenizer.build(texts)


def encode_pairs(
    pairs: Iterable[Any], tokenizer: Any, *, max_src_len: int, max_tgt_len: int
) -> list[Example]:
    examples = []
    for pair in pairs:
        src = list(tokenizer.encode(pair.input))[:max_src_len]
        out = list(tokenizer.encode(pair.output))[: max_tgt_len - 1]
        if not src:
            # An empty input would give an all-padding encoder row (attention over nothing); one UNK keeps it defined.
            src = [tokenizer.unk_id]
        examples.append(Example(tuple(src), tuple(out)))
    return examples


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded_lengths(
    longest_src: int,
    longest_tgt: int,
    *,
    src_len: int | None,
    tgt_len: int | None,
    pad_multiple: int,
    max_src_len: int | None,
    max_tgt_len: int | None,
) -> tuple[int, int]:
    """A batch's (source, target) widths: the given ones, else the longest rows rounded up to ``pad_multiple``
    (never past ``max_src_len`` / ``max_tgt_len``, never below the longest row)."""
    if src_len is None:
        src_len = _round_up(longest_src, pad_multiple)
        if max_src_len is not None:
            src_len = max(longest_src, min(src_len, max_src_len))
    if tgt_len is None:
        tgt_len = _round_up(longest_tgt, pad_multiple)
        if max_tgt_len is not None:
            tgt_len = max(longest_tgt, min(tgt_len, max_tgt_len))
    if longest_src > src_len or longest_tgt > tgt_len:
        raise ValueError(
            f"batch rows ({longest_src}, {longest_tgt}) exceed the padded shape ({src_len}, {tgt_len})"
        )
    return src_len, tgt_len


@dataclass(frozen=True)
class _PaddedTable:
    """Every example of a batcher padded once, plus one all-padding row at the end (a fixed batch's filler)."""

    src: torch.Tensor  # [N + 1, widest src] long
    tgt_in: torch.Tensor  # [N + 1, widest out + 1] long
    tgt_out: torch.Tensor
    src_lens: torch.Tensor  # [N] long
    out_lens: torch.Tensor  # [N] long, answer ids without BOS/EOS

    @classmethod
    def build(cls, examples: Sequence[Example], pad_id: int, bos_id: int, eos_id: int) -> _PaddedTable:
        src, src_lens = _padded([e.src for e in examples], pad_id)
        tgt_in, tgt_lens = _padded([(bos_id, *e.out) for e in examples], pad_id)
        tgt_out, _ = _padded([(*e.out, eos_id) for e in examples], pad_id)
        return cls(src, tgt_in, tgt_out, src_lens, tgt_lens - 1)

    def update_targets(
        self, rows: Sequence[int], outs: Sequence[tuple[int, ...]], pad_id: int, bos_id: int, eos_id: int
    ) -> bool:
        """Re-pad the targets of ``rows`` in place (their sources are unchanged): a few thousand short rows instead
        of the whole table, whose sources are most of its ids. False, changing nothing, when a target is wider
        than the table."""
        width = self.tgt_in.shape[1]
        if any(len(o) + 1 > width for o in outs):
            return False
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        self.tgt_in[idx] = _padded([(bos_id, *o) for o in outs], pad_id, width, filler=False)[0]
        self.tgt_out[idx] = _padded([(*o, eos_id) for o in outs], pad_id, width, filler=False)[0]
        self.out_lens[idx] = torch.tensor([len(o) for o in outs], dtype=torch.long)
        return True


def _padded(
    rows: Sequence[tuple[int, ...]], pad_id: int, width: int | None = None, *, filler: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` padded to ``width`` (their longest when None), plus one all-padding filler row at the end."""
    # One tensor of all ids, scattered into the rows by a length mask (row-major, the order of `flat`): a tensor per
    # row cost ~0.6 s for the xl data.
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    if width is None:
        width = int(lengths.max()) if rows else 0
    table = torch.full((len(rows) + int(filler), width), pad_id, dtype=torch.long)
    flat = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
    table[: len(rows)][torch.arange(width) < lengths[:, None]] = flat
    return table, lengths


def _take(table: torch.Tensor, idx: torch.Tensor, width: int, pad_id: int) -> torch.Tensor:
    """Rows ``idx`` of ``table``, cut or padded to ``width`` columns, as a fresh contiguous tensor."""
    if width <= table.shape[1]:
        return torch.index_select(table[:, :width], 0, idx)
    out = torch.full((len(idx), width), pad_id, dtype=table.dtype)
    out[:, : table.shape[1]] = torch.index_select(table, 0, idx)
    return out


def collate(
    examples: Sequence[Example],
    *,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    src_len: int | None = None,
    tgt_len: int | None = None,
    pad_multiple: int = 8,
    max_src_len: int | None = None,
    max_tgt_len: int | None = None,
    rows: int | None = None,
) -> Batch:
    """Pad ``examples`` into one batch; lengths fixed when given, else rounded up to ``pad_multiple``
    (never past ``max_src_len`` / ``max_tgt_len``). With ``rows``, all-padding rows fill the batch up to that many
    rows: they hold no target token, so they change neither the loss nor its gradient."""
    src_len, tgt_len = _padded_lengths(
        max(len(e.src) for e in examples),
        max(len(e.out) for e in examples) + 1,
        src_len=src_len,
        tgt_len=tgt_len,
        pad_multiple=pad_multiple,
        max_src_len=max_src_len,
        max_tgt_len=max_tgt_len,
    )
    n = max(len(examples), rows or 0)
    src = torch.full((n, src_len), pad_id, dtype=torch.long)
    tgt_in = torch.full((n, tgt_len), pad_id, dtype=torch.long)
    tgt_out = torch.full((n, tgt_len), pad_id, dtype=torch.long)
    n_tokens = 0
    for i, e in enumerate(examples):
        src[i, : len(e.src)] = torch.tensor(e.src, dtype=torch.long)
        k = len(e.out)
        if k:
            out = torch.tensor(e.out, dtype=torch.long)
            tgt_in[i, 1 : k + 1] = out
            tgt_out[i, :k] = out
        tgt_in[i, 0] = bos_id
        tgt_out[i, k] = eos_id
        n_tokens += k + 1
    return Batch(src, tgt_in, tgt_out, n_tokens)


@dataclass
class Batcher:
    """Turns encoded examples into the batches of one epoch (training) or the fixed batches of evaluation."""

    examples: list[Example]
    batch_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    max_src_len: int
    max_tgt_len: int
    seed: int = 42
    pad_mode: str = "bucket"
    pad_multiple: int = 8
    bucket_batches: int = 50

    def __post_init__(self) -> None:
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._table: _PaddedTable | None = None

    def replace_examples(self, examples: Sequence[Example], changed: Sequence[int] | None = None) -> None:
        """The same rows with other targets (the worked-steps curriculum): as many rows, so the epoch plans and the
        number of steps stay. With ``changed`` (the rows whose target differs; their sources must not) the padded
        table is updated in place; otherwise it is built again on the next batch."""
        if len(examples) != len(self.examples):
            raise ValueError(f"replace_examples: {len(examples)} rows for a batcher of {len(self.examples)}")
        self.examples = list(examples)
        if self._table is None:
            return
        if changed is None or not self._table.update_targets(
            changed, [self.examples[i].out for i in changed], self.pad_id, self.bos_id, self.eos_id
        ):
            self._table = None

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def collate(self, rows: Sequence[Example]) -> Batch:
        """One batch of ``rows`` padded this batcher's way (the module's :func:`collate` with its settings): the
        row-by-row reference that :meth:`collate_indices`, which the training loops use, reproduces."""
        fixed = self.pad_mode == "fixed"
        return collate(
            rows,
            pad_id=self.pad_id,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            src_len=self.max_src_len if fixed else None,
            tgt_len=self.max_tgt_len if fixed else None,
            pad_multiple=self.pad_multiple,
            max_src_len=self.max_src_len,
            max_tgt_len=self.max_tgt_len,
            # Fixed shapes are for compiled steps and CUDA graphs: a short last batch would otherwise be a new
            # shape, i.e. a second compilation and a second graph.
            rows=self.batch_size if fixed else None,
        )

    def collate_indices(self, indices: Sequence[int]) -> Batch:
        """``collate([examples[i] for i in indices])``, the same tensors, from rows padded once per batcher.

        Padding row by row in Python took 0.7-0.8 s per epoch of the xl data on the H200 machine's CPU, about half
        of a quality run's epoch, with the GPU idle meanwhile; cutting each batch out of one padded table is a few
        index-selects (``bench/collate.py``). The table is built on first use; ``examples`` change only through
        :meth:`replace_examples`, which updates or drops it."""
        if not indices:
            raise ValueError("a batch needs at least one row")
        if self._table is None:
            self._table = _PaddedTable.build(self.examples, self.pad_id, self.bos_id, self.eos_id)
        t = self._table
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        src_lens, out_lens = t.src_lens[idx], t.out_lens[idx]
        longest_src = int(src_lens.max())
        longest_tgt = int(out_lens.max()) + 1
        fixed = self.pad_mode == "fixed"
        src_len, tgt_len = _padded_lengths(
            longest_src,
            longest_tgt,
            src_len=self.max_src_len if fixed else None,
            tgt_len=self.max_tgt_len if fixed else None,
            pad_multiple=self.pad_multiple,
            max_src_len=self.max_src_len,
            max_tgt_len=self.max_tgt_len,
        )
        if fixed and len(idx) < self.batch_size:
            # The table's last row is all padding: the filler rows of a short fixed-shape batch.
            filler = torch.full((self.batch_size - len(idx),), len(self.examples), dtype=torch.long)
            idx = torch.cat([idx, filler])
        return Batch(
            _take(t.src, idx, src_len, self.pad_id),
            _take(t.tgt_in, idx, tgt_len, self.pad_id),
            _take(t.tgt_out, idx, tgt_len, self.pad_id),
            int(out_lens.sum()) + len(indices),
        )

    def _length(self, i: int) -> int:
        e = self.examples[i]
        return len(e.src) + len(e.out)

    def epoch_indices(self, epoch: int, group: int = 1) -> list[list[int]]:
        """The row indices of each batch of ``epoch`` (0-based): a pure function of (seed, epoch, group).

        ``group`` > 1 (data-parallel ranks): in bucket mode, runs of ``group`` consecutive batches — neighbours in
        one length-sorted chunk — are shuffled as units, so the batches that the ranks take for one step have
        similar lengths and no rank waits for another's longer batch. ``group=1`` is the plain plan.
        """
        if group < 1:
            raise ValueError("group must be >= 1")
        n = len(self.examples)
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        if self.pad_mode == "bucket":
            # A chunk holds whole groups, so no group mixes the long end of one chunk with the short end of the next.
            chunk = self.batch_size * (-(-self.bucket_batches // group) * group)
            bucketed: list[int] = []
            for start in range(0, n, chunk):
                bucketed.extend(sorted(order[start : start + chunk], key=self._length))  # stable sort
            order = bucketed
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.pad_mode == "bucket":
            units = [batches[i : i + group] for i in range(0, len(batches), group)]
            perm = torch.randperm(len(units), generator=gen).tolist()
            batches = [b for i in perm for b in units[i]]
        return batches

    def epoch(self, epoch: int) -> list[Batch]:
        return [self.collate_indices(idx) for idx in self.epoch_indices(epoch)]

    def eval_batches(self) -> list[Batch]:
        """Deterministic batches over all examples, sorted by length (evaluation order does not matter)."""
        order = sorted(range(len(self.examples)), key=self._length)
        return [
            self.collate_indices(order[s : s + self.batch_size])
            for s in range(0, len(order), self.batch_size)
        ]
