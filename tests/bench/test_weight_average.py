"""bench/weight_average.py: which epochs each variant averages, the averaged weights, and paired scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from apt_model.checkpoint import load_checkpoint, save_checkpoint
from apt_model.verify import verify_model
from bench.weight_average import averaged_state, epoch_checkpoints, main, variant_weights


def test_variants_weigh_the_right_epochs() -> None:
    weights = variant_weights([1, 2, 3, 4, 5], last=[1, 3], exp=[0.5])
    assert weights["last1"] == {5: 1.0}
    assert weights["last3"] == pytest.approx({3: 1 / 3, 4: 1 / 3, 5: 1 / 3})
    total = sum(0.5**age for age in range(5))
    assert weights["exp0.5"] == pytest.approx({5 - age: 0.5**age / total for age in range(5)})
    assert all(sum(w.values()) == pytest.approx(1.0) for w in weights.values())


@pytest.fixture
def two_epochs(run_and_data: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    """The shared tiny run's last checkpoint as epoch 2 of a copy, and a perturbed twin of it as epoch 1."""
    run, data = run_and_data
    state = load_checkpoint(run / "final_model.pt")
    copy = tmp_path / "run"
    copy.mkdir()
    save_checkpoint(copy / "checkpoint_epoch_2.pt", state)
    gen = torch.Generator().manual_seed(0)
    twin = dict(state)
    twin["model_state"] = {
        k: (v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
        for k, v in state["model_state"].items()
    }
    save_checkpoint(copy / "checkpoint_epoch_1.pt", twin)
    shutil.copyfile(data, tmp_path / "data.json")
    return copy, tmp_path / "data.json", state["model_state"], twin["model_state"]


def test_averaged_state_is_the_weighted_mean(two_epochs: tuple[Path, Path, dict, dict]) -> None:
    run, _, last, first = two_epochs
    paths = epoch_checkpoints(run)
    assert list(paths) == [1, 2]
    mean = averaged_state(paths, {1: 0.25, 2: 0.75}, {})
    for name, value in last.items():
        if value.is_floating_point():
            torch.testing.assert_close(mean[name], 0.25 * first[name] + 0.75 * value)
        else:
            assert torch.equal(mean[name], value)
    only_last = averaged_state(paths, {2: 1.0}, {})
    assert all(torch.equal(only_last[k], v) for k, v in last.items())


def test_final_weights_score_as_verify_does(
    two_epochs: tuple[Path, Path, dict, dict], tmp_path: Path
) -> None:
    run, data, _, _ = two_epochs
    out = tmp_path / "avg.json"
    argv = [
        "--run",
        str(run),
        "--dataset",
        f"own={data}",
        "--last",
        "1",
        "2",
        "--exp",
        "0.5",
        "--device",
        "cpu",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["variants"]) == ["last1", "last2", "exp0.5"]
    direct = verify_model(run / "checkpoint_epoch_2.pt", data, split="val", device="cpu", n_failures=100000)
    own = report["variants"]["last1"]["own"]
    assert own["overall"] == direct.overall["exact"] and own["n"] == direct.overall["n"]
    assert own["modules"] == {m: v["exact"] for m, v in direct.modules.items()}
    assert report["variants"]["last2"]["epochs"] == [1, 2]
    assert report["variants"]["exp0.5"]["weights"] == {"1": pytest.approx(1 / 3), "2": pytest.approx(2 / 3)}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--dataset": "own=/nonexistent/data.json"}, "expected NAME=FILE of an existing file"),
        ({"--dataset": "no-equals-sign"}, "expected NAME=FILE of an existing file"),
        ({"--run": "EMPTY"}, "no checkpoint_epoch_N.pt files"),
        ({"--exp": "1.5"}, "--exp factors in (0, 1)"),
        ({"--last": "0"}, "--last takes positive counts"),
        ({"--split": "test"}, "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_message_and_write_nothing(
    two_epochs: tuple[Path, Path, dict, dict],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    message: str,
) -> None:
    run, data, _, _ = two_epochs
    (tmp_path / "empty").mkdir()
    args = {"--run": str(run), "--dataset": f"own={data}", "--last": "1", "--device": "cpu"}
    args.update({k: (str(tmp_path / "empty") if v == "EMPTY" else v) for k, v in change.items()})
    out = tmp_path / "a.json"
    with pytest.raises(SystemExit) as exc:
        main([*(x for kv in args.items() for x in kv), "--out", str(out)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_refuses_a_run_without_the_epochs_asked_for(
    two_epochs: tuple[Path, Path, dict, dict], tmp_path: Path
) -> None:
    run, data, _, _ = two_epochs
    argv = ["--run", str(run), "--dataset", f"own={data}", "--last", "3", "--out", str(tmp_path / "a.json")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert not (tmp_path / "a.json").exists()
