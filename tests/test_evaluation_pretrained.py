"""The evaluate stage on saved tiny pretrained checkpoints of every family and a VQA-shaped test split.

Each family's checkpoint is saved the way a real one is (model and processor with
``save_pretrained``), recorded by the ``base`` stage, and evaluated by ``run_evaluate`` on
rows with images, a question, an answer, VQAv2-style answer lists and a modality (no
question types, relevant cells or digits): answers are generated and scored by VQA accuracy.
"""

import json

import numpy as np
import pytest
import torch
import tiny_lvlms
from tiny_lvlms import FAMILIES, PROCESSOR_WORDS, row_prompts, tiny_model, tiny_processor

from covipal.config import parse_params
from covipal.evaluation.harness import FULL
from covipal.evaluation.vqa import row_references, vqa_score
from covipal.pruning import n_keep

PRE_LLM = {"covipal", "random", "oracle", "visionzip"}
METHODS = ["covipal", "random", "oracle", "visionzip", "dart", "fastv", "pyramiddrop", "sparsevlm"]
CLS_FAMILIES = {"llava", "llava_next"}  # CLIP towers with a [CLS] token: visionzip runs
RATIOS = [1.0, 0.5, 0.25]


def save_checkpoint(family: str, folder):
    """The shared tiny checkpoint of ``family`` (tests/tiny_lvlms.py), or llava's built here when that
    helper is missing."""
    if hasattr(tiny_lvlms, "save_checkpoint"):
        return tiny_lvlms.save_checkpoint(family, folder)
    if family != "llava":
        pytest.skip(f"tests/tiny_lvlms.py has no save_checkpoint(family, folder) to build a {family} checkpoint")
    tiny_model("llava").save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def vqa_split(n_images: int = 6, n_videos: int = 3, frames: int = 2, seed: int = 0):
    """A VQA-shaped ``DatasetDict``: images (one, or ``frames`` for a video), question, answer, answers, modality."""
    from datasets import Dataset, DatasetDict, Features, Image, List, Value
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    pick = ["red", "blue", "yes", "no", "two"]
    rows = {"images": [], "question": [], "answer": [], "answers": [], "modality": []}
    for i in range(n_images + n_videos):
        count = 1 if i < n_images else frames
        rows["images"].append([PILImage.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
                               for _ in range(count)])
        rows["question"].append(" ".join(rng.choice(PROCESSOR_WORDS[:5], 4)))
        answers = [str(a) for a in rng.choice(pick, 3)]
        rows["answers"].append(answers)
        rows["answer"].append(max(set(answers), key=answers.count))
        rows["modality"].append("image" if count == 1 else "video")
    features = Features({"images": List(Image()), "question": Value("string"), "answer": Value("string"),
                         "answers": List(Value("string")), "modality": Value("string")})
    split = Dataset.from_dict(rows, features=features)
    return DatasetDict({"train": split, "validation": split, "test": split})


@pytest.fixture(scope="module", params=FAMILIES)
def evaluated(request, tmp_path_factory):
    """``(family, params, result, root)``: the evaluate stage run on the family's saved checkpoint, its
    outputs written under ``root``."""
    from covipal.base_model import build_base
    from covipal.evaluation.stage import run_evaluate, write_outputs
    from covipal.ppm import PPM, PPMConfig

    family = request.param
    root = tmp_path_factory.mktemp(family)
    save_checkpoint(family, root / "checkpoint")
    vqa_split().save_to_disk(str(root / "data"))
    PPM(PPMConfig(d_model=32, d_ppm=16, n_layers=1, n_heads=2)).save_pretrained(root / "ppm")
    params = parse_params({
        "model": {"source": str(root / "checkpoint")}, "targets": {"guide_layer": 1},
        "evaluate": {"methods": METHODS, "method_args": {"fastv": {"layer": 1}, "dart": {"layer": 1}},
                     "variants": {}, "ratios": [0.5, 0.25], "rows": None, "batch_size": 4, "n_bootstrap": 100,
                     "max_new_tokens": 3}})
    build_base(params, root / "data", root / "base", log=lambda *a: None)
    result = run_evaluate(params, root / "data", root / "base", root / "ppm", root, log=lambda *a: None)
    write_outputs(result, params.evaluate, root)
    return family, params, result, root


def test_every_applicable_method_has_a_vqa_accuracy_at_every_ratio(evaluated):
    family, _, result, root = evaluated
    applicable = [m for m in METHODS if m != "visionzip" or family in CLS_FAMILIES]
    assert result["scoring"] == "generate" and sorted(result["metrics"]) == sorted(applicable)
    saved = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert saved["scoring"] == "generate" and sorted(saved["methods"]) == sorted(applicable)
    for m in applicable:
        for ratio in ("r1", "r0.5", "r0.25"):  # r = 1 is always evaluated
            for modality in ("image", "video"):
                cell = saved["methods"][m][ratio][modality]
                assert 0 <= cell["accuracy"] <= 1 and cell["metric"] == "vqa"
                assert "by_type" not in cell  # no question types: no per-type table
                assert cell["relevant_kept"] is None
    assert all(rec["question_type"] == "all" for rec in result["records"])


