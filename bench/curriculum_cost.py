"""Host time the worked-steps curriculum adds to a run: each epoch's new targets and batches, GPU idle meanwhile.

The Playground loop gives the batcher an epoch's targets (``StepsCurriculum.apply``) and cuts its batches before the
epoch's first step, so this host time adds to the run's wall time. On the H200 host the first version (every row
re-encoded and the whole padded table rebuilt, every epoch of the ramp) made ramp epochs 0.5-0.9 s longer than plain
ones (BENCHMARKS.md, twenty-seventh session). Compared here over a whole run's epochs, on the quality runs' data
(xxl, the README recipe's repeats, 40 + 24 tokens, batch 128, fixed padding):

* ``plain``: no curriculum, batches only;
* ``rebuild``: the curriculum's targets, the table rebuilt at every change;
* ``in_place``: what ``apply`` does: only the targets that changed re-padded in the table.

Usage: python bench/curriculum_cost.py [--size xxl] [--epochs 52] [--full 8] [--ramp 30] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apt_model.data import SIZES, generate_hardcore, load_dataset, write_dataset  # noqa: E402
from apt_model.io import atomic_write_text  # noqa: E402
from apt_model.training.batching import Batcher, build_tokenizer, encode_pairs  # noqa: E402
from apt_model.training.curriculum import StepsCurriculum  # noqa: E402

REPEAT = {"zodiac": 3, "physics": 3}  # the README recipe's --repeat
LENGTHS = {"max_src_len": 40, "max_tgt_len": 24}


class _RebuildingBatcher(Batcher):
    """A batcher that rebuilds its whole padded table at every change of targets, as the curriculum first did."""

    def replace_examples(self, examples: list, changed: list[int] | None = None) -> None:
        super().replace_examples(examples)


def run(kind: str, pairs: list, tok: object, epochs: int, full: int, ramp: int) -> dict:
    examples = encode_pairs(pairs, tok, **LENGTHS)
    batcher_class = _RebuildingBatcher if kind == "rebuild" else Batcher
    batcher = batcher_class(examples, 128, tok.pad_id, tok.bos_id, tok.eos_id, 40, 24, pad_mode="fixed")
    curriculum = None
    if kind != "plain":
        curriculum = StepsCurriculum(full, ramp, pairs, examples, tok, max_tgt_len=LENGTHS["max_tgt_len"])
    per_epoch, changes = [], 0
    for epoch in range(epochs):
        t = time.perf_counter()
        if curriculum is not None:
            changes += curriculum.apply(batcher, epoch)
        batches = batcher.epoch(epoch)
        per_epoch.append(time.perf_counter() - t)
    return {
        "kind": kind,
        "total_s": round(sum(per_epoch), 3),
        "first_epoch_s": round(per_epoch[0], 3),
        "max_later_epoch_s": round(max(per_epoch[1:]), 3),
        "target_changes": changes,
        "batches": len(batches),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="xxl", choices=SIZES, help="the generated data (xxl: the quality runs')")
    p.add_argument("--epochs", type=int, default=52)
    p.add_argument("--full", type=int, default=8)
    p.add_argument("--ramp", type=int, default=30)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.full < 0 or args.ramp < 0 or args.full + args.ramp >= args.epochs:
        p.error("--full and --ramp must be >= 0 and end before --epochs")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hardcore.json"
        write_dataset(generate_hardcore(42, args.size), path)
        dataset = load_dataset(path)
    tok = build_tokenizer(dataset.pairs)
    pairs = [p for p in dataset.train for _ in range(REPEAT.get(p.module, 1))]
    rows = [
        run(kind, pairs, tok, args.epochs, args.full, args.ramp) for kind in ("plain", "rebuild", "in_place")
    ]
    plain = rows[0]["total_s"]
    for r in rows:
        r["added_s"] = round(r["total_s"] - plain, 3)
    result = {
        "machine": platform.processor() or platform.machine(),
        "size": args.size,
        "epochs": args.epochs,
        "full": args.full,
        "ramp": args.ramp,
        "rows": len(pairs),
        "results": rows,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
