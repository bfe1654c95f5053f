"""Parameter validation of the `apt` flow, without Prefect: every bad value names its field, before any work."""

from __future__ import annotations

import inspect

import pytest

from apt_model.errors import ConfigError
from apt_model.pipeline_params import PipelineParams, parse_cli_value, parse_params


def test_defaults_are_valid_and_build_configs(tmp_path):
    p = parse_params(output_root=str(tmp_path))
    assert p.backend == "playground"
    model = p.model_cfg(vocab_size=77)
    assert model.vocab_size == 77 and model.d_model == 32
    train = p.train_cfg()
    assert (train.epochs, train.batch_size, train.seed) == (p.epochs, p.batch_size, p.train_seed)
    assert p.data_config().size == "small"
    assert p.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"backend": "nope"}, "backend: unknown backend 'nope'; available: "),
        (
            {"model_overrides": {"d_model": 30}},
            "model_overrides: ModelConfig.n_heads: must divide d_model=30",
        ),
        ({"model_overrides": {"bogus": 1}}, "model_overrides: ModelConfig: unknown field(s) bogus"),
        ({"preset": "giant"}, "preset: unknown model preset 'giant'"),
        ({"epochs": 0}, "epochs: must be >= 1"),
        ({"dataset_size": "huge"}, "dataset_size: DataConfig.size: must be one of small, default, large, xl"),
        ({"val_fraction": 0.9}, "val_fraction: DataConfig.val_fraction"),
        ({"train_overrides": {"precision": "fp8"}}, "train_overrides: TrainConfig.precision"),
        ({"train_overrides": {"epochs": 3}}, "train_overrides: set epochs with the flat parameter"),
        ({"data_overrides": {"repeat": "zodiac"}}, "data_overrides: DataConfig.repeat: each item must be"),
        ({"data_overrides": {"bogus": 1}}, "data_overrides: DataConfig: unknown field(s) bogus"),
        (
            {"data_overrides": {"size": "xl"}},
            "data_overrides: set size with the flat parameter (dataset_size)",
        ),
        ({"dataset_size": "huge"}, "dataset_size: DataConfig.size"),
        ({"lr": "fast"}, "lr: Input should be a valid number"),
        ({"colour": "red"}, "colour: unknown parameter"),
        ({"resume_from_champion": True}, "resume_from_champion: needs promote=true"),
        ({"verify_split": "test"}, "verify_split: must be val, train or all"),
    ],
)
def test_invalid_parameters_name_the_field(params, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(params)
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name", ["deepspeed", "azure", "huggingface"])
def test_guide_backend_not_registered_is_not_available(name, monkeypatch):
    from apt_model import backends

    monkeypatch.delitem(backends.BACKENDS, name, raising=False)
    with pytest.raises(ConfigError) as err:
        parse_params(backend=name)
    assert str(err.value).startswith(f"backend: backend '{name}' is not available")


def test_registered_backend_becomes_available(monkeypatch):
    from apt_model import backends

    spec = backends.BackendSpec("deepspeed", "apt_model.backends.playground:PlaygroundBackend", "test")
    monkeypatch.setitem(backends.BACKENDS, "deepspeed", spec)
    assert parse_params(backend="deepspeed").backend == "deepspeed"


def test_cli_values():
    assert parse_cli_value("3") == 3
    assert parse_cli_value("true") is True
    assert parse_cli_value('{"d_model": 64}') == {"d_model": 64}
    assert parse_cli_value("playground") == "playground"


def test_flow_signature_matches_the_model():
    """The flow's flat parameters are exactly the model's fields, with the same defaults (no drift)."""
    pytest.importorskip("prefect")
    from flows.pipeline import apt

    sig = inspect.signature(apt.fn)
    assert list(sig.parameters) == list(PipelineParams.model_fields)
    defaults = PipelineParams()
    for name, param in sig.parameters.items():
        default = param.default if param.default is not None else None
        expected = getattr(defaults, name)
        assert default == expected or (default is None and expected in ({}, None)), name


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--param", "backend=nope"], "error: backend: unknown backend 'nope'"),
        (["--param", 'model_overrides={"d_model": 30}'], "error: model_overrides: ModelConfig.n_heads"),
        (["--param", "epochs"], "error: --param 'epochs': expected KEY=VALUE"),
        (["--epochs", "0"], "error: epochs: must be >= 1"),
    ],
)
def test_cli_rejects_bad_parameters_before_starting(argv, expected, capsys, tmp_path):
    from apt_model.cli import main

    rc = main(["pipeline", "run", "--output-root", str(tmp_path / "out"), *argv])
    assert rc == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_list_params(capsys):
    from apt_model.cli import main

    assert main(["pipeline", "run", "--list-params"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PipelineParams.model_fields)
