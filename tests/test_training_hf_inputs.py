"""Rows as inputs of a pretrained Hugging Face LVLM (HFInputs): the PPM stages' path for `model.source: <hub id>`."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_lvlms import tiny_model, tiny_processor

from covipal.ppm import PPM, PPMConfig
from covipal.training.hf_inputs import HFInputs
from covipal.training.stage2 import Stage2Config, stage2_loss
from covipal.pruning.guide import guide_targets


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    pic = lambda: Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))  # noqa: E731
    return [{"images": [pic()], "question": "what colour is the square", "answer": "red"},
            {"images": [pic(), pic()], "question": "is the square red", "answer": "no"}]  # two frames


def test_prompts_and_training_batches_line_up(rows):
    inputs = HFInputs(tiny_processor(chat_template=False))  # <image>.. then the question
    tok = inputs.tokenizer
    prompt = inputs.prompt(rows)
    assert prompt["pixel_values"].shape[0] == 3  # one picture per frame
    assert tok.convert_ids_to_tokens(prompt["input_ids"][:, -1].tolist()) == ["square", "red"]  # left-padded
    assert (prompt["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum(1).tolist() == [16, 32]
    train = inputs.train(rows)
    for j, row in enumerate(rows):
        real = prompt["input_ids"][j][prompt["attention_mask"][j].bool()]
        n = len(real)
        assert torch.equal(train["input_ids"][j, :n], real)  # the prompt, then the answer
        answer = train["labels"][j][train["labels"][j] != -100]
        assert tok.convert_ids_to_tokens(answer.tolist()) == [row["answer"]]
        assert train["input_ids"][j, n] == answer[0] and train["attention_mask"][j, :n + 1].all()
    assert inputs.answers(rows).tolist() == tok.convert_tokens_to_ids(["red", "no"])


def test_targets_and_stage2_loss_run_on_a_pretrained_style_model(rows):
    model = tiny_model("llava", layers=2)
    inputs = HFInputs(tiny_processor())
    got = guide_targets(model, inputs.prompt(rows), guide_layer=1)
    assert got.target.shape == (2, 32) and torch.isfinite(got.target).all()
    assert torch.equal(got.context.vision_mask.sum(1), torch.tensor([16, 32]))
    ppm = PPM(PPMConfig(d_model=32, d_ppm=16, n_layers=1, n_heads=2))
    loss, parts = stage2_loss(model, lambda ctx: ppm(ctx.vision, ctx.text, ctx.vision_mask, ctx.text_mask),
                              inputs.train(rows), Stage2Config(reserve_ratio=0.25))
    try:
        loss.backward()
        assert torch.isfinite(loss) and parts["lm_loss"] > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ppm.head.parameters())
    finally:
        model.zero_grad(set_to_none=True)  # the tiny model is shared between tests


def test_prompt_template_wraps_the_question_in_the_chat_template(rows):
    plain, wrapped = HFInputs(tiny_processor()), HFInputs(tiny_processor(), prompt="{question} yes or no")
    assert plain.texts(rows[:1]) == ["<s>USER : <image> what colour is the square ASSISTANT :"]
    assert wrapped.texts(rows[:1]) == ["<s>USER : <image> what colour is the square yes or no ASSISTANT :"]
    tok = wrapped.tokenizer
    ids = wrapped.prompt(rows)["input_ids"]
    assert (ids == tok.convert_tokens_to_ids("<image>")).sum(1).tolist() == [16, 32]  # the pictures stay
    train = wrapped.train(rows)
    for j, row in enumerate(rows):  # the answer follows the wrapped prompt
        answer = train["labels"][j][train["labels"][j] != -100]
        assert tok.convert_ids_to_tokens(answer.tolist()) == [row["answer"]]
    no_template = HFInputs(tiny_processor(chat_template=False), prompt="Q: {question}")
    assert no_template.texts(rows[1:]) == ["<image><image>\nQ: is the square red"]
