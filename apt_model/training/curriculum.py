"""The worked-steps curriculum: products trained on worked steps first, the steps then taken away epoch by epoch.

``TrainConfig.worked_steps_epochs = F`` and ``worked_steps_ramp = R`` (both 0: off). For each training row that is a
product of a two-digit multiplier (``apt_model/data/steps.py``) the target is

* epochs ``[0, F)``: the whole worked answer, ``148+370=518``;
* the next ``R`` epochs: the worked answer less the first ``⌊f · len(prefix)⌋`` characters of its steps prefix
  ``148+370=``, with ``f = (e − F + 1) / (R + 1)`` rising evenly;
* every later epoch: the plain answer, as the data file has it.

The data file, the validation split and every score stay the spec's plain answers, and the last epochs train on
them alone, so the model that is saved writes plain answers. This is stepwise internalisation of a chain of
thought (Deng et al., 2024). On HLBD Hardcore it lifts the products of unseen pairs, of which plain training gets
about half right (physics' work and distance most of all; BENCHMARKS.md, twenty-seventh session).

The rows, their order and the padded shapes never change; only the targets do, so compiled graphs are reused and
a resumed run trains each epoch on the same targets as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from apt_model.data.steps import staged_output, steps_prefix
from apt_model.errors import ConfigError, DataError
from apt_model.training.batching import Example


class StepsCurriculum:
    """The staged targets of one run's training rows (``pairs``: the rows ``apt train`` trains, in its order)."""

    def __init__(
        self,
        full_epochs: int,
        ramp_epochs: int,
        pairs: Sequence[Any],
        examples: Sequence[Example],
        tokenizer: Any,
        *,
        max_tgt_len: int,
    ) -> None:
        """``examples``: ``pairs`` encoded as ``apt train`` encodes them (``encode_pairs``), the plain targets."""
        self.full_epochs = full_epochs
        self.ramp_epochs = ramp_epochs
        self.pairs = list(pairs)
        self.tokenizer = tokenizer
        self.prefixes = [steps_prefix(p.module, p.input, p.output) for p in self.pairs]
        self.rows = sum(x is not None for x in self.prefixes)
        if self.rows == 0:
            raise ConfigError(
                "TrainConfig.worked_steps_epochs/worked_steps_ramp: the training split has no product of a "
                "two-digit multiplier to write in steps (HLBD Hardcore's ×, distance, work and area questions)"
            )
        # Staging is slicing: each character of a steps prefix (digits, "+", "=") is one token, so removing k
        # characters removes the first k ids of the worked answer's. Re-encoding every row each epoch of the ramp
        # cost ~0.3 s of idle GPU per epoch.
        self._plain = list(examples)
        self._worked: dict[int, tuple[tuple[int, ...], tuple[int, ...], int]] = {}
        for i, (prefix, pair) in enumerate(zip(self.prefixes, self.pairs, strict=True)):
            if prefix is not None:
                ids = tuple(tokenizer.encode(prefix + pair.output))
                if tokenizer.unk_id in ids:
                    raise DataError(
                        f"worked steps: the data's vocabulary lacks a character of {prefix!r} (its digits, '+', '=')"
                    )
                self._worked[i] = (self._plain[i].src, ids, len(prefix))
        longest = max(len(ids) for _, ids, _ in self._worked.values())
        if longest > max_tgt_len - 1:
            raise ConfigError(
                f"worked steps: the longest worked answer is {longest} tokens; DataConfig.max_tgt_len={max_tgt_len} "
                f"leaves {max_tgt_len - 1} besides EOS (raise it to {longest + 1})"
            )
        for i, (_, ids, n) in self._worked.items():
            if ids[n:] != self._plain[i].out:
                raise DataError(f"worked steps: {self.prefixes[i]!r} is not one token per character")
        self._batcher: Any = None  # the batcher ``apply`` last gave targets to, and the cuts it holds
        self._current: tuple[int, ...] | None = None

    def _stepped(self) -> list[tuple[str, Any]]:
        return [(x, p) for x, p in zip(self.prefixes, self.pairs, strict=True) if x is not None]

    def fraction(self, epoch: int) -> float:
        """The share of the steps prefix removed from the targets of 0-based ``epoch`` (1.0: plain answers)."""
        if epoch < self.full_epochs:
            return 0.0
        if epoch >= self.full_epochs + self.ramp_epochs:
            return 1.0
        return (epoch - self.full_epochs + 1) / (self.ramp_epochs + 1)

    def outputs(self, fraction: float) -> list[str]:
        """Every training row's target text at ``fraction``."""
        return [staged_output(x, p.output, fraction) for x, p in zip(self.prefixes, self.pairs, strict=True)]

    def _cuts(self, fraction: float) -> tuple[int, ...]:
        """How many leading ids each worked answer loses at ``fraction`` (its whole prefix at 1.0)."""
        if fraction >= 1.0:
            return tuple(n for _, _, n in self._worked.values())
        return tuple(int(fraction * n) for _, _, n in self._worked.values())

    def examples(self, fraction: float) -> list[Any]:
        """Every training row encoded as ``apt train`` encodes it, with its target at ``fraction``."""
        rows = list(self._plain)
        if fraction < 1.0:
            for (i, (src, ids, _)), cut in zip(self._worked.items(), self._cuts(fraction), strict=True):
                rows[i] = Example(src, ids[cut:])
        return rows

    def apply(self, batcher: Any, epoch: int) -> bool:
        """Give ``batcher`` the targets of ``epoch`` when they differ from what it holds; whether it changed. Most
        epochs of a long ramp remove no further character and keep the batcher's padded table; the others re-pad
        only the targets that changed (a rebuilt table cost ~0.35 s of idle GPU an epoch on the H200 host)."""
        if batcher is not self._batcher:  # another run's batcher holds whatever it was built with
            self._batcher, self._current = batcher, None
        fraction = self.fraction(epoch)
        cuts = self._cuts(fraction)
        if cuts == self._current:
            return False
        changed = None
        if self._current is not None:
            rows = list(self._worked)
            changed = [rows[j] for j, (a, b) in enumerate(zip(cuts, self._current, strict=True)) if a != b]
        batcher.replace_examples(self.examples(fraction), changed)
        self._current = cuts
        return True

    def describe(self) -> dict[str, Any]:
        """What the report keeps: the schedule, how many rows it stages, and their mean target length per stage."""
        stepped = self._stepped()
        return {
            "worked_steps_epochs": self.full_epochs,
            "worked_steps_ramp": self.ramp_epochs,
            "rows": self.rows,
            "plain_from_epoch": self.full_epochs + self.ramp_epochs + 1,
            "mean_target_chars": {
                "steps": round(sum(len(x) + len(p.output) for x, p in stepped) / self.rows, 3),
                "plain": round(sum(len(p.output) for _, p in stepped) / self.rows, 3),
            },
        }
