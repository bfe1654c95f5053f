"""The shared training loop: exact resume, NaN policy, accumulation, validation errors, tracking."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from apt_model.backends import TrainRequest
from apt_model.checkpoint import load_checkpoint, load_model
from apt_model.config import DataConfig, TrainConfig, model_preset
from apt_model.errors import CheckpointError, ConfigError, DataError
from apt_model.training import loop
from apt_model.training.batching import Batcher, collate
from apt_model.training.fastpath import PendingStep, TrainStep
from apt_model.training.report import read_report

ZODIAC = "鼠牛虎兔龙蛇马羊猴鸡狗猪"


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Tiny models: one intra-op thread (see the root conftest's ``one_thread``)."""


def write_small_dataset(path: Path, n_arith: int = 60) -> Path:
    """A small HLBD Hardcore file (the loader's hash rule splits it)."""
    arith = [{"input": f"{a} + {b} = ?", "output": str(a + b)} for a in range(1, 13) for b in range(3, 30, 5)]
    zodiac = [{"input": f"{z}后面是什么生肖？", "output": ZODIAC[(i + 1) % 12]} for i, z in enumerate(ZODIAC)]
    doc = {
        "metadata": {"name": "HLBD Hardcore Dataset", "version": "1.0", "modules": ["arithmetic", "zodiac"]},
        "data": {"arithmetic": arith[:n_arith], "zodiac": zodiac},
    }
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def request(tmp_path: Path, out: str = "run", **train: Any) -> TrainRequest:
    dataset = tmp_path / "hlbd.json"
    if not dataset.exists():
        write_small_dataset(dataset)
    cfg = dict(epochs=2, batch_size=8, grad_accum=2, lr=3e-3, save_interval=1, log_every=1, seed=7)
    cfg.update(train)
    return TrainRequest(
        model=model_preset("tiny", dropout=0.1),
        train=TrainConfig.from_dict(cfg),
        data=DataConfig(max_src_len=24, max_tgt_len=8),
        dataset=dataset,
        out_dir=tmp_path / out,
        tracking_uri="none",
        options={"progress": False},
    )


def test_resumed_run_matches_uninterrupted_run_exactly(tmp_path: Path) -> None:
    # dropout on and DBC-DAC firing every 3 steps on every matrix, so RNG and DBC-DAC state both matter.
    dbc = {"every_n_steps": 3, "min_numel": 64}
    full = loop.run_training(request(tmp_path, "full", epochs=4, deterministic=True, dbc_dac=dbc))
    rep_full = read_report(full.report)
    ckpt = Path(full.out_dir) / "checkpoint_epoch_2.pt"
    assert ckpt.is_file() and rep_full["final"]["dbc_dac"]["applied_steps"] > 0

    resumed_req = request(tmp_path, "resumed", epochs=4, deterministic=True, dbc_dac=dbc)
    resumed_req.resume = ckpt
    resumed = loop.run_training(resumed_req)
    rep_res = read_report(resumed.report)

    k = load_checkpoint(ckpt)["global_step"]
    after_full = [row for row in rep_full["batch_losses"] if row[0] > k]
    after_res = [row for row in rep_res["batch_losses"] if row[0] > k]
    assert len(after_full) == full.global_step - k > 0
    assert after_res == after_full  # bit-exact per-step losses
    assert rep_res["batch_losses"] == rep_full["batch_losses"]  # history carried over
    assert [r["epoch"] for r in rep_res["epochs"]] == [1, 2, 3, 4]
    assert rep_res["runtime"]["resumed_from"] == [{"path": str(ckpt), "epoch": 2}]
    a, b = load_model(full.final_model).model, load_model(resumed.final_model).model
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_dropout_epochs_turns_dropout_off_after_n_epochs_and_on_resume(tmp_path: Path) -> None:
    """``dropout_epochs=1``: epoch 1 is the always-dropout run's step for step, epoch 2 is not; a run resumed from
    the always-dropout run's epoch-1 checkpoint with the schedule continues exactly as the scheduled run."""
    always = loop.run_training(request(tmp_path, "always", deterministic=True))
    scheduled = loop.run_training(request(tmp_path, "scheduled", deterministic=True, dropout_epochs=1))
    per_epoch = read_report(always.report)["runtime"]["steps_per_epoch"]
    a, s = read_report(always.report)["batch_losses"], read_report(scheduled.report)["batch_losses"]
    assert len(a) == len(s) == 2 * per_epoch
    assert s[:per_epoch] == a[:per_epoch]
    assert all(x != y for (_, x), (_, y) in zip(s[per_epoch:], a[per_epoch:], strict=True))

    resumed_req = request(tmp_path, "resumed", deterministic=True, dropout_epochs=1)
    resumed_req.resume = Path(always.out_dir) / "checkpoint_epoch_1.pt"
    resumed = loop.run_training(resumed_req)
    assert read_report(resumed.report)["batch_losses"][per_epoch:] == s[per_epoch:]


