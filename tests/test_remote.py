"""The DVC remote: a run pushed from one clone is restored in another by `dvc pull`, every output
byte for byte and nothing to rerun; plots are versioned, so `dvc plots diff` compares commits."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from covipal.remote import RemoteConfigError, default_remote, pull, push
from test_pipeline_e2e import ROOT, make_project, sh


def dvc(cwd: Path, *args: str) -> str:
    run = sh(cwd, sys.executable, "-m", "dvc", *args)
    assert run.returncode == 0, f"dvc {' '.join(args)}:\n{run.stdout}{run.stderr}"
    return run.stdout


def git(cwd: Path, *args: str) -> None:
    run = sh(cwd, "git", "-c", "user.name=covipal", "-c", "user.email=covipal@localhost", *args)
    assert run.returncode == 0, run.stdout + run.stderr


def with_repo_remote(proj: Path, url: Path) -> None:
    """The repository's DVC configuration (default remote ``storage``), the remote pointed at ``url``
    in the clone's own ``.dvc/config.local``, as docs/operations.md says."""
    shutil.copy(ROOT / ".dvc" / "config", proj / ".dvc" / "config")
    dvc(proj, "remote", "modify", "--local", "storage", "url", str(url))
    assert default_remote(proj).url == str(url)  # never the shared folder in the home directory


def outputs(lock: dict) -> list[str]:
    return sorted(out["path"] for stage in lock["stages"].values() for out in stage.get("outs", []))


def files(root: Path, path: str) -> dict[str, bytes]:
    top = root / path
    found = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in found}


def changed_stages(proj: Path) -> dict:
    """`dvc status`, less the stages that run every time (``always_changed``)."""
    status = json.loads(dvc(proj, "status", "--json") or "{}")
    return {stage: why for stage, why in status.items() if why != ["always changed"]}


def test_a_clone_restores_every_output_from_the_remote_and_plots_diff_across_commits(tmp_path):
    remote = tmp_path / "remote"
    proj = make_project(tmp_path / "first")
    shutil.copy(ROOT / ".gitignore", proj)
    with_repo_remote(proj, remote)
    dvc(proj, "repro")
    assert push(proj) and any((remote / "files").rglob("*"))
    git(proj, "add", "-A")
    git(proj, "commit", "-q", "-m", "a run")

    clone = tmp_path / "second"
    git(tmp_path, "clone", "-q", str(proj), str(clone))
    assert not (clone / ".dvc" / "config.local").exists()  # each clone names its own remote folder
    dvc(clone, "remote", "modify", "--local", "storage", "url", str(remote))
    assert pull(clone)

    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    outs = outputs(lock)
    assert {"data/world", "models/base", "models/ppm", "plots/stage1_history.csv", "plots/evaluate/accuracy.png",
            "plots/profile", "reports/evaluate.md", "metrics/evaluate.json"} <= set(outs)
    for out in outs:
        assert files(clone, out) == files(proj, out), out
    assert changed_stages(clone) == {}

    # a second commit in the first clone: fewer frames profiled, only `profile` reruns
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["profile"]["frames"] = [4]
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    ran = dvc(proj, "repro", "profile")
    assert "Running stage 'profile'" in ran and "Running stage 'stage2'" not in ran
    assert push(proj)
    git(proj, "commit", "-q", "-a", "-m", "fewer frames")
    # a temporary experiment workspace checks the cached outputs out: nothing but `always_changed` reruns
    ran = re.findall(r"Running stage '(\w+)'", dvc(proj, "exp", "run", "--temp"))
    every_time = {name for name, stage in yaml.safe_load((proj / "dvc.yaml").read_text())["stages"].items()
                  if stage.get("always_changed")}
    assert set(ran) <= every_time, ran

    git(clone, "pull", "-q")  # the plots of both commits come from the remote: none pulled here
    diff = json.loads(dvc(clone, "plots", "diff", "HEAD~1", "HEAD", "--json"))
    assert not diff.get("errors"), diff["errors"]
    values = diff["data"]["profile_frames"][0]["content"]["data"]["values"]
    frames = {rev: sorted({int(v["frames"]) for v in values if v["rev"] == rev}) for rev in ("HEAD~1", "HEAD")}
    assert frames == {"HEAD~1": [4, 8], "HEAD": [4]}


def test_without_a_usable_remote_pull_and_push_say_so(tmp_path):
    proj = make_project(tmp_path / "p")
    said: list[str] = []
    assert pull(proj, said.append) is False and push(proj, said.append) is False
    assert "no default DVC remote" in said[0]

    with_repo_remote(proj, tmp_path / "not-yet")
    assert pull(proj, said.append) is False and "holds nothing yet" in said[-1]

    (tmp_path / "a-file").write_text("")
    dvc(proj, "remote", "modify", "--local", "storage", "url", str(tmp_path / "a-file" / "remote"))
    with pytest.raises(RemoteConfigError, match=r"not a folder.*dvc remote modify --local storage url"):
        push(proj)
    (proj / ".dvc" / "config.local").write_text("[core]\n    remote = elsewhere\n")
    with pytest.raises(RemoteConfigError, match="'elsewhere' .core.remote. is not defined"):
        pull(proj)
