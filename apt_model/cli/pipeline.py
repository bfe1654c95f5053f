"""``apt pipeline``: run the whole `apt` flow in this process, or manage the local Prefect stack.

    apt pipeline run [--preset tiny] [--backend playground] [--epochs N] [--param k=v ...] [--output-root DIR]
    apt pipeline stack up|down|status [--port 4200]

``run`` uses the embedded default when no ``PREFECT_API_URL`` is set: Prefect's ephemeral API on a SQLite database
under ``PREFECT_HOME`` (``.apt_home/prefect`` with the Makefile), local MLflow under the output root — nothing to
start by hand. With ``PREFECT_API_URL`` set the run (and its artifacts) is recorded on that server instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from apt_model.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pipeline", help="run the Prefect pipeline (generate → train → verify → ...)")
    sub = p.add_subparsers(dest="pipeline_command", metavar="ACTION", parser_class=type(p))
    run = sub.add_parser("run", help="run the whole pipeline in this process (embedded Prefect, no server)")
    run.add_argument("--preset", help="model preset (tiny | playground | reference)")
    run.add_argument("--backend", help="training backend (see `apt train --list-backends`)")
    run.add_argument("--epochs", type=int)
    run.add_argument("--output-root", help="where cache, reports, plots and MLflow go (default runs/default)")
    run.add_argument(
        "--refresh", action="store_true", default=None, help="rebuild data and model even when cached"
    )
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="any flow parameter (values parsed as JSON when they parse), e.g. --param dataset_size=small",
    )
    run.add_argument("--list-params", action="store_true", help="print the parameters with defaults and exit")
    run.set_defaults(handler=_run)
    stack = sub.add_parser(
        "stack", help="the local Prefect server + pools + deployments + worker on 127.0.0.1"
    )
    stack.add_argument("action", choices=("up", "down", "status"))
    stack.add_argument("--port", type=int, default=4200)
    stack.add_argument("--host", default="127.0.0.1")
    stack.set_defaults(handler=_stack)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])


def collect_params(args: argparse.Namespace) -> dict[str, Any]:
    # Imported here: the parameter model needs pydantic, which `apt train`/`apt data` on a bare GPU host lack.
    from apt_model.pipeline_params import parse_cli_value

    values: dict[str, Any] = {}
    for item in args.param:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        values[key.strip()] = parse_cli_value(raw)
    for flag, name in (
        ("preset", "preset"),
        ("backend", "backend"),
        ("epochs", "epochs"),
        ("output_root", "output_root"),
        ("refresh", "refresh"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            values[name] = value
    return values


def _run(args: argparse.Namespace) -> int:
    from apt_model.pipeline_params import PipelineParams, parse_params

    if args.list_params:
        for name, f in PipelineParams.model_fields.items():
            print(f"{name:22} default {f.get_default(call_default_factory=True)!r:24} {f.description or ''}")
        return 0
    values = collect_params(args)
    params = parse_params(values)  # fail here, before Prefect even starts, naming the field
    # The embedded default keeps its state in the checkout (or the user's PREFECT_HOME), and is patient with a
    # busy machine when starting its temporary API server.
    os.environ.setdefault("PREFECT_HOME", str(REPO_ROOT / ".apt_home" / "prefect"))
    os.environ.setdefault("MPLCONFIGDIR", str(REPO_ROOT / ".apt_home" / "matplotlib"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for var in ("PREFECT_HOME", "MPLCONFIGDIR"):  # Prefect does not create missing parents of its home
        Path(os.environ[var]).expanduser().mkdir(parents=True, exist_ok=True)
    where = os.environ.get("PREFECT_API_URL") or "embedded (ephemeral Prefect API, SQLite)"
    print(
        f"apt pipeline: backend {params.backend}, preset {params.preset}, {params.epochs} epochs; Prefect: {where}"
    )
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from flows.pipeline import apt

    state = apt(**values, return_state=True)
    if not state.is_completed():
        try:
            state.result()
        except Exception as exc:  # the flow's own error, one line
            msg = " ".join(str(exc).split())
            print(f"error: pipeline {state.name}: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 1
    summary = state.result()
    v = summary["verification"]
    print()
    print(f"run folder:   {summary['run_dir']}")
    print(f"report:       {v['report_md']}")
    print(
        f"              exact match {v['overall']['exact']:.2%} on {v['overall']['n']} pairs; gate {'passed' if v['gate']['passed'] else 'MISSED'}"
    )
    print(f"plots:        {summary['dashboard']}")
    print(f"model:        {summary['train']['final_model']}")
    print(f"export:       {summary['train']['export_dir']}")
    print(f"diagnosis:    {summary['diagnosis']['path']} ({summary['diagnosis']['counts']})")
    print(
        f"cache:        data {'hit' if summary['data']['cache_hit'] else 'built'}, model {'hit' if summary['train']['cache_hit'] else 'trained'}"
    )
    if summary["links"].get("mlflow"):
        print(f"MLflow run:   {summary['links']['mlflow']}")
    if summary.get("promotion"):
        print(
            f"promotion:    {summary['promotion']['outcome']} ({summary['promotion']['decision']['reason']})"
        )
    return 0


def _stack(args: argparse.Namespace) -> int:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from deployments import local_stack

    return local_stack.main([args.action, "--port", str(args.port), "--host", args.host])