def products_request(tmp_path: Path, out: str, **train: Any) -> TrainRequest:
    """``request`` on a file of two-digit products and sums (targets up to 11 characters in steps)."""
    dataset = tmp_path / "hlbd.json"
    if not dataset.exists():
        rows = [
            {"input": f"{a} × {b} = ?", "output": str(a * b)} for a in range(11, 20) for b in range(11, 17)
        ]
        rows += [
            {"input": f"{a} + {b} = ?", "output": str(a + b)} for a in range(10, 16) for b in range(3, 9)
        ]
        doc = {"metadata": {"name": "HLBD Hardcore Dataset", "version": "1.0"}, "data": {"arithmetic": rows}}
        dataset.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    req = request(tmp_path, out, **train)
    req.data = DataConfig(max_src_len=24, max_tgt_len=16)
    return req


def test_worked_steps_curriculum_trains_each_epochs_targets_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fractions 0, 0.5, 1 over three epochs: epoch 1 trains the worked steps (unlike a plain run), the last the
    plain answers; a run resumed from the epoch-1 checkpoint trains epochs 2 and 3 exactly as the uninterrupted run."""
    real_epoch = Batcher.epoch
    seen: list[list[tuple[int, ...]]] = []  # the training rows' targets as each epoch's batches are cut

    def recording_epoch(self: Batcher, epoch: int) -> list[Any]:
        seen.append([e.out for e in self.examples])
        return real_epoch(self, epoch)

    monkeypatch.setattr(Batcher, "epoch", recording_epoch)
    curriculum = dict(epochs=3, deterministic=True, worked_steps_epochs=1, worked_steps_ramp=1)
    staged = loop.run_training(products_request(tmp_path, "staged", **curriculum))
    plain = loop.run_training(products_request(tmp_path, "plain", epochs=3, deterministic=True))
    rep = read_report(staged.report)
    tok = load_model(staged.final_model).tokenizer
    runtime = rep["runtime"]["worked_steps"]
    assert 0 < runtime["rows"] <= 9 * 6  # the × rows of the training split
    texts = [[tok.decode(list(out)) for out in epoch] for epoch in seen[:3]]
    # Epoch 1: whole worked answers; epoch 2: the first partial product and "+" removed; epoch 3: plain.
    assert sum(bool(re.fullmatch(r"\d+\+\d+=\d+", t)) for t in texts[0]) == runtime["rows"]
    assert sum(bool(re.fullmatch(r"\d+=\d+", t)) for t in texts[1]) == runtime["rows"]
    assert all(re.fullmatch(r"\d+", t) for t in texts[2])
    assert seen[3:] == [seen[2]] * 3  # the plain run: plain targets every epoch
    assert runtime["plain_from_epoch"] == 3
    per_epoch = rep["runtime"]["steps_per_epoch"]
    s, p = rep["batch_losses"], read_report(plain.report)["batch_losses"]
    assert s[:per_epoch] != p[:per_epoch]

    resumed_req = products_request(tmp_path, "resumed", **curriculum)
    resumed_req.resume = Path(staged.out_dir) / "checkpoint_epoch_1.pt"
    resumed = loop.run_training(resumed_req)
    assert read_report(resumed.report)["batch_losses"][per_epoch:] == s[per_epoch:]
    assert seen[-2:] == seen[1:3]  # the resumed run's epochs 2 and 3 cut from the same targets


def test_run_outputs_and_report(tmp_path: Path) -> None:
    rows: list[dict] = []
    req = request(tmp_path, epochs=2, save_interval=1, eval_every=2)
    req.on_epoch = rows.append
    result = loop.run_training(req)
    out = Path(result.out_dir)
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "final_model.pt", "final_model"} <= names
    assert {"experiment_report.json", "train_result.json"} <= names
    assert json.loads((out / "train_result.json").read_text()) == result.to_dict()
    assert result.sha256["final_model/model.safetensors"]
    rep = read_report(result.report)
    assert rep["status"] == "finished" and rep["backend"] == "playground"
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["val_loss"] is None  # eval_every 2
    assert isinstance(rows[1]["val_loss"], float) and 0 <= rows[1]["val_token_acc"] <= 1
    assert rep["epochs"][1]["global_step"] == result.global_step == 2 * rep["runtime"]["steps_per_epoch"]
    assert len(rep["batch_losses"]) == result.global_step  # log_every 1
    assert [c["epoch"] for c in rep["checkpoints"]] == [1, 2]
    assert rep["dataset"]["n_train"] + rep["dataset"]["n_val"] == 72 and rep["dataset"]["n_val"] > 0
    assert rep["schedule"]["kind"] == "cosine_warm_restarts" and rep["schedule"]["stepping"] == "per_step"
    phases = rep["runtime"]["phase_seconds"]
    assert set(phases) == {"prepare", "setup", "finish"} and all(v > 0 for v in phases.values())
    first = rep["runtime"]["first_launch_seconds"]
    # epoch 1 only
    assert len(first) == min(loop.FIRST_LAUNCHES_TIMED, rep["runtime"]["steps_per_epoch"])
    assert all(v >= 0 for v in first)
    ck = load_checkpoint(out / "checkpoint_epoch_1.pt")
    for key in ("model_config", "train_config", "data_config", "tokenizer_json", "model_state", "optimizer_state",
                "scheduler_state", "scaler_state", "epoch", "global_step", "rng", "history", "dataset_sha256"):  # fmt: skip
        assert key in ck, key
    assert ck["epoch"] == 1 and ck["model_config"]["vocab_size"] == load_model(out).tokenizer.vocab_size


def test_accumulated_gradient_equals_one_big_batch(tmp_path: Path) -> None:
    from apt_model.model import APTModel

    prep = loop.prepare(request(tmp_path))
    b = Batcher(prep.train_examples[:10], 4, 0, 2, 3, 24, 8, pad_mode="bucket")
    window = [collate(prep.train_examples[i : i + 4], pad_id=0, bos_id=2, eos_id=3) for i in (0, 4)]
    window.append(collate(prep.train_examples[8:10], pad_id=0, bos_id=2, eos_id=3))  # a short last batch
    big = collate(prep.train_examples[:10], pad_id=0, bos_id=2, eos_id=3)
    del b
    torch.manual_seed(0)
    model = APTModel(prep.model_config.replace(dropout=0.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stepper = TrainStep(
        model, TrainConfig(), optimizer=opt, device=torch.device("cpu"), precision="fp32", pad_id=0
    )
    loss_acc = stepper.backward(window)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_big = stepper.backward([big])
    assert loss_acc.item() == pytest.approx(loss_big.item(), rel=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def _nan_after(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = loop.compute_loss

    def fake(model, batch, **kw):  # type: ignore[no-untyped-def]
        out = real(model, batch, **kw)
        calls["n"] += 1
        if calls["n"] == step:
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(loop, "compute_loss", fake)


def test_nan_stop_writes_report_and_names_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_after(5, monkeypatch)  # micro-batch 5 = optimizer step 3 with grad_accum 2
    with pytest.raises(loop.TrainingDivergedError, match="optimizer step 3 "):
        loop.run_training(request(tmp_path, nan_policy="stop"))
    rep = read_report(tmp_path / "run" / "experiment_report.json")
    assert rep["status"] == "failed" and "step 3" in rep["final"]["error"]
    assert rep["nan_events"] == [
        {"epoch": 1, "global_step": 3, "loss": "nan", "grad_norm": None, "action": "stop"}
    ]


def test_nan_skip_counts_and_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_after(5, monkeypatch)
    result = loop.run_training(request(tmp_path, nan_policy="skip", epochs=1))
    rep = read_report(result.report)
    assert rep["status"] == "finished" and rep["epochs"][0]["skipped_steps"] == 1
    assert result.extra["skipped_steps"] == 1 and 3 not in [s for s, _ in rep["batch_losses"]]
    assert all(torch.isfinite(p).all() for p in load_model(result.final_model).model.parameters())


def _read_one_step_late(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Make every step's result arrive as the whole-step graphs' do: a host copy read when asked for, after the
    loop has launched the next step. Returns the log of launches and reads."""
    events: list[tuple[str, int]] = []
    real_launch = TrainStep.launch

    class Arrival:
        def __init__(self, step: int) -> None:
            self.step = step

        def synchronize(self) -> None:
            events.append(("read", self.step))

    def launch(self: TrainStep, window: list[Any], step_number: int) -> PendingStep:
        out = real_launch(self, window, step_number).result()
        events.append(("launch", step_number))
        host = torch.tensor([out.loss, out.grad_norm], dtype=torch.float32)
        return PendingStep(host=host, ready=Arrival(step_number))  # type: ignore[arg-type]

    monkeypatch.setattr(TrainStep, "launch", launch)
    return events


