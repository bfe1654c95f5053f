"""bench/quality_run.py: the user path (train, verify) on a given file, and the scores on other sizes' val splits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from apt_model.data import generate, write_dataset
from bench.quality_run import cross_val, main
from bench.reverse_digits import main as reverse_main
from bench.worked_steps import STEPS_MARKER


def tiny_argv(out: Path, tag: str, *flags: str) -> list[str]:
    """quality_run.py's arguments for one epoch of the tiny preset on CPU, uncompiled, with ``flags`` before `--`."""
    return ["--out", str(out), "--tag", tag, "--device", "cpu", *flags, "--", "--preset", "tiny", "--epochs", "1",
            "--compile", "off"]  # fmt: skip


def assert_refused(argv: list[str], message: str, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """quality_run.py with ``argv`` (on CPU, into ``out``) exits 2 naming ``message``, before making ``out``."""
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(out), "--device", "cpu", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One epoch of the tiny preset on a given file of the small data, on CPU, also scored on the default and small
    sizes' val splits."""
    out = tmp_path_factory.mktemp("quality")
    given = out / "given.json"
    write_dataset(generate("hardcore", size="small"), given)
    given_data = ["--dataset", str(given), "--splits", "val", "train"]
    argv = tiny_argv(out, "t", *given_data, "--also-val-size", "default", "small", "--pad-to", "40,24")
    assert main(argv) == 0
    assert (out / "t" / "hardcore.json").read_bytes() == given.read_bytes()
    return out / "t", json.loads((out / "t" / "quality.json").read_text())


def test_runs_the_user_path_and_scores_the_other_sizes_val(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    _, report = tiny_run
    steps = ["train", "verify_val", "verify_train"]  # --splits' order
    steps += ["generate_default", "verify_val_default", "generate_small", "verify_val_small"]
    # --pad-to: every verification again in the fixed shape, the other sizes' data not generated twice
    steps += [
        "verify_val_padded",
        "verify_train_padded",
        "verify_val_default_padded",
        "verify_val_small_padded",
    ]
    assert [s["name"] for s in report["steps"]] == steps
    assert all(s["rc"] == 0 for s in report["steps"])
    assert report["dataset"]["params"]["size"] == "small" and report["data_size"] is None
    # the training report's timings come along (a CPU run: not compiled, no pre-warm child)
    timings = {key: report["train_report"][key] for key in ("phase_seconds", "compile_seconds",
                                                              "first_launch_seconds", "kernel_prewarm")}  # fmt: skip
    assert set(timings["phase_seconds"]) == {"prepare", "setup", "finish"} and timings["first_launch_seconds"]
    assert timings["compile_seconds"] is None and timings["kernel_prewarm"] is None
    # The given file is the small size itself, so its val split scored again gives the same figures.
    assert report["exact_val_small"]["overall"] == report["exact_val"]["overall"]
    assert report["exact_val_small"]["n"] == report["exact_val"]["n"]
    assert report["exact_val_small_padded"]["overall"] == report["exact_val_padded"]["overall"]
    assert report["exact_train_padded"]["n"] == report["exact_train"]["n"]
    assert report["exact_val_default_padded"]["n"] == report["exact_val_default"]["n"]
    assert set(report["val_by_kind_padded"]) == set(report["val_by_kind"])
    default_val = generate("hardcore", size="default")["metadata"]["split_counts"]["val"]
    cross = report["exact_val_default"]
    assert cross["n"] == default_val != report["exact_val"]["n"]
    # Both sizes hold out by the same keys, so none of default's val problems is one of small's training inputs.
    assert cross["val_inputs_in_our_training_split"] == 0
    assert set(cross["by_kind"]) == {"arithmetic", "geometry", "physics"}
    assert 0.0 <= cross["overall"] <= 1.0


def test_counts_the_other_val_problems_that_were_trained_on(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    run, _ = tiny_run
    # The same data with nothing held out: every val input of the small size is now a training input.
    doc = json.loads((run / "hardcore.json").read_text())
    small_val = len(doc["metadata"]["splits"]["val"])
    doc["metadata"]["splits"]["val"] = []
    all_train = run / "all_train.json"
    all_train.write_text(json.dumps(doc, ensure_ascii=False))
    report: dict[str, Any] = {"steps": []}
    cross_val("small", all_train, run / "run", run, report, run / "log.txt", "cpu")
    assert report["exact_val_small"]["val_inputs_in_our_training_split"] == small_val > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--splits", "test"], "--splits"),
        (["--splits", "train", "everything"], "--splits"),
        (["--data-size", "huge"], "--data-size"),
        (["--also-val-size", "xl", "huge"], "--also-val-size"),
        (["--dataset", "no-such-file.json"], "--dataset: no such file"),
        (["--pad-to", "40"], "--pad-to '40': must be two positive integers"),
        (["--pad-to", "40,0"], "--pad-to"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_refused(argv, message, tmp_path / "out", capsys)


def test_reverse_digits_trains_and_scores_other_sizes_on_reversed_answers(tmp_path: Path) -> None:
    flags = ["--data-size", "small", "--splits", "val", "--also-val-size", "small", "--reverse-digits"]
    assert main(tiny_argv(tmp_path, "r", *flags)) == 0
    report = json.loads((tmp_path / "r" / "quality.json").read_text())
    assert report["reverse_digits"] is True
    for name in ("hardcore.json", "hardcore_small.json"):  # trained on, and scored on: both reversed
        assert json.loads((tmp_path / "r" / name).read_text())["metadata"]["params"]["reverse_digits"] is True
    assert report["exact_val_small"]["val_inputs_in_our_training_split"] == 0


@pytest.fixture
def given_and_reversed(tmp_path: Path) -> tuple[Path, Path]:
    """A given file of the small data, and its copy with reversed digits (a file rewritten already)."""
    given, reversed_ = tmp_path / "given.json", tmp_path / "reversed.json"
    write_dataset(generate("hardcore", size="small"), given)
    assert reverse_main([str(given), str(reversed_)]) == 0
    return given, reversed_


def test_reverse_digits_refuses_a_given_file_reversed_already_before_any_work(
    given_and_reversed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, reversed_ = given_and_reversed
    argv = ["--dataset", str(reversed_), "--reverse-digits"]
    assert_refused(
        argv, f"--reverse-digits: {reversed_}: its answers are reversed already", tmp_path / "out", capsys
    )


@pytest.mark.parametrize(
    ("modules", "recorded"), [([], True), (["--worked-modules", "physics,geometry"], ["geometry", "physics"])]
)
def test_worked_steps_trains_and_scores_on_worked_answers_also_by_final_answer(
    modules: list[str], recorded: Any, tmp_path: Path
) -> None:
    flags = [
        "--data-size",
        "small",
        "--splits",
        "val",
        "--also-val-size",
        "small",
        "--worked-steps",
        *modules,
    ]
    assert main(tiny_argv(tmp_path, "w", *flags)) == 0
    report = json.loads((tmp_path / "w" / "quality.json").read_text())
    assert report["worked_steps"] == (modules[-1].split(",") if modules else True)
    assert "reverse_digits" not in report
    for name in ("hardcore.json", "hardcore_small.json"):  # trained on, and scored on: both worked alike
        assert (
            json.loads((tmp_path / "w" / name).read_text())["metadata"]["params"]["worked_steps"] == recorded
        )
    for own, final in (("exact_val", "final_val"), ("exact_val_small", "final_val_small")):
        assert report[final]["n"] == report[own]["n"]
        assert report[own]["overall"] <= report[final]["overall"]  # a right last number is all final asks
        assert {"arithmetic", "geometry", "physics"} <= set(report[final]["clean_by_kind"])


def test_worked_steps_refuses_a_given_file_rewritten_already_and_both_rewrites_at_once(
    given_and_reversed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    given, reversed_ = given_and_reversed
    for argv, message in (
        (["--dataset", str(reversed_), "--worked-steps"], "--worked-steps: "),
        (
            ["--dataset", str(given), "--worked-steps", "--reverse-digits"],
            "--reverse-digits goes with neither",
        ),
        (["--dataset", str(given), "--aux-steps", "--reverse-digits"], "--reverse-digits goes with neither"),
        (["--dataset", str(given), "--aux-steps", "--worked-steps"], "needs --worked-modules"),
        (
            ["--dataset", str(reversed_), "--aux-steps", "--worked-steps", "--worked-modules", "physics"],
            "--worked-steps: ",
        ),
        (["--dataset", str(given), "--worked-modules", "physics"], "--worked-modules needs --worked-steps"),
        (["--dataset", str(given), "--worked-steps", "--worked-modules", "zodiac"], "--worked-modules"),
    ):
        assert_refused(argv, message, tmp_path / "out", capsys)


def test_worked_modules_with_aux_steps_twins_the_other_modules_and_scores_by_final_answer(
    tmp_path: Path,
) -> None:
    flags = ["--data-size", "small", "--splits", "train", "val", "--also-val-size", "small"]
    flags += ["--worked-steps", "--worked-modules", "physics,geometry", "--aux-steps"]
    assert main(tiny_argv(tmp_path, "m", *flags)) == 0
    report = json.loads((tmp_path / "m" / "quality.json").read_text())
    assert report["mixed_steps"] == ["physics", "geometry"]
    assert "worked_steps" not in report and "aux_steps" not in report
    plain_val = generate("hardcore", size="small")["metadata"]["split_counts"]["val"]
    assert (
        report["exact_val"]["n"]
        == report["exact_val_small"]["n"]
        == report["final_val_small"]["n"]
        == plain_val
    )
    for name in ("hardcore.json", "hardcore_small.json"):  # trained on, and scored on: both rewritten alike
        params = json.loads((tmp_path / "m" / name).read_text())["metadata"]["params"]
        assert params["worked_steps"] == ["geometry", "physics"] and params["aux_steps"] == ["arithmetic"]
    # Train is scored with the twins and, for the quality line, on HLBD's own training rows alone.
    doc = json.loads((tmp_path / "m" / "hardcore.json").read_text())
    twins = sum(r["input"].endswith(STEPS_MARKER) for rows in doc["data"].values() for r in rows)
    own = report["exact_train_without_twins"]
    assert twins > 0 and own["n"] == report["exact_train"]["n"] - twins
    assert own["modules"]["zodiac"] == report["exact_train"]["modules"]["zodiac"]  # no twins there


def test_aux_steps_trains_with_the_twins_and_scores_the_plain_answers(tmp_path: Path) -> None:
    flags = ["--data-size", "small", "--splits", "val", "--also-val-size", "small", "--aux-steps"]
    assert main(tiny_argv(tmp_path, "x", *flags)) == 0
    report = json.loads((tmp_path / "x" / "quality.json").read_text())
    assert report["aux_steps"] is True and "final_val" not in report
    plain_val = generate("hardcore", size="small")["metadata"]["split_counts"]["val"]
    assert report["exact_val"]["n"] == report["exact_val_small"]["n"] == plain_val
    assert (
        json.loads((tmp_path / "x" / "hardcore.json").read_text())["metadata"]["params"]["aux_steps"] is True
    )
