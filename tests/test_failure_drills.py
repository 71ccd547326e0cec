"""Failure drills that need no server (tests/test_operations_e2e.py drills the servers).

Where each drill of docs/operations.md is tested:
- a stage killed while writing: here;
- training killed midway resumes: tests/test_training_ds.py::test_resumed_run_reaches_the_same_weights
  and tests/test_training_targets.py::test_interrupted_run_resumes_to_the_same_shards;
- the tracking server down at registration: tests/test_operations_e2e.py (real server) and
  tests/test_registry_ops.py (unreachable server; failure midway completed, not repeated);
- a corrupt or tampered PPM: tests/test_registry_ops.py::test_tampered_or_corrupt_artifact_is_refused;
- a worse challenger never takes champion: tests/test_registry.py::test_champion_moves_only_for_a_better_ppm;
- two runs started together run one after the other: tests/test_operations_e2e.py.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WRITER = '''
import os, sys, time
from covipal.io import atomic_output
with atomic_output("out") as tmp:
    tmp.mkdir()
    (tmp / "a.txt").write_text("first half")
    open("writing", "w").close()  # tell the test we are midway
    if not os.environ.get("NO_STALL"):
        time.sleep(120)
    (tmp / "b.txt").write_text("second half")
'''
DVC_YAML = "stages:\n  write:\n    cmd: python write.py\n    deps: [write.py]\n    outs: [out]\n"


def run(cwd, *args, **env):
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


def test_stage_killed_while_writing_leaves_no_partial_output(tmp_path):
    (tmp_path / "write.py").write_text(WRITER)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        assert run(tmp_path, *cmd).returncode == 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (tmp_path / "writing").exists():
        assert time.time() < deadline and proc.poll() is None, "the stage did not start writing"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage, no cleanup handlers run
    proc.wait(timeout=30)

    assert not (tmp_path / "out").exists()  # nothing half-written under the output's name
    assert [p.name for p in tmp_path.glob(".out.tmp-*")]  # the half is in the hidden temporary only
    rerun = run(tmp_path, sys.executable, "-m", "dvc", "repro", NO_STALL="1")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt"]
    assert not list(tmp_path.glob(".out.tmp-*"))  # the killed run's temporary is gone
    status = run(tmp_path, sys.executable, "-m", "dvc", "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