def test_visionzip_is_skipped_with_its_reason_where_the_tower_has_no_cls_token(evaluated):
    family, _, result, root = evaluated
    saved = json.loads((root / "metrics" / "evaluate.json").read_text())
    report = (root / "reports" / "evaluate.md").read_text()
    if family in CLS_FAMILIES:
        assert result["skipped"] == {} == saved["skipped"] and "Methods not run" not in report
        return
    assert list(result["skipped"]) == ["visionzip"] and "[CLS]" in result["skipped"]["visionzip"]
    assert saved["skipped"] == result["skipped"]
    assert "## Methods not run on this model" in report and f"- visionzip: {result['skipped']['visionzip']}" in report
    assert "| visionzip |" not in report


def test_pruned_runs_send_fewer_vision_tokens_into_the_llm(evaluated):
    _, _, result, _ = evaluated
    for (method, ratio), res in result["results"].items():
        assert (res.n_vision > 0).all()
        if ratio == FULL:
            assert (res.entering == res.n_vision).all() and (res.layer_average == res.n_vision).all()
            continue
        assert (res.layer_average < res.n_vision).all(), (method, ratio)
        if method in PRE_LLM:  # pruned before the LLM: exactly the budget enters it
            assert res.entering.tolist() == [n_keep(int(n), ratio) for n in res.n_vision], (method, ratio)
        else:  # pruned inside it: every token enters, fewer stay
            assert (res.entering == res.n_vision).all(), (method, ratio)


def test_scores_are_the_vqa_accuracy_of_the_recorded_answers(evaluated):
    _, params, result, _ = evaluated
    rows = result["test_rows"]
    assert "question_type" not in rows[0] and "relevant" not in rows[0]
    for key, res in result["results"].items():
        assert all(isinstance(p, str) for p in res.prediction), key
        assert all(len(p.split()) <= params.evaluate.max_new_tokens for p in res.prediction), key
        want = [vqa_score(p, row_references(r)) for p, r in zip(res.prediction, rows)]
        assert res.score.tolist() == want, key
    for rec in result["records"]:
        res = result["results"][(rec["method"], rec["ratio"])]
        sel = [r["modality"] == rec["modality"] for r in rows]
        assert rec["accuracy"] == pytest.approx(res.score[sel].mean())


def test_an_unpruned_model_that_does_not_answer_is_flagged(evaluated):
    """Random weights answer random words: the report says the unpruned accuracy is zero or at chance."""
    _, _, result, root = evaluated
    report = (root / "reports" / "evaluate.md").read_text()
    saved = json.loads((root / "metrics" / "evaluate.json").read_text())
    unpruned = result["results"][("random", FULL)]
    for check in result["unpruned"]:
        sel = [r["modality"] == check["modality"] for r in result["test_rows"]]
        assert check["accuracy"] == pytest.approx(unpruned.score[sel].mean())
        assert check["status"] != "ok" and saved["unpruned"][check["modality"]]["status"] == check["status"]
    assert "## Warning: the unpruned model does not answer these rows" in report
    assert "Likely causes" in report and "`evaluate.max_new_tokens` (3)" in report
    assert "issue" not in report


# --- the harness on every family's model, with prompts made by tests/tiny_lvlms.py -----------------------------


class TinyPrompts:
    """An inputs maker of tiny_lvlms prompts: a row ``{"seed", "modality"}`` has one image, or two for a video."""

    def __init__(self, family: str):
        self.family, self.processor = family, tiny_processor()  # its word-level tokenizer decodes every family

    def prompt(self, rows: list[dict]) -> dict:
        return row_prompts(self.family, [{"images": 1 + (r["modality"] == "video"), "seed": r["seed"]} for r in rows])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_harness_generates_and_scores_on_every_family(family):
    from covipal.evaluation.harness import evaluate_methods, unsupported
    from covipal.evaluation.vqa import generate_answers
    from covipal.ppm import PPM, PPMConfig
    from covipal.pruning import get_method

    model, inputs = tiny_model(family), TinyPrompts(family)
    rows = [{"seed": i, "modality": "image" if i < 4 else "video", "answer": "red", "answers": ["red", "w5", "w5"]}
            for i in range(6)]
    args = {"fastv": {"layer": 1}, "dart": {"layer": 1}, "oracle": {"guide_layer": 1},
            "covipal": {"ppm": PPM(PPMConfig(d_model=32, d_ppm=16, n_layers=1, n_heads=2))}}

    def make(m, r):
        return get_method(m, reserve_ratio=r, **args.get(m, {}))

    skipped = unsupported(model, make, METHODS)
    assert list(skipped) == ([] if family in CLS_FAMILIES else ["visionzip"])
    methods = [m for m in METHODS if m not in skipped]
    out = evaluate_methods(model, inputs, rows, make, methods, [1.0, 0.5], 4, progress=False, scoring="generate",
                           max_new_tokens=3)
    for (method, ratio), res in out.items():
        assert res.score.tolist() == [vqa_score(p, r["answers"]) for p, r in zip(res.prediction, rows)]
        if ratio < 1:
            assert (res.layer_average < res.n_vision).all(), method
            if method in PRE_LLM:
                assert res.entering.tolist() == [n_keep(int(n), ratio) for n in res.n_vision], method
    with torch.no_grad(), make("covipal", 0.5)(model):  # the recorded answers are the pruned model's
        said = generate_answers(model, inputs.prompt(rows[:4]), inputs.processor.tokenizer, 3)
    assert out[("covipal", 0.5)].prediction[:4].tolist() == said
