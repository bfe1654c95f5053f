"""PlaygroundBackend implements the Backend protocol and trains through the shared loop."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from apt_model.backends import Backend, TrainRequest, get_backend
from apt_model.checkpoint import load_model
from apt_model.config import DataConfig, TrainConfig, model_preset
from apt_model.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
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


def _request(tmp_path: Path, **options) -> TrainRequest:  # type: ignore[no-untyped-def]
    return TrainRequest(
        model=model_preset("tiny"),
        train=TrainConfig(epochs=2, batch_size=8, grad_accum=2, lr=3e-3, save_interval=1),
        data=DataConfig(max_src_len=16, max_tgt_len=8),
        dataset=_dataset(tmp_path / "d.json"),
        out_dir=tmp_path / "run",
        tracking_uri="none",
        options={"progress": False, **options},
    )


def test_protocol_and_flags() -> None:
    backend = get_backend("playground")
    assert isinstance(backend, Backend)
    assert backend.name == "playground" and backend.extra is None and backend.summary
    parser = argparse.ArgumentParser()
    backend.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--pad", "fixed"])
    assert backend.options_from_args(args) == {"device": "cpu", "pad": "fixed"}
    assert backend.options_from_args(parser.parse_args([])) == {}


def test_validate_refuses_bad_options(tmp_path: Path) -> None:
    backend = get_backend("playground")
    for options, match in (
        ({"turbo": True}, "unknown option"),
        ({"device": "tpu"}, "device"),
        ({"pad": "x"}, "pad"),
    ):
        with pytest.raises(ConfigError, match=match):
            backend.validate(_request(tmp_path, **options))
    assert not (tmp_path / "run").exists()


def test_train_returns_a_manifest_that_loads(tmp_path: Path) -> None:
    backend = get_backend("playground")
    request = _request(tmp_path, device="cpu", pad="fixed")
    backend.validate(request)
    result = backend.train(request)
    assert result.backend == "playground" and result.epochs_completed == 2
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()  # JSON-able
    assert Path(result.last_checkpoint).name == "checkpoint_epoch_2.pt"
    from_ckpt, from_export = load_model(result.final_model), load_model(result.export_dir)
    for (k, a), b in zip(
        from_ckpt.model.state_dict().items(), from_export.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k
    assert from_ckpt.tokenizer == from_export.tokenizer
    report = json.loads(Path(result.report).read_text())
    assert report["runtime"]["pad_mode"] == "fixed" and report["runtime"]["precision"] == "fp32"
