"""The reference recipe's grounding loss: which positions ask, which tokens they are about."""

import math

import pytest
import torch

from covipal.config import DataConfig
from covipal.reference.train import AttentionRows, grounding_loss, grounding_targets
from covipal.world.dataset import make_sample
from covipal.world.scenes import scan_pools


@pytest.fixture(scope="module")
def batch(reference):
    _, processor, _ = reference
    pools = scan_pools(0)
    rows = [make_sample(DataConfig(), "train", i, pools) for i in range(8)]
    for r in rows:
        r["n_frames"] = len(r.pop("images"))
    turns = [[(r["question"], r["answer"])] + [(t["question"], t["answer"]) for t in r["follow_ups"]] for r in rows]
    n_pictures = [1 if r["n_frames"] == 1 else -(-r["n_frames"] // 4) for r in rows]
    return rows, processor.conversation_inputs(turns, n_pictures)


def test_queries_are_the_last_question_words_and_relevant_the_asked_cells(reference, batch):
    _, processor, _ = reference
    rows, inputs = batch
    queries, relevant = grounding_targets(processor, rows, inputs)
    tok = processor.tokenizer
    assert {r["modality"] for r in rows} == {"image", "video"}
    for j, row in enumerate(rows):
        turns = [row] + row["follow_ups"]
        vision = (inputs["input_ids"][j] == processor.image_token_id).nonzero()[:, 0]
        for t, turn in enumerate(turns):
            q = queries[j, t].item()
            assert tok.convert_ids_to_tokens(int(inputs["input_ids"][j, q])) == turn["question"].split()[-1]
            assert tok.convert_ids_to_tokens(int(inputs["labels"][j, q + 1])) == turn["answer"]
            want = {int(vision[processor.token_index(f, r, c, row["n_frames"])]) for f, r, c in turn["relevant"]}
            assert set(relevant[j, t].nonzero()[:, 0].tolist()) == want
        assert not relevant[j, len(turns):].any()  # padded turns ask about nothing


def test_grounding_loss_is_minus_log_of_head0_mass_on_relevant_tokens():
    relevant = torch.zeros(1, 2, 10, dtype=torch.bool)
    relevant[0, 0, [3, 4]] = True  # turn 1 has no relevant cell: ignored
    probs = torch.full((1, 2, 2, 10), 0.1)
    assert grounding_loss(probs, relevant).item() == pytest.approx(-math.log(0.2), rel=1e-4)
    probs[0, 0, 0] = 0.0
    probs[0, 0, 0, [3, 4]] = 0.5
    probs[0, 1, 0] = 0.0  # head 1 does not count
    assert grounding_loss(probs, relevant).item() == pytest.approx(0.0, abs=1e-5)


def test_attention_rows_gives_differentiable_rows_of_the_layer(reference, batch):
    model, processor, _ = reference
    rows, inputs = batch
    queries, relevant = grounding_targets(processor, rows, inputs)
    probe = AttentionRows(model, 1)
    try:
        probe.rows = queries
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
              pixel_values=_pixels(processor, rows))
        assert probe.probs.shape == (*queries.shape[:1], model.config.text_config.num_attention_heads,
                                     queries.shape[1], inputs["input_ids"].shape[1])
        torch.testing.assert_close(probe.probs.sum(-1), torch.ones_like(probe.probs.sum(-1)))
        grounding_loss(probe.probs, relevant).backward()
        q = model.model.language_model.layers[1].self_attn.q_proj.weight
        assert q.grad is not None and q.grad.abs().sum() > 0
    finally:
        probe.remove()
        model.zero_grad()
    assert not model.model.language_model.layers[1].self_attn._forward_pre_hooks


def _pixels(processor, rows):
    import numpy as np

    from covipal.world.dataset import make_sample

    pools = scan_pools(0)
    pics = [processor.pictures([np.asarray(im) for im in make_sample(DataConfig(), "train", i, pools)["images"]])
            for i in range(len(rows))]
    return torch.from_numpy(np.concatenate(pics))
