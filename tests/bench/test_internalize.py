"""bench/internalize.py: worked steps that shrink to the plain answer over the epochs, through apt train itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from apt_model.data import generate, write_dataset
from apt_model.data.pairs import Pair
from apt_model.errors import ConfigError, DataError
from apt_model.training import batching, loop
from bench.internalize import STAGES_FILE, Internalizer, Schedule, install, main, staged_output, steps_prefix


def test_schedule_keeps_the_steps_then_removes_them_evenly_then_trains_plain() -> None:
    s = Schedule(full=2, ramp=3)
    assert [s.fraction(e) for e in range(7)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [Schedule(0, 0).fraction(e) for e in range(2)] == [1.0, 1.0]
    with pytest.raises(ConfigError, match="must be >= 0"):
        Schedule(-1, 3)


def test_steps_prefix_of_a_two_digit_multiplier_only() -> None:
    assert steps_prefix("arithmetic", "37 × 14 = ?", "518") == "148+370="
    assert steps_prefix("physics", "已知F = 37N，s = 14m，求W（J）", "518") == "148+370="
    assert steps_prefix("arithmetic", "37 × 4 = ?", "148") is None  # one-digit multiplier: plain already
    assert steps_prefix("arithmetic", "37 + 14 = ?", "51") is None
    with pytest.raises(DataError, match="not 37 × 14"):
        steps_prefix("arithmetic", "37 × 14 = ?", "519")


def test_staged_output_drops_the_prefix_from_the_front() -> None:
    assert staged_output("148+370=", "518", 0.0) == "148+370=518"
    assert staged_output("148+370=", "518", 0.5) == "370=518"
    assert staged_output("148+370=", "518", 0.99) == "=518"
    assert staged_output("148+370=", "518", 1.0) == "518"
    assert staged_output(None, "鼠", 0.0) == "鼠"


def _pairs() -> list[Pair]:
    return [
        Pair("37 × 14 = ?", "518", "arithmetic", "train"),
        Pair("猪后面是什么？", "鼠", "zodiac", "train"),
    ]


def test_internalizer_encodes_each_fraction_and_refuses_what_it_cannot_train() -> None:
    pairs = _pairs()
    tok = batching.build_tokenizer([*pairs, Pair("10 + 2 = ?", "12", "arithmetic", "train")])
    it = Internalizer(Schedule(1, 1), pairs, tok, max_src_len=40, max_tgt_len=24)
    assert it.stepped == 1
    full = it.examples(0.0, batching.encode_pairs)
    assert tok.decode(list(full[0].out)) == "148+370=518" and tok.decode(list(full[1].out)) == "鼠"
    assert it.examples(1.0, batching.encode_pairs) == batching.encode_pairs(
        pairs, tok, max_src_len=40, max_tgt_len=24
    )
    with pytest.raises(ConfigError, match="over --max-tgt-len 8"):
        Internalizer(Schedule(1, 1), pairs, tok, max_src_len=40, max_tgt_len=8)
    no_plus = batching.build_tokenizer(pairs)  # no "+" anywhere in this data
    with pytest.raises(DataError, match="no token for a character"):
        Internalizer(Schedule(1, 1), pairs, no_plus, max_src_len=40, max_tgt_len=24)


def test_apt_train_trains_each_epoch_on_its_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "d.json"
    write_dataset(generate("hardcore", size="small"), data)
    seen: list[list[tuple[str, str]]] = []  # per epoch: (target, plain answer) of each row with steps

    def recording_epoch(self: Any, progress: Any) -> dict[str, Any]:
        # What the batcher will cut this epoch's batches from: the targets of the rows with steps.
        rows = zip(
            self.train_batcher.examples, self._internalizer.prefixes, self._internalizer.pairs, strict=True
        )
        seen.append([(self.tok.decode(list(e.out)), p.output) for e, prefix, p in rows if prefix])
        return real_epoch(self, progress)

    real_epoch = loop._Trainer._train_epoch
    monkeypatch.setattr(loop._Trainer, "_setup", loop._Trainer._setup)  # restored after the test
    monkeypatch.setattr(loop._Trainer, "_train_epoch", recording_epoch)
    install(Schedule(full=1, ramp=1))
    run = tmp_path / "run"
    argv = ["train", "--backend", "playground", "--preset", "tiny", "--dataset", str(data), "--save-dir", str(run),
            "--epochs", "3", "--no-tracking", "--no-progress", "--device", "cpu", "--compile", "off"]  # fmt: skip
    from apt_model.cli import main as apt_main

    assert apt_main(argv) == 0
    stages = json.loads((run / STAGES_FILE).read_text())["stages"]
    assert [(s["from_epoch"], s["fraction"]) for s in stages] == [(1, 0.0), (2, 0.5), (3, 1.0)]
    whole, half, last = seen
    assert whole and all(t.count("+") == 1 and t.endswith(f"={p}") for t, p in whole)
    assert all(len(p) < len(t) < len(w) and t.endswith(p) for (t, p), (w, _) in zip(half, whole, strict=True))
    assert all(t == p for t, p in last)  # the plain answers: nothing of the steps is left
    assert stages[0]["mean_stepped_target_chars"] > stages[1]["mean_stepped_target_chars"]


def test_main_needs_the_train_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--full", "1", "--ramp", "1", "--", "verify"])
    assert exc.value.code == 2 and "-- train" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--full", "-1", "--ramp", "1", "--", "train"])
    assert exc.value.code == 2 and "must be >= 0" in capsys.readouterr().err
