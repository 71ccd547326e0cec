"""A user's model and data: VQA-shaped data sets prepared into the schema, column mapping, and the
checks that stop a stage before it deletes anything (guide layer, PPM width, vision tokens, params)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covipal.config import ColumnMap, ConfigError, DataConfig, parse_params
from covipal.workspace import CONFIG_ERROR_EXIT
from covipal.world.dataset import WORLD_COLUMNS, build_world, most_frequent, prepare, to_schema

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["what colour is the square", "is the square red", "is the square blue"]


def picture(rng, size=16):
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def vqa_split(n: int, seed: int = 0):
    """VQAv2-shaped rows: an image column, a question, ten human answers as {answer, answer_id} records."""
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(seed)
    features = Features({"image": ImageFeature(), "question": Value("string"), "question_id": Value("int64"),
                         "answers": List({"answer": Value("string"), "answer_id": Value("int32")})})
    answers = [["red"] * 6 + ["blue"] * 4, ["no", "yes", "yes", "no", "yes"], ["yes", "no"]]  # ties: first listed
    return Dataset.from_dict({
        "image": [picture(rng) for _ in range(n)],
        "question": [QUESTIONS[i % 3] for i in range(n)],
        "question_id": list(range(n)),
        "answers": [[{"answer": a, "answer_id": j} for j, a in enumerate(answers[i % 3])] for i in range(n)],
    }, features=features)


def save_vqa(folder: Path, sizes=(6, 3, 3), **splits) -> Path:
    from datasets import DatasetDict

    parts = {name: vqa_split(n, seed=i) for i, (name, n) in enumerate(zip(("train", "validation", "test"), sizes))}
    DatasetDict({**parts, **splits}).save_to_disk(str(folder))
    return folder


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_vqa_set_is_prepared_into_the_schema(tmp_path):
    from datasets import load_from_disk

    source = save_vqa(tmp_path / "my_vqa")
    before, said = files(source), []
    summary = prepare(DataConfig(source="my_vqa"), tmp_path / "data" / "world", root=tmp_path, log=said.append)
    assert files(source) == before  # the user's folder is only read
    assert said == ["data.columns: images <- 'image', question <- 'question', answer <- 'answers', modality from "
                    "the number of pictures (1: image, more: video); not in the data set: question_type, relevant, "
                    "digits"]
    ds, raw = load_from_disk(str(tmp_path / "data" / "world")), vqa_split(6)
    assert ds["train"].column_names == ["images", "modality", "question", "answer", "answers"]
    assert [r["answer"] for r in ds["train"]] == ["red", "yes", "yes", "red", "yes", "yes"]
    assert ds["train"][1]["answers"] == ["no", "yes", "yes", "no", "yes"]  # every human answer kept
    for row, original in zip(ds["train"], raw):
        assert len(row["images"]) == 1 and row["modality"] == "image" and row["question"] == original["question"]
        assert np.array_equal(np.asarray(row["images"][0]), np.asarray(original["image"]))  # the same pixels
    assert summary == {"train": {"rows": 6, "image": 6}, "validation": {"rows": 3, "image": 3},
                       "test": {"rows": 3, "image": 3}}


def test_columns_are_mapped_and_videos_inferred_from_their_frames(tmp_path):
    from datasets import Dataset, DatasetDict, Features, List, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(1)
    features = Features({"frames": List(ImageFeature()), "prompt": Value("string"), "label": Value("string"),
                         "kind": Value("string"), "cells": List(List(Value("int32")))})
    split = Dataset.from_dict({"frames": [[picture(rng)], [picture(rng) for _ in range(3)]],
                               "prompt": ["is the square red", "what colour is the square"],
                               "label": ["no", "blue"], "kind": ["presence", "colour"],
                               "cells": [[], [[2, 0, 1]]]}, features=features)
    ds = DatasetDict(train=split, validation=split, test=split)
    columns = ColumnMap(question="prompt", answer="label", question_type="kind", relevant="cells")
    out = to_schema(ds, columns, log=lambda _: None)
    assert out["test"].column_names == ["images", "modality", "question", "answer", "question_type", "relevant"]
    rows = out["test"].to_list()
    assert [r["modality"] for r in rows] == ["image", "video"] and [len(r["images"]) for r in rows] == [1, 3]
    assert [r["answer"] for r in rows] == ["no", "blue"] and rows[1]["relevant"] == [[2, 0, 1]]
    assert [r["question_type"] for r in rows] == ["presence", "colour"]  # a plain answer string: no `answers`

    with pytest.raises(ConfigError) as err:  # a named column that is not there
        to_schema(ds, ColumnMap(images="image"), log=lambda _: None)
    assert "data.columns.images: 'image'" in str(err.value) and "['frames', 'prompt', 'label'" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a required field under no usual name
        to_schema(ds, ColumnMap(), log=lambda _: None)
    assert "no question column" in str(err.value) and "set data.columns.question" in str(err.value)
    assert "'prompt'" in str(err.value)
    with pytest.raises(ConfigError, match="data.columns.images: column 'prompt' holds"):
        to_schema(ds, ColumnMap(images="prompt", question="label", answer="kind"), log=lambda _: None)
    with pytest.raises(ConfigError, match="row 0: modality 'presence'"):
        to_schema(ds, ColumnMap(question="prompt", answer="label", modality="kind"), log=lambda _: None)


def test_answer_forms_and_the_training_target():
    from covipal.world.dataset import _answers

    assert _answers("yes", "row", "a") == ["yes"]
    assert _answers(["a", "b", "b"], "row", "a") == ["a", "b", "b"]
    assert _answers([{"answer": "2", "answer_id": 0}], "row", "a") == ["2"]
    assert _answers({"answer": ["x", "y"], "answer_id": [0, 1]}, "row", "a") == ["x", "y"]  # datasets' Sequence
    for bad in ([], [1, 2], None, {"text": "x"}):
        with pytest.raises(ConfigError, match="set data.columns.answer"):
            _answers(bad, "row", "a")
    assert most_frequent(["b", "a", "a", "b", "c"]) == "b" and most_frequent(["x"]) == "x"


def test_a_dataset_already_in_the_schema_comes_out_the_same():
    from datasets import DatasetDict

    world = build_world(DataConfig(), {"train": 6, "validation": 4, "test": 4})
    out = to_schema(DatasetDict(world), ColumnMap(), log=lambda _: None)
    for split in world:
        assert out[split].column_names == list(WORLD_COLUMNS)
        assert out[split].data.table.equals(world[split].data.table), split


@pytest.mark.parametrize("damage, message", [
    ("empty", "split 'validation' is empty (0 rows)"),
    ("missing", "lacks split(s) ['validation']"),
    ("unreadable", "split 'validation' is unreadable"),
    ("one dataset", "holds one Dataset, not a DatasetDict"),
])
def test_a_bad_split_is_named_and_the_previous_data_stays(tmp_path, damage, message):
    from datasets import DatasetDict

    if damage == "empty":
        save_vqa(tmp_path / "src", validation=vqa_split(0))
    elif damage == "missing":
        DatasetDict(train=vqa_split(2), test=vqa_split(2)).save_to_disk(str(tmp_path / "src"))
    elif damage == "unreadable":
        shutil.rmtree(save_vqa(tmp_path / "src") / "validation")
    else:
        vqa_split(2).save_to_disk(str(tmp_path / "src"))
    out = tmp_path / "data" / "world"
    out.mkdir(parents=True)
    (out / "previous").write_text("kept")
    with pytest.raises(ConfigError) as err:
        prepare(DataConfig(source=str(tmp_path / "src")), out, log=lambda _: None)
    assert message in str(err.value) and "save_to_disk" in str(err.value)
    assert (out / "previous").read_text() == "kept" and sorted(p.name for p in out.parent.iterdir()) == ["world"]


# --- checks before damage -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny LLaVA saved as a real checkpoint, recorded by the base stage, and a prepared VQA set."""
    from tiny_lvlms import save_checkpoint

    from covipal.base_model import build_base

    root = tmp_path_factory.mktemp("pretrained")
    checkpoint = save_checkpoint("llava", root / "my_lvlm")
    params = parse_params({"model": {"source": str(checkpoint)}})
    build_base(params, root / "data" / "world", root / "models" / "base", log=lambda _: None)
    prepare(DataConfig(source=str(save_vqa(root / "my_vqa"))), root / "data" / "world", log=lambda _: None)
    return root, checkpoint


