import pytest

from covipal.tracking import PARENT_ENV, stage_run, tracking_uri


def test_env_overrides_configured(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri("sqlite:///mlflow.db", tmp_path) == "http://tracking:5000"


def test_relative_sqlite_resolved_against_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert tracking_uri("http://host:5000", tmp_path) == "http://host:5000"


@pytest.fixture
def store(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    return tracking_uri("sqlite:///mlflow.db", tmp_path)


def test_stage_run_logs_params_metrics_artifacts(store, tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "report.txt").write_text("hi")
    with stage_run("train", {"lr": 0.1, "ds": {"stage": 2, "notes": "x" * 7000}}, "exp", store) as run:
        run.metrics({"eval": {"acc": 0.75, "name": "skipped"}, "loss": 1})
        run.artifact(tmp_path / "report.txt")
    client = MlflowClient(tracking_uri=store)
    got = client.get_run(run.run_id)
    assert got.info.run_name == "train" and got.data.tags["covipal.stage"] == "train"
    assert got.data.params["lr"] == "0.1" and got.data.params["ds.stage"] == "2"
    assert len(got.data.params["ds.notes"]) == 6000
    assert got.data.metrics == {"eval.acc": 0.75, "loss": 1.0}
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["report.txt"]
    assert got.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())


def test_nested_under_parent(store, monkeypatch):
    from mlflow import MlflowClient

    with stage_run("pipeline", {}, "exp", store) as parent:
        monkeypatch.setenv(PARENT_ENV, parent.run_id)
        with stage_run("prepare", {"n": 1}, "exp", store) as child:
            pass
    got = MlflowClient(tracking_uri=store).get_run(child.run_id)
    assert got.data.tags["mlflow.parentRunId"] == parent.run_id
