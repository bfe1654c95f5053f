"""Stages 3–5: verify, diagnose, visualize — each writes into the run's folder and leaves artifacts on its page."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from apt_model.pipeline_params import PipelineParams
from tasks.common import retry_unless_config_error

_RETRY = dict(
    retries=1, retry_delay_seconds=2, retry_condition_fn=retry_unless_config_error, cache_policy=NO_CACHE
)


def run_verification(
    params: PipelineParams, data: dict[str, Any], model: str | Path, out_dir: Path
) -> dict[str, Any]:
    from apt_model.verify import verify_model, write_report

    report = verify_model(
        model,
        data["path"],
        split=params.verify_split,
        sample=params.verify_sample,
        thresholds=params.gate_thresholds,
    )
    paths = write_report(report, out_dir)
    d = report.to_dict()
    return {
        "stage": "verify",
        "report_json": str(paths["json"]),
        "report_md": str(paths["markdown"]),
        "model": str(model),
        "split": d["split"],
        "overall": d["overall"],
        "modules": {
            k: {"n": v["n"], "exact": v["exact"], "substring": v["substring"]}
            for k, v in d["modules"].items()
        },
        "gate": d["gate"],
        "collapsed": bool(d["collapse"].get("collapsed")),
    }


@task(name="verify", **_RETRY)
def verify_stage(
    params: PipelineParams, data: dict[str, Any], trained: dict[str, Any], run_dir: str
) -> dict[str, Any]:
    from apt_model.verify import render_markdown

    log = get_run_logger()
    out = Path(run_dir) / "verification"
    manifest = run_verification(params, data, trained["dir"], out)
    o = manifest["overall"]
    log.info(
        "exact match %.2f%% (%d/%d) on %s; gate %s",
        100 * o["exact"],
        o["exact_count"],
        o["n"],
        manifest["split"],
        "passed" if manifest["gate"]["passed"] else "MISSED",
    )
    report = json.loads(Path(manifest["report_json"]).read_text(encoding="utf-8"))
    create_markdown_artifact(
        render_markdown(report),
        key="apt-verification-report",
        description="verification report (exact match)",
    )
    rows = [
        {"module": name, "n": m["n"], "exact": round(m["exact"], 4), "substring": round(m["substring"], 4)}
        for name, m in manifest["modules"].items()
    ]
    rows.append(
        {
            "module": "overall",
            "n": o["n"],
            "exact": round(o["exact"], 4),
            "substring": round(o["substring"], 4),
        }
    )
    create_table_artifact(rows, key="apt-module-accuracy", description="per-module exact-match accuracy")
    return manifest


@task(name="diagnose", **_RETRY)
def diagnose_stage(
    trained: dict[str, Any], data: dict[str, Any], verification: dict[str, Any], run_dir: str
) -> dict:
    from apt_model.diagnose import diagnose, findings_to_json, format_findings
    from apt_model.io import atomic_write_json, atomic_write_text

    log = get_run_logger()
    findings = diagnose(
        run_dir=trained["dir"],
        dataset=data["path"],
        model=trained["dir"],
        verification=verification["report_json"],
    )
    out = Path(run_dir) / "diagnosis"
    doc = findings_to_json(findings)
    atomic_write_json(out / "findings.json", doc)
    text = format_findings(findings)
    atomic_write_text(out / "findings.txt", text)
    for f in findings:
        (log.warning if f.severity in ("error", "warning") else log.info)(
            "%s %s: %s", f.severity, f.check, f.message
        )
    md = ["# Diagnostics", "", f"{doc['counts']}", "", "```", text.rstrip(), "```"]
    create_markdown_artifact("\n".join(md), key="apt-diagnostics", description="diagnostic findings")
    return {"stage": "diagnose", "path": str(out / "findings.json"), "counts": doc["counts"], "ok": doc["ok"]}


def loss_table_markdown(history: list[dict[str, Any]]) -> str:
    def f(x: Any, spec: str) -> str:
        return format(x, spec) if isinstance(x, int | float) else "—"

    lines = ["| epoch | train loss | val loss | val token acc | lr |", "|---:|---:|---:|---:|---:|"]
    for r in history:
        lines.append(
            f"| {r.get('epoch')} | {f(r.get('train_loss'), '.4f')} | {f(r.get('val_loss'), '.4f')} | "
            f"{f(r.get('val_token_acc'), '.3f')} | {f(r.get('lr'), '.2e')} |"
        )
    return "\n".join(lines)


@task(name="visualize", **_RETRY)
def visualize_stage(trained: dict[str, Any], verification: dict[str, Any], run_dir: str) -> dict[str, Any]:
    import shutil
    import tempfile

    from apt_model.visualize import render_dashboard

    log = get_run_logger()
    out_png = Path(run_dir) / "plots" / "training_dashboard.png"
    # The dashboard reads the run folder (report + verification beside it); the cache entry stays read-only, so
    # assemble a view of both in a temp folder.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(Path(trained["dir"]) / "experiment_report.json", Path(tmp) / "experiment_report.json")
        shutil.copy2(verification["report_json"], Path(tmp) / "verification_report.json")
        render_dashboard(tmp, out_png)
    log.info("dashboard written to %s", out_png)
    png64 = base64.b64encode(out_png.read_bytes()).decode("ascii")
    md = [
        "# Training curves",
        "",
        f"![training dashboard](data:image/png;base64,{png64})",
        "",
        f"File: `{out_png}`",
        "",
        "## Loss per epoch",
        "",
        loss_table_markdown(trained.get("history", [])),
    ]
    create_markdown_artifact(
        "\n".join(md), key="apt-training-curves", description="training curves and loss table"
    )
    return {"stage": "visualize", "dashboard": str(out_png)}


def mlflow_run_link(tracking_uri: str, run_id: str, experiment_id: str | None = None) -> tuple[str, str]:
    """(URL, hint) for the MLflow run page. A SQLite store is viewed through `mlflow ui` on its default port."""
    if experiment_id is None:
        from tasks.train import _experiment_id

        experiment_id = _experiment_id(tracking_uri, run_id) or "0"
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
        hint = ""
    else:
        base = "http://127.0.0.1:5000"
        hint = f" (start the UI: mlflow ui --backend-store-uri {tracking_uri})"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}", hint


@task(name="publish-links", cache_policy=NO_CACHE)
def publish_links(params: PipelineParams, trained: dict[str, Any], run_dir: str) -> dict[str, Any]:
    log = get_run_logger()
    model = Path(trained["final_model"] or trained["dir"])
    create_link_artifact(
        model.resolve().as_uri(),
        link_text=f"checkpoint {model.name}",
        key="apt-checkpoint",
        description="final model",
    )
    if trained.get("export_dir"):
        create_link_artifact(
            Path(trained["export_dir"]).resolve().as_uri(),
            link_text="exported model (safetensors)",
            key="apt-export",
        )
    create_link_artifact(
        Path(run_dir).resolve().as_uri(), link_text="run folder (reports, plots)", key="apt-run-dir"
    )
    links: dict[str, Any] = {"checkpoint": str(model), "run_dir": run_dir}
    if trained.get("mlflow_run_id"):
        url, hint = mlflow_run_link(
            params.tracking_uri(), trained["mlflow_run_id"], trained.get("mlflow_experiment_id")
        )
        create_link_artifact(
            url, link_text=f"MLflow run {trained['mlflow_run_id']}", key="apt-mlflow-run", description=hint
        )
        log.info("MLflow run: %s%s", url, hint)
        links["mlflow"] = url
    else:
        log.warning("the backend recorded no MLflow run (tracking off or failed)")
    return links
