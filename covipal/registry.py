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
a replaced champion gets ``superseded_by`` and the new one ``previous_champion``.
Serving loads ``models:/covipal-ppm@champion`` (:func:`load_ppm`).

Integrity: the version records the SHA-256 of each PPM file (tags ``sha256.<file>``,
and ``sha256`` in the pyfunc's model config); :func:`load_ppm` and the pyfunc refuse
files that do not match. Registration is idempotent per ``registration_key`` (the
training run): retried after a failure (e.g. the tracking server was down), it finishes
the version it started instead of registering a second one.

Promotion and rollback by hand, one command each::

    python -m covipal.registry promote --version 3 --reason "passed the A/B test"
    python -m covipal.registry rollback --reason "latency regression"
    python -m covipal.registry show

mlflow is imported inside the functions only.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

MODEL_NAME = "covipal-ppm"
PYFUNC_FILE = Path(__file__).with_name("ppm_pyfunc.py")
KEY_TAG = "registration_key"
SHA_TAG = "sha256."  # + file name


class RegistryUnavailableError(RuntimeError):
    """The MLflow tracking server could not be reached (after MLflow's own HTTP retries)."""


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


PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "sources")  # git-tracked files the stages themselves rewrite


def code_commit(root: str | Path = ".") -> str:
    """``git rev-parse HEAD`` of ``root``, or ``unknown``; ``+dirty`` if tracked files other than the
    pipeline's own outputs (:data:`PIPELINE_OUTPUTS`) differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        exclude = [f":(exclude){p}" for p in PIPELINE_OUTPUTS]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *exclude],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
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


def _signature(d_model: int, reserve_ratio: float):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, d_model), "vision"),
                     TensorSpec(np.dtype(np.float32), (-1, -1, d_model), "text"),
                     TensorSpec(np.dtype(bool), (-1, -1), "vision_mask"),
                     TensorSpec(np.dtype(bool), (-1, -1), "text_mask")])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, -1), "scores"),
                      TensorSpec(np.dtype(np.int64), (-1, -1), "keep")])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("reserve_ratio", "double", float(reserve_ratio))]))


def _champion_value(client, name: str, metric: str, exclude: str | None = None) -> tuple[str | None, float | None]:
    number = _champion(client, name)
    if number is None or number == str(exclude):
        return None, None
    champion = client.get_model_version(name, number)
    tag = champion.tags.get(f"metric.{metric}")
    if tag is not None:
        return champion.version, float(tag)
    if champion.run_id:
        value = client.get_run(champion.run_id).data.metrics.get(metric)
        return champion.version, value
    return champion.version, None


def _champion(client, name: str) -> str | None:
    """The version holding ``champion``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def _remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _reachable(client, uri: str) -> None:
    """Raise :class:`RegistryUnavailableError` if the tracking server at ``uri`` does not answer."""
    if not _remote(uri):
        return
    try:
        client.search_registered_models(max_results=1)
    except Exception as err:  # requests' ConnectionError, MlflowException after MLflow's retries
        raise RegistryUnavailableError(
            f"the MLflow tracking server {uri} is unreachable ({type(err).__name__}: {str(err)[:300]}); "
            "start it (mlflow server, docs/operations.md) or point MLFLOW_TRACKING_URI at a running one, then "
            "rerun: registration resumes without registering the PPM twice. MLflow retried "
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES times") from err


def _version_with_key(client, name: str, key: str):
    """The version of ``name`` registered under ``key`` (a retried registration), or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.{KEY_TAG} = '{key}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def register_ppm(ppm_dir: str | Path, *, metrics: dict[str, float], metric: str, base_model: str,
                 guide_layer: int, reserve_ratio: float, data_version: str, commit: str | None = None,
                 name: str = MODEL_NAME, tracking_uri: str | None = None, experiment: str = "covipal",
                 tags: dict[str, str] | None = None, registration_key: str | None = None) -> Registration:
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
        Lineage tags of the version (``reserve_ratio`` is also the served default).
    commit : str, optional
        Code commit tag; default :func:`code_commit` of the working directory.
    tracking_uri : str, optional
        Registry location (a database such as ``sqlite:///mlflow.db`` or a server
        ``http://host:5000``); default MLflow's current one. An active run is used if there
        is one, otherwise a run named ``register`` is opened in ``experiment``.
    tags : dict, optional
        More version tags.
    registration_key : str, optional
        Identifies this training run: if a version with this key exists (an earlier attempt
        failed after creating it), that version is completed instead of adding another.

    Raises
    ------
    RegistryUnavailableError
        The tracking server cannot be reached; nothing was registered by this call, or the
        version it started is completed by the next call with the same key.
    """
    import mlflow
    from mlflow import MlflowClient

    from covipal.ppm import PPM

    if metric not in metrics:
        raise ValueError(f"promotion metric {metric!r} is not among the metrics {sorted(metrics)}")
    ppm_dir = Path(ppm_dir)
    d_model = PPM.from_pretrained(ppm_dir).config.d_model  # also checks the folder is a valid PPM
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    client = MlflowClient()
    _reachable(client, uri)
    try:
        version = _version_with_key(client, name, registration_key) if registration_key else None
        if version is not None and version.tags.get("promotion"):  # registered completely before
            champion = client.get_model_version_by_alias(name, "champion").version
            return Registration(name=name, version=str(version.version), model_uri=version.source,
                                run_id=version.run_id, promoted=version.tags["promotion"] == "promoted",
                                reason=version.tags["promotion_reason"], champion=str(champion))
        if version is None:
            version = _log_and_register(ppm_dir, d_model, metrics, name, experiment, reserve_ratio, {
                "base_model": base_model, "guide_layer": str(guide_layer), "reserve_ratio": str(reserve_ratio),
                "data_version": data_version, "code_commit": commit or code_commit(),
                **{f"metric.{k}": repr(float(v)) for k, v in metrics.items()}, **(tags or {}),
                **({KEY_TAG: registration_key} if registration_key else {})})
        number = str(version.version)
        client.set_registered_model_alias(name, "challenger", number)
        champion_version, champion_value = _champion_value(client, name, metric, exclude=number)
        promoted, reason = decide(metric, float(metrics[metric]), champion_value, champion_version)
        if promoted:
            client.set_registered_model_alias(name, "champion", number)
            if champion_version is not None:
                client.set_model_version_tag(name, champion_version, "superseded_by", number)
                client.set_model_version_tag(name, number, "previous_champion", str(champion_version))
        client.set_model_version_tag(name, number, "promotion_reason", reason)
        client.set_model_version_tag(name, number, "promotion", "promoted" if promoted else "kept_champion")
    except Exception as err:
        if _remote(uri):
            _reachable(client, uri)  # a server that went away mid-way gets the clear error
        raise
    return Registration(name=name, version=number, model_uri=version.source, run_id=version.run_id,
                        promoted=promoted, reason=reason, champion=number if promoted else str(champion_version))


def _log_and_register(ppm_dir: Path, d_model: int, metrics: dict, name: str, experiment: str,
                      reserve_ratio: float, version_tags: dict):
    """Log the PPM as a pyfunc (its checksums in the model config) in the active or a new run; register it
    with ``version_tags`` plus the checksums."""
    import mlflow
    import torch

    from covipal.ppm import file_checksums

    active = mlflow.active_run()
    if active is None:
        mlflow.set_experiment(experiment)
    sums = file_checksums(ppm_dir)
    with (mlflow.start_run(run_name="register") if active is None else nullcontext(active)):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        info = mlflow.pyfunc.log_model(
            name="ppm", python_model=str(PYFUNC_FILE), artifacts={"ppm": str(ppm_dir)},
            signature=_signature(d_model, reserve_ratio),
            model_config={"reserve_ratio": float(reserve_ratio), "sha256": sums},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors",
                              f"mlflow=={mlflow.__version__}"])
    version_tags = {**version_tags, **{SHA_TAG + f: h for f, h in sums.items()}}
    return mlflow.register_model(info.model_uri, name, tags=version_tags)


