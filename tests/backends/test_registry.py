"""--backend choices, --list-backends and describe_backends() all read the one BACKENDS registry."""

from __future__ import annotations

import argparse
import sys
import types
from typing import Any

import pytest

from apt_model import backends
from apt_model.backends import BackendSpec, describe_backends
from apt_model.cli import build_parser, main


class _ToyBackend:
    name = "toy"
    summary = "a backend registered by a test"
    extra = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--toy-level", type=int, default=None)

    def options_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"toy_level": args.toy_level} if args.toy_level is not None else {}

    def validate(self, request: Any) -> None:
        pass

    def train(self, request: Any) -> Any:
        raise AssertionError("not called")


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    module = types.ModuleType("_apt_toy_backend")
    module.ToyBackend = _ToyBackend  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_apt_toy_backend", module)
    monkeypatch.setitem(
        backends.BACKENDS, "toy", BackendSpec("toy", "_apt_toy_backend:ToyBackend", _ToyBackend.summary)
    )
    monkeypatch.setitem(
        backends.BACKENDS,
        "ghost",
        BackendSpec(
            "ghost", "_apt_missing:Ghost", "needs a stack that is absent", ("_no_such_module_",), "ghost"
        ),
    )


def _train_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_one_registry_feeds_all_three(toy, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    names = {row["name"] for row in describe_backends()}
    assert {"playground", "toy", "ghost"} <= names
    backend_action = next(a for a in _train_parser()._actions if a.dest == "backend")
    assert set(backend_action.choices) == set(backends.BACKENDS) == names
    assert main(["train", "--list-backends"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == names
    assert (
        "yes" in lines["toy"]
        and "no (needs _no_such_module_)" in lines["ghost"]
        and "ghost" in lines["ghost"]
    )
    assert _ToyBackend.summary in lines["toy"]


def test_backend_flags_come_from_the_backend(toy, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    args = _train_parser().parse_args(["--backend", "toy", "--toy-level", "3"])
    assert args.toy_level == 3
    # a flag of another backend is refused, before any work
    code = main(
        ["train", "--backend", "playground", "--dataset", str(tmp_path / "x.json"), "--toy-level", "3"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--toy-level is a flag of the toy backend" in err
    # a registered backend whose stack is missing: one clear line
    code = main(["train", "--backend", "ghost", "--dataset", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2 and "needs _no_such_module_" in err and "apt-pipeline[ghost]" in err


def test_unknown_backend_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--backend", "nope", "--dataset", "x.json"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "nope" in err and "playground" in err
