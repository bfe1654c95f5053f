"""The huggingface backend: parity with Playground, Trainer outputs, early stopping, resume, Hub, DeepSpeed, flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from apt_model.backends import Backend, TrainRequest, get_backend
from apt_model.config import DataConfig, TrainConfig, model_preset
from apt_model.errors import AptError, CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")
    monkeypatch.delenv("HF_HUB_TOKEN", raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_dataset(path: Path, *, with_val: bool = True) -> Path:
    data = {
        "arithmetic": [
            {"input": f"{a} * {b} = ?", "output": str(a * b)} for a in range(2, 9) for b in range(1, 8)
        ],
        "planets": [
            {"input": f"planet {p}", "output": p[::-1]} for p in ("mars", "venus", "earth", "saturn")
        ],
    }
    meta: dict[str, Any] = {"name": "hf-test"}
    if not with_val:
        meta["splits"] = {"val": []}
    path.write_text(json.dumps({"metadata": meta, "data": data}), encoding="utf-8")
    return path


def _request(
    dataset: Path, out: Path, *, train: dict[str, Any] | None = None, **options: Any
) -> TrainRequest:
    cfg = dict(epochs=5, batch_size=6, grad_accum=2, lr=3e-3, save_interval=1, log_every=1, t0=2)
    return TrainRequest(
        model=model_preset("tiny"),
        train=TrainConfig(**{**cfg, **(train or {})}),
        data=DataConfig(max_src_len=16, max_tgt_len=8),
        dataset=dataset,
        out_dir=out,
        tracking_uri="none",
        options={"progress": False, **options},
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One Playground and one huggingface run on the same data, seed and schedule (fp32, CPU)."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("parity")
    ds = _write_dataset(base / "d.json")
    pg = get_backend("playground").train(_request(ds, base / "pg"))
    hf = get_backend("huggingface").train(_request(ds, base / "hf"))
    return {"ds": ds, "pg": pg, "hf": hf, "base": base}


def _report(result: Any) -> dict[str, Any]:
    return json.loads(Path(result.report).read_text(encoding="utf-8"))


@pytest.mark.slow
def test_first_steps_match_playground(runs: dict[str, Any]) -> None:
    pg, hf = _report(runs["pg"]), _report(runs["hf"])
    assert hf["backend"] == "huggingface" and hf["status"] == "finished"
    a, b = pg["batch_losses"], hf["batch_losses"]
    assert len(a) >= STEPS and len(b) >= STEPS
    for (sa, la), (sb, lb) in zip(a[:STEPS], b[:STEPS], strict=True):
        assert sa == sb and abs(la - lb) < 1e-3, (sa, la, lb)
    assert a[-1][1] < a[0][1] - 0.3  # it learned something, so the comparison is not of constant values
    for ra, rb in zip(pg["epochs"], hf["epochs"], strict=True):
        assert ra["epoch"] == rb["epoch"] and ra["global_step"] == rb["global_step"]
        assert abs(ra["val_loss"] - rb["val_loss"]) < 1e-3 and ra["lr"] == pytest.approx(rb["lr"])
    assert pg["schedule"] == hf["schedule"]


@pytest.mark.slow
def test_trainer_outputs(runs: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from apt_model.checkpoint import load_model

    res = runs["hf"]
    out = Path(res.out_dir)
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    assert ckpts and res.global_step == 20 and res.epochs_completed == 5
    for name in ckpts:
        files = {p.name for p in (out / name).iterdir()}
        assert {"config.json", "model.safetensors", "trainer_state.json", "apt_state.json"} <= files
    final = {p.name for p in (out / "final_model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= final
    assert load_model(res.final_model).config == load_model(runs["pg"].final_model).config
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert len(losses) == STEPS and losses[0] == pytest.approx(_report(res)["batch_losses"][0][1], rel=1e-5)


@pytest.mark.slow
def test_dropout_epochs_turn_dropout_off_in_the_trainer(tmp_path: Path) -> None:
    """Dropout 0.3 in epoch 1 only: epoch 1's steps are the always-dropout run's, epoch 2's are not."""
    ds = _write_dataset(tmp_path / "d.json")
    losses = {}
    for name, dropout_epochs in (("always", 0), ("scheduled", 1)):
        req = _request(ds, tmp_path / name, train={"epochs": 2, "dropout_epochs": dropout_epochs})
        req = dataclasses.replace(req, model=model_preset("tiny", dropout=0.3))
        losses[name] = _report(get_backend("huggingface").train(req))["batch_losses"]
    a, s = losses["always"], losses["scheduled"]
    assert len(a) == len(s) == 8  # 4 steps an epoch
    assert s[:4] == a[:4]
    assert all(x != y for (_, x), (_, y) in zip(s[4:], a[4:], strict=True))


