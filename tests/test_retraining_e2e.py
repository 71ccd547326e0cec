"""Retraining that follows new data, on a real Prefect server (localhost) with the tests' tiny parameters.

``data.source`` is a folder of digit-world batches (``python -m covipal.world.incoming``). Every
run is started through the served deployment:

1. the first run trains everything;
2. a batch lands; the next run reruns from ``prepare`` and its registered PPM names the new data
   version, while a ``make run`` (``python pipelines/flow.py``) started meanwhile waits for the
   workspace and then finds everything up to date;
3. with nothing new, a run trains nothing, says so, and takes under a minute;
4. a bad batch (a test row copied into train) fails the run at ``prepare`` with the row named,
   and the outputs of run 2 stay as they were.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_incoming import bad_copy
from test_operations_e2e import BIN, Services, artifact, free_port, get, parse, post, terminal, wait_for

from covipal.io import content_hash
from covipal.world.incoming import MANIFEST
from test_pipeline_e2e import make_project, registry_tags, sh


def drop(proj: Path, rows: int) -> None:
    done = sh(proj, sys.executable, "-m", "covipal.world.incoming", "--to", "data/incoming", "--rows", str(rows))
    assert done.returncode == 0, done.stdout + done.stderr


def data_version(proj: Path) -> str | None:
    """The data version the sources stage recorded last (None while it is being written)."""
    try:
        return json.loads((proj / "sources" / "data.json").read_text())["version"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


@pytest.mark.timeout(1200)
def test_new_data_retrains_nothing_new_does_not_and_a_bad_drop_stops_at_prepare(tmp_path):
    services = Services(tmp_path / "logs")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "DVC_NO_ANALYTICS": "1", "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own SQLite store
    try:
        services.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                          "--port", str(port)], env, tmp_path)
        services.wait_http("prefect-server", f"{api}/health", 180)
        proj = make_project(tmp_path / "proj")
        params = yaml.safe_load((proj / "params.yaml").read_text())
        params["data"]["source"] = "data/incoming"
        params["ops"].update(deployment="retrain-on-data", schedule={"cron": "0 3 * * 0", "timezone": "UTC"})
        (proj / "params.yaml").write_text(yaml.safe_dump(params))
        drop(proj, 48)
        serve = services.start("serve", [sys.executable, "pipelines/flow.py", "serve"], env, proj)
        deployment = wait_for(lambda: get(api, "/deployments/name/covipal-pipeline/retrain-on-data"), 120,
                              services, serve)

        def start() -> str:
            return post(api, f"/deployments/{deployment['id']}/create_flow_run", {})["id"]

        def finish(run_id: str) -> dict:
            return wait_for(lambda: terminal(api, run_id), 600, services, serve)

        # 1: everything trains
        first = finish(start())
        assert first["state"]["type"] == "COMPLETED", first["state"]
        assert "| stage2 | ran |" in artifact(api, first["id"])
        data_v1 = json.loads((proj / "sources" / "data.json").read_text())["version"]
        assert json.loads((proj / "metrics" / "register.json").read_text())["version"] == 1

        # 2: a batch lands; the deployment's run retrains from prepare while `make run` waits its turn
        drop(proj, 16)
        second_id = start()
        wait_for(lambda: (get(api, f"/flow_runs/{second_id}") or {}).get("state", {}).get("type") == "RUNNING",
                 120, services, serve)
        # the run holds the workspace once its sources stage has seen the new batch; training is still ahead
        wait_for(lambda: data_version(proj) not in (None, data_v1), 120, services, serve)
        adhoc = subprocess.run([sys.executable, "pipelines/flow.py"], cwd=proj, env=env, capture_output=True,
                               text=True, timeout=900)
        second = finish(second_id)
        assert second["state"]["type"] == "COMPLETED", second["state"]
        summary = artifact(api, second_id)
        assert "| prepare | ran |" in summary and "| stage2 | ran |" in summary, summary
        data_v2 = json.loads((proj / "sources" / "data.json").read_text())["version"]
        assert data_v2 != data_v1 and json.loads((proj / "metrics" / "prepare.json").read_text())["train"]["rows"] == 64
        assert json.loads((proj / "metrics" / "register.json").read_text())["version"] == 2
        assert registry_tags(proj, "2")["data_version"] != registry_tags(proj, "1")["data_version"]
        log = adhoc.stdout + adhoc.stderr
        assert adhoc.returncode == 0, log[-4000:]
        assert "waiting for the workspace" in log and "nothing new" in log, log[-4000:]

        # 3: nothing new
        third = finish(start())
        assert third["state"]["type"] == "COMPLETED" and "nothing new" in artifact(api, third["id"])
        assert (parse(third["end_time"]) - parse(third["start_time"])).total_seconds() < 60
        assert json.loads((proj / "metrics" / "register.json").read_text())["version"] == 2

        # 4: a bad batch fails at prepare; run 2's outputs stay
        kept = {p: content_hash(proj / p) for p in ("data/world", "models/ppm", "metrics/register.json")}

        def damage(rows):
            rows["train"].append({**rows["test"][0]})

        bad_copy(proj / "data" / "incoming", tmp_path / "bad", damage)
        (tmp_path / "bad" / MANIFEST).write_text((proj / "data" / "incoming" / MANIFEST).read_text())
        (proj / "data" / "incoming").rename(tmp_path / "good")
        (tmp_path / "bad").rename(proj / "data" / "incoming")
        fourth = finish(start())
        assert fourth["state"]["type"] == "FAILED", fourth["state"]
        failure = fourth["state"]["message"] + artifact(api, fourth["id"])
        assert "prepare" in failure and "repeats train row 64" in failure, failure[-3000:]
        assert "| base | ran |" not in artifact(api, fourth["id"])
        assert {p: content_hash(proj / p) for p in kept} == kept
    finally:
        services.stop_all()
