"""apt_model.verify: autoregressive decoding, exact/substring scores, collapse, gate, reports."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from apt_model.cli import main
from apt_model.errors import AptError, ConfigError
from apt_model.verify import (
    COLLAPSE_MIN_COUNT,
    decode_greedy,
    detect_collapse,
    evaluate_gate,
    parse_thresholds,
    plan_batches,
    score,
    select_failures,
    verify_model,
    write_report,
)


class ConstantModel(torch.nn.Module):
    """A model whose greedy decoding is always ``answer`` then EOS (the planted "always answers 3" model)."""

    def __init__(self, answer_ids: list[int], eos_id: int) -> None:
        super().__init__()
        self.answer = [*answer_ids, eos_id]

    def generate(
        self, src_ids: torch.Tensor, *, max_new_tokens: int, bos_id: int, eos_id: int
    ) -> torch.Tensor:
        row = self.answer[:max_new_tokens]
        return torch.tensor([row] * src_ids.shape[0], dtype=torch.long)


def _greedy_by_forward(
    model: torch.nn.Module, tok: object, prompt: str, max_new: int, pad_to: tuple[int, int] | None = None
) -> str:
    """One prompt's greedy answer by ``model.forward`` on the growing prefix, prompt and prefix right-padded to
    ``pad_to`` when given: the reference ``decode_greedy`` must match."""
    src_len, tgt_len = pad_to or (0, 0)
    ids = tok.encode(prompt)
    src = torch.tensor([ids + [tok.pad_id] * (src_len - len(ids))])
    prefix, out = [tok.bos_id], []
    with torch.no_grad():
        for _ in range(max_new):
            tgt = torch.tensor([prefix + [tok.pad_id] * (tgt_len - len(prefix))])
            nxt = int(model(src, tgt)[0, len(prefix) - 1].argmax())
            if nxt == tok.eos_id:
                break
            out.append(nxt)
            prefix.append(nxt)
    return tok.decode(out)


# ------------------------------------------------------------------------------------------------ pure functions
def test_score_normalises_whitespace_and_keeps_substring_beside() -> None:
    assert score("I love you", "  I   love you ") == (True, True)
    assert score("46", "460") == (False, True)  # the reference's loose score would count this
    assert score("46", "4") == (False, False)


def test_collapse_rule_boundaries() -> None:
    n = 60
    expected = [str(i) for i in range(n)]
    # 30 % of predictions, 18 prompts: below the count floor → not collapsed.
    small = detect_collapse(["3"] * 18 + [str(i) for i in range(18, n)], expected)
    assert small["answer"] == "3" and not small["collapsed"]
    # Same answer for 20 of 60 prompts (33 %), wrong for all but one → collapsed.
    big = detect_collapse(["3"] * 20 + expected[20:], expected)
    assert (
        big["collapsed"]
        and big["count"] == COLLAPSE_MIN_COUNT
        and big["share"] == pytest.approx(20 / 60, abs=1e-3)
    )
    # The same answer, but it is the right answer for most of those prompts → not collapsed.
    right = detect_collapse(["3"] * 30, ["3"] * 25 + ["4"] * 5)
    assert not right["collapsed"] and right["wrong_share"] == pytest.approx(5 / 30, abs=1e-3)


def test_gate_and_thresholds() -> None:
    overall = {"exact": 0.5}
    modules = {"a": {"exact": 0.9}, "b": {"exact": 0.2}}
    gate = evaluate_gate({"a": 0.8, "b": 0.5, "overall": 0.6}, overall, modules)
    assert not gate["passed"]
    assert [m["key"] for m in gate["missed"]] == ["b", "overall"]
    assert evaluate_gate({}, overall, modules) == {
        "passed": True,
        "missed": [],
        "thresholds": {},
        "metric": "exact",
    }
    assert parse_thresholds(["a=0.5"], min_overall=0.3) == {"a": 0.5, "overall": 0.3}
    for bad in (["a"], ["a=x"], ["a=1.5"], ["=0.3"]):
        with pytest.raises(ConfigError):
            parse_thresholds(bad)


def test_plan_batches_never_mixes_prompt_lengths() -> None:
    lengths = [3, 5, 3, 3, 5, 4]
    limits = [9, 2, 1, 5, 3, 4]
    batches = plan_batches(lengths, limits, batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len({lengths[i] for i in b}) == 1 and len(b) <= 2
    assert batches[0] == [2, 3]  # length 3, sorted by limit


def test_select_failures_round_robin_and_worst_first() -> None:
    rows = [
        {"module": "a", "input": "q1", "expected": "abc", "got": "abd", "exact": False},
        {"module": "a", "input": "q2", "expected": "abc", "got": "xyz", "exact": False},
        {"module": "b", "input": "q3", "expected": "1", "got": "2", "exact": False},
        {"module": "b", "input": "q4", "expected": "1", "got": "1", "exact": True},
    ]
    out = select_failures(rows, limit=3)
    assert [f["input"] for f in out] == ["q2", "q3", "q1"]


# ------------------------------------------------------------------------------------------- with a trained model
def test_decoding_is_autoregressive_greedy(run_and_data: tuple[Path, Path]) -> None:
    """decode_greedy must equal a naive greedy loop over model.forward on the growing prefix."""
    from apt_model.checkpoint import load_model
    from apt_model.data import load_dataset

    run, data = run_and_data
    loaded = load_model(run)
    tok, model = loaded.tokenizer, loaded.model
    prompts = [p.input for p in load_dataset(data).pairs[:6]]
    got, truncated = decode_greedy(model, tok, prompts, max_new_tokens=6, batch_size=4)
    assert truncated == 0
    for prompt, answer in zip(prompts, got, strict=True):
        assert answer == _greedy_by_forward(model, tok, prompt, 6)


def test_fixed_rows_decode_every_batch_at_one_row_count_with_the_same_answers(
    run_and_data: tuple[Path, Path],
) -> None:
    """With ``fixed_rows`` every ``generate`` call sees ``batch_size`` rows whatever its prompts' grouping, so no
    answer can depend on its companions through the kernels' row count; the filler rows change no answer."""
    from apt_model.checkpoint import load_model

    loaded = load_model(run_and_data[0])
    tok, model = loaded.tokenizer, loaded.model
    prompts = [f"{a} + {b} = ?" for a, b in ((3, 4), (12, 5), (7, 31), (40, 2), (9, 9), (15, 27), (2, 8))]
    assert len({len(tok.encode(p)) for p in prompts}) > 1  # several length groups, so several short batches
    rows_seen: list[int] = []
    generate = model.generate

    def spy(src: torch.Tensor, **kw: object) -> torch.Tensor:
        rows_seen.append(src.shape[0])
        return generate(src, **kw)

    model.generate = spy  # type: ignore[method-assign]
    fixed, _ = decode_greedy(model, tok, prompts, max_new_tokens=6, batch_size=5, fixed_rows=True)
    assert len(rows_seen) > 1 and set(rows_seen) == {5}
    rows_seen.clear()
    natural, _ = decode_greedy(model, tok, prompts, max_new_tokens=6, batch_size=5)  # CPU: natural sizes
    assert sum(rows_seen) == len(prompts) and min(rows_seen) < 5
    assert fixed == natural


