"""Averaged weights of a run's last epochs, scored against its final weights on the same problems.

Question (issue 6, physics' val line): the final model of the README recipe gets 81–91% of physics' held-out
problems, and the same flags and seed gave 91.0% and 84.9% in two runs that differ only by GPU summation order. A
model that sits that close to the edge on many products may be lifted by averaging the weights it passed through at
the end of training (Polyak / stochastic weight averaging), or it may not: this measures it, paired, on one run.

Input: a Playground run directory saved with ``--save-interval 1`` (``checkpoint_epoch_N.pt`` for every epoch).
For each variant — the final weights (``last1``), the uniform mean of the last K epochs' weights (``lastK``), and
exponentially weighted means of every epoch's weights (``expG``: weight G^age, age 0 = the final epoch) — the
model is verified (greedy, exact match, ``apt_model.verify.verify_model``) on a split (``--split``, val by default)
of each given dataset; the report keeps overall and per module exact match, and on val per physics / arithmetic /
geometry kind too. Nothing in the run is changed.

Usage:
  python bench/weight_average.py --run RUN_DIR --dataset own=hardcore.json --dataset xl=hardcore_xl.json \
      --last 1 3 5 10 15 --exp 0.8 0.9 --out avg.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apt_model.checkpoint import epoch_checkpoints as all_epoch_checkpoints  # noqa: E402
from apt_model.checkpoint import load_checkpoint  # noqa: E402
from apt_model.io import atomic_write_text  # noqa: E402
from bench.quality_run import kinds_of  # noqa: E402


def epoch_checkpoints(run_dir: Path) -> dict[int, Path]:
    """``{epoch: path}`` of the run's per-epoch checkpoint files (a Playground run's; DeepSpeed's are folders)."""
    return {epoch: p for epoch, p in all_epoch_checkpoints(run_dir).items() if p.is_file()}


def variant_weights(epochs: list[int], last: list[int], exp: list[float]) -> dict[str, dict[int, float]]:
    """Per variant name, the weight of each epoch's checkpoint (summing to 1)."""
    final = epochs[-1]
    out: dict[str, dict[int, float]] = {}
    for k in last:
        chosen = epochs[-k:]
        out[f"last{k}"] = {e: 1.0 / len(chosen) for e in chosen}
    for g in exp:
        raw = {e: g ** (final - e) for e in epochs}
        total = sum(raw.values())
        out[f"exp{g:g}"] = {e: w / total for e, w in raw.items() if w / total >= 1e-4}
    return out


def averaged_state(
    paths: dict[int, Path], weights: dict[int, float], cache: dict[int, dict]
) -> dict[str, Any]:
    """The weighted mean of the model weights of the given epochs (float tensors; others from the last epoch)."""
    acc: dict[str, Any] = {}
    for epoch, w in weights.items():
        if epoch not in cache:
            # mapped, and the model's tensors copied out: the optimizer's moments (two thirds of the file) are
            # never read, and no file stays mapped.
            mapped = load_checkpoint(paths[epoch], mmap=True)["model_state"]
            cache[epoch] = {name: t.clone() for name, t in mapped.items()}
        for name, t in cache[epoch].items():
            if t.is_floating_point():
                acc[name] = acc[name] + w * t.double() if name in acc else w * t.double()
            else:
                acc.setdefault(name, t)
    ref = cache[max(weights)]
    return {name: (t.to(ref[name].dtype) if t.is_floating_point() else t) for name, t in acc.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="run directory with checkpoint_epoch_N.pt files")
    p.add_argument(
        "--dataset",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="an HLBD Hardcore file; repeatable",
    )
    p.add_argument("--last", type=int, nargs="*", default=[1, 3, 5, 10, 15])
    p.add_argument("--exp", type=float, nargs="*", default=[])
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    datasets: dict[str, Path] = {}
    for item in args.dataset:
        name, sep, file = item.partition("=")
        if not sep or not name or not Path(file).is_file():
            p.error(f"--dataset {item!r}: expected NAME=FILE of an existing file")
        datasets[name] = Path(file)
    paths = epoch_checkpoints(args.run)
    if not paths:
        p.error(f"--run {args.run}: no checkpoint_epoch_N.pt files (train with --save-interval 1)")
    if any(k < 1 for k in args.last) or any(not 0 < g < 1 for g in args.exp):
        p.error("--last takes positive counts, --exp factors in (0, 1)")
    epochs = list(paths)
    deepest = max(args.last, default=1)
    if deepest > epochs[-1]:
        p.error(f"--last {deepest}: the run has {epochs[-1]} epochs")
    missing = sorted(set(range(epochs[-1] - deepest + 1, epochs[-1] + 1)) - set(epochs))
    if missing:
        p.error(f"--run {args.run}: no checkpoints of epochs {missing} (train with --save-interval 1)")

    from apt_model.checkpoint import load_model
    from apt_model.data import load_dataset
    from apt_model.verify import verify_model

    loaded = load_model(paths[epochs[-1]], device=args.device)
    docs = {name: json.loads(f.read_text()) for name, f in datasets.items()}
    data = {name: load_dataset(f) for name, f in datasets.items()}
    cache: dict[int, dict] = {}
    report: dict[str, Any] = {"run": str(args.run), "epochs": epochs, "split": args.split, "variants": {}}
    for variant, weights in variant_weights(epochs, args.last, args.exp).items():
        state = averaged_state(paths, weights, cache)
        loaded.model.load_state_dict(state, strict=True)
        loaded.model.eval()
        row: dict[str, Any] = {
            "epochs": sorted(weights),
            "weights": {str(e): round(w, 6) for e, w in weights.items()},
        }
        for name, ds in data.items():
            started = time.perf_counter()
            vr = verify_model(
                loaded,
                ds,
                split=args.split,
                device=args.device,
                batch_size=args.batch_size,
                n_failures=100000,
            ).to_dict()
            row[name] = {
                "overall": vr["overall"]["exact"],
                "n": vr["overall"]["n"],
                "modules": {m: v["exact"] for m, v in vr["modules"].items()},
                "by_kind": kinds_of(docs[name], vr) if args.split == "val" else None,
                "seconds": round(time.perf_counter() - started, 2),
            }
        report["variants"][variant] = row
        print(variant, {n: (row[n]["overall"], row[n]["modules"].get("physics")) for n in data}, flush=True)
        atomic_write_text(args.out, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
