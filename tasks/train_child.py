"""The training subprocess: ``python -m tasks.train_child REQUEST.json``.

Runs ``get_backend(name).train(TrainRequest)`` in its own process (its own process group), so the pipeline can
kill it cleanly on cancel/timeout, and a crash (OOM, SIGKILL) leaves the checkpoints for the retried stage to
resume from. Every finished epoch is printed as one ``APT_EPOCH {json}`` line (the parent turns them into the
progress artifact); the result manifest is written atomically to ``train_result.json`` beside the checkpoints.
Exit status 2 means bad input (AptError: do not retry), 1 any other failure.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

EPOCH_PREFIX = "APT_EPOCH "
RESULT_FILE = "train_result.json"


def _watch_parent(parent: int) -> None:
    # If the pipeline process dies without killing us (SIGKILL of the worker), don't train on as an orphan.
    while True:
        time.sleep(2.0)
        if os.getppid() != parent:
            print("parent process is gone; stopping training", file=sys.stderr, flush=True)
            os._exit(1)


def main(argv: list[str]) -> int:
    from apt_model.backends import TrainRequest, get_backend
    from apt_model.errors import AptError
    from apt_model.io import atomic_write_json

    if len(argv) != 2:
        print("usage: python -m tasks.train_child REQUEST.json", file=sys.stderr)
        return 2
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        spec = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
        backend_name = spec["backend"]
        request = TrainRequest.from_dict(spec["request"])

        def on_epoch(row: dict) -> None:
            print(EPOCH_PREFIX + json.dumps(row, default=str), flush=True)

        request.on_epoch = on_epoch
        backend = get_backend(backend_name)
        backend.validate(request)
        result = backend.train(request)
        atomic_write_json(Path(request.out_dir) / RESULT_FILE, result.to_dict())
    except AptError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
