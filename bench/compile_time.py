"""Cold compile time of the Playground fast path: the autopoietic transform inlined 18 times, traced once per shape,
or the fused Triton kernels (one opaque op, nothing for inductor to generate).

The fast path compiles the loss (model forward with its 18 autopoietic transforms, cross-entropy) and its backward as
one graph; inductor then generates and compiles code for every inlined copy of the transform. Wrapping the transform
in ``torch.compiler.nested_compile_region`` asks Dynamo to trace it once per distinct input signature and reuse that
subgraph at every call site; the library does so since the measurement on an H200 (``inlined`` here runs the
undecorated function, as before). ``fused`` is the default on CUDA since: the transform is the custom op
``apt::autopoietic_probs`` (``apt_model.model.fused_transform``), so inductor compiles only the rest of the model;
the kernels themselves are compiled by Triton on first use (two per distinct tile shape). This script measures what that does to the first step (compilation included), to the
steady-state step, and to the numbers: each variant runs in its own process with an empty inductor/Triton cache (a
cold start, as on a fresh machine), same seed, same batches, through the Playground loop's own step (``bench/train_step.py``'s ``build_apt_step``).

Usage (writes a JSON and prints a table):
  python bench/compile_time.py --out /tmp/compile_time.json                       # GPU: the quality-run shapes
  python bench/compile_time.py --device cpu --layers 2 --batch 8 --out /tmp/ct.json  # CPU: a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apt_model.io import atomic_write_json  # noqa: E402

VARIANTS = ("inlined", "nested", "fused")


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from train_step import _sync, build_apt_step, make_batch  # bench/train_step.py: the step it measures

    import apt_model.model.autopoietic as autopoietic
    from apt_model.config import model_preset
    from apt_model.model.fused_transform import set_transform_kernel
    from apt_model.training.loop import resolve_precision

    # inlined and nested: the transform as torch ops for inductor; fused: the default choice (Triton on CUDA).
    set_transform_kernel("auto" if args.variant == "fused" else "torch")
    if args.variant == "inlined":
        # The library marks the transform as a nested compile region; the undecorated function is what was inlined
        # before. autopoietic_probs looks the region up at call time, so rebinding the attribute is enough.
        autopoietic._autopoietic_probs_region = autopoietic._autopoietic_probs
    device = torch.device(args.device)
    torch.manual_seed(0)
    # Without DBC-DAC and dropout: the same numbers in both variants, and only the compiled region differs.
    run_step, _ = build_apt_step(
        "apt-fast-nodbc",
        device,
        args.vocab,
        model_preset("playground").max_len,
        layers=args.layers,
        dropout=0.0,
        compiled=True,
    )
    batches = [
        make_batch(args.batch, args.src_len, args.tgt_len, args.vocab, device, seed=1 + i)
        for i in range(args.steps + 1)
    ]
    _sync(device)
    t0 = time.perf_counter()
    losses = [run_step(batches[0])]
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for b in batches[1:]:
        t = time.perf_counter()
        losses.append(run_step(b))
        _sync(device)
        times.append(time.perf_counter() - t)
    return {
        "variant": args.variant,
        "first_step_s": first,
        "step_ms_median": 1e3 * statistics.median(times[len(times) // 2 :]),
        "losses": losses,
        "precision": resolve_precision("auto", device),
        "cuda_graphs": run_step.stepper.graphs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each (the guide's: 6)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--src-len", type=int, default=40)
    p.add_argument("--tgt-len", type=int, default=24)
    p.add_argument("--vocab", type=int, default=5000)
    p.add_argument("--steps", type=int, default=20, help="steps after the first (median of the second half)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="the first is the baseline"
    )
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return 0
    if not args.out.parent.is_dir():
        p.error(f"--out: folder {args.out.parent} does not exist")
    results = []
    for variant in args.variants:
        with tempfile.TemporaryDirectory(prefix=f"apt_compile_{variant}_") as cache:
            env = {
                **os.environ,
                "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor",
                "TRITON_CACHE_DIR": f"{cache}/triton",
                "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            }
            argv_child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
            proc = subprocess.run(
                [*argv_child, "--variant", variant], env=env, capture_output=True, text=True, cwd=REPO
            )
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{variant:8s} first step {r['first_step_s']:7.1f} s   step {r['step_ms_median']:8.2f} ms")
    base = results[0]
    report = {
        "bench": "compile_time",
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "variant")},
        "results": results,
        "baseline": args.variants[0],
        "vs_baseline": {
            r["variant"]: {
                "first_step_ratio": r["first_step_s"] / base["first_step_s"],
                "step_ratio": r["step_ms_median"] / base["step_ms_median"],
                "max_relative_loss_difference": max(
                    abs(x - y) / max(abs(y), 1e-12) for x, y in zip(r["losses"], base["losses"], strict=True)
                ),
            }
            for r in results[1:]
        },
    }
    atomic_write_json(args.out, report)
    for name, row in report["vs_baseline"].items():
        print(
            f"{name} / {args.variants[0]}: first step {row['first_step_ratio']:.2f}x, step {row['step_ratio']:.2f}x; "
            f"max relative loss difference {row['max_relative_loss_difference']:.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