# --- consumers and operators ---------------------------------------------------------------


def _client(tracking_uri: str | None):
    import mlflow
    from mlflow import MlflowClient

    from covipal.tracking import tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri), uri


def resolve(client, model_uri: str):
    """The model version behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        raise ValueError(f"{model_uri!r} is not a registry URI; use models:/<name>@<alias> or models:/<name>/<version>")
    ref = model_uri[len("models:/"):].rstrip("/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, number = ref.rpartition("/")
        return client.get_model_version(name, number)
    except MlflowException as err:
        raise LookupError(f"{model_uri} is not in the registry at {client.tracking_uri} ({err.message}); "
                          "check the name and alias/version with `python -m covipal.registry show`") from None


def load_ppm(model_uri: str = f"models:/{MODEL_NAME}@champion", *, reserve_ratio: float | None = None,
             tracking_uri: str | None = None):
    """A ready-to-use CoViPAL pruner for the registered PPM ``model_uri``.

    >>> pruner = load_ppm("models:/covipal-ppm@champion")
    >>> with pruner(model):
    ...     model.generate(**inputs)

    The PPM files are downloaded and checked against the SHA-256 sums the registry recorded
    at registration (a corrupt or tampered file is refused with ``ValueError``); the
    weights are safetensors, nothing is unpickled. ``reserve_ratio`` defaults to the one
    the version was trained for. ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI`` or
    the project's ``sqlite:///mlflow.db``. A local PPM folder is accepted too.
    """
    import mlflow

    from covipal.ppm import PPM, verify_checksums
    from covipal.pruning import get_method

    if Path(model_uri).is_dir():
        ppm, ratio = PPM.from_pretrained(model_uri), reserve_ratio
    else:
        client, _ = _client(tracking_uri)
        version = resolve(client, model_uri)
        expected = {k[len(SHA_TAG):]: v for k, v in version.tags.items() if k.startswith(SHA_TAG)}
        if not expected:
            raise ValueError(f"{version.name} v{version.version} records no checksums (sha256.* tags); "
                             "re-register it with covipal.registry.register_ppm")
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}",
                                                                 dst_path=tmp))
            folder = model_dir / _ppm_path(model_dir, f"{version.name} v{version.version}")
            verify_checksums(folder, expected, f"{version.name} v{version.version}")
            ppm = PPM.from_pretrained(folder)
        ratio = reserve_ratio if reserve_ratio is not None else float(version.tags.get("reserve_ratio", 0.25))
    return get_method("covipal", ppm=ppm, reserve_ratio=0.25 if ratio is None else ratio)


def _ppm_path(model_dir: Path, what: str) -> str:
    """Where the pyfunc in ``model_dir`` keeps its ``ppm`` artifact (from its MLmodel file)."""
    import yaml

    try:
        spec = yaml.safe_load((model_dir / "MLmodel").read_text())
        return spec["flavors"]["python_function"]["artifacts"]["ppm"]["path"]
    except (OSError, KeyError, TypeError) as err:
        raise ValueError(f"{what} is not a covipal PPM model (no `ppm` artifact in its MLmodel: {err}); "
                         "register PPMs with covipal.registry.register_ppm") from None


def promote(version: str, reason: str, name: str = MODEL_NAME, tracking_uri: str | None = None) -> str:
    """Point ``champion`` at ``version`` by hand; record the reason. Returns the previous champion (or "")."""
    client, _ = _client(tracking_uri)
    target = resolve(client, f"models:/{name}/{version}")
    previous = _champion(client, name)
    if str(previous) == str(target.version):
        raise ValueError(f"{name} v{version} is already the champion")
    client.set_registered_model_alias(name, "champion", str(target.version))
    if previous is not None:
        client.set_model_version_tag(name, previous, "superseded_by", str(target.version))
        client.set_model_version_tag(name, str(target.version), "previous_champion", str(previous))
    client.set_model_version_tag(name, str(target.version), "promotion_reason", f"promoted by hand: {reason}")
    client.set_model_version_tag(name, str(target.version), "promotion", "promoted_by_hand")
    return "" if previous is None else str(previous)


def rollback(reason: str, name: str = MODEL_NAME, tracking_uri: str | None = None) -> str:
    """Give ``champion`` back to the version it replaced (tag ``previous_champion``); returns that version."""
    client, _ = _client(tracking_uri)
    current = resolve(client, f"models:/{name}@champion")
    previous = current.tags.get("previous_champion")
    if not previous:
        raise ValueError(f"{name} v{current.version} replaced no earlier champion, so there is nothing to roll "
                         "back to; choose a version with `python -m covipal.registry promote --version N`")
    client.set_registered_model_alias(name, "champion", previous)
    client.set_model_version_tag(name, current.version, "promotion", "rolled_back")
    client.set_model_version_tag(name, current.version, "rollback_reason", reason)
    client.set_model_version_tag(name, previous, "promotion_reason", f"restored by rollback from v{current.version}: "
                                 f"{reason}")
    return previous


def show(name: str = MODEL_NAME, tracking_uri: str | None = None) -> list[dict]:
    """Every version of ``name``: aliases, promotion, reason, metrics and lineage tags (newest first)."""
    client, _ = _client(tracking_uri)
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version))
    aliases = client.get_registered_model(name).aliases  # {alias: version}
    return [{"version": str(v.version), "aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version)),
             **dict(sorted(v.tags.items()))} for v in versions]


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


def main(argv: list[str] | None = None) -> None:
    import json

    parser = argparse.ArgumentParser(prog="python -m covipal.registry", description="Operate the PPM registry.")
    parser.add_argument("--name", default=MODEL_NAME, help=f"registered model (default {MODEL_NAME})")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("promote", help="make a version the champion")
    p.add_argument("--version", required=True)
    p.add_argument("--reason", default="no reason given")
    r = sub.add_parser("rollback", help="give champion back to the version the current one replaced")
    r.add_argument("--reason", default="no reason given")
    sub.add_parser("show", help="list versions with aliases, promotion reasons and metrics")
    args = parser.parse_args(argv)
    if args.command == "promote":
        previous = promote(args.version, args.reason, args.name, args.tracking_uri)
        print(f"{args.name}: champion is now v{args.version} (was {'v' + previous if previous else 'none'})")
    elif args.command == "rollback":
        restored = rollback(args.reason, args.name, args.tracking_uri)
        print(f"{args.name}: champion rolled back to v{restored}")
    else:
        print(json.dumps(show(args.name, args.tracking_uri), indent=2))


if __name__ == "__main__":
    main()