@pytest.mark.slow
def test_worked_steps_curriculum_matches_playground_epoch_by_epoch(tmp_path: Path) -> None:
    """Worked steps in epoch 1, half removed in epoch 2, plain in epoch 3: the Trainer's steps are the Playground's
    over all three epochs (each epoch's targets reach the Trainer before its first batch), and not a plain run's."""
    ds = tmp_path / "products.json"
    rows = [{"input": f"{a} × {b} = ?", "output": str(a * b)} for a in range(11, 17) for b in range(12, 16)]
    rows += [{"input": f"{a} + {b} = ?", "output": str(a + b)} for a in range(10, 14) for b in (5, 7)]  # "+"
    ds.write_text(json.dumps({"metadata": {"name": "t"}, "data": {"arithmetic": rows}}), encoding="utf-8")
    curriculum = {"epochs": 3, "worked_steps_epochs": 1, "worked_steps_ramp": 1}
    losses = {}
    for name, backend, train in (
        ("pg", "playground", curriculum),
        ("hf", "huggingface", curriculum),
        ("plain", "playground", {"epochs": 3}),
    ):
        req = dataclasses.replace(
            _request(ds, tmp_path / name, train=train), data=DataConfig(max_src_len=16, max_tgt_len=16)
        )
        losses[name] = _report(get_backend(backend).train(req))["batch_losses"]
    pg, hf = losses["pg"], losses["hf"]
    assert [s for s, _ in pg] == [s for s, _ in hf] and len(pg) == 9  # 3 steps an epoch
    assert [x for _, x in hf] == pytest.approx([x for _, x in pg], abs=1e-3)
    assert max(abs(x - y) for (_, x), (_, y) in zip(pg, losses["plain"], strict=True)) > 1e-2


