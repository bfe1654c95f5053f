"""`apt train` with worked steps internalized over the epochs: the model ends writing HLBD's plain answers.

The twenty-fifth and twenty-sixth sessions showed (BENCHMARKS.md) that physics' unseen products close when they are
answered in worked steps (``37 × 14`` → ``148+370=518``), but that format is not the data spec's, and with the spec's
plain answers a steps side task does not carry over. This measures the third way, stepwise internalization of a chain
of thought (Deng et al., 2024): the data file stays as generated, every answer plain; the training targets of
products of a two-digit multiplier (the rows ``bench/worked_steps.py`` writes in steps) start as the worked steps
and lose their leading characters epoch by epoch until only the plain answer is left, so the last epochs, and the
model that is scored, are on the spec's own targets. The schedule:

* epochs ``[0, full)``: the whole worked answer;
* the next ``ramp`` epochs: the first ``⌊f·len(prefix)⌋`` characters of the steps prefix (``148+370=``) removed,
  ``f = (e − full + 1) / (ramp + 1)``;
* after that: the plain answer, as ``apt train`` would train it.

It runs ``apt_model.cli`` in this process, with the Playground trainer's epoch hook wrapped to swap the training
rows' targets when the fraction changes (the padded shape stays, so compiled graphs are reused); the stages it
trained are written to ``internalize.json`` beside the run's report.

    python bench/internalize.py --full 16 --ramp 20 -- train --preset playground --dataset hardcore.json …
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apt_model.data.pairs import normalize_text  # noqa: E402
from apt_model.errors import ConfigError, DataError  # noqa: E402
from apt_model.io import atomic_write_text  # noqa: E402
from bench.worked_steps import product_operands, worked_answer  # noqa: E402

STAGES_FILE = "internalize.json"


@dataclass(frozen=True)
class Schedule:
    full: int  # epochs on the whole worked answer
    ramp: int  # epochs over which the steps prefix is removed

    def __post_init__(self) -> None:
        if self.full < 0 or self.ramp < 0:
            raise ConfigError(f"internalize: --full and --ramp must be >= 0 (got {self.full}, {self.ramp})")

    def fraction(self, epoch: int) -> float:
        """The share of the steps prefix removed from the targets of 0-based ``epoch``."""
        if epoch < self.full:
            return 0.0
        if self.ramp == 0 or epoch >= self.full + self.ramp:
            return 1.0
        return (epoch - self.full + 1) / (self.ramp + 1)


def steps_prefix(module: str, text: str, output: str) -> str | None:
    """The worked-steps prefix (``148+370=``) of a product of a two-digit multiplier answered ``output``; None for
    every other row. DataError when the row's answer is not its product (a file edited by hand)."""
    operands = product_operands(module, normalize_text(text))
    if operands is None or operands[1] < 10:
        return None
    a, b = operands
    if str(a * b) != output:
        raise DataError(f"{module}: {text!r} answers {output!r}, not {a} × {b}")
    worked = worked_answer(a, b)
    return worked[: len(worked) - len(output)]


def staged_output(prefix: str | None, output: str, fraction: float) -> str:
    """``output`` with what is left of its steps prefix after removing ``fraction`` of it from the front."""
    if prefix is None or fraction >= 1.0:
        return output
    return prefix[math.floor(fraction * len(prefix)) :] + output


