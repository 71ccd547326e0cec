"""Attach the evaluation of a PPM to its version in the MLflow model registry.

The version is found by content: the PPM folder that ``register_ppm`` logged with each
version (``artifacts/ppm`` of the pyfunc model) is compared, by hash, with the folder
that was evaluated. mlflow is imported inside the functions only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def find_version(ppm_dir: str | Path, name: str) -> tuple[str | None, bool]:
    """``(version, is_champion)`` of the registered model ``name`` whose PPM equals ``ppm_dir``.

    Versions are tried newest first; ``(None, False)`` when none matches.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from covipal.io import content_hash

    client = MlflowClient()
    want = content_hash(ppm_dir)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None, False
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{v.version}", dst_path=tmp))
            except (MlflowException, OSError):
                continue
            logged = local / "artifacts" / "ppm"
            if logged.is_dir() and content_hash(logged) == want:
                return v.version, "champion" in (v.aliases or [])
    return None, False


def attach(name: str, version: str, tags: dict[str, str]) -> None:
    """Set ``tags`` on version ``version`` of the registered model ``name``."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