@pytest.mark.slow
def test_both_backends_load_through_auto_classes(runs: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import apt_model.hf as H
    from apt_model.checkpoint import load_model

    pg_hf = H.convert_export(Path(runs["pg"].export_dir), tmp_path / "pg_hf")
    prompts = ["3 * 4 = ?", "planet mars", "8 * 7 = ?"]
    for name, directory in (("huggingface", Path(runs["hf"].export_dir)), ("playground", pg_hf)):
        model = AutoModelForSeq2SeqLM.from_pretrained(directory)
        tok = AutoTokenizer.from_pretrained(directory)
        native = load_model(runs["hf" if name == "huggingface" else "pg"].final_model)
        enc = tok(prompts, padding=True, return_tensors="pt")
        got = model.generate(**enc, max_new_tokens=6, do_sample=False)
        ref = native.model.generate(enc.input_ids, max_new_tokens=6, bos_id=2, eos_id=3)
        assert torch.equal(got[:, 1:], ref), name


@pytest.mark.slow
def test_resume_continues_steps_and_losses(runs: dict[str, Any], tmp_path: Path) -> None:
    src = Path(runs["hf"].out_dir)
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    shutil.rmtree(out / "final_model")
    ckpt = out / "checkpoint-12"  # after epoch 3 of 5
    assert ckpt.is_dir()
    res = get_backend("huggingface").train(_request(runs["ds"], out, resume_from_checkpoint=str(ckpt)))
    full, again = _report(runs["hf"]), _report(res)
    assert res.global_step == 20 and [r["epoch"] for r in again["epochs"]] == [1, 2, 3, 4, 5]
    assert again["runtime"]["resumed_from"][-1]["path"] == str(ckpt)
    tail_full = {s: v for s, v in full["batch_losses"] if s > 12}
    tail_again = {s: v for s, v in again["batch_losses"] if s > 12}
    assert sorted(tail_again) == list(range(13, 21))
    for s, v in tail_again.items():
        assert abs(v - tail_full[s]) < 1e-5, s


@pytest.mark.slow
def test_early_stopping_stops_a_plateau(tmp_path: Path) -> None:
    ds = _write_dataset(tmp_path / "d.json")
    req = _request(
        ds,
        tmp_path / "es",
        train=dict(epochs=6, lr=1e-9, min_lr=0.0),
        early_stopping=True,
        early_stopping_patience=1,
        early_stopping_threshold=1e-3,
    )
    res = get_backend("huggingface").train(req)
    report = _report(res)
    assert res.epochs_completed == 2 and res.extra["early_stopped"] is True
    assert [r["epoch"] for r in report["epochs"]] == [1, 2] and report["status"] == "finished"
    # At lr 1e-9 the two val losses differ in their last bits only: the best checkpoint is whichever is lower (the
    # Trainer keeps the first of equals), each epoch being 4 steps.
    first, second = (r["val_loss"] for r in report["epochs"])
    assert abs(first - second) < 1e-3
    best_step = 8 if second < first else 4
    assert res.extra["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")


class _FakeHfApi:
    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self, token: str | None = None) -> None:
        self.calls.append(("init", {"has_token": token is not None}))

    def create_repo(self, **kwargs: Any) -> str:
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs: Any) -> None:
        kwargs["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs))


@pytest.mark.slow
def test_hub_upload_without_leaking_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import huggingface_hub

    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_HUB_TOKEN", secret)
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHfApi)
    _FakeHfApi.calls = []
    caplog.set_level(logging.DEBUG)
    ds = _write_dataset(tmp_path / "d.json")
    res = get_backend("huggingface").train(
        _request(ds, tmp_path / "hub", train=dict(epochs=1), hub_repo_id="someone/apt-hlbd")
    )
    names = [c[0] for c in _FakeHfApi.calls]
    assert names == ["init", "create_repo", "upload_folder"] and _FakeHfApi.calls[0][1]["has_token"]
    assert _FakeHfApi.calls[1][1]["repo_id"] == "someone/apt-hlbd"
    upload = _FakeHfApi.calls[2][1]
    assert upload["repo_id"] == "someone/apt-hlbd" and Path(upload["folder_path"]) == Path(res.export_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        upload["files"]
    )
    assert res.extra["hub_url"].endswith("someone/apt-hlbd")
    assert secret not in caplog.text
    for p in Path(res.out_dir).rglob("*"):
        if p.is_file() and p.suffix in (".json", ".txt", ""):
            assert secret not in p.read_text(encoding="utf-8", errors="ignore"), p


