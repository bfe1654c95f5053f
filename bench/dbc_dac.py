"""What one DBC-DAC application costs on the Playground model's own gradients, and where the time goes.

DBC-DAC runs every 20th optimizer step between backward and the optimizer (``apt_model.model.dbc_dac``). On a GPU
its arithmetic is small (four batched groups of low-rank projections); what the step pays is mostly the host
dispatching its kernels. This script measures, in one process on one device, on random gradients of the model's
exact parameter shapes (Playground preset, vocab 5,000 as in ``bench/train_step.py``):

  application     one ``DBCDAC.step`` at the default configuration (cleaning + stabilising), synchronised
  dispatch        the same call's host time alone (no synchronisation after it: what the CPU spends issuing it)
  clean_each      ``clean_nonfinite_`` on each gradient in turn (how DBC-DAC cleaned before)
  clean_all       ``clean_nonfinite_all_`` on all gradients (how it cleans now)
  stabilize       the stabilisation of the target groups alone
  graphed         (CUDA) one application replayed from a CUDA graph (``DBCDAC(cuda_graph=True)``; the first call,
                  which runs eagerly and captures, is part of the warm-up), synchronised
  graphed_dispatch  (CUDA) the same call's host time alone

Each figure is the median of ``--repeats`` timed calls after ``--warmup`` untimed ones. With ``--profile DIR`` it
also writes the profiler's kernel table of one application. The per-step cost at the default cadence is
``application / every_n_steps``; the end-to-end figure (DBC-DAC on vs off in the compiled step) comes from
``bench/train_step.py --variants apt-fast apt-fast-nodbc``.

Usage:
  python bench/dbc_dac.py --out /tmp/dbc_dac.json                              # GPU
  python bench/dbc_dac.py --device cpu --preset tiny --repeats 2 --out /tmp/d.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt_model.config import DBCDACConfig, model_preset
from apt_model.io import atomic_write_json
from apt_model.model import APTModel
from apt_model.model.dbc_dac import DBCDAC, _Plan, clean_nonfinite_, clean_nonfinite_all_, stabilize_batch
from bench.train_step import _sync


def _median_seconds(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, sync_after: bool
) -> float:
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        if sync_after:
            _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        _sync(device)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = APTModel(model_preset(args.preset, vocab_size=args.vocab)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    cfg = DBCDACConfig(every_n_steps=1)  # every call applies; otherwise the default configuration
    dbc = DBCDAC(cfg, seed=0)
    plan = _Plan.of(params, dbc.is_target)  # the library's own grouping of the targets
    grads = plan.grads
    gen = dbc.generator(device)

    def stabilize_groups() -> None:
        for group in plan.groups:
            stabilize_batch(torch.stack(group), cfg, gen)

    w, r = args.warmup, args.repeats
    seconds = {
        "application": _median_seconds(lambda: dbc.step(params, 1), device, w, r, sync_after=True),
        "dispatch": _median_seconds(lambda: dbc.step(params, 1), device, w, r, sync_after=False),
        "clean_each": _median_seconds(lambda: [clean_nonfinite_(g) for g in grads], device, w, r, True),
        "clean_all": _median_seconds(lambda: clean_nonfinite_all_(grads), device, w, r, True),
        "stabilize": _median_seconds(stabilize_groups, device, w, r, True),
    }
    if device.type == "cuda":
        graphed = DBCDAC(cfg, seed=0, cuda_graph=True)
        seconds["graphed"] = _median_seconds(lambda: graphed.step(params, 1), device, max(w, 1), r, True)
        seconds["graphed_dispatch"] = _median_seconds(lambda: graphed.step(params, 1), device, w, r, False)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "vocab": args.vocab,
        "parameters": len(params),
        "target_groups": {"x".join(map(str, g[0].shape)): len(g) for g in plan.groups},
        "every_n_steps_default": DBCDACConfig().every_n_steps,
        "repeats": r,
        "ms": {k: round(v * 1e3, 3) for k, v in seconds.items()},
        "ms_per_step_at_default_cadence": round(
            seconds["application"] * 1e3 / DBCDACConfig().every_n_steps, 3
        ),
        "clean_each_over_all": round(seconds["clean_each"] / seconds["clean_all"], 2),
    }
    if "graphed" in seconds:
        report["eager_over_graphed"] = round(seconds["application"] / seconds["graphed"], 2)
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            dbc.step(params, 1)
            _sync(device)
        sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=25)
        args.profile.mkdir(parents=True, exist_ok=True)
        (args.profile / "dbc_dac_profile.txt").write_text(table)
        launches = Counter(e.key for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        report["kernels_per_application"] = sum(launches.values())
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="playground")
    p.add_argument("--vocab", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--profile", type=Path, default=None, help="folder for the kernel table of one application"
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    atomic_write_json(args.out, report)
    for k, v in report["ms"].items():
        print(f"{k:>12}: {v:9.3f} ms")
    print(f"per step at the default cadence: {report['ms_per_step_at_default_cadence']} ms; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
