"""MLflow tracking for pipeline stages; mlflow is imported only inside these functions."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SQLITE = "sqlite:///"
PARENT_ENV = "COVIPAL_PARENT_RUN_ID"


def tracking_uri(configured: str = "sqlite:///mlflow.db", root: Path | str = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``configured`` with a relative sqlite path made absolute against ``root``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri.startswith(SQLITE) and not uri[len(SQLITE):].startswith("/"):
        uri = SQLITE + str((Path(root) / uri[len(SQLITE):]).resolve())
    return uri


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class StageRun:
    """The active run of one stage: log metrics and artifacts to it."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def metrics(self, values: dict, step: int | None = None) -> None:
        """Log the numeric leaves of ``values`` (nested keys joined with ".")."""
        import mlflow

        numbers = {k: float(v) for k, v in flatten(values).items() if isinstance(v, (int, float))}
        mlflow.log_metrics(numbers, step=step)

    def artifact(self, path: str | Path) -> None:
        """Log a file, or every file under a directory."""
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name)
        else:
            mlflow.log_artifact(str(path))


def _experiment_id(name: str, uri: str) -> str:
    """The experiment's id, creating it; with sqlite its artifacts go to ``mlruns/`` beside the database."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith(SQLITE):
        location = (Path(uri[len(SQLITE):]).parent / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)


@contextmanager
def stage_run(stage: str, params_section: dict, experiment: str, uri: str) -> Iterator[StageRun]:
    """Run ``stage`` as an MLflow run with its params logged, nested under ``$COVIPAL_PARENT_RUN_ID`` if set."""
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=_experiment_id(experiment, uri))
    parent = os.environ.get(PARENT_ENV) or None
    with mlflow.start_run(run_name=stage, nested=parent is not None, parent_run_id=parent,
                          tags={"covipal.stage": stage}) as run:
        mlflow.log_params({k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(params_section).items()})
        yield StageRun(run.info.run_id)