def test_results_read_one_step_late_account_every_step_as_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_after(5, monkeypatch)  # optimizer step 3 is non-finite
    at_once = read_report(loop.run_training(request(tmp_path, "at_once", nan_policy="skip")).report)
    monkeypatch.undo()
    events = _read_one_step_late(monkeypatch)
    _nan_after(5, monkeypatch)
    late = read_report(loop.run_training(request(tmp_path, "late", nan_policy="skip")).report)
    n = late["final"]["global_step"]
    # Each step is read after the next one is launched, the last of each epoch before the epoch ends.
    steps_per_epoch = n // 2
    expected: list[tuple[str, int]] = []
    for first in (1, steps_per_epoch + 1):
        last = first + steps_per_epoch - 1
        expected.append(("launch", first))
        for k in range(first + 1, last + 1):
            expected += [("launch", k), ("read", k - 1)]
        expected.append(("read", last))
    assert events == expected
    for key in ("batch_losses", "nan_events"):
        assert late[key] == at_once[key]
    assert late["nan_events"][0]["global_step"] == 3
    for row_late, row_now in zip(late["epochs"], at_once["epochs"], strict=True):
        for key in ("train_loss", "val_loss", "grad_norm", "skipped_steps", "global_step"):
            assert row_late[key] == pytest.approx(row_now[key], rel=1e-6), key


