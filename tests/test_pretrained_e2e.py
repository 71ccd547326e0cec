"""A user's pretrained LVLM and VQA data through all seven stages with real DVC, as the README says.

For a tiny LLaVA and a tiny Qwen2-VL (random weights, saved with ``save_pretrained`` together
with a processor whose tokenizer is built offline), and a VQA-shaped ``DatasetDict`` (an image
column, questions and VQAv2-style lists of human answers; none of the digit world's columns),
the test follows the README's section "Your model and your data" as written: it applies the
section's ``params.yaml`` block and runs its shell block in a fresh project. Only the sizes
of the work (rows, epochs, repeats) are made tiny on top. Then a second ``dvc repro`` must
rerun nothing but the ``sources`` stage, and the report must hold a VQA accuracy for every method that applies.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_lvlms import PROCESSOR_WORDS, save_checkpoint

from test_pipeline_e2e import make_project, reran, sh

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Your model and your data"
LAYERS = 17  # the README's example guide layer (16) must exist in the tiny model
TINY = {  # the size of the work only: the README's keys are applied on top of these
    "targets": {"shard_size": 8, "batch_size": 8, "rows": {"train": 16, "validation": 8}},
    "deepspeed": {"micro_batch_size": 8},
    "stage1": {"epochs": 1, "eval_batch_size": 8, "ppm": {"d_ppm": 16, "n_layers": 1, "n_heads": 2}},
    "stage2": {"eval_batch_size": 8, "rows": {"train": 8, "validation": 8}, "deepspeed": {"micro_batch_size": 8}},
    "evaluate": {"ratios": [1.0, 0.25], "rows": None, "batch_size": 8, "n_bootstrap": 100, "max_new_tokens": 2},
    "profile": {"ratios": [0.25], "warmup": 0, "repeats": 1, "decode_tokens": 2, "frames": [2, 4], "trace": False},
}


def readme_blocks(kind: str) -> list[str]:
    """The fenced ``kind`` blocks of the README's section on a user's model and data, in order."""
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{kind}\n(.*?)```", body, flags=re.S)


def vqa_data(folder: Path, seed: int = 0) -> None:
    """A VQAv2-shaped DatasetDict: ``image``, ``question``, ``answers`` (10 human answers per row)."""
    from datasets import Dataset, DatasetDict, Features, Image, List, Value
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    words = [w for w in PROCESSOR_WORDS if w not in ("what", "is", "the")]
    features = Features({"image": Image(), "question": Value("string"), "answers": List(Value("string"))})

    def split(n: int):
        rows = {"image": [], "question": [], "answers": []}
        for _ in range(n):
            rows["image"].append(PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
            rows["question"].append("what colour is the square")
            rows["answers"].append([str(w) for w in rng.choice(words, 10)])
        return Dataset.from_dict(rows, features=features)

    DatasetDict({"train": split(24), "validation": split(8), "test": split(8)}).save_to_disk(str(folder))


def user_project(tmp: Path, family: str) -> Path:
    """A fresh project with tiny work sizes, the README's params applied, a model and data beside it."""
    proj = make_project(tmp)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section] = merge(params[section], values)
    for block in readme_blocks("yaml"):
        for section, values in (yaml.safe_load(block) or {}).items():
            params[section] = merge(params.get(section, {}), values)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    save_checkpoint(family, proj / params["model"]["source"], layers=LAYERS)
    vqa_data(proj / params["data"]["source"])
    return proj


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def run_readme_commands(proj: Path) -> str:
    """Run the section's bash lines in ``proj`` (comments dropped); return their output."""
    out = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("hf download"):  # the download needs the network: the test saved a model
                continue
            args = shlex.split(line)
            if args[0] in ("dvc", "python"):
                args = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else [sys.executable, *args[1:]]
            done = sh(proj, *args)
            assert done.returncode == 0, f"README command {line!r} failed:\n{done.stdout}\n{done.stderr}"
            out.append(done.stdout)
    return "\n".join(out)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_pretrained_model_and_vqa_data_run_every_stage_as_the_readme_says(tmp_path, family):
    proj = user_project(tmp_path, family)
    output = run_readme_commands(proj)
    for stage in ("prepare", "base", "targets", "stage1", "stage2", "evaluate", "profile"):
        assert f"Running stage '{stage}'" in output, f"{stage} did not run:\n{output[-3000:]}"

    prepared = json.loads((proj / "metrics" / "prepare.json").read_text())
    assert prepared["train"]["rows"] == 24 and prepared["test"]["rows"] == 8
    base = json.loads((proj / "models" / "base" / "pretrained.json").read_text())
    assert base["revision"].startswith("sha256:")  # a local checkpoint is recorded by its content

    ev = json.loads((proj / "metrics" / "evaluate.json").read_text())
    params = yaml.safe_load((proj / "params.yaml").read_text())
    skipped = ev.get("skipped", {})
    assert set(ev["methods"]) | set(skipped) == set(params["evaluate"]["methods"])
    if family == "qwen2_vl":
        assert "visionzip" in skipped  # no CLIP [CLS] attention to read
    report = (proj / "reports" / "evaluate.md").read_text()
    for method, by_ratio in ev["methods"].items():
        for ratio in ("r1", "r0.25"):
            result = by_ratio[ratio]["image"]
            assert 0 <= result["accuracy"] <= 1 and result["metric"] == "vqa", (method, ratio, result)
        assert by_ratio["r0.25"]["image"]["tokens_entering"] < by_ratio["r1"]["image"]["tokens_entering"] or \
            by_ratio["r0.25"]["image"]["tokens_layer_average"] < by_ratio["r1"]["image"]["tokens_layer_average"]
        assert f"| {method} " in report
    assert "VQA accuracy" in report

    again = sh(proj, sys.executable, "-m", "dvc", "repro")
    assert again.returncode == 0 and reran(again.stdout) == ["sources"], again.stdout
