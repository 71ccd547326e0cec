"""The pipeline flow's operations with real DVC and Prefect's temporary server on a small project
whose stages are short scripts: writers of one workspace wait their turn, a hung stage is
stopped by its timeout, only transient failures are retried, a failed run posts its note to a
webhook; and the Docker image and its work pool's job template, checked by structure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# a stage script: take the workspace as pipelines/common.py's stage() does, count the run, act, write its output
STAGE = """import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from covipal.workspace import CONFIG_ERROR_EXIT, hold_workspace
ROOT = Path(__file__).resolve().parents[1]
name, action = sys.argv[1], sys.argv[2]
hold_workspace(ROOT, name)
runs = ROOT / f"{{name}}.runs"
runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
if action == "sleep":
    time.sleep(float(sys.argv[3]))
elif action == "config":
    print("error: params.yaml: a bad key", file=sys.stderr)
    sys.exit(CONFIG_ERROR_EXIT)
elif action == "register":  # what stage 2 writes when it registers a PPM version
    (ROOT / "metrics").mkdir(exist_ok=True)
    (ROOT / "metrics" / "register.json").write_text('{{"version": 1, "promoted": true}}')
elif action == "flaky" and len(runs.read_text()) == 1:
    print("the MLflow tracking server http://127.0.0.1:1 is unreachable", file=sys.stderr)
    sys.exit(1)