def test_nan_stop_read_one_step_late_names_the_bad_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_after(5, monkeypatch)
    events = _read_one_step_late(monkeypatch)
    with pytest.raises(loop.TrainingDivergedError, match="optimizer step 3 "):
        loop.run_training(request(tmp_path, nan_policy="stop"))
    assert events[-2:] == [("launch", 4), ("read", 3)]  # step 4 was on its way when step 3 was read
    rep = read_report(tmp_path / "run" / "experiment_report.json")
    assert rep["final"]["global_step"] == 3 and rep["nan_events"][0]["global_step"] == 3


def test_validation_errors_write_nothing(tmp_path: Path) -> None:
    req = request(tmp_path, epochs=1)
    result = loop.run_training(req)
    out = Path(result.out_dir)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    with pytest.raises(ConfigError, match="already holds a run"):
        loop.prepare(request(tmp_path, epochs=1))  # a fresh run into a used dir
    bad = request(tmp_path, epochs=1)
    bad.dataset = tmp_path / "missing.json"
    with pytest.raises(DataError, match="not found"):
        loop.prepare(bad)
    other = request(tmp_path, "other", epochs=3)
    other.resume = out / "final_model.pt"
    other.model = model_preset("tiny", d_model=64)
    with pytest.raises(CheckpointError, match="d_model"):
        loop.prepare(other)
    other.model = model_preset("tiny", dropout=0.1)
    other.dataset = write_small_dataset(tmp_path / "other.json", n_arith=30)
    with pytest.raises(CheckpointError, match="dataset sha256"):
        loop.prepare(other)
    long = request(tmp_path, "long")
    long.data = DataConfig(max_src_len=512)
    with pytest.raises(ConfigError, match="max_len"):
        loop.prepare(long)
    unknown = request(tmp_path, "unknown")
    unknown.data = DataConfig(max_src_len=24, max_tgt_len=8, repeat="zodiac=2,physics=3")
    with pytest.raises(ConfigError, match=r"repeat: .*hlbd.json has no module 'physics' \(its modules: "):
        loop.prepare(unknown)
    fp16 = request(tmp_path, "fp16", precision="fp16")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        loop.prepare(fp16)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert not (tmp_path / "other").exists() and not (tmp_path / "long").exists()
    assert not (tmp_path / "unknown").exists()


