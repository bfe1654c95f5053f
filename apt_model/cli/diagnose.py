"""``apt diagnose``: check the environment, a dataset, a model, a run and a verification; suggest fixes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "diagnose",
        help="find problems in the environment, data, checkpoint, run and verification (read-only)",
        description="Read-only checks with a severity, the evidence and a fix for each finding. "
        "Exit 1 when an error-level finding exists.",
    )
    p.add_argument(
        "--run", type=Path, default=None, help="training output folder (holds experiment_report.json)"
    )
    p.add_argument(
        "--dataset", type=Path, default=None, help="HLBD dataset file (default: the run's dataset)"
    )
    p.add_argument(
        "--model", type=Path, default=None, help="checkpoint / export / run folder (default: the run's)"
    )
    p.add_argument(
        "--verification",
        type=Path,
        default=None,
        help="verification_report.json (default: the one in the run folder)",
    )
    p.add_argument("--no-env", action="store_true", help="skip the environment checks")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--out", type=Path, default=None, help="write the output to this file instead of stdout")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from apt_model.diagnose import diagnose, findings_to_json, format_findings, has_errors
    from apt_model.errors import ConfigError
    from apt_model.io import atomic_write_text, dumps_json

    if args.out is not None and args.out.is_dir():
        raise ConfigError(f"--out {args.out}: is a directory (give a file path)")
    findings = diagnose(
        run_dir=args.run,
        dataset=args.dataset,
        model=args.model,
        verification=args.verification,
        environment=not args.no_env,
    )
    text = dumps_json(findings_to_json(findings)) if args.json else format_findings(findings)
    if args.out is not None:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 1 if has_errors(findings) else 0
