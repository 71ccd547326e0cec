"""New digit-world data arriving in a folder, and the checks ``prepare`` runs on a drop before any training."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from covipal.config import ConfigError, DataConfig, Sizes
from covipal.io import content_hash
from covipal.world.dataset import prepare
from covipal.world.incoming import MANIFEST, drop, main

WORLD = DataConfig(sizes=Sizes(train=8, validation=6, test=6))
quiet = {"log": lambda *a: None}


def keys(split) -> list[str]:
    """Each row's content: its image bytes and question."""
    rows = split.cast_column("images", _undecoded()).select_columns(["images", "question"]).to_list()
    return [hashlib.sha256(r["question"].encode() + b"".join(i["bytes"] for i in r["images"])).hexdigest()
            for r in rows]


def _undecoded():
    from datasets import Image, List

    return List(Image(decode=False))


def test_drops_append_new_scenes_and_keep_the_evaluation_splits(tmp_path):
    from datasets import load_from_disk

    folder = tmp_path / "incoming"
    drop(folder, WORLD, rows=10, **quiet)
    first = load_from_disk(str(folder))
    assert {s: len(first[s]) for s in first} == {"train": 10, "validation": 6, "test": 6}
    before = {s: keys(first[s]) for s in first}

    drop(folder, WORLD, rows=12, question_types=["count"], digits=3, **quiet)
    second = load_from_disk(str(folder))
    assert {s: len(second[s]) for s in second} == {"train": 22, "validation": 6, "test": 6}
    after = {s: keys(second[s]) for s in second}
    assert after["train"][:10] == before["train"]  # appended: the earlier rows as they were
    assert after["validation"] == before["validation"] and after["test"] == before["test"]
    assert not set(after["train"][10:]) & set(before["train"])  # new scenes, not repeats
    batch = second["train"].select(range(10, 22))
    assert set(batch["question_type"]) == {"count"} and set(batch["digits"]) == {3}
    assert set(first["train"]["question_type"]) != {"count"}  # the shift is the batch's only

    drop(folder, WORLD, rows=2, split="test", seed=5, **quiet)
    third = load_from_disk(str(folder))
    assert len(third["test"]) == 8 and len(third["train"]) == 22
    manifest = json.loads((folder / MANIFEST).read_text())
    assert [(b["split"], b["first_row"], b["rows"]) for b in manifest["batches"]] == [
        ("train", 0, 10), ("validation", 0, 6), ("test", 0, 6), ("train", 10, 12), ("test", 6, 2)]
    assert manifest["batches"][3]["question_types"] == {"image": ["count"], "video": ["count"]}

    out = tmp_path / "world"
    summary = prepare(replace(WORLD, source=str(folder)), out, **quiet)  # what the prepare stage reads
    assert summary["train"]["rows"] == 22 and summary["test"]["rows"] == 8


def test_the_command_refuses_bad_arguments_and_foreign_folders(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"sizes": {"train": 4, "validation": 2, "test": 2}}}))
    assert main(["--to", str(tmp_path / "in"), "--rows", "3", "--params", str(params)]) == 0
    assert main(["--to", str(tmp_path / "in"), "--rows", "2", "--digits", "1", "--params", str(params)]) == 2
    assert "--digits" in capsys.readouterr().err
    assert main(["--to", str(tmp_path / "in"), "--rows", "2", "--question-types", "colour,size",
                 "--params", str(params)]) == 2
    assert "unknown ['size']" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="no incoming folder"):
        drop(tmp_path / "mine", WORLD, rows=2, **quiet)


def bad_copy(folder: Path, out: Path, damage) -> None:
    """``folder``'s data set with ``damage(rows_by_split)`` applied to its rows, saved to ``out``."""
    from datasets import Dataset, DatasetDict, load_from_disk

    ds = load_from_disk(str(folder))
    rows = {s: ds[s].cast_column("images", _undecoded()).to_list() for s in ds}
    damage(rows)
    features = ds["train"].features.copy()
    features["images"] = _undecoded()
    DatasetDict({s: Dataset.from_list(r, features=features) for s, r in rows.items()}).save_to_disk(str(out))


def test_a_bad_drop_is_refused_with_its_rows_named_and_the_prepared_data_kept(tmp_path):
    folder, out = tmp_path / "incoming", tmp_path / "world"
    drop(folder, WORLD, rows=8, **quiet)
    prepare(replace(WORLD, source=str(folder)), out, **quiet)
    kept = content_hash(out)

    def damage(rows):
        rows["train"][3] = {**rows["test"][2]}  # a test row copied into train
        rows["validation"][1]["images"][0] = {"bytes": b"not a png", "path": None}
        rows["train"][5]["answer"] = " "
        rows["test"][4]["question"] = ""

    bad = tmp_path / "bad"
    bad_copy(folder, bad, damage)
    with pytest.raises(ConfigError) as err:
        prepare(replace(WORLD, source=str(bad)), out, **quiet)
    message = str(err.value)
    for named in ("train row 5: no answer", "validation row 1: image 0 cannot be decoded",
                  "test row 2 repeats train row 3", "test row 4: no question", "4 problem(s)"):
        assert named in message, (named, message)
    assert content_hash(out) == kept  # the previous prepared data stay as they were


def test_a_bad_drop_fails_the_pipeline_at_prepare_and_nothing_downstream_runs(tmp_path):
    """With real DVC: the drop lands, ``dvc repro`` stops at prepare with the rows named, no later stage
    runs, and prepare's previous outputs are the ones of the last good drop."""
    from test_pipeline_e2e import make_project, sh

    proj = make_project(tmp_path / "proj")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"]["source"] = "data/incoming"
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    good = sh(proj, sys.executable, "-m", "covipal.world.incoming", "--to", "data/incoming", "--rows", "16")
    assert good.returncode == 0, good.stderr
    first = sh(proj, sys.executable, "-m", "dvc", "repro", "prepare")
    assert first.returncode == 0, first.stdout + first.stderr
    world, metrics = content_hash(proj / "data" / "world"), (proj / "metrics" / "prepare.json").read_text()
    assert json.loads(metrics)["train"]["rows"] == 16

    def damage(rows):
        rows["train"].append({**rows["test"][0]})

    bad_copy(proj / "data" / "incoming", tmp_path / "bad", damage)
    (tmp_path / "bad" / MANIFEST).write_text((proj / "data" / "incoming" / MANIFEST).read_text())
    (proj / "data" / "incoming").rename(tmp_path / "old")
    (tmp_path / "bad").rename(proj / "data" / "incoming")
    run = sh(proj, sys.executable, "-m", "dvc", "repro", "base")
    assert run.returncode != 0
    assert "Running stage 'prepare'" in run.stdout and "Running stage 'base'" not in run.stdout, run.stdout
    assert "test row 0 repeats train row 16" in run.stdout + run.stderr, run.stdout + run.stderr
    assert content_hash(proj / "data" / "world") == world
    assert (proj / "metrics" / "prepare.json").read_text() == metrics
