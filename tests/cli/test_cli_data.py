"""``apt data generate|inspect``: one-line errors, exit 2, nothing written on bad input; byte-identical output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apt_model.cli import main
from apt_model.data import generate, load_dataset
from apt_model.io import dumps_json

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, hashseed: str = "0") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED=hashseed)
    return subprocess.run(
        [sys.executable, "-m", "apt_model", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generate_writes_canonical_file_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "d" / "hc.json"
    rc = main(["data", "generate", "--kind", "hardcore", "--seed", "5", "--size", "small", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and str(out) in printed[0] and "train" in printed[0]
    assert out.read_text(encoding="utf-8") == dumps_json(generate("hardcore", seed=5, size="small"))
    assert [p.name for p in out.parent.iterdir()] == ["hc.json"]


def test_generate_full_and_inspect_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "full.json"
    assert main(["data", "generate", "--kind", "full", "--val-fraction", "0.2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out)]) == 0
    table = capsys.readouterr().out
    for fragment in ("format      full", "full_record", "full_kr", "vocabulary", "p99"):
        assert fragment in table
    assert main(["data", "inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    ds = load_dataset(out)
    assert summary["pairs"] == len(ds.pairs)
    assert summary["splits"] == {"train": len(ds.train), "val": len(ds.val)}
    assert summary["modules"]["full_record"]["val"] == 0
    assert set(summary["input_tokens"]) == {"p50", "p90", "p99", "max"}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--kind", "medium"], "--kind"),
        (["--size", "huge"], "--size"),
        (["--seed", "abc"], "--seed"),
        (["--seed", "-3"], "--seed"),
        (["--val-fraction", "0.7"], "--val-fraction"),
        (["--val-fraction", "nan"], "--val-fraction"),
        (["--val-fraction", "0"], "--val-fraction"),
    ],
)
def test_generate_bad_args_leave_existing_file_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    out = tmp_path / "existing.json"
    out.write_text("precious\n", encoding="utf-8")
    before = out.stat().st_mtime_ns
    rc = main(["data", "generate", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err
    assert out.read_text(encoding="utf-8") == "precious\n" and out.stat().st_mtime_ns == before
    assert [p.name for p in tmp_path.iterdir()] == ["existing.json"]


def test_generate_out_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "generate", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_inspect_malformed_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"data": {"arithmetic": [{"input": "1 + 1 = ?", "output": 2}]}}), encoding="utf-8"
    )
    assert main(["data", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}: $.data.arithmetic[0].output: expected a non-empty string, got a number\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bad.json"]
    assert main(["data", "inspect", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_subprocess_same_seed_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    """Two separate processes (different hash seeds) write the same bytes; another seed writes other bytes."""
    digests = {}
    for name, seed, hashseed in (("a", "7", "1"), ("b", "7", "2"), ("c", "8", "1")):
        out = tmp_path / f"{name}.json"
        proc = _run(
            "data", "generate", "--kind", "hardcore", "--seed", seed, "--out", str(out), hashseed=hashseed
        )
        assert proc.returncode == 0, proc.stderr
        digests[name] = hashlib.sha256(out.read_bytes()).hexdigest()
    assert digests["a"] == digests["b"]
    assert digests["a"] != digests["c"]

    full = [tmp_path / "f1.json", tmp_path / "f2.json"]
    for i, out in enumerate(full):
        proc = _run(
            "data", "generate", "--kind", "full", "--seed", "3", "--out", str(out), hashseed=str(i + 5)
        )
        assert proc.returncode == 0, proc.stderr
    assert full[0].read_bytes() == full[1].read_bytes()

    proc = _run("data", "inspect", str(tmp_path / "a.json"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sha256"] == digests["a"]

    proc = _run("data", "generate", "--kind", "nope", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: --kind") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_cli_imports_no_pipeline_or_tracking_stack() -> None:
    """`apt train`/`apt data`/`apt verify` run on hosts with only torch (a bare GPU machine): the CLI's import
    must not pull pydantic, Prefect, MLflow, DeepSpeed or transformers in."""
    heavy = ("pydantic", "prefect", "mlflow", "deepspeed", "transformers", "azure")
    code = (
        "import sys, apt_model.cli, apt_model.cli.train, apt_model.cli.verify; "
        f"loaded = [m for m in {heavy!r} if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}
    )
