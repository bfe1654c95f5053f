"""Where one training step's time goes: GPU busy time against wall time, host time per part, kernels by kind.

`bench/train_step.py` gives ms/step; this says whether that time is the GPU's or the host's. For each variant and
batch size it builds the same step (`train_step.build_apt_step`), warms it up, then:

1. times `--steps` steps with CUDA events (ms/step, as train_step.py does);
2. times the host side of the same number of steps with `time.perf_counter` around each part of
   `TrainStep.__call__` (the compiled loss call, the backward call, DBC-DAC, clipping, the optimizer, clearing the
   gradients; the rest of the step is the one host sync, where the host waits for the GPU);
3. records `--steps` steps under `torch.profiler` with CUDA activity and sums, from the trace, the time at least
   one kernel (or copy) ran — the GPU's busy time — and each kernel's total, grouped into kinds by name.

Wall time well above GPU busy time means the GPU waits for the host (launches, Python, the sync); wall time close to
it means the kernels themselves are what to shrink.

Usage (GPU): python bench/step_profile.py --batch 256 16 --variants plain-fast apt-fast --out OUT/step_profile.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import build_apt_step, make_batch

# Kinds of kernel, first match wins (names as the CUDA trace shows them).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "transform (fused Triton)",
        (
            "rows_fwd_kernel",
            "rows_bwd_kernel",
            "stats_fwd_kernel",
            "stats_bwd_kernel",
            "heads_fwd_kernel",
            "heads_bwd_kernel",
            "scores_bwd_kernel",
            "mlp_param_grad_kernel",
        ),
    ),
    ("matmul", ("gemm", "cutlass", "sm90_", "sm100_", "nvjet", "cublas", "xmma", "gemv")),
    ("attention (SDPA)", ("flash", "fmha", "attention", "efficient_attention")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    # Before "copy / fill": inductor names its kernels after the ops they fuse, and most of ours hold a "_to_copy"
    # (the ninth session's profiles counted ~2.7 ms of layer norms and dropouts as copies that way).
    ("inductor (fused elementwise / reductions)", ("triton_",)),
    ("copy / fill", ("memcpy", "memset", "copy_", "fill", "zero")),
    ("reduce (torch)", ("reduce_kernel", "norm")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def busy_union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by at least one interval (µs)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def gpu_time_from_trace(trace_path: Path) -> dict[str, Any]:
    opener = gzip.open if trace_path.suffix == ".gz" else open
    with opener(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    per_name: dict[str, list[float]] = defaultdict(list)
    for e in gpu:
        per_name[e["name"]].append(float(e["dur"]))
    intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu]
    span = (max(e for _, e in intervals) - min(s for s, _ in intervals)) if intervals else 0.0
    return {
        "n_gpu_events": len(gpu),
        "busy_us": busy_union(intervals),
        "span_us": span,
        "per_name": {k: (len(v), sum(v)) for k, v in per_name.items()},
    }


class HostTimer:
    """Accumulates host seconds per part; wraps callables in place."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[part] += time.perf_counter() - t

        return timed


def host_breakdown(step_fn, batch: dict, steps: int) -> dict[str, float]:
    """Host ms per step spent in each part of the step (no extra synchronisation is added)."""
    stepper = step_fn.stepper
    timer = HostTimer()
    saved = {
        "_loss": stepper._loss,
        "backward": stepper.backward,
        "_clear_grads": stepper._clear_grads,
        "opt_step": stepper.optimizer.step,
        "clip": torch.nn.utils.clip_grad_norm_,
        "dbc": stepper.dbc.step if stepper.dbc is not None else None,
    }
    stepper._loss = timer.wrap(saved["_loss"], "compiled loss call (forward + graph launch)")
    stepper.backward = timer.wrap(saved["backward"], "backward() in all (loss call + .backward())")
    stepper._clear_grads = timer.wrap(saved["_clear_grads"], "clear gradients")
    stepper.optimizer.step = timer.wrap(saved["opt_step"], "optimizer step")
    torch.nn.utils.clip_grad_norm_ = timer.wrap(saved["clip"], "clip_grad_norm_")
    if stepper.dbc is not None:
        stepper.dbc.step = timer.wrap(saved["dbc"], "DBC-DAC (every 20th step applies)")
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step_fn(batch)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    finally:
        stepper._loss = saved["_loss"]
        stepper.backward = saved["backward"]
        stepper._clear_grads = saved["_clear_grads"]
        stepper.optimizer.step = saved["opt_step"]
        torch.nn.utils.clip_grad_norm_ = saved["clip"]
        if stepper.dbc is not None:
            stepper.dbc.step = saved["dbc"]
    out = {k: 1000 * v / steps for k, v in timer.seconds.items()}
    named = sum(v for k, v in out.items() if k != "compiled loss call (forward + graph launch)")
    out["whole step (host clock)"] = 1000 * total / steps
    out["rest: sync wait (loss + norm read back), schedule, Python"] = out["whole step (host clock)"] - named
    return out


