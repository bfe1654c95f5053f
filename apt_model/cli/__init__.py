"""The ``apt`` command: one dispatcher, one module per command group.

Each group module exposes ``register(subparsers)`` and sets ``handler`` on its parsers. A handler returns an exit
code; an ``AptError`` becomes ``error: <one line>`` on stderr and exit status 2 — before any work starts, since
handlers validate their inputs first.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Sequence

from apt_model.errors import AptError

# Order is the order of `apt --help`.
COMMAND_MODULES = ("data", "train", "verify", "diagnose", "visualize", "monitor", "pipeline")


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line plus exit 2 (no usage dump that hides the message)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="apt", description="Train, check and ship APT models.")
    from apt_model import __version__

    parser.add_argument("--version", action="version", version=f"apt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"apt_model.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"apt_model.cli.{name}":
                continue  # group not built yet in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except AptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Storage failures mid-run (full disk, quota, read-only or failing filesystem) are the user's to fix:
        # say which file and why, in one line. Atomic writes have left the previous files intact.
        if exc.errno not in _STORAGE_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc} (previous outputs are intact)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
