"""Compile the fused transform's Triton kernels in a child process while the parent compiles the training step.

On a cold machine the first step of a compiled GPU run takes about a minute (BENCHMARKS.md): torch.compile traces
and lowers the forward and the backward, and only when the compiled code first runs does Triton compile the fused
autopoietic transform's own kernels (three forward, five backward, per attention shape), one after the other, in
the parent. A child process started beside the compilation runs the same model eagerly on a batch of the training
shape, forward and backward (and the no-grad forward of evaluation), so those kernels are compiled into Triton's
on-disk cache (``TRITON_CACHE_DIR``, inherited) in parallel; the parent then loads them instead of compiling them.

The child changes nothing but that cache: its results are thrown away, a child that fails or is late costs only
the time the parent would have spent anyway (it compiles what it does not find), and it is reaped after the first
epoch (killed if it is still running then). It holds a CUDA context and a 16-row model on the parent's GPU for the
~20 s it runs. On an H200 the README recipe's first step took 32.0 s with it and 42.5 s without, from cold caches on
one host at once (BENCHMARKS.md). ``APT_PREWARM_KERNELS=0`` turns it off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from apt_model.config import ModelConfig

ENV_SWITCH = "APT_PREWARM_KERNELS"
# Rows of the child's batch: what the kernels specialise on does not depend on the batch size (it sets the grid),
# except whether entry counts divide by 16, which 16 rows keep as the training batch has them for any batch size
# that is a multiple of 16. Few rows keep the child's memory small beside the parent on an 8 GB card.
CHILD_ROWS = 16


@dataclass
class Prewarm:
    """A running child; :meth:`reap` waits for it (briefly) and returns what the training report keeps."""

    process: subprocess.Popen[str]
    started: float

    def reap(self, timeout: float = 2.0) -> dict[str, object]:
        """Called after the parent's first epoch, by which time the parent has compiled whatever the child has not:
        a child still running then only takes GPU and CPU time, so it gets ``timeout`` seconds, then is killed."""
        killed = False
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
            killed = True
        result: dict[str, object] = {
            "rc": self.process.returncode,
            "seconds": round(time.perf_counter() - self.started, 3),
            "killed": killed,
        }
        lines = (out or "").strip().splitlines()
        if self.process.returncode == 0 and lines:
            with contextlib.suppress(ValueError):  # a child that printed something else: its rc is enough
                result["child"] = json.loads(lines[-1])
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def wanted(device: torch.device, compiled: bool, transform_kernel: str) -> bool:
    """A compiled CUDA run whose transform is the fused Triton one, unless ``APT_PREWARM_KERNELS=0``."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    return compiled and device.type == "cuda" and transform_kernel == "triton"


def start(
    model_config: ModelConfig, *, device: torch.device, precision: str, src_len: int, tgt_len: int
) -> Prewarm:
    """Start the child on the parent's device (same ``CUDA_VISIBLE_DEVICES``, same index) and return at once."""
    argv = [
        sys.executable,
        "-m",
        "apt_model.training.prewarm",
        "--model-config",
        model_config.to_json(),
        "--device",
        str(device),
        "--precision",
        precision,
        "--src-len",
        str(src_len),
        "--tgt-len",
        str(tgt_len),
    ]
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    return Prewarm(process, time.perf_counter())


def run(
    model_config: ModelConfig, *, device: torch.device, precision: str, src_len: int, tgt_len: int, rows: int
) -> dict[str, float]:
    """One training-shaped forward + backward and one no-grad forward, eagerly; seconds of each."""
    from apt_model.model import APTModel
    from apt_model.model.fused_transform import set_transform_kernel
    from apt_model.training.loop import autocast_context

    if device.type == "cuda":
        set_transform_kernel("triton")
    torch.manual_seed(0)
    model = APTModel(model_config).to(device)
    # Token ids past the special ones, with the last positions padded as a real batch's are: the masks then have
    # the training batches' shapes.
    high = max(model_config.vocab_size, 8)
    src = torch.randint(4, high, (rows, src_len), device=device)
    tgt = torch.randint(4, high, (rows, tgt_len), device=device)
    src[:, -1] = tgt[:, -1] = model_config.pad_id
    seconds: dict[str, float] = {}
    mark = time.perf_counter()
    with autocast_context(device, precision):
        logits = model(src, tgt)
    logits.float().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds["train_step"] = round(time.perf_counter() - mark, 3)
    mark = time.perf_counter()
    model.eval()
    with torch.no_grad(), autocast_context(device, precision):
        model(src, tgt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds["eval_forward"] = round(time.perf_counter() - mark, 3)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apt_model.training.prewarm", description=__doc__)
    parser.add_argument("--model-config", required=True, help="ModelConfig as JSON")
    parser.add_argument("--device", required=True)
    parser.add_argument("--precision", required=True)
    parser.add_argument("--src-len", type=int, required=True)
    parser.add_argument("--tgt-len", type=int, required=True)
    parser.add_argument("--rows", type=int, default=CHILD_ROWS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    seconds = run(
        ModelConfig.from_json(args.model_config),
        device=torch.device(args.device),
        precision=args.precision,
        src_len=args.src_len,
        tgt_len=args.tgt_len,
        rows=args.rows,
    )
    print(json.dumps({**seconds, "total": round(time.perf_counter() - started, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
