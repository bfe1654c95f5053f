"""Cosine warm restarts stepped per optimizer step; warmup; AdamW decay groups."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from apt_model.config import TrainConfig
from apt_model.training.schedule import WarmRestartSchedule, build_optimizer, param_groups, restart_epochs


def test_restart_epochs_match_the_guide() -> None:
    assert restart_epochs(10, 2, 200) == [10, 30, 70, 150]
    assert restart_epochs(10, 1, 35) == [10, 20, 30]


def _schedule(cfg: TrainConfig, steps_per_epoch: int) -> WarmRestartSchedule:
    model = torch.nn.Linear(4, 4)
    return WarmRestartSchedule(build_optimizer(model, cfg), cfg, steps_per_epoch)


def test_lr_follows_cosine_per_step_with_restarts() -> None:
    cfg = TrainConfig(lr=3e-4, min_lr=1e-5, t0=10, t_mult=2)
    s = _schedule(cfg, steps_per_epoch=4)
    lrs = [s.set_step(i) for i in range(4 * 40)]
    assert lrs[0] == pytest.approx(3e-4)
    assert all(a > b for a, b in itertools.pairwise(lrs[:40]))  # decays within the first period
    assert lrs[40] == pytest.approx(3e-4)  # restart after epoch 10
    assert lrs[120] == pytest.approx(3e-4)  # and after epoch 30 (T_mult 2)
    mid = 1e-5 + (3e-4 - 1e-5) * (1 + math.cos(math.pi * 0.5)) / 2
    assert lrs[20] == pytest.approx(mid)  # half way through the first period, fractional stepping
    assert min(lrs) >= 1e-5


def test_warmup_scales_the_first_steps_and_state_round_trips() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=0.0, t0=10, warmup_steps=4)
    s = _schedule(cfg, steps_per_epoch=10)
    cosine = _schedule(cfg.replace(warmup_steps=0), steps_per_epoch=10)
    for i, factor in enumerate([0.25, 0.5, 0.75, 1.0, 1.0]):
        assert s.set_step(i) == pytest.approx(factor * cosine.set_step(i))
    state = s.state_dict()
    s2 = _schedule(cfg, steps_per_epoch=10)
    s2.load_state_dict(state)
    assert s2.set_step(7) == s.set_step(7)
    assert s.describe(100)["stepping"] == "per_step" and s.describe(100)["restart_epochs"] == [10, 30, 70]


def test_no_weight_decay_on_biases_norms_and_embeddings() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # embedding, linear bias, LN weight + bias
    decay, no_decay = param_groups(model, 0.01, decay_embeddings=True)
    assert [p.shape for p in decay["params"]] == [torch.Size([10, 4]), torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3


def test_adamw_takes_its_betas_from_the_config_and_the_cli() -> None:
    from apt_model.cli import build_parser
    from apt_model.cli.train import build_request

    model = torch.nn.Linear(4, 4)
    assert build_optimizer(model, TrainConfig()).defaults["betas"] == (0.9, 0.999)
    cfg = TrainConfig(adam_beta1=0.8, adam_beta2=0.95)
    assert build_optimizer(model, cfg).defaults["betas"] == (0.8, 0.95)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # saved beside checkpoints, so it must round-trip
    argv = [
        "train",
        "--dataset",
        "d.json",
        "--adam-beta1",
        "0.8",
        "--adam-beta2",
        "0.95",
        "--clip-grad-norm",
        "0.5",
    ]
    request, _ = build_request(build_parser().parse_args(argv))
    assert (request.train.adam_beta1, request.train.adam_beta2, request.train.clip_grad_norm) == (
        0.8,
        0.95,
        0.5,
    )
    assert request.train.decay_embeddings is False
    request, _ = build_request(build_parser().parse_args([*argv, "--decay-embeddings"]))
    assert request.train.decay_embeddings is True
