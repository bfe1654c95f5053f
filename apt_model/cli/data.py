"""``apt data generate|inspect``: make an HLBD dataset file, or summarise one.

Arguments are validated by the handlers (not by argparse ``type=``/``choices``) so every bad value becomes one
``ConfigError`` line and exit status 2 before anything is written; ``--out`` is replaced atomically or not at all.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from apt_model.errors import ConfigError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("data", help="generate and inspect HLBD datasets")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(parser))

    gen = sub.add_parser("generate", help="generate an HLBD Hardcore or Full dataset file")
    gen.add_argument("--kind", default="hardcore", help="hardcore | full (default: hardcore)")
    gen.add_argument("--seed", default="42", help="non-negative integer (default: 42)")
    gen.add_argument(
        "--size", default="default", help="small | default | large | xl | xxl (default: default)"
    )
    gen.add_argument(
        "--val-fraction", default="0.1", help="share of validation pairs, in (0, 0.5) (default: 0.1)"
    )
    gen.add_argument("--out", required=True, help="output JSON file (replaced atomically)")
    gen.set_defaults(handler=_generate)

    ins = sub.add_parser("inspect", help="summarise an HLBD file (either format)")
    ins.add_argument("file", help="HLBD JSON file")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins.set_defaults(handler=_inspect)

    def _usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(handler=_usage)


def _parse_seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise ConfigError(f"--seed: expected a non-negative integer, got {text!r}") from None
    if seed < 0:
        raise ConfigError(f"--seed: expected a non-negative integer, got {text!r}")
    return seed


def _parse_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--val-fraction: expected a number in (0, 0.5), got {text!r}") from None
    if not math.isfinite(value) or not 0.0 < value < 0.5:
        raise ConfigError(f"--val-fraction: expected a number in (0, 0.5), got {text!r}")
    return value


def _check_out(text: str) -> Path:
    if not text.strip():
        raise ConfigError("--out: expected a file path, got an empty string")
    out = Path(text)
    if out.is_dir():
        raise ConfigError(f"--out: {text} is a directory, expected a file path")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out: {parent} is not a directory")
            if not os.access(parent, os.W_OK):
                raise ConfigError(f"--out: cannot write in {parent}")
            break
    return out


def _generate(args: argparse.Namespace) -> int:
    from apt_model.data import KINDS, SIZES, generate, write_dataset

    if args.kind not in KINDS:
        raise ConfigError(f"--kind: must be one of {', '.join(KINDS)}, got {args.kind!r}")
    if args.size not in SIZES:
        raise ConfigError(f"--size: must be one of {', '.join(SIZES)}, got {args.size!r}")
    seed = _parse_seed(args.seed)
    val_fraction = _parse_fraction(args.val_fraction)
    out = _check_out(args.out)

    doc = generate(args.kind, seed=seed, size=args.size, val_fraction=val_fraction)
    sha = write_dataset(doc, out)
    md = doc["metadata"]
    counts = md["split_counts"]
    print(
        f"wrote {out}: {args.kind} (seed {seed}, size {args.size}) {counts['train'] + counts['val']} pairs "
        f"(train {counts['train']}, val {counts['val']}) in {len(md['modules'])} modules, sha256 {sha[:16]}"
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from apt_model.data import load_dataset, summarize
    from apt_model.io import dumps_json

    summary = summarize(load_dataset(args.file))
    if args.json:
        print(dumps_json(summary), end="")
    else:
        print(format_summary(summary))
    return 0


def format_summary(s: dict[str, Any]) -> str:
    """The ``apt data inspect`` table."""
    lines = [
        f"file        {s['path']}",
        f"format      {s['format']}  (generator {s['generator_version'] or '-'}, seed {s['seed']})",
        f"sha256      {s['sha256']}",
        f"pairs       {s['pairs']}  (train {s['splits']['train']}, val {s['splits']['val']}; "
        f"split from {'the file' if s['split_source'] == 'file' else 'input hash'})",
        f"duplicates  {s['duplicates']}  ({s['conflicting_duplicates']} with a different answer; not trained on)",
        f"vocabulary  {s['vocab_size']} tokens",
        "",
    ]
    width = max([len("module"), *(len(m) for m in s["modules"])])
    lines.append(f"{'module':<{width}}  {'train':>6}  {'val':>6}  {'total':>6}")
    for module, c in s["modules"].items():
        lines.append(f"{module:<{width}}  {c['train']:>6}  {c['val']:>6}  {c['total']:>6}")
    lines.append("")
    lines.append(f"{'tokens':<{width}}  {'p50':>6}  {'p90':>6}  {'p99':>6}  {'max':>6}")
    for side in ("input", "output"):
        p = s[f"{side}_tokens"]
        lines.append(f"{side:<{width}}  {p['p50']:>6}  {p['p90']:>6}  {p['p99']:>6}  {p['max']:>6}")
    lines.extend(f"warning: {w}" for w in s["warnings"])
    return "\n".join(lines)
