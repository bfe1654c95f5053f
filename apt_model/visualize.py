"""Training dashboards drawn from what a run actually recorded.

The reference visualizer plotted a synthetic "loss landscape". Here every mark comes from ``experiment_report.json``
(and ``verification_report.json`` when it sits beside it): losses per epoch plus the logged batch losses, the learning
rate with its warm-restart markers, grad norm, throughput, validation token accuracy and per-module exact-match
accuracy. A panel without data says "no data"; non-finite values are not drawn but counted on the panel.

``build_figure`` returns the matplotlib ``Figure`` (the test seam: axes and lines carry ``gid`` names), and
``render_dashboard`` saves it atomically as a PNG of a fixed size. Only the object-oriented Agg canvas is used — no
pyplot, so nothing global (backend, open figures) changes in the caller's process; ``MPLCONFIGDIR`` is honoured by
matplotlib itself.

``watch`` is the realtime mode: it re-renders whenever the report (or the verification report) changes on disk,
prints a live table, and returns by itself when the run's status becomes finished/failed or nothing changed for
``idle_timeout`` seconds.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from apt_model.errors import ConfigError
from apt_model.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REPORT_FILE = "experiment_report.json"
VERIFICATION_FILE = "verification_report.json"
DASHBOARD_FILE = "training_dashboard.png"
FIGSIZE = (14.0, 10.0)
DPI = 100  # → 1400 x 1000 pixels, a fixed size that tests and docs can rely on
NO_DATA = "no data"
TRAIN_COLOR, VAL_COLOR, BATCH_COLOR = "#1f77b4", "#d62728", "#9ecae1"


# ------------------------------------------------------------------------------------------------------- reading
def _num(x: Any) -> float:
    """A report value as float; the strings "nan"/"inf"/"-inf" (how reports store them) too; else NaN."""
    if isinstance(x, bool) or x is None:
        return math.nan
    if isinstance(x, int | float):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return math.nan
    return math.nan


def read_log_dir(log_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(experiment report, verification report or None); ConfigError naming the file when unusable."""
    d = Path(log_dir)
    if not d.is_dir():
        raise ConfigError(f"--log-dir {d}: not a directory")
    return _read_report(d / REPORT_FILE), _read_verification(d / VERIFICATION_FILE)


def _read_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (is this a training output folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable experiment report ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("epochs", []), list):
        raise ConfigError(f"{path}: not an experiment report (expected an object with an epochs list)")
    return data


def _read_verification(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable verification report ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("modules"), dict):
        raise ConfigError(f"{path}: not a verification report (no modules table)")
    return data


# ---------------------------------------------------------------------------------------------------- the series
@dataclass
class Series:
    x: list[float]
    y: list[float]
    nonfinite: int = 0  # points left out because the value was NaN/Inf


def _series(xs: list[float], ys: list[float]) -> Series:
    keep = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    # None (not recorded, e.g. no eval this epoch) is not "non-finite"; only real NaN/Inf values count.
    return Series([x for x, _ in keep], [y for _, y in keep], 0)