def test_a_guide_layer_beyond_the_depth_fails_before_any_shard_is_touched(pretrained):
    from covipal.training.pipeline import make_targets, mark_complete, resumable

    root, checkpoint = pretrained
    shards = root / "data" / "targets"
    resumable(shards, {"an": "earlier run"}, lambda *_: None)
    for split in ("train", "validation"):
        (shards / split).mkdir()
        (shards / split / "shard-00000.pt").write_bytes(os.urandom(256))
    mark_complete(shards)
    before = files(shards)
    params = parse_params({"model": {"source": str(checkpoint)}, "targets": {"guide_layer": 9}})
    with pytest.raises(ConfigError) as err:
        make_targets(params, root / "data" / "world", root / "models" / "base", shards, log=lambda *_: None)
    assert "targets.guide_layer: 9 is beyond the model's depth (2 decoder layers" in str(err.value)
    assert "at most 1" in str(err.value)
    assert files(shards) == before  # every shard and the resume record, byte for byte


def test_the_prepared_vqa_set_makes_targets_on_the_saved_model(pretrained, tmp_path):
    from covipal.training.pipeline import make_targets
    from covipal.training.targets import TargetShards

    root, checkpoint = pretrained
    params = parse_params({"model": {"source": str(checkpoint), "prompt": "{question} answer in one word"},
                           "targets": {"guide_layer": 1, "shard_size": 2, "rows": {"train": 4, "validation": 3}}})
    out = make_targets(params, root / "data" / "world", root / "models" / "base", tmp_path / "targets",
                       log=lambda *_: None)
    assert out["train"]["rows"] == 4 and out["validation"]["rows"] == 3
    assert out["train"]["mean_vision_tokens"] == 16  # one 16-token picture per row
    assert TargetShards(tmp_path / "targets" / "train").d_model == 32


