"""The retrain deployment's last stages: find the champion, decide, register and (maybe) promote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from apt_model.errors import AptError
from apt_model.pipeline_params import PipelineParams
from tasks.common import retry_unless_config_error
from tasks.promotion import decide, download_champion, get_champion, register_candidate

_RETRY = dict(
    retries=2, retry_delay_seconds=3, retry_condition_fn=retry_unless_config_error, cache_policy=NO_CACHE
)


@task(name="find-champion", **_RETRY)
def find_champion(params: PipelineParams) -> dict[str, Any] | None:
    log = get_run_logger()
    champion = get_champion(params.tracking_uri(), params.model_name)
    if champion is None:
        log.info("no %r model has the champion alias yet", params.model_name)
        return None
    local = download_champion(champion, params.root / "champions")
    log.info("champion: %s v%s (%s)", params.model_name, local["version"], local["dir"])
    return local


@task(name="promote", **_RETRY)
def promote_stage(
    params: PipelineParams,
    data: dict[str, Any],
    trained: dict[str, Any],
    verification: dict[str, Any],
    champion: dict[str, Any] | None,
    run_dir: str,
    run_name: str,
) -> dict[str, Any]:
    from tasks.evaluate import run_verification

    log = get_run_logger()
    champion_exact: float | None = None
    champion_note = ""
    if champion is not None:
        # Re-measure the champion on exactly the candidate's data and split: accuracies from different data
        # are not comparable.
        try:
            cv = run_verification(params, data, champion["dir"], Path(run_dir) / "champion_verification")
            champion_exact = float(cv["overall"]["exact"])
            champion_note = f"re-verified on this run's {cv['split']} split"
        except AptError as exc:
            champion_exact = float(champion["tags"].get("exact") or 0.0)
            champion_note = f"could not re-verify ({exc}); using its recorded accuracy"
        log.info("champion v%s exact %.4f (%s)", champion["version"], champion_exact, champion_note)
    decision = decide(
        float(verification["overall"]["exact"]),
        bool(verification["gate"]["passed"]),
        champion_exact,
        tolerance=params.promote_tolerance,
    )
    reg = register_candidate(
        params.tracking_uri(),
        experiment=params.experiment,
        model_name=params.model_name,
        trained=trained,
        verification=verification,
        decision=decision,
        champion=champion,
        run_name=f"promotion-{run_name}",
    )
    verdict = "PROMOTED to champion" if decision.promote else "NOT promoted"
    log.info("%s: %s v%s — %s", verdict, params.model_name, reg["version"], decision.reason)
    md = [
        f"# Promotion: {verdict}",
        "",
        f"- model: `{params.model_name}` version **{reg['version']}** (tag `outcome={reg['outcome']}`)",
        f"- reason: {decision.reason}",
        f"- candidate exact match: {decision.candidate:.4f}",
        f"- champion exact match: {'—' if decision.champion is None else f'{decision.champion:.4f}'}"
        + (f" (v{champion['version']}, {champion_note})" if champion else ""),
        f"- gate passed: {verification['gate']['passed']}",
        f"- MLflow run: `{reg['run_id']}`",
    ]
    create_markdown_artifact(
        "\n".join(md), key="apt-promotion", description=f"promotion decision: {reg['outcome']}"
    )
    from tasks.evaluate import mlflow_run_link

    url, hint = mlflow_run_link(params.tracking_uri(), reg["run_id"])
    create_link_artifact(
        url,
        link_text=f"MLflow promotion run ({reg['outcome']})",
        key="apt-mlflow-promotion",
        description=hint,
    )
    return {"stage": "promote", **reg, "decision": decision.to_dict()}
