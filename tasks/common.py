"""What every stage shares: the retry rule, the cache root, per-run output folders."""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any

from apt_model.cache import Cache
from apt_model.errors import AptError
from apt_model.pipeline_params import PipelineParams

GPU_LIMIT = "apt-gpu"


def retry_unless_config_error(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn`: a user's bad input (AptError and subclasses) will fail the same way again; don't retry."""
    try:
        state.result()
    except AptError:
        return False
    except BaseException:
        return True
    return True


def cache_for(params: PipelineParams) -> Cache:
    return Cache(params.root / "cache")


def run_dir_for(params: PipelineParams, run_name: str | None) -> Path:
    """``<output_root>/pipeline/<UTC time>-<flow run name>``: one folder of reports and plots per run."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name or "local").strip("-") or "local"
    path = params.root / "pipeline" / f"{stamp}-{slug}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100] or "apt"