(ROOT / "out").mkdir(exist_ok=True)
(ROOT / "out" / f"{{name}}.txt").write_text((ROOT / "input.txt").read_text())
"""


def make_ops_project(path: Path, stages: dict[str, str], ops: dict | None = None) -> Path:
    """A git + DVC project with pipelines/flow.py and one stage per ``name: "action args"``."""
    (path / "pipelines").mkdir(parents=True)
    shutil.copy(ROOT / "pipelines" / "flow.py", path / "pipelines" / "flow.py")
    (path / "pipelines" / "stage.py").write_text(STAGE.format(root=str(ROOT)))
    (path / "input.txt").write_text("one\n")
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        name: {"cmd": f"python pipelines/stage.py {name} {action}", "deps": ["pipelines/stage.py", "input.txt"],
               "outs": [f"out/{name}.txt"]} for name, action in stages.items()}}, sort_keys=False))
    (path / "params.yaml").write_text(yaml.safe_dump({"ops": {"retry_delay_seconds": 0.2, **(ops or {})}}))
    env = environment(path)
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"], [str(BIN / "dvc"), "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=path, env=env, check=True, capture_output=True)
    return path


def environment(path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "COVIPAL_"))}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
            "PREFECT_HOME": str(path / ".prefect"), "PYTHONPATH": str(ROOT)}


def start_flow(path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "pipelines/flow.py", "run", *args], cwd=path, env=environment(path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def runs(path: Path, stage: str) -> int:
    counter = path / f"{stage}.runs"
    return len(counter.read_text()) if counter.exists() else 0


@pytest.mark.timeout(600)
def test_two_flow_runs_and_a_plain_dvc_repro_take_turns(tmp_path):
    proj = make_ops_project(tmp_path / "p", {"slow": "sleep 45"})
    first = start_flow(proj)
    lock = proj / ".dvc" / "tmp" / "workspace.lock"
    deadline = time.time() + 120
    while runs(proj, "slow") == 0 and time.time() < deadline:  # the first flow is inside its stage
        time.sleep(0.5)
    assert runs(proj, "slow") == 1, "the first flow never reached its stage"
    assert "flow run" in json.loads(lock.read_text())["holder"]
    second = start_flow(proj)
    # a plain `dvc repro` through the workspace command waits too, then finds everything up to date
    plain = subprocess.Popen([sys.executable, "-m", "covipal.workspace", sys.executable, "-m", "dvc", "repro"],
                             cwd=proj, env=environment(proj), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (code1, out1), (code2, out2) = finish(first), finish(second)
    code3, out3 = finish(plain)
    assert code1 == 0 and code2 == 0 and code3 == 0, out1[-3000:] + out2[-3000:] + out3[-3000:]
    assert runs(proj, "slow") == 1  # trained once: the later writers found it up to date
    assert "waiting for the workspace" in out2 and "waiting for the workspace" in out3, out2[-3000:] + out3[-3000:]
    assert "| slow | ran |" in out1 or "Running stage 'slow'" in out1
    assert "Running stage 'slow'" not in out2 and "didn't change" in out3
    assert lock.read_text() == ""  # released


@pytest.mark.timeout(300)
def test_a_hung_stage_is_stopped_by_its_timeout(tmp_path):
    proj = make_ops_project(tmp_path / "p", {"hang": "sleep 600"}, {"stage_timeout_minutes": 0.1})
    started = time.time()
    code, out = finish(start_flow(proj))
    assert code != 0 and "longer than its timeout of 0.1 min" in out, out[-3000:]
    assert time.time() - started < 150
    assert runs(proj, "hang") == 1  # a timeout is not retried
    assert not (proj / "out" / "hang.txt").exists()
    assert json.loads((proj / ".dvc" / "tmp" / "workspace.lock").read_text() or "{}") == {}


@pytest.mark.timeout(300)
def test_configuration_errors_fail_at_once_transient_ones_are_retried(tmp_path):
    proj = make_ops_project(tmp_path / "p", {"flaky": "flaky", "bad": "config"},
                            {"stage_retries": 2, "retry_delay_seconds": 0.5})
    code, out = finish(start_flow(proj))
    assert code != 0 and "configuration error (not retried)" in out, out[-3000:]
    assert runs(proj, "flaky") == 2 and (proj / "out" / "flaky.txt").exists()  # unreachable server: retried once
    assert runs(proj, "bad") == 1


class Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.timeout(300)
def test_a_failed_run_posts_its_note_to_the_webhook_and_nothing_new_says_so(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/covipal"
        proj = make_ops_project(tmp_path / "p", {"ok": "register"}, {"notify_webhook": url})
        code, out = finish(start_flow(proj))
        assert code == 0, out[-3000:]
        [note] = Hook.received  # a new registry version
        assert note["state"] == "COMPLETED" and note["registry"] == {"version": 1, "promoted": True}
        assert note["changed"] == ["ok: first run (nothing recorded before)"]
        code, out = finish(start_flow(proj))  # nothing changed
        assert code == 0 and "nothing new" in out and runs(proj, "ok") == 1, out[-3000:]
        assert len(Hook.received) == 1  # a completed run that did not touch the registry posts nothing
        code, out = finish(start_flow(proj, "--stages", "nope"))
        assert code != 0
        note = Hook.received[-1]
        assert note["state"] == "FAILED" and "unknown stage(s) ['nope']" in note["message"]
        assert "FAILED" in note["text"] and note["flow_run_id"]
    finally:
        server.shutdown()


def test_changes_name_what_moved_between_the_two_dvc_locks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("covipal_flow", ROOT / "pipelines" / "flow.py")
    flow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flow)
    changes, kind_of = flow.changes, flow.kind_of

    before = {"prepare": {"data/source": "aaa", "covipal/world": "c1", "params.data.seed": "0"}}
    after = {"prepare": {"data/source": "bbb", "covipal/world": "c1", "params.data.seed": "0"},
             "base": {"data/world": "w"}}
    lines = changes(before, after, {"prepare": "ran", "base": "ran", "stage2": "up to date"})
    assert lines == ["prepare: data data/source aaa -> bbb", "base: first run (nothing recorded before)"]
    assert changes(before, after, {"prepare": "up to date"}) == []
    assert [kind_of(d) for d in ("params.base.epochs", "covipal/io.py", "data/world")] == ["params", "code", "data"]


def test_the_image_runs_as_a_work_pool_job_and_requests_gpus():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    instructions = [line.split()[0] for line in lines if line.split()[0].isupper()]
    assert "ENTRYPOINT" not in instructions  # a worker's command must replace CMD, not become its arguments
    assert lines[-1].startswith("CMD [") and json.loads(lines[-1][4:])[:2] == ["python", "pipelines/flow.py"]
    assert any(line.startswith("COPY") and line.split()[-2:] == [".", "/work"] for line in lines)  # the code
    assert any(line.startswith("USER 1000") for line in lines) and "userdel --remove ubuntu" in "\n".join(lines)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", "data/", "models/", "mlruns/", ".dvc/cache/"} <= set(ignored) and ".git/" not in ignored
    assert subprocess.run([str(BIN / "hadolint"), str(ROOT / "Dockerfile")], capture_output=True).returncode == 0

    template = json.loads((ROOT / "docker" / "work-pool.json").read_text())
    assert template["job_configuration"]["command"] == "{{ command }}"
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    assert defaults["image"] == "covipal:latest" and defaults["env"]["COVIPAL_PROJECT"] == "/work"
    from docker.types import HostConfig

    host = HostConfig(version="1.44", device_requests=defaults["container_create_kwargs"]["device_requests"])
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]],
                                       "Options": {}}]
