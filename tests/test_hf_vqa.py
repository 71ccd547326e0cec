"""The Hugging Face VQA evaluator on a tiny local task: a tiny random LLaVA and a saved data set."""

import json

import numpy as np
import pytest
import torch
from tiny_lvlms import tiny_model, tiny_processor

from covipal.evaluation.hf_vqa import main
from covipal.evaluation.vqa import normalize, references, row_references, vqa_score


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A saved tiny LLaVA with its processor, and a saved 5-row VQA data set."""
    from datasets import Dataset, Features, Image, List, Value
    from PIL import Image as PILImage

    root = tmp_path_factory.mktemp("vqa")
    tiny_model("llava", layers=4).save_pretrained(root / "model")
    tiny_processor().save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    rows = {"image": [PILImage.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(5)],
            "question": ["what colour is the square"] * 3 + ["is the square red", "what is w5"],
            "answers": [["red"] * 3, ["blue", "red"], ["w7"], ["yes", "yes", "no"], ["two"]]}
    features = Features({"image": Image(), "question": Value("string"), "answers": List(Value("string"))})
    Dataset.from_dict(rows, features=features).save_to_disk(str(root / "data"))
    return root


def run(task, *extra):
    return main(["--model", str(task / "model"), "--data", str(task / "data"), "--answer-column", "answers",
                 "--prompt", "{question}", "--batch-size", "2", "--max-new-tokens", "2", *extra])


def test_pruned_run_keeps_fewer_vision_tokens(task, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    lengths = []  # sequence length entering the first decoder layer in every prefill (decode steps have 1)
    original = LlavaForConditionalGeneration.from_pretrained

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:
            lengths.append(hidden.shape[1])

    def load(*args, **kwargs):
        model = original(*args, **kwargs)
        model.model.language_model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
        return model

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", load)
    full = run(task, "--method", "none")
    full_lengths, lengths[:] = list(lengths), []
    pruned = run(task, "--method", "random", "--ratio", "0.25", "--output", str(task / "out.json"))
    assert full["rows"] == pruned["rows"] == 5
    assert full["tokens_full"] == full["tokens_entering"] == 16 and pruned["tokens_full"] == 16
    assert pruned["tokens_entering"] == pruned["tokens_layer_average"] == 4  # ceil(0.25 * 16)
    # per batch of 2 rows: the unpruned prefill, then the pruned one with 12 vision tokens fewer
    assert lengths[0::2] == full_lengths and [f - p for f, p in zip(full_lengths, lengths[1::2])] == [12, 12, 12]
    assert pruned["unpruned_accuracy"] == full["accuracy"]
    saved = json.loads((task / "out.json").read_text())
    assert saved["method"] == "random" and len(saved["predictions"]) == 5
    for p in saved["predictions"]:
        assert p["score"] == vqa_score(p["prediction"], p["answers"])
        assert p["prediction"] and len(p["prediction"].split()) <= 2  # --max-new-tokens 2 of a word-level vocabulary
    fastv = run(task, "--method", "fastv", "--ratio", "0.5", "--method-args", '{"layer": 2}')
    assert fastv["tokens_entering"] == 16 and fastv["tokens_layer_average"] == (2 * 16 + 2 * 8) / 4


def test_rows_are_mapped_onto_the_pipeline_schema_with_the_prompt_filled_in(task):
    from covipal.evaluation.hf_vqa import load_rows, vqa_rows

    rows = vqa_rows(load_rows(str(task / "data")), answer_column="answers", prompt="{question} yes")
    assert [len(r["images"]) for r in rows] == [1] * 5 and {r["modality"] for r in rows} == {"image"}
    assert rows[3]["question"] == "is the square red yes" and rows[3]["answers"] == ["yes", "yes", "no"]
    assert rows[3]["answer"] == "yes" and row_references(rows[3]) == ["yes", "yes", "no"]
    assert row_references({"answer": "red"}) == ["red"] and row_references({"answer": "red", "answers": []}) == ["red"]


def test_chat_template_is_used_when_the_processor_has_one(task):
    from transformers import AutoProcessor

    from covipal.training.hf_inputs import HFInputs

    processor = AutoProcessor.from_pretrained(task / "model")
    row = {"images": [None], "question": "is the square red"}
    processor.chat_template = None
    assert HFInputs(processor).texts([row]) == ["<image>\nis the square red"]
    processor.chat_template = ("{% for m in messages %}<s> {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                               "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    assert HFInputs(processor).texts([row]) == ["<s> <image> is the square red"]


def test_bad_arguments_are_named(task):
    with pytest.raises(SystemExit):
        run(task, "--method", "nope")
    with pytest.raises(ValueError, match="prunes nothing"):
        run(task, "--method", "none", "--ratio", "0.5")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answer'\].*--answer-column"):
        main(["--model", str(task / "model"), "--data", str(task / "data"), "--limit", "1"])


def test_normalisation_and_scores_on_known_predictions():
    assert normalize("  The Two dogs!") == "2 dogs"
    assert normalize("Yes.") == "yes" and normalize("3.5") == "3.5" and normalize("dont") == "don't"
    assert normalize("1,000") == "1000" and normalize("red, blue") == "red blue"
    assert references([{"answer": "a"}, {"answer": "b"}]) == ["a", "b"] and references("x") == ["x"]
    humans = ["two", "2", "2", "3", "two", "three", "2", "3", "2", "4"]  # "2" after normalisation: 7 of 10
    assert vqa_score("Two", humans) == 1.0
    assert vqa_score("3", humans) == 1.0  # 3 of 10 say three: min(1, 3 / 3)
    assert vqa_score("4", humans) == pytest.approx(1 / 3)
    assert vqa_score("five", humans) == 0.0
    assert vqa_score("A red", ["red"], metric="exact") == 1.0 and vqa_score("blue", ["red"], "exact") == 0.0
    with pytest.raises(ValueError, match="metric must be"):
        vqa_score("a", ["a"], "bleu")
