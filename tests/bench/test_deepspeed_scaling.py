"""The scaling benchmark's arithmetic: which epochs it measures and how it summarises repeated runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.deepspeed_scaling import measured_epochs, summarize

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "deepspeed_scaling.py"


def test_measured_epochs_leave_out_start_up_and_the_final_validation() -> None:
    epochs = [{"epoch": k} for k in range(1, 6)]
    assert [e["epoch"] for e in measured_epochs(epochs)] == [2, 3, 4]
    assert [e["epoch"] for e in measured_epochs(epochs[:3])] == [2]
    assert [e["epoch"] for e in measured_epochs(epochs[:2])] == [2]  # too short to leave both out: the last


def test_summary_gives_medians_spreads_and_each_repeats_own_ratio() -> None:
    per_gpu = {(1, 0): 800.0, (2, 0): 760.0, (4, 0): 720.0,
               (1, 1): 900.0, (2, 1): 810.0, (4, 1): 880.0,
               (1, 2): 850.0, (2, 2): 800.0, (4, 2): 700.0}  # fmt: skip
    rows = [{"gpus": n, "repeat": k, "tokens_per_s_per_gpu": v} for (n, k), v in per_gpu.items()]
    s = summarize(rows)
    assert s["1"]["tokens_per_s_per_gpu_median"] == 850.0 and s["1"]["efficiency_vs_1gpu_median"] == 1.0
    assert s["2"]["tokens_per_s_per_gpu_median"] == 800.0
    assert s["2"]["efficiency_vs_1gpu_median"] == pytest.approx(800 / 850)
    assert (s["4"]["tokens_per_s_per_gpu_min"], s["4"]["tokens_per_s_per_gpu_max"]) == (700.0, 880.0)
    assert s["4"]["efficiency_per_repeat"] == pytest.approx([720 / 800, 880 / 900, 700 / 850])
    # The median of the repeats' own ratios is not the ratio of the medians (here 0.900 vs 720 / 850 = 0.847).
    assert s["4"]["efficiency_per_repeat_median"] == pytest.approx(720 / 800)
    assert s["4"]["efficiency_vs_1gpu_median"] == pytest.approx(720 / 850)
    assert s["4"]["runs"] == 3
    # Without a 1-GPU run there is nothing to compare with.
    alone = summarize([r for r in rows if r["gpus"] != 1])["2"]
    assert alone["efficiency_vs_1gpu_median"] is None and alone["efficiency_per_repeat_median"] is None


def test_bad_repeats_are_refused_before_any_run(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--repeats", "0", "--out", str(out), "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--repeats must be >= 1" in proc.stderr
    assert not out.exists() and not (tmp_path / "w").exists()