def test_the_stage1_ppm_must_fit_the_base_model(pretrained, tmp_path):
    from covipal.ppm import PPM, PPMConfig
    from covipal.training.pipeline import check_ppm_width, run_stage2

    root, checkpoint = pretrained
    base = root / "models" / "base"
    PPM(PPMConfig(d_model=32, d_ppm=16, n_layers=1, n_heads=2)).save_pretrained(tmp_path / "fits")
    check_ppm_width(tmp_path / "fits", base)  # the tiny LLaVA's hidden size is 32
    PPM(PPMConfig(d_model=128, d_ppm=16, n_layers=1, n_heads=2)).save_pretrained(tmp_path / "other")
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "latest").write_text("epoch-0001")
    params = parse_params({"model": {"source": str(checkpoint)}})
    with pytest.raises(ConfigError, match="width 128, but the base model's LLM has hidden size 32"):
        run_stage2(params, root / "data" / "world", base, tmp_path / "other", tmp_path / "ppm", checkpoints,
                   tmp_path, log=lambda *_: None)
    assert (checkpoints / "latest").read_text() == "epoch-0001" and not (tmp_path / "ppm").exists()


def test_prompts_without_vision_tokens_are_refused(pretrained):
    from tiny_lvlms import tiny_model, tiny_processor

    from covipal.training.hf_inputs import HFInputs
    from covipal.training.pipeline import check_vision_tokens

    rows = [{"images": [picture(np.random.default_rng(0))], "question": q, "answer": "yes"} for q in QUESTIONS]
    model, inputs = tiny_model("llava"), HFInputs(tiny_processor())
    check_vision_tokens(model, inputs, rows, "train")

    class Dropping(HFInputs):  # a chat template that leaves the pictures out of row 1
        def prompt(self, rows):
            out = super().prompt(rows)
            out["input_ids"][1] = torch.where(out["input_ids"][1] == 90, 5, out["input_ids"][1])
            return out

    with pytest.raises(ConfigError, match=r"prompts of train rows \[1\] hold none of the model's vision tokens"):
        check_vision_tokens(model, Dropping(tiny_processor()), rows, "train")


# --- the whole params.yaml, at every entry point -------------------------------------------------


@pytest.mark.parametrize("entry", [["pipelines/flow.py"], ["pipelines/flow.py", "serve"], ["pipelines/prepare.py"]])
def test_a_typo_in_a_section_no_stage_reads_stops_every_entry_point(tmp_path, entry):
    """`ops` is read by no DVC stage; its typo still stops the flow before Prefect starts, and every stage."""
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "params.yaml").write_text("data: {seed: 0}\nops:\n  stage_retires: 2\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, *entry], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == CONFIG_ERROR_EXIT, run.stdout + run.stderr  # not retried by the flow
    assert "ops.stage_retires: Unexpected keyword argument" in run.stderr and "remove it" in run.stderr
    assert "Traceback" not in run.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and "pipelines" not in p.parts
                and p.name != "params.yaml"]  # no Prefect database, no MLflow run, no data
