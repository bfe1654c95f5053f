"""Watch every training run under a folder: status, progress, losses, and one overlay of their curves.

A run is any folder holding ``experiment_report.json``. Its displayed state:

* ``running``  — the report says running and was written within ``stale_after`` seconds;
* ``idle``     — the report says running but has not been written for longer (stalled, or the process died);
* ``finished`` / ``failed`` — as the report says;
* ``unreadable`` — the file exists but cannot be parsed (shown, never fatal: one bad run must not hide the others).

Age is taken from the report's ``updated_at`` (its writer's clock) and falls back to the file's mtime.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from apt_model.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_FILE = "experiment_report.json"
STALE_AFTER_S = 120.0
# mlflow keeps copies of logged reports in its artifact store: those are not runs.
SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "venv", "mlruns", "mlartifacts"}


@dataclass
class RunStatus:
    name: str  # path relative to the root
    path: Path  # the run folder
    status: str  # running | idle | finished | failed | unreadable
    backend: str | None = None
    epoch: int = 0
    epochs_planned: int | None = None
    last_train_loss: float | None = None
    last_val_loss: float | None = None
    best_train_loss: float | None = None
    best_val_loss: float | None = None
    age_s: float | None = None
    updated_at: str | None = None
    error: str | None = None
    train_curve: list[tuple[float, float]] = field(default_factory=list)
    val_curve: list[tuple[float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, int | float):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def read_run(
    report_path: Path, root: Path, *, now: float | None = None, stale_after: float = STALE_AFTER_S
) -> RunStatus:
    """The ``RunStatus`` of one report file."""
    run_dir = report_path.parent
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    now = time.time() if now is None else now
    try:
        mtime = report_path.stat().st_mtime
        data = json.loads(report_path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return RunStatus(
            name=name, path=run_dir, status="unreadable", error=f"{exc.__class__.__name__}: {exc}"[:200]
        )
    updated = data.get("updated_at")
    ts = mtime
    if isinstance(updated, str):
        try:
            t = datetime.fromisoformat(updated)
            ts = (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()
        except ValueError:
            pass
    age = max(0.0, now - ts)
    status = data.get("status")
    if status == "running" and age > stale_after:
        status = "idle"
    elif status not in ("running", "finished", "failed"):
        status = "unreadable"
    rows = [r for r in data.get("epochs") or [] if isinstance(r, dict)]
    train = [(float(r.get("epoch", i + 1)), _num(r.get("train_loss"))) for i, r in enumerate(rows)]
    val = [(float(r.get("epoch", i + 1)), _num(r.get("val_loss"))) for i, r in enumerate(rows)]
    tr = [(e, v) for e, v in train if _finite(v)]
    va = [(e, v) for e, v in val if _finite(v)]
    final = data.get("final") or {}
    return RunStatus(
        name=name,
        path=run_dir,
        status=status,
        backend=data.get("backend"),
        epoch=len(rows),
        epochs_planned=((data.get("config") or {}).get("train") or {}).get("epochs"),
        last_train_loss=train[-1][1] if train else None,
        last_val_loss=next((v for _, v in reversed(val) if v is not None), None),
        best_train_loss=min(v for _, v in tr) if tr else None,
        best_val_loss=min(v for _, v in va) if va else None,
        age_s=round(age, 1),
        updated_at=updated if isinstance(updated, str) else None,
        error=final.get("error") if isinstance(final, dict) else None,
        train_curve=tr,  # type: ignore[arg-type]
        val_curve=va,  # type: ignore[arg-type]
    )


def find_runs(
    root: str | Path, *, stale_after: float = STALE_AFTER_S, now: float | None = None
) -> list[RunStatus]:
    """Every run under ``root`` (the root itself included), sorted by name."""
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"--root {base}: not a directory")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        # Hidden folders include the atomic writers' temporary directories; skip them and bulky tool folders.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        if REPORT_FILE in filenames:
            found.append(Path(dirpath) / REPORT_FILE)
    return sorted((read_run(p, base, now=now, stale_after=stale_after) for p in found), key=lambda r: r.name)


# ---------------------------------------------------------------------------------------------------- rendering
def _fmt(x: float | None, spec: str = ".4g") -> str:
    return format(x, spec) if x is not None and math.isfinite(x) else ("nan" if x is not None else "-")


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


HEADER = ["run", "status", "backend", "epoch", "train", "val", "best val", "best train", "age"]


def table_rows(runs: list[RunStatus]) -> list[list[str]]:
    return [
        [
            r.name,
            r.status,
            r.backend or "-",
            f"{r.epoch}/{r.epochs_planned}" if r.epochs_planned else str(r.epoch),
            _fmt(r.last_train_loss),
            _fmt(r.last_val_loss),
            _fmt(r.best_val_loss),
            _fmt(r.best_train_loss),
            _age(r.age_s),
        ]
        for r in runs
    ]


def format_table(runs: list[RunStatus]) -> str:
    rows = [HEADER, *table_rows(runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    counts = {
        s: sum(1 for r in runs if r.status == s)
        for s in ("running", "idle", "finished", "failed", "unreadable")
    }
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs")
    return "\n".join(lines) + "\n"


def build_overlay_figure(runs: list[RunStatus]) -> Figure:
    """Val loss (solid) and train loss (dashed) of every run on shared axes, one colour per run.
    Lines carry gids ``val:<name>`` and ``train:<name>``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.0, 7.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_gid("overlay")
    ax.grid(True, alpha=0.3)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    drawn = []
    for run, color in zip(runs, colors, strict=True):
        if run.val_curve:
            (ln,) = ax.plot(
                *zip(*run.val_curve, strict=True), color=color, lw=1.8, label=f"{run.name} val ({run.status})"
            )
            ln.set_gid(f"val:{run.name}")
            drawn += [y for _, y in run.val_curve]
        if run.train_curve:
            (ln,) = ax.plot(
                *zip(*run.train_curve, strict=True),
                color=color,
                lw=1.0,
                ls="--",
                label=f"{run.name} train" if not run.val_curve else None,
            )
            ln.set_gid(f"train:{run.name}")
            drawn += [y for _, y in run.train_curve]
    if drawn:
        if min(drawn) > 0 and max(drawn) / min(drawn) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (solid: val, dashed: train)")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(
            0.5,
            0.5,
            "no data",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="#888888",
            fontsize=14,
        )
    ax.set_title(f"{len(runs)} run(s) — loss curves")
    fig.tight_layout()
    return fig


