"""Checkpoints load only tensors/primitives; exports round-trip weights bit-exactly."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from apt_model.checkpoint import (
    epoch_checkpoints,
    export_pretrained,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    resolve_model_path,
    save_checkpoint,
)
from apt_model.config import model_preset
from apt_model.errors import CheckpointError
from apt_model.model import APTModel
from apt_model.tokenizer import AptTokenizer

TEXTS = ["12 + 34 = ?", "46", "鼠后面是什么生肖？", "牛", "I love you", "[EN] hello"]


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    # Tiny models: one thread is faster, and immune to a busy 2-core machine (OpenMP spin-waits).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model_and_tokenizer(seed: int = 0) -> tuple[APTModel, AptTokenizer]:
    tok = AptTokenizer.build(TEXTS)
    torch.manual_seed(seed)
    model = APTModel(model_preset("tiny", vocab_size=tok.vocab_size, dropout=0.1))
    with torch.no_grad():  # make every tensor (LayerNorm gains, tau, ...) non-default
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model, tok


def _state(model: APTModel, tok: AptTokenizer) -> dict:
    return {
        "model_config": model.config.to_dict(),
        "tokenizer_json": tok.to_json(),
        "model_state": model.state_dict(),
        "epoch": 3,
        "rng": {"torch": torch.get_rng_state(), "python": [3, [1, 2, 3], None]},
        "history": {"epochs": [{"epoch": 1, "train_loss": 1.5, "val_loss": None}]},
    }


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype
        assert torch.equal(sa[k], sb[k]), k


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model, tok = _model_and_tokenizer()
    path = save_checkpoint(tmp_path / "ck.pt", _state(model, tok))
    state = load_checkpoint(path)
    assert state["format_version"] == 1 and state["epoch"] == 3
    assert state["history"]["epochs"][0]["train_loss"] == 1.5
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())
    loaded = load_model(path)
    _assert_same_weights(model, loaded.model)
    assert loaded.tokenizer == tok and loaded.config == model.config
    assert not loaded.model.training
    assert not list(tmp_path.glob(".*tmp")), "atomic write left a temp file"


def test_mapped_load_reads_the_same_state(tmp_path: Path) -> None:
    model, tok = _model_and_tokenizer()
    path = save_checkpoint(tmp_path / "ck.pt", _state(model, tok))
    read, mapped = load_checkpoint(path), load_checkpoint(path, mmap=True)
    assert read.keys() == mapped.keys() and read["epoch"] == mapped["epoch"]
    for name, value in read["model_state"].items():
        assert torch.equal(value, mapped["model_state"][name]), name


def test_save_refuses_objects_the_safe_loader_could_not_read(tmp_path: Path) -> None:
    model, tok = _model_and_tokenizer()
    state = _state(model, tok)
    state["history"] = {"bad": object()}
    with pytest.raises(TypeError, match=r"history\.bad"):
        save_checkpoint(tmp_path / "ck.pt", state)
    assert not (tmp_path / "ck.pt").exists()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    # A torch.save'd dict that looks like a checkpoint but carries a code-running object.
    torch.save({"model_config": {}, "tokenizer_json": "", "model_state": {}, "x": _Evil(str(marker))}, evil)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Evil(str(marker))))
    for path in (evil, raw):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(CheckpointError):
            load_model(path)
    assert not marker.exists(), "unpickling ran attacker code"


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "not found"),
        (b"not a checkpoint at all", "not a loadable"),
    ],
)
def test_bad_checkpoint_files(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "ck.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_foreign_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="missing model_config"):
        load_checkpoint(path)


def test_export_round_trip_is_bit_exact(tmp_path: Path) -> None:
    model, tok = _model_and_tokenizer(seed=1)
    out = export_pretrained(
        tmp_path / "export", model, model.config, tok, extra_configs={"train_config": {"epochs": 2}}
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "train_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == tok.vocab_size and config["format"] == "apt-export"
    loaded = load_model(out)
    _assert_same_weights(model, loaded.model)
    assert loaded.tokenizer == tok
    # tied embedding / output projection survive as one tensor
    sd = loaded.model.state_dict()
    tied = [k for k in sd if sd[k].data_ptr() == loaded.model.output_weight.data_ptr()]
    assert tied, "output projection is not tied to a saved tensor"
    # same outputs
    src = torch.tensor([tok.encode("12 + 34 = ?")])
    tgt = torch.tensor([[tok.bos_id, *tok.encode("46")]])
    model.eval()
    assert torch.equal(model(src, tgt), loaded.model(src, tgt))


def test_export_replaces_directory_as_a_whole(tmp_path: Path) -> None:
    model, tok = _model_and_tokenizer()
    target = tmp_path / "export"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    export_pretrained(target, model, model.config, tok)
    assert not (target / "stale.bin").exists()


def test_vocab_mismatch_is_refused(tmp_path: Path) -> None:
    model, tok = _model_and_tokenizer()
    other = AptTokenizer.build([*TEXTS, "完全不同的字符集合"])
    with pytest.raises(CheckpointError, match="vocab"):
        export_pretrained(tmp_path / "e", model, model.config, other)
    state = _state(model, tok)
    state["tokenizer_json"] = other.to_json()
    save_checkpoint(tmp_path / "ck.pt", state)
    with pytest.raises(CheckpointError, match=r"tokenizer vocabulary has \d+ tokens"):
        load_model(tmp_path / "ck.pt")


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    model, tok = _model_and_tokenizer()
    state = _state(model, tok)
    state["model_config"] = {**state["model_config"], "d_ff": 128}
    save_checkpoint(tmp_path / "ck.pt", state)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "ck.pt")


def test_run_directory_resolution(tmp_path: Path) -> None:
    model, tok = _model_and_tokenizer()
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="not found"):
        resolve_model_path(run)
    run.mkdir()
    with pytest.raises(CheckpointError, match="no model found"):
        resolve_model_path(run)
    save_checkpoint(run / "final_model.pt", _state(model, tok))
    assert resolve_model_path(run) == run / "final_model.pt"
    export_pretrained(run / "final_model", model, model.config, tok)
    assert resolve_model_path(run) == run / "final_model"
    _assert_same_weights(model, load_model(run).model)


def test_latest_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for n in (2, 10, 4):
        (tmp_path / f"checkpoint_epoch_{n}.pt").write_bytes(b"")
    (tmp_path / "checkpoint_epoch_x.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch_10.pt"


def test_epoch_checkpoints_lists_files_and_folders_by_epoch(tmp_path: Path) -> None:
    assert epoch_checkpoints(tmp_path) == {}
    (tmp_path / "checkpoint_epoch_3.pt").write_bytes(b"")
    (tmp_path / "checkpoint_epoch_12").mkdir()  # a DeepSpeed checkpoint
    (tmp_path / ".checkpoint_epoch_4.pt.abc.tmp").write_bytes(b"")  # an interrupted write
    (tmp_path / "checkpoint_epoch_5.pt.tmp").write_bytes(b"")
    (tmp_path / "checkpoint_epoch_7").write_bytes(b"")  # neither a .pt file nor a folder
    found = epoch_checkpoints(tmp_path)
    assert found == {3: tmp_path / "checkpoint_epoch_3.pt", 12: tmp_path / "checkpoint_epoch_12"}
    assert list(found) == [3, 12]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch_12"
