"""``apt visualize``: a PNG dashboard of a run, offline or re-rendered live while it trains."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "visualize",
        help="render a run's dashboard PNG (offline) or keep it updated while training (realtime)",
        description="Draws only what the run recorded in experiment_report.json (and verification_report.json).",
    )
    p.add_argument("--log-dir", type=Path, required=True, help="training output folder")
    p.add_argument("--mode", choices=("offline", "realtime"), default="offline")
    p.add_argument(
        "--out", type=Path, default=None, help="PNG path (default: <log-dir>/training_dashboard.png)"
    )
    p.add_argument("--interval", type=float, default=2.0, help="realtime: seconds between checks (default 2)")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        help="realtime: stop after this many seconds without a change (default 300)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from apt_model.errors import ConfigError
    from apt_model.visualize import read_log_dir, render_dashboard, watch

    if args.out is not None and args.out.is_dir():
        raise ConfigError(f"--out {args.out}: is a directory (give a .png file path)")
    if args.mode == "offline":
        path = render_dashboard(args.log_dir, args.out)
        print(f"wrote {path}")
        return 0
    if not args.log_dir.is_dir():
        raise ConfigError(f"--log-dir {args.log_dir}: not a directory")
    if (args.log_dir / "experiment_report.json").exists():
        read_log_dir(args.log_dir)  # a broken report is an error now, not a silent wait
    result = watch(args.log_dir, interval=args.interval, idle_timeout=args.idle_timeout, out_png=args.out)
    print(f"stopped: {result.reason} after {result.renders} render(s); dashboard: {result.out_png}")
    return 0
