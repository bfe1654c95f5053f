"""Benchmark the full APT training step (and a same-size Hugging Face BART) on one card, in one run.

What one "step" is: forward, backward, gradient clipping, the optimizer step and DBC-DAC at its default cadence
(every 20th step) — exactly what the Playground backend does per optimizer step, through the same library pieces
(`apt_model.training.fastpath.TrainStep`). Tokens per step = batch × (src_len + tgt_len).

Variants (each measured at every batch size):
  apt-eager           autopoietic on, eager PyTorch, bf16 autocast
  apt-fast            autopoietic on, the Playground fast path (torch.compile, the whole step as CUDA graphs, fused
                      AdamW, bf16); the transform is the default kernel choice (on CUDA with Triton: the fused Triton
                      kernels)
  apt-fast-readnow    as apt-fast reading each step's loss and norm before launching the next (the loop before the
                      late read-back; apt-fast reads step n's after launching step n + 1, as the Playground loop does)
  apt-fast-lossgraph  as apt-fast with only the loss (forward + backward) graphed, by cudagraph trees; clipping, the
                      optimizer and gradient accumulation run from the host (the fast path before the whole-step graphs)
  apt-fast-torch      as apt-fast with the transform as torch ops compiled by inductor (--transform-kernel torch)
  apt-eager-torch     as apt-eager with the transform as eager torch ops
  apt-fast-nographs   as apt-fast without CUDA graphs (torch.compile fusion only)
  apt-fast-nodbc      as apt-fast with DBC-DAC off (the DBC-DAC cost is apt-fast vs this)
  apt-fast-dbcgraph   as apt-fast with each DBC-DAC application replayed from a CUDA graph (DBCDAC(cuda_graph=True));
                      the whole-step fast path does this by itself, so since then the row repeats apt-fast
  plain-fast          autopoietic off (fused SDPA), fast path
  plain-fast-lossgraph  as plain-fast with only the loss graphed (as apt-fast-lossgraph)
  bart-bf16           transformers' BartForConditionalGeneration of the same size, plain bf16 loop, fused AdamW

Timing: warm-up steps excluded (compilation, graph capture, allocator), then `--repeats` timed windows of
`--steps` steps each, CUDA events around each window; the median window gives ms/step. Peak memory is
`torch.cuda.max_memory_allocated` from the start of that variant's warm-up (CUDA-graph pools included) to the end of
its timed windows; `reserved_gib` is what the caching allocator held. apt-fast-nodbc reuses apt-fast's compiled step
with DBC-DAC switched off, so the two differ in DBC-DAC alone.

Usage:
  python bench/train_step.py --out bench/results/train_step.json            # GPU: the full table
  python bench/train_step.py --device cpu --batch 4 --variants apt-eager   # smoke test on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt_model.config import DBCDACConfig, TrainConfig, model_preset

VARIANTS = (
    "apt-eager",
    "apt-eager-torch",
    "apt-fast",
    "apt-fast-readnow",
    "apt-fast-lossgraph",
    "apt-fast-torch",
    "apt-fast-nographs",
    "apt-fast-nodbc",
    "apt-fast-dbcgraph",
    "plain-fast",
    "plain-fast-lossgraph",
    "bart-bf16",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(batch: int, src_len: int, tgt_len: int, vocab: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    # ids 4.. avoid the special tokens; full-length rows (no padding) as in the fixed shape.
    src = torch.randint(4, vocab, (batch, src_len), generator=g)
    tgt = torch.randint(4, vocab, (batch, tgt_len + 1), generator=g)
    tgt[:, 0] = 2  # BOS
    return {
        "src": src.to(device),
        "tgt_in": tgt[:, :-1].contiguous().to(device),
        "tgt_out": tgt[:, 1:].contiguous().to(device),
        "n_tokens": batch * tgt_len,
    }


def build_apt_step(
    variant: str,
    device: torch.device,
    vocab: int,
    max_len: int,
    graphs: bool | None = None,
    *,
    layers: int | None = None,
    dropout: float = 0.1,
    compiled: bool | None = None,
):
    """The Playground loop's own step (optimizer, schedule, DBC-DAC, TrainStep), minus data loading.

    ``layers`` overrides the preset's encoder and decoder depth; ``compiled`` (default: every variant but
    ``apt-eager``, on CUDA only) forces the compiled step on or off, e.g. to compile on the CPU.
    """
    from apt_model.model import DBCDAC, APTModel
    from apt_model.training.batching import Batch
    from apt_model.training.fastpath import TrainStep
    from apt_model.training.loop import resolve_precision
    from apt_model.training.schedule import WarmRestartSchedule, build_optimizer

    depth = {} if layers is None else {"n_encoder_layers": layers, "n_decoder_layers": layers}
    cfg = model_preset(
        "playground",
        vocab_size=vocab,
        max_len=max_len,
        dropout=dropout,
        use_autopoietic=not variant.startswith("plain"),
        **depth,
    )
    model = APTModel(cfg).to(device)
    train_cfg = TrainConfig(dbc_dac=DBCDACConfig(enabled=variant != "apt-fast-nodbc"))
    optimizer = build_optimizer(model, train_cfg, fused=device.type == "cuda")
    schedule = WarmRestartSchedule(optimizer, train_cfg, steps_per_epoch=1000)
    graphed = variant == "apt-fast-dbcgraph"
    dbc = DBCDAC(train_cfg.dbc_dac, seed=0, cuda_graph=graphed) if train_cfg.dbc_dac.enabled else None
    stepper = TrainStep(
        model,
        train_cfg,
        optimizer=optimizer,
        device=device,
        precision=resolve_precision("auto", device),
        pad_id=0,
        compiled=(not variant.startswith("apt-eager") and device.type == "cuda")
        if compiled is None
        else compiled,
        cuda_graphs=graphs,
        step_graph=False if variant.endswith("-lossgraph") else None,
        dbc=dbc,
    )
    state: dict[str, Any] = {"step": 0, "in_flight": None}

    def run_step(batch: dict) -> float:
        """Launch one step; return the loss of the step before it (read late, as the Playground loop does) or,
        with ``run_step.read_late`` off, of this one."""
        schedule.set_step(state["step"])
        window = [Batch(batch["src"], batch["tgt_in"], batch["tgt_out"], batch["n_tokens"])]
        pending = stepper.launch(window, state["step"] + 1)
        state["step"] += 1
        if not run_step.read_late:  # type: ignore[attr-defined]
            return pending.result().loss
        previous, state["in_flight"] = state["in_flight"], pending
        return previous.result().loss if previous is not None else float("nan")

    run_step.stepper = stepper  # type: ignore[attr-defined]
    run_step.read_late = variant != "apt-fast-readnow"  # type: ignore[attr-defined]
    return run_step, sum(p.numel() for p in model.parameters())


def build_bart_step(device: torch.device, vocab: int, max_len: int):
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(
        vocab_size=vocab,
        d_model=256,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=1024,
        decoder_ffn_dim=1024,
        max_position_embeddings=max_len,
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    model = BartForConditionalGeneration(cfg).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=device.type == "cuda")
    use_bf16 = device.type == "cuda"

    def step(batch: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(
                input_ids=batch["src"],
                attention_mask=batch["src"].ne(0),
                decoder_input_ids=batch["tgt_in"],
                labels=batch["tgt_out"],
            )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step, sum(p.numel() for p in model.parameters())


def measure(
    step_fn, batch: dict, device: torch.device, warmup: int, steps: int, repeats: int
) -> dict[str, Any]:
    if device.type == "cuda":
        # Before warm-up: CUDA-graph pools are allocated while graphs are recorded, and they count.
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step_fn(batch)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    windows = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                loss = step_fn(batch)
            end.record()
            end.synchronize()
            windows.append(start.elapsed_time(end) / steps)
        else:
            t = time.perf_counter()
            for _ in range(steps):
                loss = step_fn(batch)
            windows.append((time.perf_counter() - t) * 1000 / steps)
    final_loss = float(loss)
    return {
        "ms_per_step": statistics.median(windows),
        "ms_windows": windows,
        "warmup_s": warmup_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": final_loss,
        "loss_finite": math.isfinite(final_loss),
    }


def profile_steps(step_fn, batch: dict, device: torch.device, out_dir: Path, tag: str, steps: int = 5) -> str:
    """Kernel-level profile of a few steps (variants without CUDA graphs: graphs hide their kernels)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step_fn(batch)
        _sync(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=45, max_name_column_width=90)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"profile_{tag}.txt"
    path.write_text(f"{steps} steps of {tag}\n{table}\n")
    return str(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apt_model.model import DBCDAC
    from apt_model.model.fused_transform import set_transform_kernel

    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    max_len = max(args.src_len, args.tgt_len) + 8
    results: list[dict[str, Any]] = []
    for batch_size in args.batch:
        batch = make_batch(batch_size, args.src_len, args.tgt_len, args.vocab, device, seed=batch_size)
        tokens = batch_size * (args.src_len + args.tgt_len)
        fast_step = None
        for variant in args.variants:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # Read while the step is traced (compiled variants) or at every call (eager): set for build and timing.
            set_transform_kernel("torch" if variant.endswith("-torch") else "auto")
            if variant == "bart-bf16":
                step_fn, n_params = build_bart_step(device, args.vocab, max_len)
            elif (
                variant in ("apt-fast-nodbc", "apt-fast-dbcgraph", "apt-fast-readnow")
                and fast_step is not None
            ):
                # The very same compiled step as apt-fast with DBC-DAC switched off (or graphed, as apt-fast does
                # itself), or its results read at once, so the rows differ in that alone (and no second compilation
                # is paid).
                step_fn, n_params = fast_step
                stepper = step_fn.stepper
                no_dbc = variant == "apt-fast-nodbc"
                stepper.dbc = None if no_dbc else DBCDAC(stepper.cfg.dbc_dac, seed=0, cuda_graph=True)
                step_fn.read_late = variant != "apt-fast-readnow"
            else:
                graphs = False if variant.endswith("nographs") else None
                step_fn, n_params = build_apt_step(variant, device, args.vocab, max_len, graphs)
                if variant == "apt-fast":
                    fast_step = (step_fn, n_params)
            r = measure(step_fn, batch, device, args.warmup, args.steps, args.repeats)
            if args.profile and variant not in (
                "apt-fast",
                "apt-fast-nodbc",
                "apt-fast-dbcgraph",
                "plain-fast",
            ):
                r["profile"] = profile_steps(step_fn, batch, device, args.profile, f"{variant}_B{batch_size}")
            r.update(
                variant=variant,
                batch=batch_size,
                tokens_per_step=tokens,
                params=n_params,
                tokens_per_s=tokens / (r["ms_per_step"] / 1000),
            )
            results.append(r)
            if args.out:  # written after every variant so a run cut short still leaves its numbers
                _write(args.out, _summary(args, device, results))
            print(
                f"B={batch_size:<4} {variant:<15} {r['ms_per_step']:8.2f} ms/step "
                f"{r['tokens_per_s'] / 1e6:7.3f} M tok/s  peak {r['peak_mem_gib'] or 0:.2f} GiB  "
                f"loss {r['final_loss']:.3f}  warmup {r['warmup_s']:.1f}s",
                flush=True,
            )
            del step_fn
        del fast_step
    set_transform_kernel("auto")
    return _summary(args, device, results)


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _summary(args: argparse.Namespace, device: torch.device, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "shape": {"src_len": args.src_len, "tgt_len": args.tgt_len, "vocab": args.vocab},
        "config": "playground (d_model 256, 6+6 layers, 8 heads, d_ff 1024)",
        "timing": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats},
        "fused_settings": args.fused_setting,
        "inductor_options": args.inductor_option,
        "results": results,
        "ratios": ratios(results),
    }


def ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["batch"], r["variant"]): r for r in results}
    out: dict[str, Any] = {}
    for b in sorted({r["batch"] for r in results}):
        row: dict[str, float] = {}
        bart = by.get((b, "bart-bf16"))
        for v in VARIANTS:
            if (b, v) in by and bart and v != "bart-bf16":
                row[f"{v}/bart"] = by[(b, v)]["tokens_per_s"] / bart["tokens_per_s"]
        if (b, "apt-fast") in by and (b, "apt-fast-nodbc") in by:
            row["dbc_dac_cost_pct"] = 100 * (
                by[(b, "apt-fast")]["ms_per_step"] / by[(b, "apt-fast-nodbc")]["ms_per_step"] - 1
            )
        if (b, "apt-fast-dbcgraph") in by and (b, "apt-fast-nodbc") in by:
            row["dbc_dac_graph_cost_pct"] = 100 * (
                by[(b, "apt-fast-dbcgraph")]["ms_per_step"] / by[(b, "apt-fast-nodbc")]["ms_per_step"] - 1
            )
        if (b, "apt-fast") in by and (b, "apt-eager") in by:
            row["fast/eager"] = by[(b, "apt-eager")]["ms_per_step"] / by[(b, "apt-fast")]["ms_per_step"]
        # Speed-up of the default kernel choice (fused Triton on CUDA) over the torch-op transform.
        for kind in ("fast", "eager"):
            if (b, f"apt-{kind}") in by and (b, f"apt-{kind}-torch") in by:
                row[f"{kind}: torch-transform ms / default ms"] = (
                    by[(b, f"apt-{kind}-torch")]["ms_per_step"] / by[(b, f"apt-{kind}")]["ms_per_step"]
                )
        out[str(b)] = row
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 256])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--src-len", type=int, default=64)
    p.add_argument("--tgt-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument(
        "--steps", type=int, default=40, help="steps per timed window (2 DBC-DAC applications at 20)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--profile", type=Path, help="folder for kernel profiles of the variants measured without CUDA graphs"
    )
    p.add_argument(
        "--fused-setting",
        nargs="*",
        default=[],
        metavar="KNOB=N",
        help="launch settings of the fused transform (fused_transform.ROW_WARPS, MLP_BLOCK, ...) for every variant",
    )
    p.add_argument(
        "--inductor-option",
        nargs="*",
        default=[],
        metavar="NAME=0|1",
        help="boolean inductor options for the compiled step (fastpath.INDUCTOR_OPTIONS), e.g. fallback_random=1",
    )
    args = p.parse_args(argv)
    from torch._inductor import config as inductor_config

    from apt_model.model import fused_transform
    from apt_model.training import fastpath

    for kv in args.inductor_option:
        name, _, value = kv.partition("=")
        if not hasattr(inductor_config, name) or value not in ("0", "1"):
            p.error(f"--inductor-option {kv}: expected NAME=0|1 with NAME an option of this torch's inductor")
        fastpath.INDUCTOR_OPTIONS[name] = value == "1"

    for kv in args.fused_setting:
        try:
            setattr(fused_transform, *fused_transform.parse_launch_setting(kv))
        except ValueError as exc:
            p.error(f"--fused-setting {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report["ratios"], indent=2))
    if args.out:
        _write(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
