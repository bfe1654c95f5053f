"""Row "a malicious pickle where a checkpoint is expected is refused": weights-only loading everywhere.

Each attacker file, once unpickled, would create a marker folder. It is offered to every entry point that loads a
checkpoint: ``load_model`` (file and run folder), ``apt verify``, ``apt train --resume``, ``apt diagnose`` and the
pipeline's training stage (a planted ``checkpoint_epoch_N.pt`` in the cache's work folder, which a retried stage
resumes from). The marker must never appear. A source scan checks that every ``torch.load(`` of the code base passes
``weights_only=True`` and that nothing else unpickles. DeepSpeed checkpoint folders:
``tests/backends/test_deepspeed.py::test_resume_refuses_a_different_model_or_an_unsafe_file``.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from apt_model.checkpoint import load_model
from apt_model.cli import main
from apt_model.errors import CheckpointError
from tests.reliability.helpers import (
    REPO,
    TRAIN_FLAGS,
    assert_one_error_line,
    count,
    plant_malicious_checkpoints,
)


@pytest.fixture
def evil(tmp_path: Path) -> tuple[list[Path], Path]:
    marker = tmp_path / "PWNED"
    files = plant_malicious_checkpoints(tmp_path / "evil", marker)
    count("faults:malicious-pickle", len(files))
    # Control: the same payloads *do* run code when unpickled unsafely, so the marker checks can fail.
    import pickle

    import torch

    control = tmp_path / "CONTROL"
    zipped, legacy = plant_malicious_checkpoints(tmp_path / "control", control)
    torch.load(zipped, weights_only=False)
    assert control.is_dir()
    control.rmdir()
    pickle.loads(legacy.read_bytes())
    assert control.is_dir()
    return files, marker


def test_load_model_refuses(evil: tuple[list[Path], Path], tmp_path: Path) -> None:
    files, marker = evil
    for path in files:
        with pytest.raises(CheckpointError, match="safe loader"):
            load_model(path)
        run = tmp_path / f"run_{path.stem}"
        run.mkdir()
        shutil.copy(path, run / "final_model.pt")  # a run folder resolves to final_model.pt
        with pytest.raises(CheckpointError, match="safe loader"):
            load_model(run)
    assert not marker.exists(), "unpickling ran attacker code"


def test_cli_verify_refuses(
    evil: tuple[list[Path], Path], rel_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files, marker = evil
    for path in files:
        assert main(["verify", "--model", str(path), "--dataset", str(rel_dataset)]) == 2
        assert_one_error_line(capsys.readouterr().err, str(path), "safe loader")
    assert not marker.exists()


def test_cli_train_resume_refuses(
    evil: tuple[list[Path], Path], rel_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files, marker = evil
    for path in files:
        save = tmp_path / f"save_{path.stem}"
        argv = [*TRAIN_FLAGS, "--dataset", str(rel_dataset), "--save-dir", str(save), "--no-tracking"]
        assert main([*argv, "--epochs", "3", "--resume", str(path)]) == 2
        assert_one_error_line(capsys.readouterr().err, str(path), "safe loader")
        assert not save.exists()  # refused before anything was written
    assert not marker.exists()


def test_cli_diagnose_refuses(evil: tuple[list[Path], Path], capsys: pytest.CaptureFixture[str]) -> None:
    files, marker = evil
    for path in files:
        rc = main(["diagnose", "--model", str(path), "--no-env"])
        out = capsys.readouterr()
        assert rc in (1, 2), out  # an error finding (1) or a refused input (2), never a loaded model
        assert "safe loader" in out.out + out.err
    assert not marker.exists()


def test_pipeline_training_stage_refuses_a_planted_resume_checkpoint(
    evil: tuple[list[Path], Path], rel_dataset: Path, tmp_path: Path
) -> None:
    """The retried training stage resumes from the newest ``checkpoint_epoch_N.pt`` in the key's work folder."""
    from apt_model.errors import ConfigError
    from apt_model.io import sha256_file
    from apt_model.pipeline_params import parse_params
    from tasks.common import cache_for
    from tasks.train import build_model, train_key

    files, marker = evil
    params = parse_params(output_root=str(tmp_path / "out"), epochs=2, save_interval=1)
    data = {"path": str(rel_dataset), "sha256": sha256_file(rel_dataset)}
    key, _ = train_key(params, data)
    entry = cache_for(params).entry("train", key)
    entry.work_dir.mkdir(parents=True)
    shutil.copy(files[0], entry.work_dir / "checkpoint_epoch_9.pt")
    lines: list[str] = []
    with pytest.raises(ConfigError, match="safe loader"):  # AptError: the stage is not retried either
        build_model(params, data, log=lines.append)
    assert any("checkpoint_epoch_9.pt" in line for line in lines), lines
    assert not marker.exists()
    assert not entry.dir.exists()  # nothing published


# ----------------------------------------------------------------------------------------------- source scan
SOURCE_DIRS = ("apt_model", "tasks", "flows", "deployments", "bench")
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"),
              ("dill", "loads"), ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
              ("mlflow.pytorch", "load_model"), ("numpy", "load"), ("np", "load")}  # fmt: skip


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py"))


def test_every_torch_load_is_weights_only() -> None:
    torch_loads, problems = 0, []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name.endswith("torch.load") or (name == "load" and _imports_torch_load(tree)):
                torch_loads += 1
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: {name}(...) without weights_only=True")
            module, _, attr = name.rpartition(".")
            if (module, attr) in UNPICKLERS:
                if name == "np.load" or name == "numpy.load":
                    flag = next((k.value for k in node.keywords if k.arg == "allow_pickle"), None)
                    if flag is None or (isinstance(flag, ast.Constant) and flag.value is False):
                        continue  # numpy refuses pickles by default
                problems.append(f"{where}: {name}(...) unpickles")
    assert torch_loads >= 3, "the scan found no torch.load: is it looking at the right files?"
    assert not problems, "\n".join(problems)
    # The text search agrees with the syntax tree (catches e.g. a torch.load in a string passed to exec).
    text_hits = sum(p.read_text(encoding="utf-8").count("torch.load(") for p in _sources())
    assert text_hits >= torch_loads


def _imports_torch_load(tree: ast.AST) -> bool:
    return any(
        isinstance(n, ast.ImportFrom) and n.module == "torch" and any(a.name == "load" for a in n.names)
        for n in ast.walk(tree)
    )
