"""``apt verify``: decode a dataset split with the model and score exact match per module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apt_model.errors import ConfigError

EXIT_GATE_MISSED = 3


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "verify",
        help="decode a dataset with a model (greedy, autoregressive) and score it per module",
        description="Greedy autoregressive decoding of every pair; exact match after whitespace normalisation "
        "(substring score beside it), per module, with mode-collapse detection and an optional gate.",
    )
    p.add_argument("--model", required=True, help=".pt checkpoint, export folder or run folder")
    p.add_argument("--dataset", required=True, help="HLBD dataset file (hardcore or full)")
    p.add_argument(
        "--split", default="val", choices=("train", "val", "all"), help="which pairs (default: val)"
    )
    p.add_argument("--sample", type=int, default=None, help="verify a seeded random sample of N pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="decode limit (default: longest expected answer + 8, at most the model's max_len)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for verification_report.json/.md (default: print the summary only)",
    )
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="MODULE=X",
        help="gate: minimum exact-match fraction for a module (or 'overall'); repeatable",
    )
    p.add_argument("--min-overall", type=_fraction, default=None, help="gate: minimum overall exact match")
    p.add_argument(
        "--fail-on-gate", action="store_true", help=f"exit {EXIT_GATE_MISSED} when the gate is missed"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument(
        "--failures",
        type=int,
        default=None,
        metavar="N",
        help="how many of the worst wrong answers the report lists (default 25)",
    )
    p.add_argument(
        "--pad-to",
        default=None,
        metavar="SRC,TGT",
        help="pad every prompt to SRC tokens and every decoder prefix to TGT positions (default: unpadded)",
    )
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from apt_model.io import dumps_json
    from apt_model.verify import N_FAILURES, parse_pad_to, parse_thresholds, verify_model, write_report

    if args.failures is None:
        args.failures = N_FAILURES
    if args.failures < 0:
        # verify_model would silently list none; say so before loading anything.
        raise ConfigError(f"--failures {args.failures}: must be a non-negative integer")
    thresholds = parse_thresholds(args.threshold, min_overall=args.min_overall)
    pad_to = parse_pad_to(args.pad_to)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: exists and is not a directory")
    report = verify_model(
        args.model,
        args.dataset,
        split=args.split,
        sample=args.sample,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        thresholds=thresholds,
        device=args.device,
        n_failures=args.failures,
        pad_to=pad_to,
    )
    if args.json:
        sys.stdout.write(dumps_json(report.to_dict()))
    else:
        o = report.overall
        print(
            f"verified {o['n']} {report.split} pairs in {report.timing['seconds']:.1f} s: "
            f"exact {o['exact']:.2%}, substring {o['substring']:.2%}"
        )
        width = max((len(m) for m in report.modules), default=6)
        for name, m in report.modules.items():
            print(
                f"  {name:<{width}}  n={m['n']:<5} exact {m['exact']:7.2%}  substring {m['substring']:7.2%}"
            )
    c = report.collapse
    if c["collapsed"]:
        print(
            f"warning: mode collapse: {c['answer']!r} answers {c['share']:.0%} of prompts "
            f"({c['count']}/{c['n']}), wrong for {c['wrong_share']:.0%} of them",
            file=sys.stderr,
        )
    if args.out is not None:
        paths = write_report(report, args.out)
        print(f"wrote {paths['json']} and {paths['markdown']}")
    gate = report.gate
    if not gate["passed"]:
        missed = ", ".join(f"{m['key']} {m['actual']:.2%} < {m['required']:.2%}" for m in gate["missed"])
        if args.fail_on_gate:
            print(f"error: verification gate missed: {missed}", file=sys.stderr)
            return EXIT_GATE_MISSED
        print(f"warning: verification gate missed: {missed}", file=sys.stderr)
    return 0
