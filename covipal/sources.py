"""What ``data.source`` and ``model.source`` name, resolved to a version that cannot move.

The ``sources`` stage writes one small JSON record per source (``sources/data.json``,
``sources/model.json``) that ``prepare`` and ``base`` depend on. The stage runs at the start
of every ``dvc repro`` (``always_changed``) and writes the same bytes when nothing moved, so
DVC reruns a later stage exactly when its source's version changed:

=========================  ===========  ==============================================================
source                     ``kind``     ``version``
=========================  ===========  ==============================================================
``digit-world``            embedded     ``embedded``: generated from the ``data`` params (their own deps)
``reference``              embedded     ``embedded``: trained by ``base`` from the ``model`` params
a local folder             folder       ``sha256:<16 hex>`` of its files' names and bytes (hidden files
                                        such as ``.cache`` left out): rows added or removed change it
a hub id                   hub          the commit (40 hex) the requested revision points at now,
                                        asked of the hub's API (``HF_ENDPOINT`` when set); a revision
                                        that is already a commit is used as is, without the network
=========================  ===========  ==============================================================

A record holds no time or absolute path, so the same source version gives the same bytes on
every machine. A relative folder is looked up from ``root`` (the project root).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from covipal.config import ConfigError
from covipal.io import content_hash, write_json

EMBEDDED_DATA = "digit-world"
EMBEDDED_MODEL = "reference"
DATA_RECORD = Path("sources") / "data.json"
MODEL_RECORD = Path("sources") / "model.json"
_COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_data(source: str, root: str | Path | None = None) -> dict:
    """The record of ``data.source``: ``{"source", "kind", "version"}`` (module docstring)."""
    if source == EMBEDDED_DATA:
        return {"source": source, "kind": "embedded", "version": "embedded"}
    folder = _local(source, root)
    if folder is not None:
        if not (folder / "dataset_dict.json").is_file():
            raise ConfigError(f"data.source: {folder} holds no dataset_dict.json, so it is not a DatasetDict saved "
                              "with save_to_disk; point data.source at the folder save_to_disk wrote")
        return {"source": source, "kind": "folder", "version": folder_version(folder)}
    return {"source": source, "kind": "hub", "requested_revision": "main",
            "version": hub_commit(source, "main", "dataset", "data.source")}


def resolve_model(source: str, revision: str | None, root: str | Path | None = None) -> dict:
    """The record of ``model.source`` at ``model.revision``: ``{"source", "kind", "version"}`` and,
    for a pretrained model, ``requested_revision`` (module docstring)."""
    if source == EMBEDDED_MODEL:
        return {"source": source, "kind": "embedded", "version": "embedded"}
    folder = _local(source, root)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.source {source!r} is a folder without config.json, not a saved checkpoint: "
                              "point it at the folder save_pretrained (or `hf download --local-dir`) wrote")
        return {"source": source, "kind": "folder", "requested_revision": revision, "version": folder_version(folder)}
    return {"source": source, "kind": "hub", "requested_revision": revision,
            "version": hub_commit(source, revision, "model", "model.source")}


def folder_version(folder: str | Path) -> str:
    """``sha256:<16 hex>`` of the files under ``folder`` (names and bytes; hidden files left out)."""
    return "sha256:" + content_hash(folder, skip_hidden=True)


def hub_commit(repo_id: str, revision: str | None, repo_type: str, key: str) -> str:
    """The commit ``revision`` (a branch, tag or commit) of hub repository ``repo_id`` points at now.

    A 40-hex ``revision`` is a commit already and is returned without asking the hub. A
    repository or revision the hub does not know is a :class:`ConfigError` naming ``key``;
    a hub that cannot be reached is a ``ConnectionError`` (transient: a retry may succeed).
    """
    revision = revision or "main"
    if _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    what = f"{key} {repo_id!r} at revision {revision!r}"
    try:
        info = api.repo_info(repo_id, revision=revision, repo_type=repo_type)
    except RevisionNotFoundError:
        raise ConfigError(f"{what}: the hub ({api.endpoint}) has no such revision; set the revision to a branch, "
                          "tag or commit of the repository") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{what}: neither a folder (looked in the project root) nor a {repo_type} repository the "
                          f"hub ({api.endpoint}) knows; fix the path or the id, or log in (`hf auth login`) for a "
                          "private repository") from None
    except OfflineModeIsEnabled:
        raise ConfigError(f"{what}: HF_HUB_OFFLINE is set, so the revision cannot be resolved to a commit; unset it, "
                          "or pin the revision to a commit (40 hex digits)") from None
    except Exception as err:  # HfHubHTTPError, or the HTTP client's own connection and timeout errors
        raise ConnectionError(f"{what}: the hub ({api.endpoint}) could not be asked which commit it is "
                              f"({type(err).__name__}: {err}); retry when it is reachable, or pin the revision to a "
                              "commit (40 hex digits)") from err
    if not info.sha:
        raise ConnectionError(f"{what}: the hub ({api.endpoint}) answered without a commit sha")
    return info.sha


def _local(source: str, root: str | Path | None) -> Path | None:
    """The folder ``source`` names (relative to ``root``), or None when there is none (a hub id)."""
    path = Path(source).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{source!r} is a file, not a folder or a hub id; point it at a folder")
    return None


def write_sources(data_source: str, model_source: str, model_revision: str, root: str | Path) -> dict:
    """Resolve both sources and write their records under ``root`` (only bytes that differ change
    a file's content, so a stage depending on it reruns exactly when its source moved)."""
    root = Path(root)
    records = {"data": resolve_data(data_source, root), "model": resolve_model(model_source, model_revision, root)}
    write_json(root / DATA_RECORD, records["data"])
    write_json(root / MODEL_RECORD, records["model"])
    return records


def read_record(path: str | Path) -> dict | None:
    """A record written by :func:`write_sources`, or None when there is none."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def describe(record: dict) -> str:
    """``source@version`` (with the requested revision of a hub source), for logs and summaries."""
    asked = record.get("requested_revision")
    pinned = record["kind"] == "hub" and asked and asked != record["version"]
    return f"{record['source']}@{record['version']}" + (f" ({asked})" if pinned else "")
