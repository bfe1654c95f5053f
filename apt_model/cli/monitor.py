"""``apt monitor``: every run under a folder in one live table, plus an overlay of their loss curves."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "monitor",
        help="status of every training run under a folder (live table, loss overlay PNG)",
        description="Finds every experiment_report.json under --root: running, idle (running but stale), "
        "finished or failed; epoch, last and best losses, age.",
    )
    p.add_argument("--root", type=Path, default=Path("."), help="folder to search (default: .)")
    p.add_argument("--once", action="store_true", help="print the table once and exit")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes (default 5)")
    p.add_argument("--overlay", type=Path, default=None, help="also write a PNG overlay of all loss curves")
    p.add_argument(
        "--stale-after",
        type=float,
        default=120.0,
        help="a running report older than this many seconds shows as idle (default 120)",
    )
    p.add_argument("--until-done", action="store_true", help="exit once no run is running")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from apt_model.errors import ConfigError
    from apt_model.monitor import REPORT_FILE, find_runs, monitor

    if not args.root.is_dir():
        raise ConfigError(f"--root {args.root}: not a directory")
    if args.overlay is not None and args.overlay.is_dir():
        raise ConfigError(f"--overlay {args.overlay}: is a directory (give a .png file path)")
    if args.stale_after <= 0 or args.interval <= 0:
        raise ConfigError("--interval and --stale-after must be positive")
    if args.once and not find_runs(args.root, stale_after=args.stale_after):
        raise ConfigError(f"--root {args.root}: no {REPORT_FILE} found under it")
    monitor(
        args.root,
        interval=args.interval,
        once=args.once,
        overlay=args.overlay,
        stale_after=args.stale_after,
        until_done=args.until_done,
    )
    if args.overlay is not None:
        print(f"overlay: {args.overlay}")
    return 0
