"""The Playground backend: HLBD experiments on one local GPU (or the CPU).

It runs the shared training loop (``apt_model.training.loop``) as is: AdamW + cosine warm restarts stepped per
optimizer step, mixed precision, gradient accumulation, clipping, DBC-DAC, per-epoch validation, checkpoints
``checkpoint_epoch_{N}.pt`` + ``final_model.pt`` + ``final_model/`` export, ``experiment_report.json`` and MLflow.

Backend options (``TrainRequest.options``): ``device`` (auto | cpu | cuda[:N]), ``pad`` (bucket | fixed; default
fixed when the model is compiled), ``progress`` (bool), ``overwrite`` (bool: allow a fresh run into a save dir
that already holds one).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from apt_model.backends import TrainRequest, TrainResult
from apt_model.errors import ConfigError

OPTION_KEYS = ("device", "pad", "progress", "overwrite")


class PlaygroundBackend:
    name = "playground"
    summary = "one local GPU (or CPU): cosine warm restarts, mixed precision, accumulation, DBC-DAC"
    extra: str | None = None

    def __init__(self) -> None:
        self._prepared: tuple[str, Any] | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--device", default=None, help="playground: auto (default), cpu, cuda or cuda:N")
        parser.add_argument(
            "--pad",
            choices=("bucket", "fixed"),
            default=None,
            help="playground: batch padding; fixed = one shape for every batch (default when compiled)",
        )

    def options_from_args(self, args: argparse.Namespace) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if getattr(args, "device", None):
            opts["device"] = args.device
        if getattr(args, "pad", None):
            opts["pad"] = args.pad
        return opts

    @staticmethod
    def _key(request: TrainRequest) -> str:
        return json.dumps(request.to_dict(), sort_keys=True, default=str)

    def validate(self, request: TrainRequest) -> None:
        from apt_model.training.loop import prepare

        unknown = sorted(set(request.options) - set(OPTION_KEYS))
        if unknown:
            raise ConfigError(f"playground backend: unknown option(s) {', '.join(unknown)}")
        # The loaded data, tokenizer and checkpoint are kept so that train() does not load them twice.
        self._prepared = (self._key(request), prepare(request))

    def train(self, request: TrainRequest) -> TrainResult:
        from apt_model.training.loop import run_training

        prepared = None
        if self._prepared is not None and self._prepared[0] == self._key(request):
            prepared = self._prepared[1]
        else:
            self.validate(request)
            prepared = self._prepared[1] if self._prepared else None
        self._prepared = None
        return run_training(request, backend=self.name, prepared=prepared)
