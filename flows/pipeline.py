"""The `apt` flow: HLBD generation → training → verification → diagnostics → visualization (→ promotion).

Deployments read ``apt/<name>`` (``apt/full-pipeline``, ``apt/retrain``, ...). Parameters are flat so that users
type ``prefect deployment run apt/full-pipeline --param epochs=3``; they are exactly the fields of
``apt_model.pipeline_params.PipelineParams``, which validates them (building the real configs) before any stage.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import State

from apt_model.io import atomic_write_json
from apt_model.pipeline_params import parse_params
from tasks.common import GPU_LIMIT, run_dir_for
from tasks.data import generate_hlbd
from tasks.evaluate import diagnose_stage, publish_links, verify_stage, visualize_stage
from tasks.promote import find_champion, promote_stage
from tasks.train import train_model


def ensure_gpu_limit(name: str = GPU_LIMIT, limit: int = 1) -> None:
    """Create the global concurrency limit that training holds, when it does not exist (an existing one is kept)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


def _value(result: Any) -> Any:
    """A stage that returns a named state (``Cached``) may hand the flow the State itself: take its data."""
    return result.result() if isinstance(result, State) else result


@flow(
    name="apt",
    description="HLBD → train → verify → diagnose → visualize (→ promote)",
    validate_parameters=True,
)
def apt(
    backend: str = "playground",
    backend_options: dict[str, Any] | None = None,
    dataset_kind: str = "hardcore",
    dataset_seed: int = 42,
    dataset_size: str = "small",
    val_fraction: float = 0.1,
    data_overrides: dict[str, Any] | None = None,
    preset: str = "tiny",
    model_overrides: dict[str, Any] | None = None,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 3e-4,
    save_interval: int = 5,
    train_seed: int = 42,
    train_overrides: dict[str, Any] | None = None,
    train_timeout_s: int = 24 * 3600,
    train_retries: int = 2,
    verify_split: str = "val",
    verify_sample: int | None = None,
    gate_thresholds: dict[str, float] | None = None,
    output_root: str = "runs/default",
    refresh: bool = False,
    mlflow_tracking_uri: str | None = None,
    experiment: str = "apt",
    promote: bool = False,
    resume_from_champion: bool = False,
    model_name: str = "apt-hlbd",
    promote_tolerance: float = 0.0,
) -> dict[str, Any]:
    # Validate everything first: a bad parameter fails the run here, naming the field, before any stage runs.
    params = parse_params({k: v for k, v in locals().items() if v is not None})
    log = get_run_logger()
    ensure_gpu_limit()
    run_name = flow_run.get_name() or "local"
    run_dir = run_dir_for(params, run_name)
    log.info("run folder %s; backend %s; preset %s", run_dir, params.backend, params.preset)

    champion = find_champion(params) if params.promote else None
    data = _value(generate_hlbd(params))
    trained = _value(
        train_model.with_options(retries=params.train_retries)(
            params, data, champion if params.resume_from_champion else None
        )
    )
    verification = verify_stage(params, data, trained, str(run_dir))
    diagnosis = diagnose_stage(trained, data, verification, str(run_dir))
    plots = visualize_stage(trained, verification, str(run_dir))
    links = publish_links(params, trained, str(run_dir))
    promotion = (
        promote_stage(params, data, trained, verification, champion, str(run_dir), run_name)
        if params.promote
        else None
    )

    summary = {
        "run_dir": str(run_dir),
        "params": params.model_dump(),
        "data": {k: data[k] for k in ("path", "sha256", "key", "cache_hit")},
        "train": {
            k: trained.get(k)
            for k in (
                "dir",
                "key",
                "cache_hit",
                "final_model",
                "export_dir",
                "epochs_completed",
                "metrics",
                "mlflow_run_id",
            )
        },
        "verification": {k: verification[k] for k in ("report_md", "report_json", "overall", "gate")},
        "diagnosis": diagnosis,
        "dashboard": plots["dashboard"],
        "links": links,
        "promotion": promotion,
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