def test_pad_to_decodes_every_prompt_and_prefix_in_the_given_shape(run_and_data: tuple[Path, Path]) -> None:
    """``pad_to`` right-pads each prompt and each decoder prefix to one shape (the fixed-shape training's), and the
    answer is the greedy loop over ``forward`` on those padded inputs."""
    from apt_model.checkpoint import load_model

    loaded = load_model(run_and_data[0])
    tok, model = loaded.tokenizer, loaded.model
    prompts = [f"{a} + {b} = ?" for a, b in ((3, 4), (12, 5), (7, 31), (40, 2))]
    seen: list[tuple[int, object]] = []
    generate = model.generate

    def spy(src: torch.Tensor, **kw: object) -> torch.Tensor:
        seen.append((src.shape[1], kw.get("tgt_len")))
        return generate(src, **kw)

    model.generate = spy  # type: ignore[method-assign]
    got, _ = decode_greedy(model, tok, prompts, max_new_tokens=6, batch_size=4, pad_to=(16, 9))
    assert seen and set(seen) == {(16, 9)}
    seen.clear()
    decode_greedy(model, tok, prompts, max_new_tokens=6, batch_size=4)
    assert {kw for _, kw in seen} == {None} and {n for n, _ in seen} == {len(tok.encode(p)) for p in prompts}
    for prompt, answer in zip(prompts, got, strict=True):
        assert answer == _greedy_by_forward(model, tok, prompt, 6, pad_to=(16, 9))


