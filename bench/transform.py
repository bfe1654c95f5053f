"""Forward + backward time of the autopoietic transform alone, compiled, on one card.

Measures `apt_model.model.autopoietic.autopoietic_probs` on scores `[B, 8, 64, 64]` (the Playground shape, causal
mask) against the same transform whose step-4 MLP is a matmul over the hidden dim (the formulation the library
used before; kept here only as the comparison), and the fused Triton kernels (`apt_model.model.fused_transform`,
the default on CUDA) with their defaults and with 8 rows per program in the row and head kernels.
Also times the plain softmax of the same scores, the floor any attention pays. CUDA events, warm-up excluded, median of repeats.

Usage: python bench/transform.py --out bench/results/transform.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt_model.io import atomic_write_json
from apt_model.model import autopoietic, fused_transform
from apt_model.model.attention import causal_mask


def _matmul_element_mlp(a0, w1, b1, w2):
    """Step 4 as ``matmul(hidden, w2)``: materialises the [B, Lq, Lk, h] hidden tensor."""
    hidden = torch.relu(torch.clamp(a0.unsqueeze(-1) * w1[:, 0] + b1, -5.0, 5.0))
    return torch.matmul(hidden, w2[0])


def _softmax_only(scores, masked, tau, w1, b1, w2, b2, *, eps):
    return autopoietic.masked_softmax(scores, masked).to(scores.dtype)


def _fused(scores, masked, tau, w1, b1, w2, b2, *, eps):
    return fused_transform.fused_autopoietic_probs(scores, masked, tau, w1, b1, w2, b2, eps)


def time_fn(fn, args: tuple, device: torch.device, warmup: int, iters: int, repeats: int) -> float:
    params = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def once() -> None:
        out = fn(*args, eps=1e-6)
        out.float().square().sum().backward()
        for p in params:
            p.grad = None

    for _ in range(warmup):
        once()
    torch.cuda.synchronize(device)
    windows = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            once()
        end.record()
        end.synchronize()
        windows.append(start.elapsed_time(end) / iters)
    return statistics.median(windows)


def gpu_time(fn, args: tuple, device: torch.device, iters: int) -> dict[str, float]:
    """Kernel time on the GPU per forward + backward (torch.profiler), all kernels and the fused ones by name.

    Wall time (``time_fn``) can be the host's: an eager call issues its launches from Python. This is the GPU's own.
    """
    from torch.profiler import ProfilerActivity, profile

    params = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            out = fn(*args, eps=1e-6)
            out.float().square().sum().backward()
            for p in params:
                p.grad = None
        torch.cuda.synchronize(device)
    per_call = {"all kernels": 0.0}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0.0)
        if us <= 0:
            continue
        per_call["all kernels"] += us / 1000 / iters
        if any(name in evt.key for name in FUSED_KERNELS):
            per_call[evt.key] = us / 1000 / iters
    return per_call


# The fused transform's kernels (apt_model/model/_transform_triton.py), timed one by one.
FUSED_KERNELS = (
    "rows_fwd_kernel",
    "stats_fwd_kernel",
    "heads_fwd_kernel",
    "heads_bwd_kernel",
    "stats_bwd_kernel",
    "rows_bwd_kernel",
    "scores_bwd_kernel",
    "mlp_param_grad_kernel",
)


def write(out: Path | None, device: torch.device, results: list[dict[str, Any]]) -> None:
    if out is None:
        return
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 256])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--skip-matmul",
        action="store_true",
        help="leave out the matmul-MLP comparison (measured before, slow)",
    )
    p.add_argument(
        "--sweep",
        nargs="*",
        default=[],
        metavar="KNOB=N[,KNOB=N]",
        help="extra fused variants with fused_transform's launch settings changed",
    )
    p.add_argument("--only-fused", action="store_true", help="time only the fused variants")
    args = p.parse_args(argv)
    sweep: dict[str, dict[str, int]] = {}  # checked before anything touches the GPU
    for setting in args.sweep:  # e.g. ROW_WARPS=2 or MLP_BLOCK=64,MLP_WARPS=2
        try:
            sweep[setting] = dict(fused_transform.parse_launch_setting(kv) for kv in setting.split(","))
        except ValueError as exc:
            p.error(f"--sweep {exc}")
    device = torch.device("cuda")
    mod = autopoietic.AutopoieticTransform(args.hidden).to(device)
    weights = (mod.tau, mod.w1, mod.b1, mod.w2, mod.b2)
    library_mlp = autopoietic.element_mlp
    # name: (function, step-4 implementation in place while it is traced and timed, fused_transform settings)
    knobs = fused_transform.LAUNCH_SETTINGS
    default = {name: getattr(fused_transform, name) for name in knobs}
    variants = {
        # The undecorated transform: one call compiles the same with or without the nested-region marker, and
        # the published figures were taken without it.
        "library (sum over h)": (autopoietic._autopoietic_probs, library_mlp, {}),
        "matmul over h": (autopoietic._autopoietic_probs, _matmul_element_mlp, {}),
        "softmax only": (_softmax_only, library_mlp, {}),
        "fused Triton": (_fused, library_mlp, {}),
        "fused, 8 rows/program": (_fused, library_mlp, {"ROWS_PER_PROGRAM": 8}),
    }
    for setting, pairs in sweep.items():
        variants[f"fused, {setting}"] = (_fused, library_mlp, pairs)
    if args.skip_matmul:
        del variants["matmul over h"]
    if args.only_fused:
        variants = {k: v for k, v in variants.items() if v[0] is _fused}
    results: list[dict[str, Any]] = []
    for b in args.batch:
        g = torch.Generator(device=device).manual_seed(b)
        scores = torch.randn(b, 8, 64, 64, device=device, generator=g, dtype=torch.bfloat16) * 3
        masked = causal_mask(64, 64, device).unsqueeze(0)
        scores = scores.masked_fill(masked.unsqueeze(1), float("-inf")).requires_grad_(True)
        for name, (fn, mlp, settings) in variants.items():
            # The fused op is opaque to inductor (a custom op): compiling it would only add the tracing.
            compiled = fn if fn is _fused else torch.compile(fn, dynamic=False)
            for key, value in {**default, **settings}.items():
                setattr(fused_transform, key, value)
            autopoietic.element_mlp = mlp
            try:
                ms = time_fn(
                    compiled, (scores, masked, *weights), device, args.warmup, args.iters, args.repeats
                )
                gpu = gpu_time(compiled, (scores, masked, *weights), device, args.iters)
            finally:
                autopoietic.element_mlp = library_mlp
                for key, value in default.items():
                    setattr(fused_transform, key, value)
            results.append({"batch": b, "variant": name, "ms_fwd_bwd": ms, "gpu_ms": gpu})
            write(args.out, device, results)  # after every variant: a run cut short keeps what it measured
            kernels = "  ".join(f"{k} {v:.3f}" for k, v in gpu.items() if k != "all kernels")
            print(
                f"B={b:<4} {name:<24} {ms:7.3f} ms fwd+bwd (wall)  GPU {gpu['all kernels']:7.3f} ms  {kernels}",
                flush=True,
            )
            torch._dynamo.reset()
    write(args.out, device, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
