"""Dropout's random numbers, alone: forward + backward of ``dropout(gelu(x))`` compiled, one card.

The B=256 training step spends a large share of its fused elementwise kernels drawing dropout's random numbers
(BENCHMARKS.md, step profiles). This times the ways of drawing them on the FFN's shape (``[B·64, 1024]`` bf16):

- ``inductor``: torch.compile's own dropout, one Philox call per element;
- ``fallback``: ``fallback_random``: ATen's uniform kernel (four numbers per Philox call, an fp32 tensor in memory);
- ``int16``: ATen ``randint`` into int16 (four per call, half the bytes), compared against ``round(p·2^16)``;
- ``bits64``: ATen's full-range int64 draw viewed as four int16 (eight numbers per Philox call);
- ``mask``: :func:`apt_model.model.dropout.keep_mask` (a Triton kernel: eight 16-bit draws per Philox call, a
  bool mask in memory).

Each also reports the kept fraction (should be ``1 − p``) and whether two calls drew different masks.
CUDA events, warm-up excluded, median of repeats.

Usage: python bench/dropout_rng.py --out bench/results/dropout_rng.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt_model.io import atomic_write_json
from apt_model.model import dropout as apt_dropout


def _inductor(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(F.gelu(x), p, True)


def _int16(x: torch.Tensor, p: float) -> torch.Tensor:
    bits = torch.randint(-32768, 32768, x.shape, dtype=torch.int16, device=x.device)
    keep = bits >= apt_dropout.keep_threshold(p) - 32768
    return F.gelu(x) * keep * (1.0 / (1.0 - p))


def _bits64(x: torch.Tensor, p: float) -> torch.Tensor:
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    bits = words.view(torch.int16)[:n].view(x.shape)
    keep = bits >= apt_dropout.keep_threshold(p) - 32768
    return F.gelu(x) * keep * (1.0 / (1.0 - p))


def _mask(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.gelu(x) * apt_dropout.keep_mask(x, p) * (1.0 / (1.0 - p))


VARIANTS = {
    "inductor": (_inductor, {}),
    "fallback": (_inductor, {"fallback_random": True}),
    "int16": (_int16, {"fallback_random": True}),
    "bits64": (_bits64, {"fallback_random": True}),
    "mask": (_mask, {}),
}


def run(variant: str, rows: int, cols: int, p: float, iters: int, repeats: int) -> dict[str, Any]:
    fn, options = VARIANTS[variant]
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=False, options=options)
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)

    def once() -> torch.Tensor:
        y = compiled(x, p)
        y.backward(g)
        x.grad = None
        return y

    for _ in range(3):
        once()
    with torch.no_grad():
        a = compiled(x, p) != 0
        b = compiled(x, p) != 0
    kept = float(a.float().mean())
    torch.cuda.synchronize()
    windows = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            once()
        end.record()
        end.synchronize()
        windows.append(start.elapsed_time(end) / iters)
    return {
        "variant": variant,
        "ms_fwd_bwd": statistics.median(windows),
        "kept_fraction": kept,
        "masks_differ": bool((a != b).any()),
        "agreement_of_two_masks": float((a == b).float().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256 * 64)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--p", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    results = []
    for v in variants:
        r = run(v, args.rows, args.cols, args.p, args.iters, args.repeats)
        print(r, flush=True)
        results.append(r)
    atomic_write_json(
        args.out,
        {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "argv": sys.argv[1:],
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
