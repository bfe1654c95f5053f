"""Acceptance: the tiny preset learns the default HLBD Hardcore data on CPU within a minute."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch

from apt_model.backends import TrainRequest
from apt_model.config import DataConfig, TrainConfig, model_preset
from apt_model.data import generate, write_dataset
from apt_model.training.loop import run_training
from apt_model.training.report import read_report


@pytest.mark.slow
def test_tiny_preset_halves_its_first_epoch_loss_on_default_hardcore(tmp_path: Path) -> None:
    dataset = tmp_path / "HLBD_Hardcore_Full.json"
    write_dataset(generate("hardcore", seed=0), dataset)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest and immune to a busy machine
    try:
        start = time.monotonic()
        result = run_training(
            TrainRequest(
                model=model_preset("tiny"),
                # The usual post-LN recipe: one epoch of linear warm-up (40 steps of 128), then the cosine schedule.
                train=TrainConfig(
                    epochs=5, batch_size=128, grad_accum=1, lr=5e-3, min_lr=5e-4, warmup_steps=40, log_every=1
                ),
                # The longest default-Hardcore input is 34 tokens and the longest answer 17 (+ BOS/EOS).
                data=DataConfig(max_src_len=40, max_tgt_len=24),
                dataset=dataset,
                out_dir=tmp_path / "run",
                tracking_uri="none",
                options={"progress": False},
            )
        )
        elapsed = time.monotonic() - start
    finally:
        torch.set_num_threads(threads)
    rep = read_report(result.report)
    assert rep["dataset"]["n_train"] + rep["dataset"]["n_val"] >= 5000
    # "First-epoch value": the first epoch's training loss, i.e. its mean over every step of epoch 1.
    losses = [row["train_loss"] for row in rep["epochs"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert rep["epochs"][-1]["val_token_acc"] > 0.3  # well above chance over a vocabulary of hundreds
    assert elapsed < 60, f"training took {elapsed:.0f}s"
