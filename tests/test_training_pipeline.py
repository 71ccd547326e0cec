"""The PPM stages' glue: config sections match the library, resume rules, rank shares, two gloo processes."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from covipal.config import (ConfigError, DeepSpeedSection, PPMShape, Stage1Section, Stage2Section, TargetsConfig,
                            load_params, parse_params)
from covipal.training.launch import RankBatches, launcher_command
from covipal.training.pipeline import (deepspeed_config, mark_complete, ppm_config, resumable, stage1_config,
                                       stage2_config)

ROOT = Path(__file__).resolve().parents[1]


def fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def default(f):
    if f.default is not dataclasses.MISSING:
        return getattr(f.default, "default", f.default)  # pydantic Field(...) or a plain default
    return f.default_factory()


@pytest.mark.parametrize("section, library, only_here, only_there", [
    (DeepSpeedSection, "covipal.training.ds:DeepSpeedConfig", {"processes", "hostfile"}, set()),
    (Stage1Section, "covipal.training.stage1:Stage1Config", {"ppm", "deepspeed"}, {"reserve_ratio"}),
    (Stage2Section, "covipal.training.stage2:Stage2Config", {"eval_batch_size", "rows", "deepspeed"},
     {"reserve_ratio"}),
    (PPMShape, "covipal.ppm:PPMConfig", set(), {"d_model"}),
])
def test_config_sections_match_the_library_dataclasses(section, library, only_here, only_there):
    """Same keys and defaults as the library dataclass each section builds (the library is the reference)."""
    import importlib

    module, name = library.split(":")
    lib = getattr(importlib.import_module(module), name)
    ours, theirs = fields(section), fields(lib)
    assert set(ours) - only_here == set(theirs) - only_there
    for key in set(ours) - only_here:
        assert default(ours[key]) == default(theirs[key]), key
        hint, lib_hint = typing.get_type_hints(section)[key], typing.get_type_hints(lib)[key]
        if typing.get_origin(lib_hint) is typing.Literal:
            assert typing.get_args(hint) == typing.get_args(lib_hint), key


def test_literal_choices_match_the_library():
    from covipal.pruning import guide
    from covipal.training import stage1

    hints = typing.get_type_hints(TargetsConfig)
    assert typing.get_args(hints["queries"]) == guide.QUERIES
    assert typing.get_args(typing.get_type_hints(Stage1Section)["loss"]) == stage1.LOSSES
    assert typing.get_args(typing.get_type_hints(Stage1Section)["normalize"]) == stage1.NORMALIZE


def test_repository_params_build_the_library_configs():
    params = load_params(ROOT / "params.yaml")
    ds = deepspeed_config(params, "stage2")
    assert ds.lr == params.stage2.deepspeed.get("lr", params.deepspeed.lr)
    assert stage1_config(params).reserve_ratio == params.pruning.reserve_ratio
    assert stage2_config(params).epochs == params.stage2.epochs
    assert ppm_config(params, 128).d_model == 128


@pytest.mark.parametrize("raw, key, fix", [
    ({"deepspeed": {"zero_stage": 3}}, "deepspeed.zero_stage", "listed values"),
    ({"deepspeed": {"precision": "fp16"}}, "deepspeed.precision", "listed values"),
    ({"deepspeed": {"processes": 0}}, "deepspeed.processes", "allowed range"),
    ({"stage1": {"deepspeed": {"lrr": 1e-3}}}, "stage1.deepspeed.lrr", "remove it"),
    ({"stage2": {"deepspeed": {"micro_batch_size": 0}}}, "stage2.deepspeed.micro_batch_size", "allowed range"),
    ({"stage1": {"ppm": {"d_ppm": 10, "n_heads": 4}}}, "stage1.ppm", "must divide"),
    ({"stage2": {"temperature": 0}}, "stage2.temperature", "allowed range"),
    ({"targets": {"rows": {"train": 0}}}, "targets.rows.train", "allowed range"),
    ({"targets": {"queries": "first"}}, "targets.queries", "listed values"),
    ({"registry": {"metric": "val_loss"}}, "registry.metric", "listed values"),
    ({"registry": {"champion": "x"}}, "registry.champion", "remove it"),
])
def test_bad_training_values_name_key_and_fix(raw, key, fix):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert key in str(err.value) and fix in str(err.value)


def test_resume_only_an_interrupted_run_of_the_same_inputs(tmp_path):
    folder, quiet = tmp_path / "ckpt", lambda *_: None
    assert not resumable(folder, {"a": (1, 2)}, quiet)  # nothing there yet
    (folder / "latest").write_text("epoch-0001")
    assert resumable(folder, {"a": [1, 2]}, quiet) and (folder / "latest").exists()  # interrupted: resume
    assert not resumable(folder, {"a": [1, 3]}, quiet) and not (folder / "latest").exists()  # other inputs
    (folder / "latest").write_text("epoch-0001")
    mark_complete(folder)
    assert not resumable(folder, {"a": [1, 3]}, quiet) and not (folder / "latest").exists()  # finished: afresh


def test_rank_batches_split_an_epoch_evenly():
    batches = list(range(11))
    shares = [list(RankBatches(batches, r, 3)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5, 8]] and all(len(RankBatches(batches, r, 3)) == 3 for r in range(3))


def test_launcher_command():
    cmd = launcher_command("pipelines/stage1.py", ["--params", "p.yaml"], 2, master_port=1234)
    assert cmd[1:] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "1234",
                       "--no_local_rank", "pipelines/stage1.py", "--params", "p.yaml"]
    assert "--hostfile" in launcher_command("s.py", [], 1, hostfile="hosts")


def test_two_gloo_processes_train_stage1(llava_shards, tmp_path):
    """``deepspeed.processes: 2`` on a CPU: stage 1 restarts under DeepSpeed's launcher, two ranks share the
    batches (ZeRO-2 writes one optimizer partition per rank), rank 0 alone exports and logs."""
    proj = tmp_path / "proj"
    shutil.copytree(ROOT / "pipelines", proj / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    resumable(proj / "data" / "targets", {"test": 1}, lambda *_: None)  # as the targets stage leaves it
    for split in ("train", "validation"):
        shutil.copytree(llava_shards, proj / "data" / "targets" / split)
    mark_complete(proj / "data" / "targets")
    params = {"deepspeed": {"processes": 2, "micro_batch_size": 1, "zero_stage": 2},
              "stage1": {"epochs": 1, "ppm": {"d_ppm": 16, "n_layers": 1, "n_heads": 2}}}
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, "pipelines/stage1.py"], cwd=proj, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "deepspeed.launcher.runner --num_gpus 2" in run.stdout
    metrics = json.loads((proj / "metrics" / "stage1.json").read_text())
    assert metrics["world_size"] == 2 and 0 <= metrics["val"]["recall"] <= 1
    ckpt = proj / "checkpoints" / "stage1" / "epoch-0001"
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (proj / "models" / "stage1" / "model.safetensors").exists()
    history = (proj / "plots" / "stage1_history.csv").read_text().splitlines()
    assert len(history) == 2  # one epoch, written once (by rank 0)


def test_checks_before_work_read_the_saved_reference_model(reference, tmp_path):
    """The guide layer is checked against the saved model's own depth (its config), and the prompts of
    the first rows hold its vision tokens."""
    from covipal.training.data import ReferenceInputs
    from covipal.training.pipeline import check_guide_layer, check_ppm_width, check_vision_tokens

    model, processor, rows = reference  # a 2-layer LLM of width 32
    model.save_pretrained(tmp_path / "base")
    with pytest.raises(ConfigError, match="targets.guide_layer: 2 is beyond the model's depth"):
        check_guide_layer(parse_params({"targets": {"guide_layer": 2}}), tmp_path / "base")  # params allow 0..3
    check_guide_layer(parse_params({"targets": {"guide_layer": 1}}), tmp_path / "base")
    check_vision_tokens(model, ReferenceInputs(processor), rows[:4], "train")
    with pytest.raises(FileNotFoundError, match="dvc repro stage1"):
        check_ppm_width(tmp_path / "no_ppm", tmp_path / "base")