def test_protocol_and_flags() -> None:
    backend = get_backend("huggingface")
    assert isinstance(backend, Backend) and backend.extra == "hf"
    parser = argparse.ArgumentParser()
    backend.add_arguments(parser)
    args = parser.parse_args(
        [
            "--bf16",
            "--learning-rate",
            "1e-3",
            "--save-steps",
            "5",
            "--early-stopping-patience",
            "3",
            "--wandb",
            "--deepspeed",
            "ds.json",
            "--resume-from-checkpoint",
            "out/checkpoint-5",
            "--hub-repo-id",
            "a/b",
        ]
    )
    assert backend.options_from_args(args) == {
        "bf16": True,
        "learning_rate": 1e-3,
        "save_steps": 5,
        "early_stopping_patience": 3,
        "wandb": True,
        "deepspeed": "ds.json",
        "resume_from_checkpoint": "out/checkpoint-5",
        "hub_repo_id": "a/b",
    }
    assert backend.options_from_args(parser.parse_args([])) == {}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from apt_model.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fp16", "--bf16"], "--fp16 and --bf16 are mutually exclusive"),
        (["--fp16"], "--fp16 needs a CUDA device"),
        (["--save-steps", "-5"], "--save-steps must be an integer >= 1"),
        (["--save-total-limit", "0"], "--save-total-limit must be an integer >= 1"),
        (["--learning-rate", "-1"], "--learning-rate must be a finite number > 0"),
        (["--deepspeed", "missing_ds.json"], "missing_ds.json: file not found"),
        (["--early-stopping-patience", "2"], "need --early-stopping"),
        (["--early-stopping", "--save-steps", "3"], "drop --save-steps"),
        (["--resume-from-checkpoint", "nowhere"], "not a Trainer checkpoint directory"),
        (["--hub-repo-id", "bad repo id!"], "--hub-repo-id"),
    ],
)
def test_bad_flags_fail_before_training(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = _write_dataset(tmp_path / "d.json")
    out = tmp_path / "out"
    base = [
        "train",
        "--backend",
        "huggingface",
        "--dataset",
        str(ds),
        "--save-dir",
        str(out),
        "--preset",
        "tiny",
    ]
    err = _cli([*base, "--no-tracking", *flags], capsys)
    assert message in err
    assert not out.exists()


def test_validation_errors_needing_data_or_files(tmp_path: Path) -> None:
    backend = get_backend("huggingface")
    no_val = _write_dataset(tmp_path / "noval.json", with_val=False)
    with pytest.raises(ConfigError, match="needs a validation split"):
        backend.validate(_request(no_val, tmp_path / "a", early_stopping=True))
    ds = _write_dataset(tmp_path / "d.json")
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        backend.validate(_request(ds, tmp_path / "b", deepspeed=str(cfg)))
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        backend.validate(_request(ds, tmp_path / "b", deepspeed=str(cfg)))
    with pytest.raises(ConfigError, match="unknown option"):
        backend.validate(_request(ds, tmp_path / "c", zero_stage=2))
    if sys.modules.get("wandb") is None and not _has("wandb"):
        with pytest.raises(ConfigError, match="wandb package"):
            backend.validate(_request(ds, tmp_path / "d", wandb=True))
    fake = tmp_path / "checkpoint-3"
    fake.mkdir()
    (fake / "trainer_state.json").write_text("{}")
    (fake / "config.json").write_text(json.dumps({**model_preset("tiny", d_model=64).to_dict()}))
    with pytest.raises(CheckpointError, match="model config differs"):
        backend.validate(_request(ds, tmp_path / "e", resume_from_checkpoint=str(fake)))
    assert not any((tmp_path / n).exists() for n in "abcde")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_refuses_an_existing_run(tmp_path: Path) -> None:
    ds = _write_dataset(tmp_path / "d.json")
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(AptError, match="already holds a run"):
        get_backend("huggingface").validate(_request(ds, out))
    get_backend("huggingface").validate(_request(ds, out, overwrite=True))


@pytest.mark.slow
@pytest.mark.skipif(not _has("deepspeed"), reason="deepspeed is not installed")
def test_deepspeed_through_the_trainer_on_two_cpu_processes(tmp_path: Path) -> None:
    ds = _write_dataset(tmp_path / "d.json")
    cfg = tmp_path / "ds_config.json"
    cfg.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    )
    out = tmp_path / "ds_run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29531", "-m", "apt_model", "train"]
    cmd += ["--backend", "huggingface", "--dataset", str(ds), "--preset", "tiny", "--epochs", "1"]
    cmd += ["--batch-size", "4", "--gradient-accumulation", "1", "--save-dir", str(out), "--no-tracking"]
    cmd += ["--max-src-len", "16", "--max-tgt-len", "8", "--deepspeed", str(cfg), "--save-steps", "3"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "train_result.json").read_text())
    assert result["extra"]["world_size"] == 2 and result["extra"]["deepspeed"] == str(cfg)
    assert result["global_step"] >= 3 and (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert any(p.name.startswith("global_step") for p in (out / "checkpoint-3").iterdir())  # ZeRO's own state
    report = json.loads((out / "experiment_report.json").read_text())
    assert report["runtime"]["world_size"] == 2 and report["status"] == "finished"
    from transformers import AutoModelForSeq2SeqLM

    import apt_model.hf

    assert isinstance(
        AutoModelForSeq2SeqLM.from_pretrained(out / "final_model"), apt_model.hf.APTForConditionalGeneration
    )


def test_request_resume_must_be_a_trainer_checkpoint(tmp_path: Path) -> None:
    ds = _write_dataset(tmp_path / "d.json")
    pt = tmp_path / "checkpoint_epoch_1.pt"
    pt.write_bytes(b"x")
    req = dataclasses.replace(_request(ds, tmp_path / "o"), resume=pt)
    with pytest.raises(CheckpointError, match="resumes from --resume-from-checkpoint"):
        get_backend("huggingface").validate(req)
