"""Row "corrupted checkpoint or cached dataset on disk": detected before use, a clear error or a rebuild, never loaded.

* A damaged ``.pt`` / export given to ``apt verify`` / ``apt train --resume`` → one ``error:`` line naming the file,
  exit 2, nothing written.
* The pipeline's dataset cache entry with a damaged ``hlbd.json`` → the sha256 in its manifest does not match →
  rebuilt, never handed to training (cache-level cases: ``tests/test_cache.py::test_damaged_entry_is_rebuilt``).
* A bit flip inside a standalone checkpoint's tensor data is *not* caught by torch's loader: the run's
  ``experiment_report.json`` records each checkpoint's sha256, which resume checks before loading.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from apt_model.cli import main
from apt_model.io import sha256_file
from tests.reliability.helpers import TRAIN_FLAGS, assert_one_error_line, count, snapshot


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 64)


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _zeros(p: Path) -> None:
    p.write_bytes(b"\0" * p.stat().st_size)


def _json_text(p: Path) -> None:
    p.write_text('{"model_config": {}}', encoding="utf-8")


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate,
    "garbage": _garbage,
    "empty": _empty,
    "zeroed": _zeros,
    "json": _json_text,
}


def _train_argv(dataset: Path, run: Path) -> list[str]:
    """`apt train` into ``run`` for 3 epochs (the tests add ``--resume``)."""
    return [*TRAIN_FLAGS, "--dataset", str(dataset), "--save-dir", str(run), "--no-tracking", "--epochs", "3"]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_verify_refuses_a_damaged_checkpoint_with_one_line(
    tmp_path: Path, tiny_run: Path, rel_dataset: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "model.pt"
    shutil.copy(tiny_run / "final_model.pt", ckpt)
    DAMAGE[damage](ckpt)
    count("faults:corrupt-checkpoint")
    before = snapshot(tmp_path)
    rc = main(["verify", "--model", str(ckpt), "--dataset", str(rel_dataset), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert_one_error_line(capsys.readouterr().err, str(ckpt))
    assert snapshot(tmp_path) == before  # no report written


@pytest.mark.parametrize(
    "name, damage",
    [("model.safetensors", "truncated"), ("model.safetensors", "garbage"), ("config.json", "garbage"),
     ("tokenizer.json", "truncated"), ("config.json", "empty")],
)  # fmt: skip
def test_verify_refuses_a_damaged_export_with_one_line(
    tmp_path: Path,
    tiny_run: Path,
    rel_dataset: Path,
    name: str,
    damage: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    export = tmp_path / "final_model"
    shutil.copytree(tiny_run / "final_model", export)
    DAMAGE[damage](export / name)
    count("faults:corrupt-export")
    rc = main(["verify", "--model", str(export), "--dataset", str(rel_dataset)])
    assert rc == 2
    assert_one_error_line(capsys.readouterr().err, name)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_resume_from_a_damaged_checkpoint_is_refused_before_any_write(
    tmp_path: Path, tiny_run: Path, rel_dataset: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    DAMAGE[damage](run / "checkpoint_epoch_2.pt")
    count("faults:corrupt-checkpoint")
    before = snapshot(run)
    argv = _train_argv(rel_dataset, run)
    rc = main([*argv, "--resume", str(run / "checkpoint_epoch_2.pt")])
    assert rc == 2
    assert_one_error_line(capsys.readouterr().err, "checkpoint_epoch_2.pt")
    assert snapshot(run) == before


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the file: inside tensor data, which torch's zip reader does not checksum."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_refuses_a_checkpoint_whose_sha256_differs_from_the_report(
    tmp_path: Path, tiny_run: Path, rel_dataset: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = run / "checkpoint_epoch_2.pt"
    recorded = {
        c["epoch"]: c["sha256"]
        for c in json.loads((run / "experiment_report.json").read_text())["checkpoints"]
    }
    _flip_tensor_byte(ckpt)
    count("faults:bit-flip")
    assert sha256_file(ckpt) != recorded[2]
    argv = _train_argv(rel_dataset, run)
    rc = main([*argv, "--resume", str(ckpt)])
    assert rc == 2
    assert_one_error_line(capsys.readouterr().err, "sha256")


# --------------------------------------------------------------------------------------- the pipeline's cache
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_pipeline_rebuilds_a_damaged_cached_dataset(tmp_path: Path, damage: str) -> None:
    from apt_model.data import load_dataset
    from apt_model.pipeline_params import parse_params
    from tasks.data import DATASET_FILE, build_dataset

    params = parse_params(output_root=str(tmp_path / "out"))
    first = build_dataset(params)
    path = Path(first["path"])
    good = path.read_bytes()
    if damage == "flip":
        data = bytearray(good)
        data[len(data) // 2] ^= 0x01  # still valid UTF-8/JSON-ish: only the hash can tell
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    else:
        path.unlink()
    count("faults:corrupt-cached-dataset")
    second = build_dataset(params)
    assert not second["cache_hit"]
    assert second["cache_reason"] == (
        f"{DATASET_FILE} missing" if damage == "delete" else f"{DATASET_FILE} sha256 mismatch"
    )
    assert Path(second["path"]).read_bytes() == good  # regenerated byte-identically (seeded)
    assert second["sha256"] == first["sha256"] == sha256_file(second["path"])
    assert load_dataset(second["path"]).pairs
    assert build_dataset(params)["cache_hit"]  # and trusted again once intact
