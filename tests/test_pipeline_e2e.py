"""The prepare and base stages end to end through real DVC, on a tiny configuration."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"sizes": {"train": 48, "validation": 12, "test": 12}},
    "model": {"reference": {"vision_hidden": 16, "vision_layers": 1, "vision_heads": 2, "text_hidden": 32,
                            "text_layers": 2, "text_heads": 2, "text_intermediate": 64}},
    "base": {"warmup_steps": 2, "steps": 3, "batch_size": 8, "eval_batch_size": 16},
    "targets": {"guide_layer": 1},
}


def sh(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh project with the repository's pipeline, tiny params, git and DVC."""
    proj = tmp_path_factory.mktemp("proj")
    shutil.copytree(ROOT / "pipelines", proj / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", proj)
    shutil.copytree(ROOT / "covipal", proj / "covipal", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        for key, value in values.items():
            params[section][key] = {**params[section][key], **value} if isinstance(value, dict) else value
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"]):
        assert sh(proj, *cmd).returncode == 0
    return proj


def test_repro_runs_both_stages_then_nothing(project):
    first = sh(project, sys.executable, "-m", "dvc", "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'prepare'" in first.stdout and "Running stage 'base'" in first.stdout
    metrics = json.loads((project / "metrics" / "base.json").read_text())
    for modality in ("image", "video"):
        assert 0.0 <= metrics["test"][modality]["all"] <= 1.0
    assert "position" in metrics["test"]["image"]
    assert (project / "models" / "base" / "config.json").exists()
    assert (project / "mlflow.db").exists()
    again = sh(project, sys.executable, "-m", "dvc", "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout


def test_bad_params_stop_before_any_work(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["video_share"] = 1.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = (project / "models" / "base" / "config.json").stat().st_mtime
    run = sh(project, sys.executable, "-m", "dvc", "repro")
    assert run.returncode != 0
    assert "data.video_share" in run.stdout + run.stderr
    assert (project / "models" / "base" / "config.json").stat().st_mtime == before
