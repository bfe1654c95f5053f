"""HLBD learning-quality run: the commands a user types, timed, with per-module exact match on train and val.

Steps (each a subprocess of the `apt` CLI, exactly as users run it):
  1. `apt data generate --kind hardcore --seed 42` (the default HLBD Hardcore data; `--data-size large` for more);
  2. `apt train --backend playground --preset playground …` (the guide's model size; our tunables are flags);
  3. `apt verify --split train` and `--split val` on the final model (greedy decoding, exact match); val lists
     every wrong answer, so `val_by_kind` breaks val exact match down by problem kind (`bench/hlbd_kinds.py`).

Writes `quality.json` (commands, wall times, the training report's epoch timings, per-module exact match) under
`--out`, rewritten after every step, so a run cut short still leaves what it measured.

Usage:
  python bench/quality_run.py --out /tmp/q -- --batch-size 128 --lr 1e-3 --epochs 150
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from apt_model.data.pairs import SIZES, normalize_text  # noqa: E402
from apt_model.errors import ConfigError, DataError  # noqa: E402
from apt_model.verify import parse_pad_to  # noqa: E402
from bench.hlbd_kinds import breakdown  # noqa: E402
from bench.reverse_digits import load_reversible, reverse_file, val_inputs  # noqa: E402
from bench.worked_steps import (  # noqa: E402
    aux_file,
    final_scores,
    load_workable,
    parse_modules,
    score_without_twins,
    worked_file,
)

KIND_MODULES = ("geometry", "physics", "arithmetic")
# The data rewrites a run can train on: flag → (check of a given file, rewrite of a file in place). Val is scored on
# the same rewrite of every size's data (aux_steps leaves val rows as they are: the scores are the plain format's).
ANSWER_REWRITES: dict[str, tuple[Callable[[Path], Any], Callable[[Path, Path], None]]] = {
    "reverse_digits": (load_reversible, reverse_file),
    "worked_steps": (load_workable, worked_file),
    "aux_steps": (load_workable, aux_file),
    # --worked-steps --worked-modules M,M --aux-steps: M's products in steps, twins for the other modules' products.
    "mixed_steps": (load_workable, aux_file),
}
# The rewrites whose val answers hold steps, scored by final answer too.
WORKED_REWRITES = ("worked_steps", "mixed_steps")
# The rewrites that add steps-marked twins to the training split, scored also without them (exact_train_without_twins).
TWIN_REWRITES = ("aux_steps", "mixed_steps")


def rewrite_file(name: str, worked_modules: list[str] | None = None) -> Callable[[Path, Path], None]:
    """The in-place rewrite of ANSWER_REWRITES[name], worked steps limited to ``worked_modules`` when given."""
    if name in WORKED_REWRITES and worked_modules is not None:
        return partial(ANSWER_REWRITES[name][1], modules=worked_modules)
    return ANSWER_REWRITES[name][1]


def chosen_rewrite(args: argparse.Namespace) -> str | None:
    """The ANSWER_REWRITES entry the flags ask for; ValueError naming the flags that do not go together."""
    if args.reverse_digits and (args.worked_steps or args.aux_steps):
        raise ValueError("--reverse-digits goes with neither --worked-steps nor --aux-steps")
    if args.worked_modules is not None and not args.worked_steps:
        raise ValueError("--worked-modules needs --worked-steps")
    if args.worked_steps and args.aux_steps:
        if args.worked_modules is None:
            raise ValueError(
                "--worked-steps with --aux-steps needs --worked-modules: the twins go to the others"
            )
        return "mixed_steps"
    return next(
        (name for name in ("reverse_digits", "worked_steps", "aux_steps") if getattr(args, name)), None
    )


# The training report's runtime entries that time the run (apt_model/training/report.py), kept in each result.
RUNTIME_TIMINGS = ("phase_seconds", "compile_seconds", "first_launch_seconds", "kernel_prewarm")


def apt(*args: str) -> list[str]:
    return [sys.executable, "-m", "apt_model.cli", *args]


def run_step(name: str, argv: list[str], report: dict[str, Any], out: Path, log: Path) -> None:
    started = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n")
        fh.flush()
        proc = subprocess.run(argv, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, text=True)
    report["steps"].append(
        {
            "name": name,
            "argv": argv[2:],
            "seconds": round(time.perf_counter() - started, 2),
            "rc": proc.returncode,
        }
    )
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")


def val_by_kind(dataset: dict[str, Any], failures: list[dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """Val exact match per module and problem kind: every val row of ``dataset`` (a Hardcore document) is right
    unless ``failures`` (a verification report's complete list of wrong answers) names it."""
    val = val_inputs(dataset)
    wrong = {(f["module"], f["input"]) for f in failures}
    rows = [
        {"module": m, "input": t, "exact": (m, t) not in wrong}
        for m in KIND_MODULES
        for r in dataset["data"].get(m, [])
        if (t := normalize_text(r["input"])) in val
    ]
    return breakdown(rows)


def generate_step(name: str, size: str, path: Path, report: dict[str, Any], out: Path, log: Path) -> None:
    """`apt data generate` of the Hardcore data at ``size`` (seed 42) into ``path``, as step ``name``."""
    argv = apt("data", "generate", "--kind", "hardcore", "--seed", "42", "--size", size, "--out", str(path))
    run_step(name, argv, report, out, log)


def verify_step(
    name: str,
    run_dir: Path,
    dataset: Path,
    split: str,
    device: str,
    report: dict[str, Any],
    out: Path,
    log: Path,
    pad_to: str | None = None,
    every_failure: bool = False,
) -> dict[str, Any]:
    """`apt verify` of the model on ``dataset``'s ``split`` (val, or ``every_failure``: every wrong answer listed),
    as step ``name``; returns the verification report. ``pad_to``: `apt verify --pad-to`."""
    vdir = out / name
    verify = apt(
        "verify", "--model", str(run_dir), "--dataset", str(dataset), "--split", split,
        "--device", device, "--batch-size", "512", "--out", str(vdir),
        *(["--failures", "100000"] if split == "val" or every_failure else []),
        *(["--pad-to", pad_to] if pad_to else []),
    )  # fmt: skip
    run_step(name, verify, report, out, log)
    return json.loads((vdir / "verification_report.json").read_text())


def exact_summary(vr: dict[str, Any]) -> dict[str, Any]:
    return {
        "overall": vr["overall"]["exact"],
        "modules": {m: v["exact"] for m, v in vr["modules"].items()},
        "n": vr["overall"]["n"],
    }


def kinds_of(doc: dict[str, Any], vr: dict[str, Any]) -> dict[str, dict[str, dict]] | None:
    """Val exact match per kind, or None: "right unless listed" holds only while the report lists every wrong
    answer (`--failures 100000`)."""
    complete = len(vr["failures"]) == vr["overall"]["n"] - vr["overall"]["exact_count"]
    return val_by_kind(doc, vr["failures"]) if complete else None


def cross_val(
    size: str,
    data: Path,
    run_dir: Path,
    out: Path,
    report: dict[str, Any],
    log: Path,
    device: str,
    pad_to: str | None = None,
    rewrite: str | None = None,
    worked_modules: list[str] | None = None,
) -> None:
    """Verify the model on ``size``'s val split; record it as ``exact_val_<size>`` (``…_padded`` with ``pad_to``)
    with its per-kind breakdown and how many of those val inputs the training split held (0 under the shared
    hold-out rule, or the score means nothing). ``rewrite``: the ANSWER_REWRITES entry the run trained on, applied
    to that data too (worked steps, in ``worked_modules`` or all: also scored by final answer, as
    ``final_val_<size>``)."""
    other = out / f"hardcore_{size}.json"
    suffix = "_padded" if pad_to else ""
    if not other.is_file():
        generate_step(f"generate_{size}", size, other, report, out, log)
        if rewrite is not None:
            rewrite_file(rewrite, worked_modules)(other, other)
    ours = json.loads(data.read_text())
    ours_val = val_inputs(ours)
    ours_train = {normalize_text(r["input"]) for rows in ours["data"].values() for r in rows} - ours_val
    doc = json.loads(other.read_text())
    leaked = sum(1 for t in doc["metadata"]["splits"]["val"] if normalize_text(t) in ours_train)
    vr = verify_step(f"verify_val_{size}{suffix}", run_dir, other, "val", device, report, out, log, pad_to)
    report[f"exact_val_{size}{suffix}"] = {
        **exact_summary(vr),
        "val_inputs_in_our_training_split": leaked,
        "by_kind": kinds_of(doc, vr),
    }
    if rewrite in WORKED_REWRITES and report[f"exact_val_{size}{suffix}"]["by_kind"] is not None:
        report[f"final_val_{size}{suffix}"] = final_scores(doc, vr["failures"], ours)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tag", default="run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-size", default="default", choices=SIZES, help="`apt data generate --size`")
    p.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="train on this HLBD Hardcore file (copied into the run) instead of generating one at --data-size",
    )
    p.add_argument(
        "--splits",
        nargs="*",
        choices=("train", "val"),
        default=["train", "val"],
        help="the run's own splits to verify, in this order (default: train val; none: only --also-val-size)",
    )
    p.add_argument(
        "--also-val-size",
        nargs="+",
        choices=SIZES,
        default=[],
        help="also verify on the val split of these sizes' data (same seed): a model trained on a larger size, "
        "scored on the problems a smaller size holds out (none of which is in the larger size's training split)",
    )
    p.add_argument(
        "--pad-to",
        default=None,
        metavar="SRC,TGT",
        help="verify every split again with `apt verify --pad-to SRC,TGT` (reported as exact_*_padded): decoding "
        "in the fixed shape the GPU training padded every batch to",
    )
    p.add_argument(
        "--reverse-digits",
        action="store_true",
        help="train and verify on copies whose answers have their digit runs reversed (bench/reverse_digits.py): "
        "exact match is unchanged by the bijection, so it measures only whether the model learns that order better",
    )
    p.add_argument(
        "--worked-steps",
        action="store_true",
        help="train and verify on copies whose products of two-digit multipliers are answered as partial products "
        "and their sum (bench/worked_steps.py); val is also scored by final answer (final_val*)",
    )
    p.add_argument(
        "--worked-modules",
        type=parse_modules,
        default=None,
        metavar="M,M",
        help="with --worked-steps: only these modules' products in steps (e.g. physics,geometry: arithmetic's "
        "answers stay plain integers, as the data spec has them)",
    )
    p.add_argument(
        "--aux-steps",
        action="store_true",
        help="train on the plain data plus a steps-marked twin, answered in steps, of each training product of a "
        "two-digit multiplier (bench/worked_steps.py --aux); every score is on the plain answers. With "
        "--worked-steps --worked-modules M,M: M's products answered in steps, twins for the other modules'",
    )
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="extra `apt train` flags, after --")
    args = p.parse_args(argv)
    if args.dataset is not None and not args.dataset.is_file():
        p.error(f"--dataset: no such file: {args.dataset}")
    try:
        rewrite = chosen_rewrite(args)
    except ValueError as exc:
        p.error(str(exc))
    if rewrite is not None and args.dataset is not None:
        try:  # the rewrite itself would refuse the file only after the run folder is made
            ANSWER_REWRITES[rewrite][0](args.dataset)
        except DataError as exc:
            flag = "--worked-steps" if rewrite == "mixed_steps" else f"--{rewrite.replace('_', '-')}"
            p.error(f"{flag}: {exc}")
    try:
        parse_pad_to(args.pad_to)  # `apt verify` would refuse it only after training
    except ConfigError as exc:
        p.error(str(exc))
    extra = [a for a in args.train_args if a != "--"]
    out = args.out / args.tag
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    data = out / "hardcore.json"
    run_dir = out / "run"
    report: dict[str, Any] = {"tag": args.tag, "data_size": args.data_size, "train_args": extra, "steps": []}
    env_note = {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES",) if k in os.environ}
    report["env"] = env_note

    if args.dataset is not None:
        shutil.copyfile(args.dataset, data)
        report["data_size"] = None
        report["dataset"] = {
            "file": str(args.dataset),
            "params": json.loads(data.read_text())["metadata"]["params"],
        }
    else:
        generate_step("generate", args.data_size, data, report, out, log)
    if rewrite is not None:
        rewrite_file(rewrite, args.worked_modules)(data, data)
        report[rewrite] = args.worked_modules or True
    train = apt(
        "train", "--backend", "playground", "--preset", "playground", "--dataset", str(data),
        "--save-dir", str(run_dir), "--overwrite", "--no-tracking", "--no-progress", "--device", args.device, *extra,
    )  # fmt: skip
    run_step("train", train, report, out, log)
    exp = json.loads((run_dir / "experiment_report.json").read_text())
    runtime = exp.get("runtime") or {}
    epochs = exp.get("epochs") or exp.get("history") or []
    report["train_report"] = {
        "epochs": len(epochs),
        "epoch_seconds_sum": round(sum(float(e.get("epoch_seconds", 0.0)) for e in epochs), 2),
        "final_train_loss": epochs[-1].get("train_loss") if epochs else None,
        "final_val_loss": epochs[-1].get("val_loss") if epochs else None,
        "final_val_token_acc": epochs[-1].get("val_token_acc") if epochs else None,
        "status": exp.get("status"),
        # Where `apt train`'s wall time went besides the epochs: prepare / setup / finish, torch.compile's phases,
        # the first epoch's first launches, and the kernel pre-warm child.
        **{key: runtime.get(key) for key in RUNTIME_TIMINGS},
    }
    # The curves, so a recipe's val loss can be read against its train loss epoch by epoch.
    report["history"] = [
        {k: e.get(k) for k in ("epoch", "train_loss", "val_loss", "val_token_acc", "epoch_seconds")}
        for e in epochs
    ]
    # Unpadded first; with --pad-to every verification again in that shape, under names ending in _padded.
    doc = json.loads(data.read_text())  # as trained on: its rows and split, the same for every verification
    for pad_to in (None, args.pad_to) if args.pad_to else (None,):
        suffix = "_padded" if pad_to else ""
        for split in args.splits:
            twins = split == "train" and rewrite in TWIN_REWRITES
            vr = verify_step(
                f"verify_{split}{suffix}", run_dir, data, split, args.device, report, out, log, pad_to, twins
            )
            report[f"exact_{split}{suffix}"] = exact_summary(vr)
            if twins:
                report[f"exact_train_without_twins{suffix}"] = score_without_twins(doc, vr["failures"])
            if split == "val":
                report[f"val_by_kind{suffix}"] = kinds_of(doc, vr)
                if rewrite in WORKED_REWRITES and report[f"val_by_kind{suffix}"] is not None:
                    report[f"final_val{suffix}"] = final_scores(doc, vr["failures"], doc)
                if pad_to is None:
                    report["val_failures"] = vr["failures"]
            (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
        for size in args.also_val_size:
            cross_val(
                size, data, run_dir, out, report, log, args.device, pad_to, rewrite, args.worked_modules
            )
            (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {k: report.get(k) for k in ("tag", "steps", "train_report", "exact_train", "exact_val")}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
