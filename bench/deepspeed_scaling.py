"""DeepSpeed backend on GPUs: ZeRO-2 bf16 throughput at 1/2/4 GPUs, and a ZeRO-3 + CPU-offload train + exact resume.

Everything goes through the backend itself (``apt_model.backends.deepspeed_backend.DeepSpeedBackend``: torchrun,
NCCL, the generated ``deepspeed_config.json``), so the numbers are those of ``apt train --backend deepspeed``.

1. **Scaling** — for each world size in ``--gpus`` (default 1 2 4, capped at the visible GPUs): ZeRO-2, bf16, the
   ``--preset`` model (default ``playground``) on a generated hardcore dataset, ``--epochs`` epochs at a fixed micro
   batch per GPU (weak scaling). Throughput is ``tokens_per_s`` of ``experiment_report.json`` (target tokens trained
   per second of epoch wall time, all ranks together), the median over the epochs between the first and the last,
   divided by the world size → tokens/s per GPU, plus the scaling efficiency against 1 GPU. Those epochs hold
   training only: the first holds start-up costs, and validation and the checkpoint run after the last epoch only
   (``--epochs`` ≥ 3). ``--repeats R`` runs the world sizes R times, interleaved; ``summary`` in the JSON gives, per
   world size, the median, min and max over the runs, the medians' ratio and every repeat's own ratio. Single runs
   moved the 2- and 4-GPU ratios by ±0.1 between calls on one host (BENCHMARKS.md), so the target needs medians.
2. **ZeRO-3 + offload resume** — 2 GPUs, ZeRO-3 with parameter and optimizer offload, bf16: 2 epochs uninterrupted vs
   1 epoch + ``--load-checkpoint checkpoint_epoch_1`` for the second; the per-step losses of epoch 2 must agree
   (max abs difference reported; exact on deterministic kernels) and the export must load.

Results: a JSON file (``--out``, default ``bench/results/deepspeed_scaling_<date>.json``) and a table on stdout.

Usage (GPU host with deepspeed installed; see shared/device/deepspeed.md for carrying the wheels):
  python bench/deepspeed_scaling.py                       # the full run
  python bench/deepspeed_scaling.py --gpus 2 --skip-resume --preset tiny --epochs 3   # quick look
  python bench/deepspeed_scaling.py --compile on --skip-resume    # the scaling runs with the compiled model
  python bench/deepspeed_scaling.py --overlap-comm --skip-resume  # ZeRO-2 overlapping reduction with backward
  python bench/deepspeed_scaling.py --bind-cores --skip-resume    # each rank pinned to its own CPU cores
  python bench/deepspeed_scaling.py --repeats 3 --epochs 4 --skip-resume   # medians of 3 interleaved runs each
  DS_ACCELERATOR=cpu python bench/deepspeed_scaling.py --cpu-smoke   # CPU processes, tiny model (plumbing only)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt_model.backends import TrainRequest
from apt_model.backends.deepspeed_backend import DeepSpeedBackend, build_ds_config
from apt_model.config import DataConfig, TrainConfig, model_preset
from apt_model.io import atomic_write_json


def make_dataset(path: Path, size: str) -> Path:
    from apt_model.data import generate, write_dataset

    if not path.exists():
        write_dataset(generate("hardcore", seed=0, size=size), path)
    return path


def run(
    dataset: Path,
    out: Path,
    *,
    preset: str,
    epochs: int,
    micro: int,
    accum: int,
    save_interval: int | None = None,
    compile_model: str = "off",
    transform_kernel: str = "auto",
    **options: Any,
) -> tuple[dict[str, Any], dict[str, Any], float]:
    request = TrainRequest(
        model=model_preset(preset),
        # Validation only after the last epoch: a per-epoch evaluation is a fixed cost per epoch (every rank runs it),
        # so at 4 GPUs, with a quarter of the steps per epoch, it would weigh four times as much in tokens/s.
        train=TrainConfig(
            epochs=epochs,
            batch_size=micro,
            grad_accum=accum,
            save_interval=save_interval or epochs,
            eval_every=epochs + 1,
            log_every=1,
            precision="auto",
            compile=compile_model,
            transform_kernel=transform_kernel,
        ),
        data=DataConfig(max_src_len=64, max_tgt_len=64),
        dataset=dataset,
        out_dir=out,
        tracking_uri="none",
        options={"overwrite": True, **options},
    )
    backend = DeepSpeedBackend()
    t0 = time.perf_counter()
    backend.validate(request)
    result = backend.train(request)
    wall = time.perf_counter() - t0
    report = json.loads(Path(result.report).read_text(encoding="utf-8"))
    return result.to_dict(), report, wall


def overlap_comm_config(args: argparse.Namespace, root: Path, world: int) -> Path:
    """The generated ZeRO-2 config with ``overlap_comm`` on, as a ``--deepspeed-config`` file (the one difference)."""
    config = build_ds_config(
        zero_stage=2,
        offload=False,
        precision="fp32" if args.cpu_smoke else "bf16",
        micro_batch=args.micro,
        grad_accum=args.accum,
        world_size=world,
        clip_grad_norm=TrainConfig().clip_grad_norm,
    )
    config["zero_optimization"]["overlap_comm"] = True
    path = root / f"ds_config_overlap_comm_{world}gpu.json"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def measured_epochs(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epochs that hold training only: all but the first (start-up) and the last (validation, export)."""
    return epochs[1:-1] if len(epochs) >= 3 else epochs[-1:]


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per world size over its runs: median, min and max tokens/s per GPU, the median's ratio to the 1-GPU median
    (``efficiency_vs_1gpu_median``), each repeat's own ratio (against the 1-GPU run of the same repeat), which shows
    the spread, and the median of those (``efficiency_per_repeat_median``: the figure BENCHMARKS.md reports, since
    each of its ratios is taken inside one repeat, on one state of the host)."""
    by_gpus: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_gpus.setdefault(r["gpus"], []).append(r)
    one = {r["repeat"]: r["tokens_per_s_per_gpu"] for r in by_gpus.get(1, [])}
    base = statistics.median(one.values()) if one else None
    out = {}
    for n, runs in sorted(by_gpus.items()):
        values = [r["tokens_per_s_per_gpu"] for r in runs]
        median = statistics.median(values)
        own = [r["tokens_per_s_per_gpu"] / one[r["repeat"]] for r in runs if r["repeat"] in one]
        out[str(n)] = {
            "runs": len(runs),
            "tokens_per_s_per_gpu_median": median,
            "tokens_per_s_per_gpu_min": min(values),
            "tokens_per_s_per_gpu_max": max(values),
            "efficiency_vs_1gpu_median": median / base if base else None,
            "efficiency_per_repeat": own,
            "efficiency_per_repeat_median": statistics.median(own) if own else None,
        }
    return out


def scaling(
    args: argparse.Namespace,
    dataset: Path,
    root: Path,
    gpus: list[int],
    on_run: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
) -> list[dict[str, Any]]:
    rows = []
    # Interleaved (1, 2, 4, 1, 2, 4, …): a slow phase of the host then touches every world size alike.
    for repeat, n in ((k, n) for k in range(args.repeats) for n in gpus):
        opts: dict[str, Any] = {"num_gpus": n, "zero_stage": 2}
        if not args.cpu_smoke:
            opts["bf16"] = True
        if args.overlap_comm:
            opts = {"num_gpus": n, "deepspeed_config": str(overlap_comm_config(args, root, n))}
        if args.bind_cores:
            opts["bind_cores"] = True
        result, report, wall = run(
            dataset, root / f"zero2_{n}gpu_r{repeat}", preset=args.preset, epochs=args.epochs, micro=args.micro,
            accum=args.accum, compile_model=args.compile, transform_kernel=args.transform_kernel, **opts,
        )  # fmt: skip
        measured = measured_epochs(report["epochs"])
        tokens_per_s = statistics.median(e["tokens_per_s"] for e in measured)
        last = measured[-1]
        rows.append(
            {
                "gpus": n,
                "repeat": repeat,
                "epochs_measured": len(measured),
                "zero_stage": 2,
                "compiled": report["runtime"]["compiled"],
                "transform_kernel": report["runtime"].get("transform_kernel"),
                "precision": report["runtime"]["precision"],
                "micro_batch_per_gpu": args.micro,
                "grad_accum": args.accum,
                "train_batch_size": report["runtime"]["train_batch_size"],
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_gpu": tokens_per_s / n,
                "epoch_seconds": statistics.median(e["epoch_seconds"] for e in measured),
                "steps_per_epoch": report["runtime"]["steps_per_epoch"],
                "train_loss": last["train_loss"],
                "overlap_comm": bool(args.overlap_comm),
                "rank0_cpus": report["runtime"].get("rank0_cpus"),
                "dataset_size": args.size,
                "wall_s_including_start": wall,
                "out_dir": result["out_dir"],
            }
        )
        print(
            f"ZeRO-2 {rows[-1]['precision']} {n} GPU(s), repeat {repeat}: "
            f"{rows[-1]['tokens_per_s_per_gpu']:.0f} tokens/s per GPU"
        )
        base = next(
            (r["tokens_per_s_per_gpu"] for r in rows if r["gpus"] == 1 and r["repeat"] == repeat), None
        )
        for r in rows:
            if r["repeat"] == repeat:
                r["efficiency_vs_1gpu"] = r["tokens_per_s_per_gpu"] / base if base else None
        on_run(rows)
    return rows


def zero3_resume(args: argparse.Namespace, dataset: Path, root: Path) -> dict[str, Any]:
    from apt_model.checkpoint import load_model

    opts: dict[str, Any] = {"num_gpus": 2, "zero_stage": 3, "cpu_offload": True}
    if not args.cpu_smoke:
        opts["bf16"] = True
    common = dict(
        preset=args.preset,
        epochs=2,
        micro=args.micro,
        accum=args.accum,
        save_interval=1,
        transform_kernel=args.transform_kernel,
    )
    full, full_report, wall_full = run(dataset, root / "zero3_offload_full", **common, **opts)
    ckpt = Path(full["out_dir"]) / "checkpoint_epoch_1"
    resumed, res_report, wall_res = run(
        dataset, root / "zero3_offload_resumed", **common, load_checkpoint=str(ckpt), **opts
    )
    spe = full_report["runtime"]["steps_per_epoch"]
    a = [loss for step, loss in full_report["batch_losses"] if step > spe]
    b = [loss for step, loss in res_report["batch_losses"] if step > spe]
    diff = (
        max((abs(x - y) for x, y in zip(a, b, strict=True)), default=float("nan"))
        if len(a) == len(b)
        else None
    )
    loaded = load_model(resumed["final_model"])
    out = {
        "gpus": 2,
        "zero_stage": 3,
        "offload": True,
        "transform_kernel": full_report["runtime"].get("transform_kernel"),
        "precision": full_report["runtime"]["precision"],
        "steps_compared": len(a),
        "max_abs_loss_diff_after_resume": diff,
        "export_loads": loaded.config.d_model == model_preset(args.preset).d_model,
        "tokens_per_s_epoch2": full_report["epochs"][-1]["tokens_per_s"],
        "wall_s": {"full": wall_full, "resumed": wall_res},
    }
    print(f"ZeRO-3 + offload resume: max |Δloss| over {len(a)} steps = {diff}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--preset", default="playground")
    parser.add_argument(
        "--epochs", type=int, default=3, help=">= 3: the measured epoch is the one before the last"
    )
    parser.add_argument("--micro", type=int, default=32, help="micro batch per GPU")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--size", default="default", help="hardcore dataset size (small|default|large|xl)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_deepspeed"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument(
        "--compile",
        choices=("off", "on"),
        default="off",
        help="scaling runs with the compiled model (ZeRO-2)",
    )
    parser.add_argument(
        "--transform-kernel",
        choices=("auto", "triton", "torch"),
        default="auto",
        help="the autopoietic transform: fused Triton kernels (auto on CUDA) or torch ops",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="folder: each rank profiles 10 steps of epoch 2 (diagnostics)",
    )
    parser.add_argument(
        "--overlap-comm",
        action="store_true",
        help="ZeRO-2 with overlap_comm on (the generated config otherwise; passed as --deepspeed-config)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per world size, interleaved (1, 2, 4, 1, 2, 4, …); the summary gives medians and spreads",
    )
    parser.add_argument(
        "--bind-cores", action="store_true", help="pin each rank to its own share of the CPU cores"
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="CPU processes, fp32 (checks the plumbing only)"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    import torch

    if args.cpu_smoke:
        args.preset, args.micro, args.epochs, args.size = "tiny", 8, 3, "small"
        available = 2
    else:
        if not torch.cuda.is_available():
            parser.error("needs CUDA GPUs (or --cpu-smoke)")
        available = torch.cuda.device_count()
    gpus = [n for n in args.gpus if n <= available]
    if args.profile:
        from apt_model.backends.deepspeed_worker import PROFILE_DIR_ENV

        os.environ[PROFILE_DIR_ENV] = str(args.profile.resolve())
    args.workdir.mkdir(parents=True, exist_ok=True)
    dataset = make_dataset(args.workdir / f"hlbd_hardcore_{args.size}.json", args.size)
    results: dict[str, Any] = {
        "bench": "deepspeed_scaling",
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "device": "cpu" if args.cpu_smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "deepspeed": __import__("importlib.metadata").metadata.version("deepspeed"),
        "preset": args.preset,
        "skipped_gpu_counts": [n for n in args.gpus if n > available],
    }
    out = (
        args.out or Path(__file__).resolve().parent / "results" / f"deepspeed_scaling_{results['date']}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict[str, Any]]) -> None:
        # After every run: a call cut short (device time, timeout) keeps the runs it finished.
        results["scaling"], results["summary"] = rows, summarize(rows)
        atomic_write_json(out, results)

    write(scaling(args, dataset, args.workdir, gpus, on_run=write))
    for n, s in results["summary"].items():
        ratio, own = s["efficiency_vs_1gpu_median"], s["efficiency_per_repeat_median"]
        print(
            f"{n} GPU(s): median {s['tokens_per_s_per_gpu_median']:.0f} tokens/s per GPU over {s['runs']} run(s)"
            + (f", {ratio:.3f} of the 1-GPU median" if ratio is not None else "")
            + (f", median of per-repeat ratios {own:.3f}" if own is not None else "")
        )
    if not args.skip_resume and available >= 2:
        results["zero3_offload_resume"] = zero3_resume(args, dataset, args.workdir)
        atomic_write_json(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
