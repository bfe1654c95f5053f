"""Stage 1: generate the HLBD dataset, cached by generator version + parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from apt_model.cache import cache_key
from apt_model.pipeline_params import PipelineParams
from tasks.common import cache_for, retry_unless_config_error

DATASET_FILE = "hlbd.json"


def data_key(params: PipelineParams) -> tuple[str, dict[str, Any]]:
    from apt_model.data import GENERATOR_VERSION

    payload = {"generator_version": GENERATOR_VERSION, **params.data_payload()}
    return cache_key("data", payload), payload


def build_dataset(params: PipelineParams, log: Any = None) -> dict[str, Any]:
    """The data stage without Prefect: returns the manifest (``cache_hit`` says whether anything was generated)."""
    from apt_model.data import generate, write_dataset

    key, payload = data_key(params)

    def build(work: Path) -> dict[str, Any]:
        if log:
            log.info(
                "generating HLBD %s (seed=%s, size=%s)",
                params.dataset_kind,
                params.dataset_seed,
                params.dataset_size,
            )
        doc = generate(
            params.dataset_kind,
            seed=params.dataset_seed,
            size=params.dataset_size,
            val_fraction=params.val_fraction,
        )
        write_dataset(doc, work / DATASET_FILE)
        meta = doc.get("metadata", {}) if isinstance(doc, dict) else {}
        counts = {
            k: meta[k] for k in ("total_samples", "per_split", "per_module", "split_counts") if k in meta
        }
        return {"params": payload, "counts": counts}

    outcome = cache_for(params).get_or_build(
        "data",
        key,
        build,
        refresh=params.refresh,
        on_wait=(lambda e: log.info("waiting for another run building %s", e.dir)) if log else None,
    )
    path = outcome.dir / DATASET_FILE
    return {
        "stage": "data",
        "path": str(path),
        "sha256": outcome.manifest["files"][DATASET_FILE],
        "key": key,
        "cache_hit": outcome.hit,
        "cache_reason": outcome.reason,
        "params": payload,
        "counts": outcome.manifest["meta"].get("counts", {}),
    }


@task(
    name="generate-hlbd",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_config_error,
    cache_policy=NO_CACHE,
)
def generate_hlbd(params: PipelineParams) -> Any:
    log = get_run_logger()
    manifest = build_dataset(params, log)
    if manifest["cache_hit"]:
        log.info(
            "cache hit: data %s (sha256 %s verified) at %s",
            manifest["key"],
            manifest["sha256"][:12],
            manifest["path"],
        )
        return Completed(name="Cached", message=f"verified cache hit {manifest['key']}", data=manifest)
    log.info(
        "generated %s (%s); sha256 %s", manifest["path"], manifest["cache_reason"], manifest["sha256"][:12]
    )
    return manifest