def profile(step_fn, batch: dict, steps: int, trace_dir: Path, tag: str) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step_fn(batch)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        g = gpu_time_from_trace(raw)
        trace_dir.mkdir(parents=True, exist_ok=True)
        with open(raw, "rb") as src, gzip.open(trace_dir / f"trace_{tag}.json.gz", "wb") as dst:
            dst.write(src.read())
    by_kind: dict[str, float] = defaultdict(float)
    for name, (_, us) in g["per_name"].items():
        by_kind[kind_of(name)] += us
    top = sorted(g["per_name"].items(), key=lambda kv: -kv[1][1])[:40]
    return {
        "gpu_events_per_step": g["n_gpu_events"] / steps,
        "gpu_busy_ms_per_step": g["busy_us"] / 1000 / steps,
        "gpu_span_ms_per_step": g["span_us"] / 1000 / steps,
        "kernel_ms_per_step_by_kind": {
            k: v / 1000 / steps for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
        },
        "top_kernels": [
            {"name": n[:160], "calls_per_step": c / steps, "ms_per_step": us / 1000 / steps}
            for n, (c, us) in top
        ],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apt_model.model.fused_transform import set_transform_kernel

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    max_len = max(args.src_len, args.tgt_len) + 8
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "argv": sys.argv[1:],
        "results": [],
    }
    for b in args.batch:
        batch = make_batch(b, args.src_len, args.tgt_len, args.vocab, device, seed=b)
        for variant in args.variants:
            set_transform_kernel("torch" if variant.endswith("-torch") else "auto")
            graphs = False if variant.endswith("nographs") else None
            step_fn, _ = build_apt_step(variant, device, args.vocab, max_len, graphs)
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                step_fn(batch)
            torch.cuda.synchronize()
            warmup_s = time.perf_counter() - t0
            windows = []
            for _ in range(args.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.steps):
                    step_fn(batch)
                end.record()
                end.synchronize()
                windows.append(start.elapsed_time(end) / args.steps)
            r: dict[str, Any] = {
                "variant": variant,
                "batch": b,
                "warmup_s": warmup_s,
                "ms_per_step": statistics.median(windows),
                "ms_windows": windows,
                "host_ms_per_step": host_breakdown(step_fn, batch, args.steps),
            }
            r.update(profile(step_fn, batch, args.steps, args.trace_dir, f"{variant}_B{b}"))
            report["results"].append(r)
            print(
                f"B={b:<4} {variant:<16} {r['ms_per_step']:7.2f} ms/step  GPU busy {r['gpu_busy_ms_per_step']:6.2f} ms"
                f"  ({r['gpu_events_per_step']:.0f} GPU events/step)",
                flush=True,
            )
            for k, v in r["host_ms_per_step"].items():
                print(f"    host  {k:<60} {v:7.3f} ms", flush=True)
            for k, v in r["kernel_ms_per_step_by_kind"].items():
                print(f"    gpu   {k:<60} {v:7.3f} ms", flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2) + "\n")
            del step_fn
            torch.cuda.empty_cache()
    set_transform_kernel("auto")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[256, 16])
    p.add_argument("--variants", nargs="+", default=["plain-fast", "apt-fast"])
    p.add_argument("--src-len", type=int, default=64)
    p.add_argument("--tgt-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="steps per window (one DBC-DAC application at 20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    p.add_argument("--trace-dir", type=Path, default=Path("/tmp/step_traces"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print("step_profile: needs a CUDA device", file=sys.stderr)
        return 2
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
