"""Host time to build one epoch's batches: row-by-row collation against cutting batches out of the padded table.

The training loop builds an epoch's batches before its first step, with the GPU idle meanwhile, so this host time
adds to every epoch. Data: `apt data generate --kind hardcore --size xl` (the quality runs' data), its training
split, the quality runs' lengths (40 + 24), bucketed padding as `apt train` uses it.

Usage: python bench/collate.py [--size xl] [--batch-sizes 128 256] [--epochs 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apt_model.data import SIZES, generate_hardcore, load_dataset, write_dataset  # noqa: E402
from apt_model.io import atomic_write_text  # noqa: E402
from apt_model.training.batching import Batcher, build_tokenizer, encode_pairs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="xl", choices=SIZES)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--epochs", type=int, default=5, help="epochs timed per method (medians reported)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.epochs < 1 or any(b < 1 for b in args.batch_sizes):
        p.error("--epochs and --batch-sizes must be >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hardcore.json"
        write_dataset(generate_hardcore(42, args.size), path)
        dataset = load_dataset(path)
    tok = build_tokenizer(dataset.pairs)  # as `apt train` builds it
    train = encode_pairs(dataset.train, tok, max_src_len=40, max_tgt_len=24)
    rows = []
    for bs in args.batch_sizes:
        batcher = Batcher(train, bs, tok.pad_id, tok.bos_id, tok.eos_id, 40, 24)
        t = time.perf_counter()
        batcher.epoch(0)  # builds the table once
        first = time.perf_counter() - t
        table, by_row = [], []
        for e in range(1, args.epochs + 1):
            plan = batcher.epoch_indices(e)
            t = time.perf_counter()
            new = [batcher.collate_indices(idx) for idx in plan]
            table.append(time.perf_counter() - t)
            t = time.perf_counter()
            old = [batcher.collate([train[i] for i in idx]) for idx in plan]
            by_row.append(time.perf_counter() - t)
            same = all(
                a.src.equal(b.src) and a.tgt_in.equal(b.tgt_in) and a.tgt_out.equal(b.tgt_out)
                and a.n_tokens == b.n_tokens
                for a, b in zip(new, old, strict=True)
            )  # fmt: skip
            if not same:
                raise SystemExit(f"B={bs}, epoch {e}: the table's batches differ from row-by-row collation")
        row = {
            "batch_size": bs,
            "batches": len(plan),
            "first_epoch_with_table_ms": round(first * 1e3, 1),
            "table_ms": round(statistics.median(table) * 1e3, 1),
            "row_by_row_ms": round(statistics.median(by_row) * 1e3, 1),
        }
        row["ratio"] = round(row["row_by_row_ms"] / max(row["table_ms"], 1e-3), 1)
        rows.append(row)
        print(
            f"B={bs}: {row['batches']} batches per epoch; row by row {row['row_by_row_ms']} ms, "
            f"from the table {row['table_ms']} ms ({row['ratio']}x); first epoch with the table's build "
            f"{row['first_epoch_with_table_ms']} ms"
        )
    result = {"size": args.size, "train_rows": len(train), "host": platform.node(), "rows": rows}
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