def test_pad_to_is_checked_before_work_and_recorded(
    run_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, data = run_and_data
    assert main(["verify", "--model", str(run), "--dataset", str(data), "--pad-to", "24,8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["pad_to"] == [24, 8]
    assert verify_model(run, data).settings["pad_to"] is None
    missing = str(tmp_path / "nope.pt")
    base = ["verify", "--model", missing, "--dataset", str(data), "--out", str(tmp_path / "o")]
    for value in ("40", "a,b", "0,8", "40,8,2", "-4,8"):
        code = main([*base, f"--pad-to={value}"])
        err = capsys.readouterr().err
        assert code == 2, (value, err)
        assert err.count("\n") == 1 and err.startswith("error:") and "--pad-to" in err, err
    assert not (tmp_path / "o").exists()
    max_len = verify_model(run, data, sample=1).settings["model_max_len"]
    with pytest.raises(ConfigError, match="longer than the model's max_len"):
        verify_model(run, data, pad_to=(max_len + 1, 8))


def test_verify_end_to_end_cli(
    run_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, data = run_and_data
    out = tmp_path / "ver"
    rc = main(["verify", "--model", str(run), "--dataset", str(data), "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "verification_report.json").read_text(encoding="utf-8"))
    md = (out / "verification_report.md").read_text(encoding="utf-8")
    assert rep["split"] == "val" and rep["overall"]["n"] == 10
    assert {m: v["n"] for m, v in rep["modules"].items()} == {"arithmetic": 8, "zodiac": 2}
    assert rep["overall"]["exact_count"] == sum(v["exact_count"] for v in rep["modules"].values())
    assert rep["overall"]["exact"] <= rep["overall"]["substring"]
    assert rep["gate"] == {"passed": True, "missed": [], "thresholds": {}, "metric": "exact"}
    assert "| arithmetic | 8 |" in md and "## Worst failures" in md
    assert "verified 10 val pairs" in capsys.readouterr().out


def test_batch_size_does_not_change_answers(run_and_data: tuple[Path, Path]) -> None:
    run, data = run_and_data
    a = verify_model(run, data, split="all", batch_size=1)
    b = verify_model(run, data, split="all", batch_size=512)
    assert a.modules == b.modules and a.collapse == b.collapse and a.failures == b.failures


def test_planted_constant_model_is_flagged_as_collapsed(
    run_and_data: tuple[Path, Path], tmp_path: Path
) -> None:
    from apt_model.checkpoint import load_model
    from apt_model.diagnose import diagnose

    run, data = run_and_data
    tok = load_model(run).tokenizer
    planted = SimpleNamespace(model=ConstantModel(tok.encode("3"), tok.eos_id), tokenizer=tok, config=None,
                              source="always-3")  # fmt: skip
    report = verify_model(planted, data, split="all")
    c = report.collapse
    assert c["collapsed"] and c["answer"] == "3" and c["count"] == 76 and c["share"] == 1.0
    # "3" is right for 0+3, 1+2, 2+1, 3+0 only.
    assert report.modules["arithmetic"]["exact_count"] == 4
    assert c["wrong_share"] == pytest.approx(72 / 76, abs=1e-3)
    assert "arithmetic" in c["modules"]
    paths = write_report(report, tmp_path)
    assert "Mode collapse" in paths["markdown"].read_text(encoding="utf-8")
    findings = diagnose(verification=paths["json"], environment=False)
    assert [f.check for f in findings if f.severity == "error"] == ["verify.collapse"]


def test_gate_cli_exit_codes(run_and_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run, data = run_and_data
    exact = verify_model(run, data).overall["exact"]
    if exact == 1.0:
        pytest.skip("the tiny model is perfect on val; a 100 % gate cannot be missed")
    assert main(["verify", "--model", str(run), "--dataset", str(data), "--min-overall", "1.0"]) == 0
    assert "warning: verification gate missed: overall" in capsys.readouterr().err
    rc = main(
        ["verify", "--model", str(run), "--dataset", str(data), "--min-overall", "1.0", "--fail-on-gate"]
    )
    assert rc == 3 and "error: verification gate missed" in capsys.readouterr().err
    assert (
        main(["verify", "--model", str(run), "--dataset", str(data), "--min-overall", "0", "--fail-on-gate"])
        == 0
    )


def test_bad_inputs_fail_before_work(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = run_and_data
    with pytest.raises(AptError, match=r"model (path )?not found"):
        verify_model(tmp_path / "nope.pt", data)
    with pytest.raises(AptError, match="dataset file not found"):
        verify_model(run, tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="unknown module"):
        verify_model(run, data, thresholds={"geometry": 0.5})
    with pytest.raises(ConfigError, match="--sample"):
        verify_model(run, data, sample=0)
    with pytest.raises(ConfigError, match="--split"):
        verify_model(run, data, split="test")


def _cli_failures(run: Path, data: Path, n: int, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["verify", "--model", str(run), "--dataset", str(data), "--split", "all",
                 "--failures", str(n), "--json"]) == 0  # fmt: skip
    return json.loads(capsys.readouterr().out)


def test_failures_option_sets_how_many_wrong_answers_are_listed(
    run_and_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, data = run_and_data
    full = _cli_failures(run, data, 100_000, capsys)
    wrong = full["overall"]["n"] - full["overall"]["exact_count"]
    if wrong < 3:
        pytest.skip("the tiny model gets fewer than 3 pairs wrong; nothing to truncate")
    assert len(full["failures"]) == wrong  # a large N lists every wrong answer, no more
    assert _cli_failures(run, data, 0, capsys)["failures"] == []
    two = _cli_failures(run, data, 2, capsys)["failures"]
    assert len(two) == 2 and all(f in full["failures"] for f in two)
    assert len(_cli_failures(run, data, 25, capsys)["failures"]) == min(25, wrong)


def test_failures_option_rejects_bad_values_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A model and dataset that do not exist: the --failures error must come first, before anything is loaded.
    base = ["verify", "--model", str(tmp_path / "nope.pt"), "--dataset", str(tmp_path / "nope.json")]
    for value, message in (("-1", "--failures -1: must be a non-negative integer"), ("2.5", "--failures")):
        try:
            code = main([*base, "--failures", value, "--out", str(tmp_path / "out")])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (value, err)
        assert err.count("\n") == 1 and err.startswith("error:") and message in err, err
    assert not (tmp_path / "out").exists()


def test_sample_is_seeded(run_and_data: tuple[Path, Path]) -> None:
    run, data = run_and_data
    a = verify_model(run, data, split="all", sample=20, seed=1)
    b = verify_model(run, data, split="all", sample=20, seed=1)
    assert a.overall["n"] == 20 and a.modules == b.modules


@pytest.mark.slow
def test_verify_5000_pairs_under_60s(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    """Acceptance: 5,000 pairs with the tiny model verify in < 60 s on this CPU — the CLI-trained one, and (the
    upper bound) an untrained one of the same shape that never emits EOS, so every prompt decodes to its limit."""
    from apt_model.checkpoint import export_pretrained, load_model
    from apt_model.config import model_preset
    from apt_model.model import APTModel

    run, _ = run_and_data
    rows = [{"input": f"{a} + {b} = ?", "output": str(a + b)} for a in range(100) for b in range(50)]
    big = tmp_path / "big.json"
    big.write_text(
        json.dumps({"metadata": {"splits": {"val": []}}, "data": {"arithmetic": rows}}), encoding="utf-8"
    )
    tok = load_model(run).tokenizer
    torch.manual_seed(0)
    cfg = model_preset("tiny", vocab_size=tok.vocab_size)
    untrained = export_pretrained(tmp_path / "untrained", APTModel(cfg), cfg, tok)
    for model in (run, untrained):
        started = time.perf_counter()
        report = verify_model(model, big, split="all")
        elapsed = time.perf_counter() - started
        assert report.overall["n"] == 5000
        assert elapsed < 60, f"verification of 5000 pairs with {model} took {elapsed:.1f} s"
        if model == untrained:  # it really decoded: no prompt stopped at once
            assert report.collapse["top"] and all(answer for answer, _ in report.collapse["top"])
