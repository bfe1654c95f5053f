"""`apt train`: a run, a resume that adopts the checkpoint's config, and bad arguments that touch nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from apt_model.cli import main


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dataset(path: Path) -> Path:
    data = {
        "arithmetic": [{"input": f"{a} + {b} = ?", "output": str(a + b)} for a in range(8) for b in range(6)],
        "zodiac": [
            {"input": f"{z}后面是什么生肖？", "output": n}
            for z, n in zip("鼠牛虎兔", "牛虎兔龙", strict=True)
        ],
    }
    path.write_text(
        json.dumps({"metadata": {"name": "t"}, "data": data}, ensure_ascii=False), encoding="utf-8"
    )
    return path


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def trained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    dataset = _dataset(tmp_path / "hlbd.json")
    config = tmp_path / "cfg.yaml"
    config.write_text("model:\n  preset: tiny\n  dropout: 0.0\ntrain:\n  batch_size: 8\n  lr: 0.003\n")
    save = tmp_path / "hlbd_playground"
    argv = ["train", "--backend", "playground", "--dataset", str(dataset), "--epochs", "2", "--save-dir", str(save),
            "--save-interval", "1", "--config", str(config), "--gradient-accumulation", "1", "--seed", "3",
            "--max-src-len", "16", "--max-tgt-len", "8", "--no-progress", "--no-dbc-dac"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    manifest = json.loads(out.strip().splitlines()[-1])
    assert manifest == json.loads((save / "train_result.json").read_text())
    return dataset, save


def test_train_then_resume_adopting_the_checkpoint_config(trained, capsys) -> None:  # type: ignore[no-untyped-def]
    dataset, save = trained
    report = json.loads((save / "experiment_report.json").read_text())
    assert report["config"]["model"]["d_model"] == 32 and report["config"]["train"]["batch_size"] == 8
    assert (
        report["config"]["train"]["dbc_dac"]["enabled"] is False
        and report["config"]["data"]["max_src_len"] == 16
    )
    assert {"checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "final_model.pt", "final_model"} <= {
        p.name for p in save.iterdir()
    }
    # resume: no preset given → model, train and data configs come from the checkpoint; --epochs extends the run
    assert main(["train", "--dataset", str(dataset), "--save-dir", str(save), "--no-progress",
                 "--resume", str(save / "checkpoint_epoch_2.pt"), "--epochs", "3"]) == 0  # fmt: skip
    manifest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert manifest["epochs_completed"] == 3
    report = json.loads((save / "experiment_report.json").read_text())
    assert [r["epoch"] for r in report["epochs"]] == [1, 2, 3]
    assert report["config"]["train"]["batch_size"] == 8 and report["config"]["train"]["seed"] == 3


def test_bad_arguments_exit_2_with_one_line_and_touch_nothing(trained, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    dataset, save = trained
    capsys.readouterr()
    before = _snapshot(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    before[str(garbage)] = (garbage.stat().st_mtime_ns, hashlib.sha256(garbage.read_bytes()).hexdigest())
    base = ["train", "--dataset", str(dataset), "--save-dir", str(save), "--preset", "tiny"]
    fresh = ["train", "--dataset", str(dataset), "--save-dir", str(tmp_path / "fresh"), "--preset", "tiny"]
    cases = [
        (["train", "--backend", "nope", "--dataset", str(dataset)], "invalid choice"),
        ([*base, "--n-heads", "5"], "n_heads: must divide d_model=32"),
        (["train", "--dataset", str(tmp_path / "missing.json"), "--save-dir", str(save)], "missing.json"),
        ([*base, "--epochs", "-1"], "TrainConfig.epochs: must be >= 1"),
        ([*base, "--resume", str(garbage)], "garbage.pt: not a loadable APT checkpoint"),
        ([*base, "--resume", str(tmp_path / "nothing.pt")], "checkpoint file not found"),
        (
            [*base, "--d-model", "64", "--resume", str(save / "checkpoint_epoch_1.pt")],
            "differs from the checkpoint",
        ),
        ([*base, "--epochs", "1"], "already holds a run"),
        ([*base, "--precision", "fp16"], "fp16 needs a CUDA device"),
        (["train", "--save-dir", str(save)], "--dataset is required"),
        ([*base, "--config", str(dataset)], "unknown section"),
        ([*base, "--max-src-len", "4096"], "exceeds ModelConfig.max_len"),
        ([*base, "--embedding-init-std", "-1"], "ModelConfig.embedding_init_std: must be positive"),
        ([*base, "--dropout-epochs", "-1"], "TrainConfig.dropout_epochs: must be >= 0"),
        ([*base, "--adam-beta2", "1.0"], "TrainConfig.adam_beta2: must be in [0, 1)"),
        ([*base, "--clip-grad-norm", "0"], "TrainConfig.clip_grad_norm: must be positive"),
        ([*base, "--transform-kernel", "fused"], "invalid choice"),
        ([*base, "--repeat", "zodiac"], "DataConfig.repeat: each item must be MODULE=K"),
        ([*fresh, "--repeat", "nosuch=2"], "has no module 'nosuch' (its modules: "),
        ([*fresh, "--worked-steps-ramp", "-1"], "TrainConfig.worked_steps_ramp: must be >= 0"),
        (
            [*fresh, "--epochs", "3", "--worked-steps-epochs", "2", "--worked-steps-ramp", "1"],
            "plus worked_steps_ramp=1 must be below epochs=3",
        ),
        ([*fresh, "--worked-steps-epochs", "1"], "has no product of a two-digit multiplier"),
        ([*base, "--cuda-graphs", "all"], "invalid choice"),
        (
            [*base, "--backend", "deepspeed", "--cuda-graphs", "off"],
            "--cuda-graphs is the playground backend's",
        ),
        (
            [*base, "--backend", "huggingface", "--cuda-graphs", "loss"],
            "--cuda-graphs is the playground backend's",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append(
            ([*base, "--transform-kernel", "triton"], "transform_kernel='triton' needs a CUDA device")
        )
        cases.append(
            ([*base, "--cuda-graphs", "step"], "cuda_graphs='step' needs the compiled step on a CUDA")
        )
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("error:"), err
        assert message in err, (message, err)
        assert _snapshot(tmp_path) == before, argv


def test_list_backends(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--list-backends"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "INSTALLED", "EXTRA", "SUMMARY"]
    assert any(line.startswith("playground") and " yes " in line for line in out)