def dashboard_series(report: dict[str, Any], verification: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the dashboard draws, extracted from the reports (pure; the figure draws exactly this)."""
    rows = [r for r in report.get("epochs") or [] if isinstance(r, dict)]
    ep = [float(r.get("epoch", i + 1)) for i, r in enumerate(rows)]
    out: dict[str, Any] = {}
    for key in ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "val_token_acc"):
        raw = [r.get(key) for r in rows]
        vals = [_num(v) for v in raw]
        s = _series(ep, vals)
        s.nonfinite = sum(1 for v, r in zip(vals, raw, strict=True) if r is not None and not math.isfinite(v))
        out[key] = s

    # Batch losses are logged by global step; place them on the epoch axis (x = completed epochs).
    sched = report.get("schedule") or {}
    spe = sched.get("steps_per_epoch") or (report.get("runtime") or {}).get("steps_per_epoch")
    steps = [
        (_num(b[0]), _num(b[1]))
        for b in report.get("batch_losses") or []
        if isinstance(b, list | tuple) and len(b) >= 2
    ]
    if isinstance(spe, int | float) and spe > 0:
        to_epoch: Callable[[float], float] = lambda s: s / float(spe)  # noqa: E731
    else:
        gs = [0.0] + [_num(r.get("global_step")) for r in rows]
        xs = [0.0, *ep]
        import numpy as np

        to_epoch = lambda s: float(np.interp(s, gs, xs)) if len(gs) > 1 else s  # noqa: E731
    bx = [to_epoch(s) for s, _ in steps if math.isfinite(s)]
    by = [v for s, v in steps if math.isfinite(s)]
    b = _series(bx, by)
    b.nonfinite = sum(1 for v in by if not math.isfinite(v))
    out["batch_loss"] = b

    # Restarts: the schedule's own list (restarts that have happened), else jumps up in the recorded LR.
    done = ep[-1] if ep else 0.0
    restarts = [
        float(r) for r in sched.get("restart_epochs") or [] if isinstance(r, int | float) and r < done
    ]
    if not sched.get("restart_epochs"):
        lr = out["lr"]
        restarts = [lr.x[i - 1] for i in range(1, len(lr.y)) if lr.y[i] > 1.5 * lr.y[i - 1]]
    out["restarts"] = restarts

    modules: dict[str, dict[str, float]] = {}
    if verification:
        for name, m in (verification.get("modules") or {}).items():
            if isinstance(m, dict):
                modules[name] = {
                    "exact": _num(m.get("exact")),
                    "substring": _num(m.get("substring")),
                    "n": m.get("n"),
                }
    out["modules"] = modules
    out["overall"] = (verification or {}).get("overall")
    out["collapse"] = (verification or {}).get("collapse")
    return out


# ------------------------------------------------------------------------------------------------------ the figure
def _no_data(ax: Axes, hint: str = "") -> None:
    ax.text(
        0.5,
        0.5,
        NO_DATA + (f"\n{hint}" if hint else ""),
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="#888888",
        fontsize=12,
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _note_nonfinite(ax: Axes, n: int) -> None:
    if n:
        ax.text(
            0.99,
            0.97,
            f"{n} non-finite value(s) not drawn",
            ha="right",
            va="top",
            transform=ax.transAxes,
            color="#b00000",
            fontsize=9,
            fontweight="bold",
        )


def _line(ax: Axes, s: Series, gid: str, **kw: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    (line,) = ax.plot(s.x, s.y, **kw)
    line.set_gid(gid)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers


def _fmt(x: Any, spec: str = ".4g") -> str:
    v = _num(x)
    return format(v, spec) if math.isfinite(v) else "n/a"


def build_figure(
    report: dict[str, Any], verification: dict[str, Any] | None = None, *, title: str | None = None
) -> Figure:
    """The dashboard figure. Axes gids: loss, lr, grad_norm, tokens_per_s, val_token_acc, modules; line gids
    name their series (train_loss, val_loss, batch_loss, lr, grad_norm, tokens_per_s, val_token_acc); the
    bars (one per module, in the report's order) have gids module_exact / module_substring."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = dashboard_series(report, verification)
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 2)
    ax_loss, ax_lr, ax_gn, ax_tps, ax_acc, ax_mod = axes.flat
    for ax, gid in zip(
        axes.flat, ("loss", "lr", "grad_norm", "tokens_per_s", "val_token_acc", "modules"), strict=True
    ):
        ax.set_gid(gid)
        ax.grid(True, alpha=0.3)

    # Loss.
    ax_loss.set_title("Loss")
    tr, va, ba = data["train_loss"], data["val_loss"], data["batch_loss"]
    if tr.y or va.y or ba.y:
        if ba.y:
            _line(
                ax_loss, ba, "batch_loss", color=BATCH_COLOR, lw=0.8, alpha=0.9, label="batch (logged steps)"
            )
        if tr.y:
            _line(
                ax_loss, tr, "train_loss", color=TRAIN_COLOR, marker="o", ms=3, lw=1.8, label="train (epoch)"
            )
        if va.y:
            _line(ax_loss, va, "val_loss", color=VAL_COLOR, marker="s", ms=3, lw=1.8, label="val (epoch)")
        ys = tr.y + va.y + ba.y
        if min(ys) > 0 and max(ys) / min(ys) > 20:
            ax_loss.set_yscale("log")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("cross-entropy")
        ax_loss.legend(loc="upper right", fontsize=9)
    else:
        _no_data(ax_loss)
    _note_nonfinite(ax_loss, tr.nonfinite + va.nonfinite + ba.nonfinite)

    # Learning rate with restarts.
    ax_lr.set_title("Learning rate (cosine warm restarts)")
    lr = data["lr"]
    if lr.y:
        _line(ax_lr, lr, "lr", color="#2ca02c", marker="o", ms=3, label="lr at epoch end")
        for i, r in enumerate(data["restarts"]):
            ax_lr.axvline(r, color="#7f7f7f", ls="--", lw=1, label="restart" if i == 0 else None).set_gid(
                "restart"
            )
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax_lr.set_xlabel("epoch")
        ax_lr.legend(loc="upper right", fontsize=9)
    else:
        _no_data(ax_lr)
    _note_nonfinite(ax_lr, lr.nonfinite)

    for ax, key, label, color in (
        (ax_gn, "grad_norm", "Gradient norm (epoch mean, pre-clip)", "#9467bd"),
        (ax_tps, "tokens_per_s", "Throughput (target tokens / s)", "#8c564b"),
        (ax_acc, "val_token_acc", "Validation token accuracy (teacher-forced)", "#ff7f0e"),
    ):
        ax.set_title(label)
        s = data[key]
        if s.y:
            _line(ax, s, key, color=color, marker="o", ms=3)
            ax.set_xlabel("epoch")
            if key == "val_token_acc":
                ax.set_ylim(0, 1.02)
        else:
            _no_data(ax)
        _note_nonfinite(ax, s.nonfinite)

    # Per-module verification accuracy.
    mods = data["modules"]
    overall = data["overall"] or {}
    if mods:
        import numpy as np

        names = list(mods)
        pos = np.arange(len(names))
        w = 0.38
        exact = [mods[n]["exact"] if math.isfinite(mods[n]["exact"]) else 0.0 for n in names]
        sub = [mods[n]["substring"] if math.isfinite(mods[n]["substring"]) else 0.0 for n in names]
        b1 = ax_mod.bar(pos - w / 2, exact, w, color="#1f77b4", label="exact match")
        b2 = ax_mod.bar(pos + w / 2, sub, w, color="#aec7e8", label="substring (reference)")
        for patch in b1:
            patch.set_gid("module_exact")
        for patch in b2:
            patch.set_gid("module_substring")
        for x, v in zip(pos, exact, strict=True):
            ax_mod.text(x - w / 2, v + 0.01, f"{v:.0%}", ha="center", va="bottom", fontsize=8)
        ax_mod.set_xticks(
            pos,
            names,
            rotation=20 if len(names) > 4 else 0,
            ha="right" if len(names) > 4 else "center",
            fontsize=9,
        )
        ax_mod.set_ylim(0, 1.12)
        ax_mod.legend(loc="upper right", fontsize=8)
        head = f"Verification: exact {_fmt(overall.get('exact'), '.1%')} on {overall.get('n', '?')} pairs"
        c = data["collapse"] or {}
        if c.get("collapsed"):
            head += (
                f" — COLLAPSED on {c.get('answer')!r}"
                if c.get("answer")
                else " — COLLAPSED on the empty answer"
            )
        ax_mod.set_title(head, color="#b00000" if c.get("collapsed") else "black")
    else:
        ax_mod.set_title("Verification: per-module exact match")
        _no_data(ax_mod, "run `apt verify --out <log dir>`")

    if title is None:
        rows = report.get("epochs") or []
        planned = ((report.get("config") or {}).get("train") or {}).get("epochs", "?")
        best = min(data["val_loss"].y) if data["val_loss"].y else math.nan
        ds = Path(str((report.get("dataset") or {}).get("path", "?"))).name
        title = (
            f"{report.get('backend', '?')} run — status {report.get('status', '?')} — epoch {len(rows)}/{planned} — "
            f"best val loss {_fmt(best)} — dataset {ds} — updated {report.get('updated_at', '?')}"
        )
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def save_figure(fig: Figure, out_png: str | Path) -> Path:
    """Write the figure as PNG atomically (a reader never sees half an image)."""
    out = Path(out_png)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return out


def render_dashboard(log_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """Render ``<log_dir>/experiment_report.json`` (+ verification) to a PNG; default ``<log_dir>/training_dashboard.png``."""
    report, verification = read_log_dir(log_dir)
    out = Path(out_png) if out_png is not None else Path(log_dir) / DASHBOARD_FILE
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory (give a .png file path)")
    return save_figure(build_figure(report, verification), out)


# -------------------------------------------------------------------------------------------------------- realtime
def epoch_table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in report.get("epochs") or []:
        rows.append(
            [
                str(r.get("epoch")),
                _fmt(r.get("train_loss")),
                _fmt(r.get("val_loss")),
                _fmt(r.get("val_token_acc"), ".3f"),
                _fmt(r.get("lr"), ".2e"),
                _fmt(r.get("grad_norm"), ".3g"),
                _fmt(r.get("tokens_per_s"), ".0f"),
                _fmt(r.get("epoch_seconds"), ".1f"),
            ]
        )
    return rows


TABLE_HEADER = ["epoch", "train", "val", "val acc", "lr", "grad", "tok/s", "s"]


@dataclass
class WatchResult:
    reason: str  # finished | failed | idle
    renders: int
    out_png: Path
    status: str | None


def watch(
    log_dir: str | Path,
    interval: float = 2.0,
    idle_timeout: float = 300.0,
    out_png: str | Path | None = None,
    *,
    stream: IO[str] | None = None,
    rich: bool | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> WatchResult:
    """Re-render whenever the report changes; return when the run ends or nothing changed for ``idle_timeout`` s."""
    d = Path(log_dir)
    if not d.is_dir():
        raise ConfigError(f"--log-dir {d}: not a directory")
    if not (interval > 0 and idle_timeout > 0):
        raise ConfigError("--interval and --idle-timeout must be positive")
    out = Path(out_png) if out_png is not None else d / DASHBOARD_FILE
    stream = stream or sys.stdout
    use_rich = stream.isatty() if rich is None else rich
    printer = _RichPrinter(stream) if use_rich else _PlainPrinter(stream)
    report_path, ver_path = d / REPORT_FILE, d / VERIFICATION_FILE
    last_sig: tuple[int | None, int | None] | None = None
    last_change = clock()
    renders, status = 0, None
    try:
        while True:
            sig = (_mtime(report_path), _mtime(ver_path))
            if sig[0] is not None and sig != last_sig:
                try:
                    report = _read_report(report_path)
                    verification = _read_verification(ver_path)
                except ConfigError:
                    report = None  # mid-replace on an odd file system; the next tick reads it whole
                if report is not None:
                    save_figure(build_figure(report, verification), out)
                    renders += 1
                    last_sig, last_change = sig, clock()
                    status = report.get("status")
                    printer.update(report, out)
                    if status in ("finished", "failed"):
                        return WatchResult(status, renders, out, status)
            if clock() - last_change >= idle_timeout:
                printer.message(f"no change for {idle_timeout:g} s; stopping")
                return WatchResult("idle", renders, out, status)
            sleep(interval)
    finally:
        printer.close()


def _mtime(p: Path) -> int | None:
    try:
        return p.stat().st_mtime_ns
    except FileNotFoundError:
        return None


class _PlainPrinter:
    """Append-only text (logs, pipes): one line per new epoch and a line when the status changes."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream, self.seen, self.status = stream, 0, None

    def update(self, report: dict[str, Any], out: Path) -> None:
        rows = epoch_table_rows(report)
        if self.seen == 0 and rows:
            self.stream.write("  ".join(f"{h:>9}" for h in TABLE_HEADER) + "\n")
        for r in rows[self.seen :]:
            self.stream.write("  ".join(f"{c:>9}" for c in r) + "\n")
        self.seen = len(rows)
        if report.get("status") != self.status:
            self.status = report.get("status")
            self.stream.write(f"status: {self.status} (dashboard: {out})\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class _RichPrinter:
    """A live-updating table on a terminal."""

    def __init__(self, stream: IO[str]) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=stream)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def update(self, report: dict[str, Any], out: Path) -> None:
        from rich.table import Table

        table = Table(
            title=f"{report.get('backend', '?')} — {report.get('status')} — {out}", show_lines=False
        )
        for h in TABLE_HEADER:
            table.add_column(h, justify="right")
        for r in epoch_table_rows(report)[-20:]:
            table.add_row(*r)
        self.live.update(table)

    def message(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        self.live.stop()
