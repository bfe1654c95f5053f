"""apt_model.diagnose: each planted problem is found with the right severity; a healthy run is clean."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from apt_model.cli import main
from apt_model.diagnose import (
    Finding,
    check_dataset,
    check_run,
    diagnose,
    expected_lr,
    findings_to_json,
    format_findings,
)
from apt_model.errors import AptError


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def edit_report(run: Path, change) -> None:  # type: ignore[no-untyped-def]
    path = run / "experiment_report.json"
    report = json.loads(path.read_text(encoding="utf-8"))
    change(report)
    path.write_text(json.dumps(report), encoding="utf-8")


def problems(findings: list[Finding]) -> dict[str, str]:
    return {f.check: f.severity for f in findings if f.severity != "info"}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------------------- healthy run
def test_healthy_real_run_has_no_warning_or_error(run_and_data: tuple[Path, Path]) -> None:
    run, _ = run_and_data
    before = snapshot(run.parent)
    findings = diagnose(run_dir=run)
    assert problems(findings) == {}, format_findings(findings)
    checks = {f.check for f in findings}
    # Every area was actually examined: environment, checkpoint, data (from the report's path) and the run.
    assert {
        "env.python",
        "env.torch",
        "env.extras",
        "checkpoint.summary",
        "data.summary",
        "run.summary",
    } <= checks
    assert snapshot(run.parent) == before  # read-only


def test_lr_recomputation_matches_torch_scheduler() -> None:
    from apt_model.config import TrainConfig
    from apt_model.training.schedule import WarmRestartSchedule

    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, t0=2, t_mult=2, warmup_steps=3)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=cfg.lr)
    sched = WarmRestartSchedule(opt, cfg, steps_per_epoch=4)
    for step in range(40):
        got = sched.set_step(step)
        want = expected_lr(step, base_lr=1e-3, min_lr=1e-5, t0=2, t_mult=2, steps_per_epoch=4, warmup_steps=3)
        assert math.isclose(got, want, rel_tol=1e-9), step


# ------------------------------------------------------------------------------------------------ planted problems
def test_nan_in_loss_history_is_an_error(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(run_and_data[0], tmp_path / "run")

    def plant(r: dict) -> None:  # type: ignore[type-arg]
        r["epochs"][1]["train_loss"] = "nan"
        r["batch_losses"].append([99, "inf"])

    edit_report(run, plant)
    found = problems(diagnose(run_dir=run, environment=False))
    assert found.get("run.nonfinite_loss") == "error"
    f = next(f for f in diagnose(run_dir=run, environment=False) if f.check == "run.nonfinite_loss")
    assert f.evidence["epochs"][0]["epoch"] == 2 and f.evidence["batches"] == [[99, math.inf]] and f.fix


def test_inf_weights_are_an_error(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    from apt_model.checkpoint import load_checkpoint, save_checkpoint

    run, _ = run_and_data
    state = load_checkpoint(run / "final_model.pt")
    name = next(k for k, v in state["model_state"].items() if v.is_floating_point() and v.ndim == 2)
    state["model_state"][name] = state["model_state"][name].clone()
    state["model_state"][name][0, 0] = math.inf
    bad = save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in state.items() if k != "format_version"})
    findings = diagnose(model=bad, environment=False)
    assert problems(findings) == {"checkpoint.nonfinite_weights": "error"}
    f = next(f for f in findings if f.check == "checkpoint.nonfinite_weights")
    assert f.evidence["tensors"][name]["inf"] == 1


def test_vocab_mismatch_is_an_error(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    from apt_model.tokenizer import AptTokenizer

    run, _ = run_and_data
    export = tmp_path / "export"
    shutil.copytree(run / "final_model", export)
    other = AptTokenizer.build(["completely different text: xyzXYZ!"])
    (export / "tokenizer.json").write_text(other.to_json(), encoding="utf-8")
    findings = diagnose(model=export, environment=False)
    assert problems(findings).get("checkpoint.vocab_mismatch") == "error"
    f = next(f for f in findings if f.check == "checkpoint.vocab_mismatch")
    assert f.evidence["tokenizer_vocab_size"] == other.vocab_size != f.evidence["config_vocab_size"]


def test_train_val_leakage_is_an_error(tmp_path: Path, arith_dataset: Callable[[Path], Path]) -> None:
    from apt_model.data import load_dataset
    from apt_model.data.pairs import HLBDDataset, Pair

    # In a file: the loader drops exact repeats, so the leak is the same question with other spacing/punctuation.
    doc = {
        "metadata": {"splits": {"val": ["12+34=?", "5 + 5 = ?"]}},
        "data": {"arithmetic": [
            {"input": "12 + 34 = ?", "output": "46"}, {"input": "12+34=?", "output": "46"},
            {"input": "5 + 5 = ?", "output": "10"}, {"input": "1 + 1 = ?", "output": "2"},
        ]},
    }  # fmt: skip
    path = tmp_path / "leaky.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    found = problems(diagnose(dataset=path, environment=False))
    assert found == {"data.near_leakage": "error"}
    # In memory (any other producer of an HLBDDataset): the exact same input in both splits.
    ds = HLBDDataset(
        pairs=[Pair("a?", "1", "m", "train"), Pair("a?", "1", "m", "val"), Pair("b?", "2", "m", "val")],
        metadata={},
    )
    assert problems(check_dataset(ds)) == {"data.leakage": "error"}
    # The clean generated dataset has none.
    assert problems(check_dataset(load_dataset(arith_dataset(tmp_path / "ok.json")))) == {}


def test_run_health_rules() -> None:
    def report(train: list[float], val: list[float], lr: float = 1e-3, gn: list[float] | None = None) -> dict:  # type: ignore[type-arg]
        return {
            "status": "finished",
            "epochs": [
                {"epoch": i + 1, "train_loss": t, "val_loss": v, "val_token_acc": 0.5, "lr": lr,
                 "grad_norm": (gn or [1.0] * len(train))[i], "global_step": i + 1, "skipped_steps": 0}
                for i, (t, v) in enumerate(zip(train, val, strict=True))
            ],
        }  # fmt: skip

    assert problems(check_run(report([3, 2, 4], [3, 2, 4]))) == {"run.diverged": "error"}
    assert problems(check_run(report([3, 1, 2], [3, 1, 2]))) == {"run.diverging": "warning"}
    flat = [3.0, 2.0, 1.5] + [1.2] * 8
    assert problems(check_run(report(flat, flat))) == {"run.plateau": "warning"}
    down = [3.0, 2.0, 1.5, 1.2, 1.0]
    assert problems(check_run(report(down, [3.0, 2.0, 1.6, 2.0, 2.4]))) == {"run.overfitting": "warning"}
    assert problems(check_run(report(down, down, gn=[1, 1, 50, 1, 1]))) == {"run.grad_spikes": "warning"}
    assert problems(check_run(report(down, down))) == {}
    failed = report(down, down)
    failed.update(status="failed", final={"error": "CUDA out of memory"})
    assert problems(check_run(failed)) == {"run.failed": "error"}
    stale = report(down, down)
    stale.update(status="running", updated_at="2000-01-01T00:00:00+00:00")
    assert problems(check_run(stale)) == {"run.stale": "warning"}


def test_wrong_lr_schedule_is_flagged(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    run = copy_run(run_and_data[0], tmp_path / "run")

    def plant(r: dict) -> None:  # type: ignore[type-arg]
        for e in r["epochs"]:
            e["lr"] = r["config"]["train"]["lr"]  # a constant LR where the schedule says cosine restarts

    edit_report(run, plant)
    found = problems(diagnose(run_dir=run, environment=False))
    assert found == {"run.lr_schedule": "warning"}


def test_json_text_and_cli(
    run_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(run_and_data[0], tmp_path / "run")
    assert main(["diagnose", "--run", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["counts"]["error"] == 0 and all({"severity", "check", "message", "evidence", "fix"}
                                                               <= set(f) for f in data["findings"])  # fmt: skip
    edit_report(run, lambda r: r["epochs"][0].update(val_loss="nan"))
    out = tmp_path / "diag.txt"
    assert main(["diagnose", "--run", str(run), "--out", str(out)]) == 1
    text = out.read_text(encoding="utf-8")
    assert text.startswith("ERROR   run.nonfinite_loss") and "fix:" in text
    assert findings_to_json([])["ok"]


def test_bad_paths_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(AptError):
        diagnose(run_dir=tmp_path / "missing")
    for argv in (
        ["diagnose", "--run", str(tmp_path / "missing")],
        ["diagnose", "--run", str(tmp_path)],  # exists, but holds no report
        ["diagnose", "--dataset", str(tmp_path / "missing.json")],
        ["diagnose", "--model", str(tmp_path / "missing.pt")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "experiment_report.json").write_text("{not json", encoding="utf-8")
    assert main(["diagnose", "--run", str(broken)]) == 2
    # A file that exists but is not a checkpoint is a finding (the check "loads" failed), exit 1.
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["diagnose", "--model", str(junk), "--no-env"]) == 1
    assert "ERROR   checkpoint.load" in capsys.readouterr().out
