"""Every stage end to end through real DVC (prepare, base, targets, stage1, stage2 + registry, evaluate), tiny."""

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
    "targets": {"guide_layer": 1, "shard_size": 16, "batch_size": 8, "rows": {"train": 24, "validation": 12}},
    "deepspeed": {"micro_batch_size": 8},
    "stage1": {"epochs": 2, "eval_batch_size": 16, "ppm": {"d_ppm": 16, "n_layers": 1, "n_heads": 2}},
    "stage2": {"eval_batch_size": 12, "rows": {"train": 16, "validation": 12}, "deepspeed": {"micro_batch_size": 8}},
    "evaluate": {"ratios": [1.0, 0.25], "rows": None, "batch_size": 8, "n_bootstrap": 100},
    "profile": {"ratios": [0.25], "warmup": 0, "repeats": 1, "decode_tokens": 2, "frames": [4, 8], "trace": False},
}
STAGES = ["prepare", "base", "targets", "stage1", "stage2", "evaluate", "profile"]


def sh(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def reran(stdout: str) -> list[str]:
    """The stages a ``dvc repro`` ran, in order. With nothing new it is ``["sources"]``: that stage
    runs every time (it resolves data.source and model.source) and leaves the rest up to date."""
    return [line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("proj"))


def make_project(proj: Path) -> Path:
    """A fresh project in ``proj`` with the repository's pipeline, tiny params, git and DVC."""
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


def test_repro_runs_every_stage_then_nothing(project):
    first = sh(project, sys.executable, "-m", "dvc", "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout, stage
    metrics = json.loads((project / "metrics" / "base.json").read_text())
    for modality in ("image", "video"):
        assert 0.0 <= metrics["test"][modality]["all"] <= 1.0
    assert "position" in metrics["test"]["image"]
    assert (project / "models" / "base" / "config.json").exists()
    assert (project / "mlflow.db").exists()

    targets = json.loads((project / "metrics" / "targets.json").read_text())
    assert targets["train"]["rows"] == 24 and targets["train"]["shards"] == 2 and targets["validation"]["rows"] == 12
    stage1 = json.loads((project / "metrics" / "stage1.json").read_text())
    assert set(stage1["val"]) == {"loss", "recall", "spearman"} and 0 <= stage1["val"]["recall"] <= 1
    assert (project / "models" / "stage1" / "model.safetensors").exists()
    assert (project / "checkpoints" / "stage1" / "latest").read_text() == "epoch-0002"
    assert len((project / "plots" / "stage1_history.csv").read_text().splitlines()) == 3  # header + 2 epochs
    stage2 = json.loads((project / "metrics" / "stage2.json").read_text())["val"]
    for key in ("full_accuracy", "soft_accuracy", "hard_accuracy"):
        assert 0 <= stage2[key] <= 1
    assert stage2["soft_hard_gap"] == stage2["soft_accuracy"] - stage2["hard_accuracy"]
    assert (project / "models" / "ppm" / "model.safetensors").exists()

    registered = json.loads((project / "metrics" / "register.json").read_text())
    assert registered["version"] == 1 and registered["promoted"] and registered["champion"] == 1
    tags = registry_tags(project, "1")
    assert tags["guide_layer"] == "1" and tags["reserve_ratio"] == "0.25"
    assert tags["base_model"].startswith("reference@sha256:") and tags["data_version"].startswith("sha256:")
    assert tags["data_dvc_md5"] and tags["code_commit"] and tags["promotion"] == "promoted"
    check_evaluation(project, tags)

    profile = json.loads((project / "metrics" / "profile.json").read_text())
    assert profile["device"] == "cpu" and set(profile["cases"]) == {"none", "covipal_r0.25", "random_r0.25"}
    assert (project / "plots" / "profile" / "speedup.png").exists()
    assert tags["profile.artifacts"].count("runs:/") == 3 and "profile.covipal_r0.25.limit" in tags

    again = sh(project, sys.executable, "-m", "dvc", "repro")
    assert again.returncode == 0 and reran(again.stdout) == ["sources"], again.stdout


def test_forced_stage2_registers_a_challenger_that_ties(project):
    """A rerun is trained afresh (not resumed from the finished checkpoint), equals the champion, and
    only becomes challenger."""
    run = sh(project, sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "stage2")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "starting afresh (finished run)" in run.stdout + run.stderr
    registered = json.loads((project / "metrics" / "register.json").read_text())
    assert registered["version"] == 2 and not registered["promoted"] and registered["champion"] == 1
    assert registered["aliases"] == ["challenger"]


def test_analysis_scripts_read_the_pipeline_outputs(project, monkeypatch, capsys):
    """scripts/budget_fill.py (both modes) and scripts/grounding_hits.py run on the trained tiny
    outputs and print a table row per fill, PPM and question type."""
    import runpy

    run = sh(project, sys.executable, "-m", "dvc", "repro", "stage2")  # a no-op after the first test
    assert run.returncode == 0, run.stdout + run.stderr
    common = ["--model", str(project / "models" / "base"), "--data", str(project / "data" / "world")]
    types = ["position", "colour", "presence", "count", "relation"]

    def script(name: str, *args: str) -> list[list[str]]:  # in this process: no second start-up
        monkeypatch.setattr(sys, "argv", [name, *args])
        runpy.run_path(str(ROOT / "scripts" / name), run_name="__main__")
        return [line.split() for line in capsys.readouterr().out.splitlines()]

    fill = script("budget_fill.py", *common, "--types", *types, "--ratios", "0.25")
    assert [r[:2] for r in fill[2:]] == [["digits_first", "0.250"], ["random", "0.250"], ["empty_first", "0.250"]]
    ppms = [str(project / "models" / "stage1"), str(project / "models" / "ppm")]
    kept = script("budget_fill.py", *common, "--types", *types, "--ratios", "0.25", "--ppm", *ppms)
    assert [r[:2] for r in kept[2:]] == [[ppms[0], "0.250"], [ppms[1], "0.250"]]
    assert all(0 <= float(r[2]) <= 1 for r in kept[2:])  # share of the relevant cells kept
    hits = script("grounding_hits.py", *common, "--rows", "12")
    table = [r for r in hits if r and r[0] in types]
    assert table and sum(int(r[1]) for r in table) == image_test_rows(project)  # every image row, once


def test_base_sweep_trains_each_variant_and_stops_on_a_bad_key(project, tmp_path):
    """scripts/base_sweep.py in the tiny project: a variant trains the reference model and writes its
    test accuracy; a variants file with an unknown key fails before any training."""
    shutil.copytree(ROOT / "scripts", project / "scripts", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    good = tmp_path / "good.txt"
    good.write_text('S1 {"base": {"seed": 1, "steps": 2}}\n')
    run = sh(project, sys.executable, "scripts/base_sweep.py", str(good), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "out" / "S1.json").read_text())
    assert result["over"] == {"base": {"seed": 1, "steps": 2}} and set(result["test"]) == {"image", "video"}
    assert all(0 <= v <= 1 for t in result["test"].values() for v in t.values())
    assert run.stdout.startswith("S1: image ")
    bad = tmp_path / "bad.txt"
    bad.write_text('S1 {"base": {"seed": 1}}\nS2 {"base": {"stepz": 2}}\n')
    run = sh(project, sys.executable, "scripts/base_sweep.py", str(bad), "--out", str(tmp_path / "bad"))
    assert run.returncode != 0 and "stepz" in run.stderr
    assert not list((tmp_path / "bad").glob("*.log"))  # no variant started


def image_test_rows(project: Path) -> int:
    """Number of image rows in the tiny project's test split."""
    from datasets import load_from_disk

    return sum(m == "image" for m in load_from_disk(str(project / "data" / "world"))["test"]["modality"])


def check_evaluation(project: Path, tags: dict) -> None:
    """metrics/evaluate.json, the plot table, the report, and the PPM's numbers on its registry version."""
    ev = json.loads((project / "metrics" / "evaluate.json").read_text())
    methods = yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["methods"]
    assert ev["rows"] == 12 and sorted(ev["methods"]) == sorted(methods)
    for method in methods:
        for modality in ("image", "video"):
            full, pruned = ev["methods"][method]["r1"][modality], ev["methods"][method]["r0.25"][modality]
            assert full["accuracy"] == ev["methods"]["random"]["r1"][modality]["accuracy"]  # r = 1: unpruned
            assert 0 <= pruned["accuracy"] <= 1 and pruned["tokens_layer_average"] < full["tokens_layer_average"]
    covipal = ev["methods"]["covipal"]["r0.25"]["image"]
    assert covipal["tokens_entering"] == covipal["tokens_layer_average"] == 16  # 64 cells, ceil(0.25 * 64)
    lines = (project / "plots" / "evaluate_accuracy.csv").read_text().splitlines()
    assert lines[0].startswith("method,ratio,modality,question_type,accuracy,ci_low,ci_high")
    report = (project / "reports" / "evaluate.md").read_text()
    assert "## image" in report and "## What covipal keeps of the unpruned accuracy" in report
    kept, full = ev["covipal_retention"]["image"]["r0.25"], ev["methods"]["covipal"]["r1"]["image"]["accuracy"]
    assert kept["share"] == (pytest.approx(covipal["accuracy"] / full) if full else None)
    stage1 = ev["methods"]["covipal_stage1"]["r0.25"]["image"]["accuracy"]
    assert kept["versus"]["covipal_stage1"]["lead"] == pytest.approx(covipal["accuracy"] - stage1)
    assert tags["eval.image.r0.25"].startswith(f"{covipal['accuracy']:.4f}") and tags["eval.run_id"]


def test_plots_show_renders_the_accuracy_plot(project):
    run = sh(project, sys.executable, "-m", "dvc", "plots", "show")
    assert run.returncode == 0, run.stdout + run.stderr
    html = (project / "dvc_plots" / "index.html").read_text()
    assert "Test accuracy against reserve ratio" in html and '"method": "covipal"' in html


def registry_tags(project: Path, version: str) -> dict:
    code = ("import json, sys; from mlflow import MlflowClient; "
            f"print(json.dumps(MlflowClient('sqlite:///{project}/mlflow.db')"
            f".get_model_version('covipal-ppm', '{version}').tags))")
    out = sh(project, sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_scratch_is_no_output_and_an_earlier_value_is_restored_from_the_run_cache(project):
    """The target shards were published to data/targets (the scratch folder is gone); deleting the
    checkpoints reruns nothing; stage 1 returned to an earlier parameter value restores its outputs from
    DVC's run cache (nothing downstream reruns); a comment in a baseline's file reruns no PPM stage.
    After the tests that read the checkpoints (it deletes them), before the one that breaks params.yaml."""
    dvc = [sys.executable, "-m", "dvc"]

    def repro(*args: str) -> str:
        run = sh(project, *dvc, "repro", *args)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return run.stdout

    def set_epochs(n: int) -> None:
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["stage1"]["epochs"] = n
        (project / "params.yaml").write_text(yaml.safe_dump(params))

    repro()  # whatever the tests above left outdated (a forced stage2 registers a new version: profile)
    assert {"train", "validation"} <= {p.name for p in (project / "data" / "targets").iterdir()}
    assert not (project / "checkpoints" / "targets").exists()  # moved to data/targets when done
    weights = (project / "models" / "stage1" / "model.safetensors").read_bytes()
    shutil.rmtree(project / "checkpoints")
    assert reran(repro()) == ["sources"]

    set_epochs(1)
    assert reran(repro("--single-item", "stage1")) == ["stage1"]
    assert (project / "models" / "stage1" / "model.safetensors").read_bytes() != weights
    set_epochs(2)
    again = repro("--single-item", "stage1")
    assert reran(again) == [] and "Stage 'stage1' is cached" in again, again
    assert (project / "models" / "stage1" / "model.safetensors").read_bytes() == weights
    assert reran(repro()) == ["sources"]

    fastv = project / "covipal" / "pruning" / "fastv.py"
    text = fastv.read_text()
    fastv.write_text(text + "# a comment\n")
    try:
        status = sh(project, *dvc, "status", "stage2", "profile")
        assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
        assert "covipal/pruning" in sh(project, *dvc, "status", "evaluate").stdout  # the whole folder: every method
    finally:
        fastv.write_text(text)


def test_bad_params_stop_before_any_work(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["video_share"] = 1.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = (project / "models" / "base" / "config.json").stat().st_mtime
    run = sh(project, sys.executable, "-m", "dvc", "repro")
    assert run.returncode != 0
    assert "data.video_share" in run.stdout + run.stderr
    assert (project / "models" / "base" / "config.json").stat().st_mtime == before


def test_the_readme_quick_start_runs_as_written_on_the_outputs(project):
    """The README's quick start, run in the project after the pipeline: answers and budgets print."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    run = sh(project, sys.executable, "-c", code)
    assert run.returncode == 0, run.stdout + run.stderr
    answers, budget = run.stdout.strip().splitlines()[-2:]
    assert answers.count("'") >= 32  # 8 answers given and 8 expected, quoted
    assert budget.startswith("[") and "vision tokens kept of" in budget
