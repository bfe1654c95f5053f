"""Champion/challenger: the decision rule (pure) and the MLflow registry round trip (SQLite store in tmp)."""

from __future__ import annotations

import pytest

from tasks.promotion import decide


@pytest.mark.parametrize(
    "cand, gate, champ, tol, promote, reason",
    [
        (0.5, True, None, 0.0, True, "no champion yet"),
        (0.9, False, None, 0.0, False, "verification gate missed"),
        (0.9, False, 0.1, 0.0, False, "verification gate missed"),
        (0.4, True, 0.5, 0.0, False, "below the champion"),
        (0.5, True, 0.5, 0.0, True, ">= champion"),
        (0.6, True, 0.5, 0.0, True, ">= champion"),
        (0.45, True, 0.5, 0.05, True, ">= champion"),
        (0.44, True, 0.5, 0.05, False, "below the champion"),
    ],
)
def test_decide(cand, gate, champ, tol, promote, reason):
    d = decide(cand, gate, champ, tolerance=tol)
    assert d.promote is promote
    assert reason in d.reason


@pytest.mark.slow
def test_registry_both_outcomes(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from tasks.promotion import download_champion, get_champion, register_candidate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def model(tag: str) -> dict:
        d = tmp_path / tag
        (d / "final_model").mkdir(parents=True)
        (d / "final_model" / "config.json").write_text("{}")
        (d / "final_model" / "model.safetensors").write_bytes(tag.encode())
        (d / "final_model.pt").write_bytes(tag.encode())
        return {
            "export_dir": str(d / "final_model"),
            "final_model": str(d / "final_model.pt"),
            "epochs_completed": 2,
        }

    report = tmp_path / "verification_report.json"
    report.write_text("{}")
    ver = {"report_json": str(report), "gate": {"passed": True}}
    assert get_champion(uri, "m") is None
    first = register_candidate(
        uri, experiment="apt", model_name="m", trained=model("a"), verification=ver,
        decision=decide(0.6, True, None), champion=None, run_name="r1",
    )  # fmt: skip
    champ = get_champion(uri, "m")
    assert first["outcome"] == "promoted" and champ["version"] == first["version"] == "1"
    local = download_champion(champ, tmp_path / "champions")
    assert (tmp_path / "champions" / "m-v1" / "final_model.pt").read_bytes() == b"a"
    assert local["epochs"] == 2 and local["checkpoint"].endswith("final_model.pt")

    worse = register_candidate(
        uri, experiment="apt", model_name="m", trained=model("b"), verification=ver,
        decision=decide(0.4, True, 0.6), champion=local, run_name="r2",
    )  # fmt: skip
    better = register_candidate(
        uri, experiment="apt", model_name="m", trained=model("c"), verification=ver,
        decision=decide(0.7, True, 0.6), champion=local, run_name="r3",
    )  # fmt: skip
    client = MlflowClient(uri)
    assert worse["outcome"] == "rejected" and better["outcome"] == "promoted"
    assert client.get_model_version("m", worse["version"]).tags["outcome"] == "rejected"
    assert client.get_model_version("m", better["version"]).tags["outcome"] == "promoted"
    assert str(client.get_model_version_by_alias("m", "champion").version) == better["version"]
    assert client.get_run(worse["run_id"]).data.tags["apt.outcome"] == "rejected"
    assert client.get_run(worse["run_id"]).data.metrics["champion_exact"] == pytest.approx(0.6)
