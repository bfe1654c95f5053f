"""DeepSpeed backend on GPUs: ZeRO-2 bf16 throughput at 1/2/4 GPUs, and a ZeRO-3 + CPU-offload train + exact resume.

Everything goes through the backend itself (``apt_model.backends.deepspeed_backend.DeepSpeedBackend``: torchrun,
NCCL, the generated ``deepspeed_config.json``), so the numbers are those of ``apt train --backend deepspeed``.

1. **Scaling** — for each world size in ``--gpus`` (default 1 2 4, capped at the visible GPUs): ZeRO-2, bf16, the
   ``--preset`` model (default ``playground``) on a generated hardcore dataset, ``--epochs`` epochs at a fixed micro
   batch per GPU (weak scaling). Throughput is ``tokens_per_s`` of ``experiment_report.json`` (target tokens trained
   per second of epoch wall time, all ranks together) for the epoch before the last, divided by the world size →
   tokens/s per GPU, plus the scaling efficiency against 1 GPU. That epoch holds training only: the first holds
   start-up costs, and validation and the checkpoint run after the last epoch only (``--epochs`` ≥ 3).
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
  DS_ACCELERATOR=cpu python bench/deepspeed_scaling.py --cpu-smoke   # CPU processes, tiny model (plumbing only)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt_model.backends import TrainRequest
from apt_model.backends.deepspeed_backend import DeepSpeedBackend, build_ds_config
from apt_model.config import DataConfig, TrainConfig, model_preset


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


def scaling(args: argparse.Namespace, dataset: Path, root: Path, gpus: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in gpus:
        opts: dict[str, Any] = {"num_gpus": n, "zero_stage": 2}
        if not args.cpu_smoke:
            opts["bf16"] = True
        if args.overlap_comm:
            opts = {"num_gpus": n, "deepspeed_config": str(overlap_comm_config(args, root, n))}
        if args.bind_cores:
            opts["bind_cores"] = True
        result, report, wall = run(
            dataset, root / f"zero2_{n}gpu", preset=args.preset, epochs=args.epochs, micro=args.micro,
            accum=args.accum, compile_model=args.compile, **opts,
        )  # fmt: skip
        # The epoch before the last: past the first (start-up costs) and before the last (validation, export).
        last = report["epochs"][-2] if len(report["epochs"]) >= 3 else report["epochs"][-1]
        rows.append(
            {
                "gpus": n,
                "zero_stage": 2,
                "compiled": report["runtime"]["compiled"],
                "precision": report["runtime"]["precision"],
                "micro_batch_per_gpu": args.micro,
                "grad_accum": args.accum,
                "train_batch_size": report["runtime"]["train_batch_size"],
                "tokens_per_s": last["tokens_per_s"],
                "tokens_per_s_per_gpu": last["tokens_per_s"] / n,
                "epoch_seconds": last["epoch_seconds"],
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
            f"ZeRO-2 {rows[-1]['precision']} {n} GPU(s): {rows[-1]['tokens_per_s_per_gpu']:.0f} tokens/s per GPU"
        )
    base = rows[0]["tokens_per_s_per_gpu"] if rows and rows[0]["gpus"] == 1 else None
    for r in rows:
        r["efficiency_vs_1gpu"] = r["tokens_per_s_per_gpu"] / base if base else None
    return rows


def zero3_resume(args: argparse.Namespace, dataset: Path, root: Path) -> dict[str, Any]:
    from apt_model.checkpoint import load_model

    opts: dict[str, Any] = {"num_gpus": 2, "zero_stage": 3, "cpu_offload": True}
    if not args.cpu_smoke:
        opts["bf16"] = True
    common = dict(preset=args.preset, epochs=2, micro=args.micro, accum=args.accum, save_interval=1)
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
        "--bind-cores", action="store_true", help="pin each rank to its own share of the CPU cores"
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="CPU processes, fp32 (checks the plumbing only)"
    )
    args = parser.parse_args()

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
        "scaling": scaling(args, dataset, args.workdir, gpus),
    }
    if not args.skip_resume and available >= 2:
        results["zero3_offload_resume"] = zero3_resume(args, dataset, args.workdir)
    out = (
        args.out or Path(__file__).resolve().parent / "results" / f"deepspeed_scaling_{results['date']}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