class Internalizer:
    """Re-encodes the training rows' targets for each epoch's fraction; the rows themselves never change."""

    def __init__(
        self, schedule: Schedule, pairs: Sequence[Any], tokenizer: Any, *, max_src_len: int, max_tgt_len: int
    ) -> None:
        self.schedule = schedule
        self.pairs = list(pairs)
        self.tokenizer = tokenizer
        self.lengths = {"max_src_len": max_src_len, "max_tgt_len": max_tgt_len}
        self.prefixes = [steps_prefix(p.module, p.input, p.output) for p in self.pairs]
        self.stepped = sum(x is not None for x in self.prefixes)
        for prefix in {x for x in self.prefixes if x is not None}:
            if tokenizer.unk_id in tokenizer.encode(prefix):
                raise DataError(f"internalize: the tokenizer has no token for a character of {prefix!r}")
        longest = max(
            (
                len(tokenizer.encode(x + p.output))
                for x, p in zip(self.prefixes, self.pairs, strict=True)
                if x
            ),
            default=0,
        )
        if longest > max_tgt_len - 1:
            raise ConfigError(
                f"internalize: a worked answer is {longest} tokens, over --max-tgt-len {max_tgt_len} less EOS"
            )
        self.current: float | None = None
        self.stages: list[dict[str, Any]] = []

    def outputs(self, fraction: float) -> list[str]:
        return [staged_output(x, p.output, fraction) for x, p in zip(self.prefixes, self.pairs, strict=True)]

    def examples(self, fraction: float, encode_pairs: Any) -> list[Any]:
        staged = [
            type(p)(p.input, out, p.module, p.split)
            for p, out in zip(self.pairs, self.outputs(fraction), strict=True)
        ]
        return encode_pairs(staged, self.tokenizer, **self.lengths)


def install(schedule: Schedule) -> None:
    """Wrap the Playground trainer so each epoch trains on its fraction's targets."""
    from apt_model.training import batching, loop

    original_setup = loop._Trainer._setup
    original_epoch = loop._Trainer._train_epoch

    def _setup(self: Any) -> None:
        original_setup(self)
        request, prep = self.request, self.prep
        repeat = request.data.repeat_counts()
        pairs = [p for p in prep.dataset.train for _ in range(repeat.get(p.module, 1))]
        if len(pairs) != len(prep.train_examples):
            raise ConfigError("internalize: the training rows differ from apt train's own; cannot stage them")
        self._internalizer = Internalizer(
            schedule,
            pairs,
            prep.tokenizer,
            max_src_len=request.data.max_src_len,
            max_tgt_len=request.data.max_tgt_len,
        )
        if self._internalizer.examples(1.0, batching.encode_pairs) != prep.train_examples:
            raise ConfigError("internalize: re-encoded plain targets differ from apt train's own")

    def _train_epoch(self: Any, progress: Any) -> dict[str, Any]:
        it: Internalizer = self._internalizer
        fraction = it.schedule.fraction(self.epoch)
        if fraction != it.current:
            self.train_batcher.examples = it.examples(fraction, batching.encode_pairs)
            self.train_batcher._table = None  # built again from the new targets on the next batch
            it.current = fraction
            outs = it.outputs(fraction)
            it.stages.append(
                {
                    "from_epoch": self.epoch + 1,
                    "fraction": round(fraction, 4),
                    "stepped_rows": it.stepped,
                    "mean_stepped_target_chars": round(
                        sum(len(o) for o, x in zip(outs, it.prefixes, strict=True) if x) / max(it.stepped, 1),
                        3,
                    ),
                }
            )
            atomic_write_text(
                self.out_dir / STAGES_FILE,
                json.dumps(
                    {"full": it.schedule.full, "ramp": it.schedule.ramp, "stages": it.stages}, indent=1
                )
                + "\n",
            )
        return original_epoch(self, progress)

    loop._Trainer._setup = _setup
    loop._Trainer._train_epoch = _train_epoch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", type=int, required=True, help="epochs on the whole worked answer")
    p.add_argument("--ramp", type=int, required=True, help="epochs over which the steps are removed")
    p.add_argument("cli_args", nargs=argparse.REMAINDER, help="`apt train …`, after --")
    args = p.parse_args(argv)
    cli_args = args.cli_args[1:] if args.cli_args[:1] == ["--"] else args.cli_args
    if cli_args[:1] != ["train"]:
        p.error("give the `apt train` command after --: -- train …")
    try:
        schedule = Schedule(args.full, args.ramp)
    except ConfigError as exc:
        p.error(str(exc))
    install(schedule)
    from apt_model.cli import main as apt_main

    return apt_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
