"""data.source and model.source resolved to versions that cannot move, and DVC seeing them move.

The hub is a local stand-in: an HTTP server on 127.0.0.1 answering the one call the
resolution makes, huggingface_hub's revision API (``GET /api/{models,datasets}/<id>/revision/<rev>``,
JSON with the commit ``sha``; ``X-Error-Code`` headers for unknown repositories and revisions),
with ``HF_ENDPOINT`` pointed at it.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage

from covipal.config import ConfigError
from covipal.sources import folder_version, hub_commit, resolve_data, resolve_model, write_sources

SHA1, SHA2 = "1" * 40, "2" * 40


class StandInHub:
    """Branches of hub repositories (``{(kind, id): {revision: sha}}``) served like the hub's revision API."""

    def __init__(self):
        self.repos: dict[tuple[str, str], dict[str, str]] = {}
        self.calls: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                hub.calls.append(self.path)
                parts = self.path.split("?")[0].split("/")  # '', 'api', kind, owner, name, 'revision', rev
                if len(parts) != 7 or parts[1] != "api" or parts[5] != "revision":
                    return self.answer(404, {"error": "not found"}, "EntryNotFound")
                repo = hub.repos.get((parts[2], f"{parts[3]}/{parts[4]}"))
                if repo is None:
                    return self.answer(404, {"error": "Repository not found"}, "RepoNotFound")
                sha = repo.get(unquote(parts[6]))
                if sha is None:
                    return self.answer(404, {"error": "Invalid rev id"}, "RevisionNotFound")
                self.answer(200, {"id": f"{parts[3]}/{parts[4]}", "sha": sha, "siblings": []})

            def answer(self, status: int, body: dict, error_code: str | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hub(monkeypatch):
    stand_in = StandInHub()
    monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


def save_vqa(folder: Path, train: int = 6, seed: int = 0) -> None:
    from datasets import Dataset, DatasetDict, Features, Image, List, Value

    rng = np.random.default_rng(seed)
    features = Features({"image": Image(), "question": Value("string"), "answers": List(Value("string"))})

    def split(n: int, tag: str):
        return Dataset.from_dict({
            "image": [PILImage.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(n)],
            "question": [f"what is in {tag} {i}" for i in range(n)], "answers": [["a", "b"]] * n}, features=features)

    DatasetDict({"train": split(train, "train"), "validation": split(2, "val"), "test": split(2, "test")}) \
        .save_to_disk(str(folder))


def test_the_embedded_sources_resolve_without_the_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a call would fail
    records = write_sources("digit-world", "reference", "main", tmp_path)
    assert records == {"data": {"source": "digit-world", "kind": "embedded", "version": "embedded"},
                       "model": {"source": "reference", "kind": "embedded", "version": "embedded"}}
    before = (tmp_path / "sources" / "data.json").read_bytes(), (tmp_path / "sources" / "model.json").read_bytes()
    write_sources("digit-world", "reference", "main", tmp_path)
    assert ((tmp_path / "sources" / "data.json").read_bytes(), (tmp_path / "sources" / "model.json").read_bytes()) \
        == before  # the same bytes: nothing downstream reruns


def test_a_local_folder_is_versioned_by_its_content(tmp_path):
    save_vqa(tmp_path / "vqa", train=6)
    first = resolve_data("vqa", tmp_path)
    assert first["kind"] == "folder" and first["source"] == "vqa" and first["version"].startswith("sha256:")
    assert resolve_data(str(tmp_path / "vqa"))["version"] == first["version"]  # absolute or relative: the same
    (tmp_path / "vqa" / ".cache").mkdir()
    (tmp_path / "vqa" / ".cache" / "x").write_text("bookkeeping")
    assert resolve_data("vqa", tmp_path) == first  # hidden bookkeeping is no new data
    save_vqa(tmp_path / "more", train=8)  # two rows more
    assert folder_version(tmp_path / "more") != first["version"]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        resolve_data("notes.txt", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no dataset_dict.json"):
        resolve_data("empty", tmp_path)
    with pytest.raises(ConfigError, match="without config.json"):
        resolve_model("empty", "main", tmp_path)


def test_a_hub_revision_resolves_to_the_commit_it_points_at(hub):
    hub.repos[("models", "org/lvlm")] = {"main": SHA1, "v1": SHA1}
    hub.repos[("datasets", "org/vqa")] = {"main": SHA1}
    assert resolve_model("org/lvlm", "main") == {"source": "org/lvlm", "kind": "hub", "requested_revision": "main",
                                                 "version": SHA1}
    assert resolve_data("org/vqa")["version"] == SHA1
    hub.repos[("models", "org/lvlm")]["main"] = SHA2  # a push upstream moves the branch
    assert resolve_model("org/lvlm", "main")["version"] == SHA2
    assert resolve_model("org/lvlm", "v1")["version"] == SHA1
    calls = len(hub.calls)
    assert hub_commit("org/lvlm", SHA1, "model", "model.source") == SHA1 and len(hub.calls) == calls  # no call
    with pytest.raises(ConfigError, match="no such revision"):
        resolve_model("org/lvlm", "nope")
    with pytest.raises(ConfigError, match=r"neither a folder .* nor a model repository"):
        resolve_model("org/missing", "main")


def test_an_unreachable_hub_is_a_transient_error(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ConnectionError, match="could not be asked which commit"):
        resolve_model("org/lvlm", "main")


def test_the_base_stage_records_the_resolved_commit(hub, tmp_path):
    from covipal.base_model import pretrained_record

    hub.repos[("models", "org/lvlm")] = {"main": SHA1}
    assert pretrained_record("org/lvlm", "main") == {"source": "org/lvlm", "revision": SHA1,
                                                     "requested_revision": "main"}
    resolved = resolve_model("org/lvlm", "main")
    hub.repos[("models", "org/lvlm")]["main"] = SHA2  # moved after the sources stage: base keeps its record
    assert pretrained_record("org/lvlm", "main", resolved)["revision"] == SHA1
    hub.repos[("models", "org/lvlm")]["v2"] = SHA2
    assert pretrained_record("org/lvlm", "v2", resolved)["revision"] == SHA2  # a record of another revision: resolved


# --- with real DVC -----------------------------------------------------------------------------


def dvc(proj: Path, *args: str):
    from test_pipeline_e2e import sh

    return sh(proj, sys.executable, "-m", "dvc", *args)


def test_dvc_sees_a_folder_gain_rows_and_a_hub_branch_move(hub, tmp_path):
    """``dvc status`` names the stage a moved source reruns once the ``sources`` stage (the first of
    every ``dvc repro``, and of the flow) has run; with nothing new, no stage but ``sources`` runs."""
    from test_pipeline_e2e import make_project, reran

    proj = make_project(tmp_path / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"]["source"] = "vqa"
    params["model"]["source"], params["model"]["revision"] = "org/lvlm", "main"
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    save_vqa(proj / "vqa", train=6)
    hub.repos[("models", "org/lvlm")] = {"main": SHA1}

    first = dvc(proj, "repro", "base")
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("sources", "prepare", "base"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    record = json.loads((proj / "models" / "base" / "pretrained.json").read_text())
    assert record == {"source": "org/lvlm", "revision": SHA1, "requested_revision": "main"}
    assert json.loads((proj / "metrics" / "prepare.json").read_text())["train"]["rows"] == 6
    assert json.loads((proj / "data" / "world" / "source.json").read_text())["version"] == \
        folder_version(proj / "vqa")

    again = dvc(proj, "repro", "base")  # nothing new: only the cheap sources stage runs
    assert again.returncode == 0 and reran(again.stdout) == ["sources"], again.stdout

    hub.repos[("models", "org/lvlm")]["main"] = SHA2  # upstream pushes to main
    assert dvc(proj, "repro", "sources").returncode == 0
    status = dvc(proj, "status", "--json")
    changed = json.loads(status.stdout)
    assert "base" in changed and "prepare" not in changed, status.stdout
    assert {"changed deps": {"sources/model.json": "modified"}} in changed["base"]
    moved = dvc(proj, "repro", "base")
    assert reran(moved.stdout) == ["sources", "base"], moved.stdout
    assert json.loads((proj / "models" / "base" / "pretrained.json").read_text())["revision"] == SHA2

    save_vqa(proj / "vqa", train=9, seed=1)  # the folder gains rows
    assert dvc(proj, "repro", "sources").returncode == 0
    changed = json.loads(dvc(proj, "status", "--json").stdout)
    assert {"changed deps": {"sources/data.json": "modified"}} in changed["prepare"], changed
    grown = dvc(proj, "repro", "base")
    assert "Running stage 'prepare'" in grown.stdout, grown.stdout
    assert json.loads((proj / "metrics" / "prepare.json").read_text())["train"]["rows"] == 9