def render_overlay(runs: list[RunStatus], out_png: str | Path) -> Path:
    """Save the overlay of every run's loss curves as a PNG (atomically)."""
    from apt_model.visualize import save_figure

    out = Path(out_png)
    if out.is_dir():
        raise ConfigError(f"--overlay {out}: is a directory (give a .png file path)")
    return save_figure(build_overlay_figure(runs), out)


# -------------------------------------------------------------------------------------------------------- the loop
def monitor(
    root: str | Path,
    *,
    interval: float = 5.0,
    once: bool = False,
    overlay: str | Path | None = None,
    stale_after: float = STALE_AFTER_S,
    until_done: bool = False,
    stream: IO[str] | None = None,
    rich: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
    max_iterations: int | None = None,
) -> list[RunStatus]:
    """Print the runs table (once, or live until Ctrl-C / ``until_done``: no run left running); returns the last scan."""
    if interval <= 0:
        raise ConfigError("--interval must be positive")
    stream = stream or sys.stdout
    runs = find_runs(root, stale_after=stale_after)
    if once:
        stream.write(format_table(runs) if runs else f"no {REPORT_FILE} under {root}\n")
        if overlay is not None and runs:
            render_overlay(runs, overlay)
        return runs
    use_rich = stream.isatty() if rich is None else rich
    live = None
    if use_rich:
        from rich.console import Console
        from rich.live import Live

        live = Live(console=Console(file=stream), refresh_per_second=2)
        live.start()
    iterations = 0
    try:
        while True:
            if live is not None:
                live.update(_rich_table(runs, root))
            else:
                stream.write(time.strftime("%H:%M:%S ") + f"{root}\n" + format_table(runs))
                stream.flush()
            if overlay is not None and runs:
                render_overlay(runs, overlay)
            iterations += 1
            if until_done and runs and not any(r.status == "running" for r in runs):
                return runs
            if max_iterations is not None and iterations >= max_iterations:
                return runs
            sleep(interval)
            runs = find_runs(root, stale_after=stale_after)
    finally:
        if live is not None:
            live.stop()


def _rich_table(runs: list[RunStatus], root: str | Path) -> Any:
    from rich.table import Table

    style = {
        "running": "green",
        "idle": "yellow",
        "finished": "blue",
        "failed": "red",
        "unreadable": "magenta",
    }
    table = Table(title=f"APT runs under {root} — {time.strftime('%H:%M:%S')}")
    for i, h in enumerate(HEADER):
        table.add_column(h, justify="left" if i < 3 else "right")
    for run, row in zip(runs, table_rows(runs), strict=True):
        table.add_row(*row, style=style.get(run.status))
    if not runs:
        table.add_row("no runs yet", *[""] * (len(HEADER) - 1))
    return table
