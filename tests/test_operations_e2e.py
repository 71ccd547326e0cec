"""Operations end to end: a real Prefect server and a real MLflow server on localhost.

The deployment is served with a cron schedule about a minute away; a second run of it is
started for the same moment. Both complete one after the other (the deployment admits one
run at a time), the scheduled one retrains the tiny pipeline and registers the PPM on the
MLflow server, and a fresh process loads the new champion through ``covipal.load_ppm``
and ``mlflow models serve`` serves it. A run with a bad parameter fails with its cause
visible through the Prefect API (what the UI shows). Last, a drill: the MLflow server stops
answering while stage 2 registers; the stage fails with a clear error, and its rerun
resumes the finished training and registers the PPM exactly once. 4.5-6.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from test_pipeline_e2e import make_project

BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Services:
    """Background processes (own process groups, logs in files) stopped together at the end."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self.procs[name]

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)

    def tail(self, n: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-n:]}" for p in sorted(self.logs.glob("*.log")))

    def wait_http(self, name: str, url: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited early\n{self.tail()}")
            try:
                if requests.get(url, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise AssertionError(f"{name} did not answer {url} within {timeout} s\n{self.tail()}")


def next_minute(at_least: float) -> datetime:
    """The first whole UTC minute at least ``at_least`` seconds from now."""
    t = datetime.now(timezone.utc) + timedelta(seconds=at_least)
    return (t + timedelta(minutes=1)).replace(second=0, microsecond=0) if t.second or t.microsecond else t


@pytest.mark.timeout(900)
def test_scheduled_retraining_on_real_servers(tmp_path):
    services = Services(tmp_path / "logs")
    prefect_port, mlflow_port, serve_port = free_port(), free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "DVC_NO_ANALYTICS": "1", "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
    try:
        services.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                          "--port", str(prefect_port)], env, tmp_path)
        services.start("mlflow-server", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                                         str(mlflow_port), "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                                         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                       {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, tmp_path)
        services.wait_http("prefect-server", f"{api}/health", 180)
        services.wait_http("mlflow-server", f"http://127.0.0.1:{mlflow_port}/health", 180)

        proj = make_project(tmp_path / "proj")
        when = next_minute(at_least=45)  # time for `serve` to start and register the deployment
        params = yaml.safe_load((proj / "params.yaml").read_text())
        params["ops"].update(deployment="retrain-test", schedule={"cron": f"{when.minute} {when.hour} * * *",
                                                                   "timezone": "UTC"})
        (proj / "params.yaml").write_text(yaml.safe_dump(params))
        serve = services.start("serve", [sys.executable, "pipelines/flow.py", "serve"], env, proj)

        deployment = wait_for(lambda: get(api, "/deployments/name/covipal-pipeline/retrain-test"), 120, services)
        assert parse(deployment["created"]) < when, "serve started too late for the schedule; raise at_least"
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        assert deployment["schedules"][0]["schedule"]["cron"].startswith(
            f"{when.minute} {when.hour} ")
        # a second run for the same moment: "two pipeline runs started together"
        manual = post(api, f"/deployments/{deployment['id']}/create_flow_run", {"state": {
            "type": "SCHEDULED", "state_details": {"scheduled_time": when.isoformat()}}})

        # the server's scheduler creates the run of the cron line (its failure shows in prefect-server.log)
        wait_for(lambda: [r for r in flow_runs(api, deployment["id"]) if r["auto_scheduled"]], 90, services, serve)
        runs = wait_for(lambda: done_runs(api, deployment["id"], 2), 480, services, serve)
        assert [r["state"]["type"] for r in runs] == ["COMPLETED", "COMPLETED"], [r["state"] for r in runs]
        assert manual["id"] in {r["id"] for r in runs}
        scheduled = [r for r in runs if r["auto_scheduled"]]
        assert scheduled and abs(parse(scheduled[0]["expected_start_time"]) - when) < timedelta(seconds=1)
        first, second = sorted(runs, key=lambda r: r["start_time"])
        assert parse(second["start_time"]) >= parse(first["end_time"])  # one after the other
        first_md, second_md = (artifact(api, r["id"]) for r in (first, second))
        assert "| stage2 | ran |" in first_md and "metrics/register.json" in first_md
        assert "| stage2 | up to date |" in second_md and "| prepare | up to date |" in second_md

        # a failing run: its cause is on the flow run's state and in its Markdown artifact
        bad = post(api, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"stages": ["nope"]}})
        failed = wait_for(lambda: terminal(api, bad["id"]), 180, services, serve)
        assert failed["state"]["type"] == "FAILED" and "unknown stage(s) ['nope']" in failed["state"]["message"]
        assert "## Failed" in artifact(api, bad["id"]) and "unknown stage(s)" in artifact(api, bad["id"])
        services.stop("serve")

        # the new champion, in a fresh process, from the MLflow server
        check = subprocess.run([sys.executable, "-c", CONSUMER], env=env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=180)
        assert check.returncode == 0, check.stderr[-3000:]
        seen = json.loads(check.stdout.strip().splitlines()[-1])
        register = json.loads((proj / "metrics" / "register.json").read_text())
        assert register["version"] == 1 and register["promoted"] and seen["champion"] == "1"
        assert seen["pruner"] == "CoViPALPruner" and seen["reserve_ratio"] == 0.25 and seen["d_model"] == 32
        assert seen["lineage"] == ["base_model", "code_commit", "data_version", "guide_layer", "reserve_ratio"]
        assert seen["promotion"] == "promoted" and seen["artifact"].startswith("mlflow-artifacts:")
        # one MLflow parent run per pipeline run, the stages nested under the one that ran them
        assert seen["parents"] == 2 and {"prepare", "base", "targets", "stage1", "stage2"} <= set(seen["nested"])

        # the registered model served over HTTP: scores and kept indices
        services.start("model-serve", [str(BIN / "mlflow"), "models", "serve", "-m", "models:/covipal-ppm@champion",
                                       "--env-manager", "local", "--host", "127.0.0.1", "-p", str(serve_port)],
                       env, tmp_path)
        services.wait_http("model-serve", f"http://127.0.0.1:{serve_port}/ping", 180)
        rng = np.random.default_rng(0)  # distinct tokens (a ramp per row is the same row after LayerNorm)
        body = {"inputs": {"vision": [rng.standard_normal((8, 32)).tolist()],
                           "text": [rng.standard_normal((3, 32)).tolist()],
                           "vision_mask": [[True] * 8], "text_mask": [[True] * 3]}, "params": {"reserve_ratio": 0.25}}
        reply = HTTP.post(f"http://127.0.0.1:{serve_port}/invocations", json=body, timeout=60)
        assert reply.ok, reply.text
        out = reply.json()["predictions"]
        assert len(out["scores"][0]) == 8 and len(out["keep"][0]) == 2
        scores = out["scores"][0]
        assert len(set(scores)) == 8  # no ties, so the top 2 are well defined
        assert out["keep"][0] == sorted(sorted(range(8), key=lambda k: -scores[k])[:2])
        services.stop("model-serve")

        # drill: the tracking server stops answering while stage 2 registers its PPM; the rerun
        # resumes the finished training (no retraining) and registers the PPM once
        frozen = registration_with_frozen_server(proj, env, services.procs["mlflow-server"])
        assert frozen.returncode != 0 and "is unreachable" in frozen.output, frozen.output[-3000:]
        rerun = subprocess.run([sys.executable, "-m", "dvc", "repro", "stage2"], cwd=proj, env=env,
                               capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert "resuming stage 2" in rerun.stdout and "resumed from" in rerun.stdout
        register = json.loads((proj / "metrics" / "register.json").read_text())
        assert register["version"] == 2 and register["champion"] == 1  # a tie keeps the champion
        listed = HTTP.get(f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/model-versions/search",
                              params={"filter": "name='covipal-ppm'"}, timeout=30).json()["model_versions"]
        assert sorted(int(v["version"]) for v in listed) == [1, 2]
    finally:
        services.stop_all()


CONSUMER = """
import json, mlflow, covipal
from mlflow import MlflowClient
pruner = covipal.load_ppm("models:/covipal-ppm@champion")
client = MlflowClient()
champion = client.get_model_version_by_alias("covipal-ppm", "champion")
runs = mlflow.search_runs(experiment_names=["covipal"], output_format="list")
names = {r.info.run_id: r.info.run_name for r in runs}
parents = [r for r in runs if r.info.run_name == "pipeline"]
nested = [r.info.run_name for r in runs if names.get(r.data.tags.get("mlflow.parentRunId")) == "pipeline"]
lineage = sorted(k for k in champion.tags if k in ("base_model", "guide_layer", "reserve_ratio", "data_version",
                                                   "code_commit"))
print(json.dumps({"pruner": type(pruner).__name__, "reserve_ratio": pruner.reserve_ratio,
                  "d_model": pruner.ppm.config.d_model, "champion": str(champion.version), "lineage": lineage,
                  "promotion": champion.tags.get("promotion"), "parents": len(parents), "nested": nested,
                  "artifact": client.get_run(champion.run_id).info.artifact_uri}))
"""


def registration_with_frozen_server(proj: Path, env: dict, server: subprocess.Popen):
    """``dvc repro --force stage2`` with the MLflow server frozen (SIGSTOP) once training is done."""
    env = {**env, "PYTHONUNBUFFERED": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "stage2"], cwd=proj,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(400, proc.kill)
    watchdog.start()
    lines, stopped = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not stopped and line.startswith("epoch 1 "):  # stage 2's last epoch is logged; registration is next
                os.killpg(server.pid, signal.SIGSTOP)
                stopped = True
        proc.wait()
    finally:
        watchdog.cancel()
        if stopped:
            os.killpg(server.pid, signal.SIGCONT)
    proc.output = "".join(lines)
    assert stopped, proc.output[-3000:]
    return proc


def _session() -> requests.Session:
    """Retries 429/502/503 with backoff, as Prefect's own client does: a busy server (SQLite
    locked while the runner and the scheduler write) answers 503 "Service Unavailable"."""
    session = requests.Session()
    retry = Retry(total=6, backoff_factor=0.5, status_forcelist=(429, 502, 503), allowed_methods=None,
                  raise_on_status=False)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    return session


HTTP = _session()


def get(api: str, path: str):
    reply = HTTP.get(api + path, timeout=10)
    return reply.json() if reply.ok else None


def post(api: str, path: str, body: dict):
    reply = HTTP.post(api + path, json=body, timeout=10)
    assert reply.ok, reply.text
    return reply.json()


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def flow_runs(api: str, deployment_id: str) -> list[dict]:
    return post(api, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})


def done_runs(api: str, deployment_id: str, n: int):
    """The deployment's flow runs once ``n`` of them are finished, else None."""
    finished = [r for r in flow_runs(api, deployment_id) if r["state"] and r["state"]["type"] in TERMINAL]
    return finished if len(finished) >= n else None


def terminal(api: str, run_id: str):
    run = get(api, f"/flow_runs/{run_id}")
    return run if run and run["state"]["type"] in TERMINAL else None


def artifact(api: str, run_id: str) -> str:
    found = post(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]},
                                                          "key": {"any_": ["pipeline-summary"]}}})
    assert len(found) == 1, found
    return found[0]["data"]


def wait_for(poll, timeout: float, services: Services, watched: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = poll()
        if value:
            return value
        if watched is not None and watched.poll() is not None:
            raise AssertionError(f"a service exited (status {watched.returncode})\n{services.tail()}")
        time.sleep(2)
    raise AssertionError(f"nothing after {timeout} s\n{services.tail()}")