def test_repeat_shows_a_modules_training_pairs_k_times_and_leaves_validation_alone(tmp_path: Path) -> None:
    plain = loop.prepare(request(tmp_path, "plain"))
    req = request(tmp_path, "repeated")
    req.data = DataConfig(max_src_len=24, max_tgt_len=8, repeat="zodiac=3")
    repeated = loop.prepare(req)
    zodiac = [p for p in plain.dataset.train if p.module == "zodiac"]
    assert zodiac and len(zodiac) < len(plain.dataset.train)
    assert len(repeated.train_examples) == len(plain.train_examples) + 2 * len(zodiac)
    # Each zodiac example three times, every other example once, validation as it was.
    counts: dict[tuple[int, ...], int] = {}
    for ex in repeated.train_examples:
        counts[ex.src] = counts.get(ex.src, 0) + 1
    for src, n in counts.items():
        assert n == (3 if repeated.tokenizer.decode(src).endswith("生肖？") else 1), (
            repeated.tokenizer.decode(src)
        )
    assert repeated.val_examples == plain.val_examples


@pytest.mark.slow
def test_mlflow_tracking_logs_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    req = request(tmp_path, epochs=2, save_interval=5)
    req.tracking_uri = None  # default: sqlite store beside the run
    req.experiment = "apt-test"
    result = loop.run_training(req)
    assert result.mlflow_run_id and result.extra["tracking_error"] is None
    assert (tmp_path / "mlflow.db").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.d_model"] == "32"
    history = client.get_metric_history(result.mlflow_run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(result.metrics["train_loss"])
    arts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"experiment_report.json", "final_model"} <= arts


def test_broken_tracking_never_kills_training(tmp_path: Path) -> None:
    req = request(tmp_path, epochs=1)
    req.tracking_uri = "bogus-scheme://nowhere"
    result = loop.run_training(req)
    assert result.mlflow_run_id is None and "start" in result.extra["tracking_error"]
    assert read_report(result.report)["status"] == "finished"


def test_cuda_graphs_resolution_and_refusals() -> None:
    """``cuda_graphs`` auto: the whole step on CUDA in bf16/fp32, the loss alone with fp16's scaler, nothing when the
    step is not compiled on CUDA; asking for graphs that cannot run is a ConfigError before any work."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    assert loop.resolve_cuda_graphs("auto", cuda, True, "bf16") == "step"
    assert loop.resolve_cuda_graphs("auto", cuda, True, "fp16") == "loss"
    assert loop.resolve_cuda_graphs("auto", cuda, False, "bf16") == "off"
    assert loop.resolve_cuda_graphs("auto", cpu, True, "fp32") == "off"
    assert loop.resolve_cuda_graphs("loss", cuda, True, "bf16") == "loss"
    assert loop.resolve_cuda_graphs("off", cuda, True, "bf16") == "off"
    with pytest.raises(ConfigError, match="needs the compiled step on a CUDA device"):
        loop.resolve_cuda_graphs("step", cpu, True, "fp32")
    with pytest.raises(ConfigError, match="needs the compiled step on a CUDA device"):
        loop.resolve_cuda_graphs("loss", cuda, False, "bf16")
    with pytest.raises(ConfigError, match="fp16's loss scaler"):
        loop.resolve_cuda_graphs("step", cuda, True, "fp16")
    with pytest.raises(ConfigError, match=r"TrainConfig\.cuda_graphs: must be auto, step, loss or off"):
        TrainConfig(cuda_graphs="all")
    assert TrainConfig.from_dict(TrainConfig(cuda_graphs="loss").to_dict()).cuda_graphs == "loss"
