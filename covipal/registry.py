"""Publish trained PPMs to the MLflow model registry, with a champion/challenger gate.

:func:`register_ppm` logs a PPM folder (``save_pretrained`` output) as an MLflow pyfunc
model (model from code, :mod:`covipal.ppm_pyfunc`: the safetensors weights are an
artifact, nothing is pickled), registers it as a new version of ``covipal-ppm``, tags the
version with its lineage (base model, guide layer, reserve ratio, data version, code
commit) and metrics (``metric.<name>``), and points the alias ``challenger`` at it.

The alias ``champion`` moves to the new version only if its value of the named
validation metric is strictly greater than the champion's (ties and worse keep the
champion; a champion without that metric is kept too: the metrics are not comparable).
The first version becomes champion. The decision and its reason are recorded on the new
version as tags ``promotion`` (``promoted`` / ``kept_champion``) and ``promotion_reason``;
a replaced champion gets ``superseded_by``. Serving loads ``models:/covipal-ppm@champion``.

mlflow is imported inside the functions only.
"""

from __future__ import annotations

import math
import subprocess
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

MODEL_NAME = "covipal-ppm"
PYFUNC_FILE = Path(__file__).with_name("ppm_pyfunc.py")


@dataclass
class Registration:
    """Outcome of :func:`register_ppm`."""

    name: str
    version: str
    model_uri: str
    run_id: str
    promoted: bool
    reason: str
    champion: str  # version holding the alias afterwards


def code_commit(root: str | Path = ".") -> str:
    """``git rev-parse HEAD`` of ``root`` (``+dirty`` if the tree has changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def decide(metric: str, value: float, champion_value: float | None, champion_version: str | None) -> tuple[bool, str]:
    """Whether a candidate with ``value`` of ``metric`` replaces the champion, and why."""
    if champion_version is None:
        return True, f"no champion yet; {metric} = {value:.6g}"
    if champion_value is None:
        return False, f"champion v{champion_version} has no {metric}; not comparable, champion kept"
    if not math.isnan(value) and value > champion_value:
        return True, f"{metric} {value:.6g} > {champion_value:.6g} of champion v{champion_version}"
    return False, f"{metric} {value:.6g} does not beat {champion_value:.6g} of champion v{champion_version}"


def _signature(d_model: int):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, d_model), "vision"),
                     TensorSpec(np.dtype(np.float32), (-1, -1, d_model), "text"),
                     TensorSpec(np.dtype(bool), (-1, -1), "vision_mask"),
                     TensorSpec(np.dtype(bool), (-1, -1), "text_mask")])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1), "scores")]))


def _champion_value(client, name: str, metric: str) -> tuple[str | None, float | None]:
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None
    tag = champion.tags.get(f"metric.{metric}")
    if tag is not None:
        return champion.version, float(tag)
    if champion.run_id:
        value = client.get_run(champion.run_id).data.metrics.get(metric)
        return champion.version, value
    return champion.version, None


def register_ppm(ppm_dir: str | Path, *, metrics: dict[str, float], metric: str, base_model: str,
                 guide_layer: int, reserve_ratio: float, data_version: str, commit: str | None = None,
                 name: str = MODEL_NAME, tracking_uri: str | None = None, experiment: str = "covipal",
                 tags: dict[str, str] | None = None) -> Registration:
    """Log, register and (if it beats the champion on ``metric``) promote the PPM in ``ppm_dir``.

    Parameters
    ----------
    ppm_dir : str or Path
        Folder written by ``PPM.save_pretrained``.
    metrics : dict
        Validation metrics of this PPM (logged to the run and as version tags).
    metric : str
        Key of ``metrics`` that decides promotion (higher is better).
    base_model, guide_layer, reserve_ratio, data_version
        Lineage tags of the version.
    commit : str, optional
        Code commit tag; default :func:`code_commit` of the working directory.
    tracking_uri : str, optional
        Registry location (must be a database, e.g. ``sqlite:///mlflow.db``); default
        MLflow's current one. An active run is used if there is one, otherwise a run named
        ``register`` is opened in ``experiment``.
    tags : dict, optional
        More version tags.
    """
    import mlflow
    import torch
    from mlflow import MlflowClient

    from covipal.ppm import PPM

    if metric not in metrics:
        raise ValueError(f"promotion metric {metric!r} is not among the metrics {sorted(metrics)}")
    ppm_dir = Path(ppm_dir)
    d_model = PPM.from_pretrained(ppm_dir).config.d_model  # also checks the folder is a valid PPM
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    version_tags = {"base_model": base_model, "guide_layer": str(guide_layer), "reserve_ratio": str(reserve_ratio),
                    "data_version": data_version, "code_commit": commit or code_commit(),
                    **{f"metric.{k}": repr(float(v)) for k, v in metrics.items()}, **(tags or {})}

    active = mlflow.active_run()
    if active is None:
        mlflow.set_experiment(experiment)
    with (mlflow.start_run(run_name="register") if active is None else nullcontext(active)) as run:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        info = mlflow.pyfunc.log_model(
            name="ppm", python_model=str(PYFUNC_FILE), artifacts={"ppm": str(ppm_dir)},
            signature=_signature(d_model), pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                             "safetensors", f"mlflow=={mlflow.__version__}"])
        run_id = run.info.run_id
    champion_version, champion_value = _champion_value(client, name, metric)
    version = mlflow.register_model(info.model_uri, name).version
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, "challenger", version)
    promoted, reason = decide(metric, float(metrics[metric]), champion_value, champion_version)
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
        if champion_version is not None:
            client.set_model_version_tag(name, champion_version, "superseded_by", str(version))
    client.set_model_version_tag(name, version, "promotion", "promoted" if promoted else "kept_champion")
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    return Registration(name=name, version=str(version), model_uri=info.model_uri, run_id=run_id, promoted=promoted,
                        reason=reason, champion=str(version) if promoted else str(champion_version))


def attach_files(name: str, version: str, files: list[str | Path], *, tags: dict[str, str] | None = None,
                 artifact_path: str = "profile", tracking_uri: str | None = None) -> list[str]:
    """Attach ``files`` (figures, reports) to model version ``version`` of ``name``.

    The files are logged under ``artifact_path`` in the run that produced the version (the
    registration run, which holds the model), and the version is tagged with ``tags`` plus
    ``<artifact_path>.artifacts``: the files' artifact URIs, comma-separated. Returns those URIs.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = client.get_model_version(name, version).run_id
    uris = []
    for path in map(Path, files):
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
        uris.append(f"runs:/{run_id}/{artifact_path}/{path.name}")
    for key, value in {**(tags or {}), f"{artifact_path}.artifacts": ",".join(uris)}.items():
        client.set_model_version_tag(name, version, key, value)
    return uris
