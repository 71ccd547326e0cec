"""The reference recipe's grounding loss: which positions ask, which tokens they are about."""

import math

import numpy as np
import pytest
import torch

from covipal.config import DataConfig
from covipal.reference.train import (AttentionRows, grounding_loss, grounding_targets, intermediate_answer_loss,
                                     turn_heads)
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


def test_sink_types_also_point_at_the_bos_token(reference, batch):
    _, processor, _ = reference
    rows, inputs = batch
    _, plain = grounding_targets(processor, rows, inputs)
    _, sunk = grounding_targets(processor, rows, inputs, sink=("count", "presence"))
    assert (inputs["input_ids"][:, 0] == processor.tokenizer.bos_token_id).all()
    seen = set()
    for j, row in enumerate(rows):
        for t, turn in enumerate([row] + row["follow_ups"]):
            with_sink = turn["question_type"] in ("count", "presence")
            seen.add(with_sink)
            assert sunk[j, t, 0].item() == with_sink
            assert torch.equal(sunk[j, t, 1:], plain[j, t, 1:])  # the cells themselves are unchanged
        assert not sunk[j, len(row["follow_ups"]) + 1:].any()
    assert seen == {True, False}


def test_named_only_types_point_at_the_named_digit_alone(reference, batch):
    _, processor, _ = reference
    rows, inputs = batch
    _, every = grounding_targets(processor, rows, inputs)
    _, named = grounding_targets(processor, rows, inputs, named_only=("relation",))
    seen = 0
    for j, row in enumerate(rows):
        vision = (inputs["input_ids"][j] == processor.image_token_id).nonzero()[:, 0]
        for t, turn in enumerate([row] + row["follow_ups"]):
            if turn["question_type"] != "relation":
                assert torch.equal(named[j, t], every[j, t])
                continue
            seen += 1
            (f, r, c), (f2, r2, c2) = turn["relevant"]
            assert (f2, r2, c2) == (f, r, c + 1)  # the world lists the named digit first
            want = {int(vision[processor.token_index(f, r, c, row["n_frames"])])}
            assert set(named[j, t].nonzero()[:, 0].tolist()) == want
            assert every[j, t].sum().item() == 2
    assert seen > 0


def test_grounding_loss_is_cross_entropy_to_an_even_target_over_relevant_tokens():
    relevant = torch.zeros(1, 2, 10, dtype=torch.bool)
    relevant[0, 0, [3, 4]] = True  # turn 1 has no relevant token: ignored
    probs = torch.full((1, 2, 2, 10), 0.1)
    assert grounding_loss(probs, relevant).item() == pytest.approx(-math.log(0.1), rel=1e-4)
    probs[0, 0, 0] = 0.0
    probs[0, 0, 0, [3, 4]] = 0.5  # the target itself: only its entropy, log 2, is left
    probs[0, 1, 0] = 0.0  # head 1 does not count
    assert grounding_loss(probs, relevant).item() == pytest.approx(math.log(2), abs=1e-5)
    probs[0, 0, 0, [3, 4]] = torch.tensor([0.9, 0.1])  # all on the cells, but not evenly: worse
    assert grounding_loss(probs, relevant).item() > math.log(2) + 0.5


def test_each_turn_is_grounded_on_the_head_named_for_its_question_type(batch):
    rows, _ = batch
    heads = turn_heads(rows, 8, {"position": 1})
    seen = set()
    for j, row in enumerate(rows):
        turns = [row] + row["follow_ups"]
        for t in range(8):
            want = 1 if t < len(turns) and turns[t]["question_type"] == "position" else 0
            assert heads[j, t].item() == want
            seen.add(want)
    assert seen == {0, 1}
    relevant = torch.zeros(1, 2, 10, dtype=torch.bool)
    relevant[0, :, 3] = True
    probs = torch.full((1, 2, 2, 10), 0.1)
    probs[0, 1, :, :] = 0.0
    probs[0, 1, :, 3] = 1.0  # head 1 looks only at the cell, head 0 evenly everywhere
    on_head_1 = torch.ones(1, 2, dtype=torch.long)
    assert grounding_loss(probs, relevant, on_head_1).item() == pytest.approx(0.0, abs=1e-5)
    assert grounding_loss(probs, relevant).item() == pytest.approx(-math.log(0.1), rel=1e-4)
    mixed = torch.tensor([[1, 0]])  # turn 0 on head 1 (loss 0), turn 1 on head 0 (-log 0.1)
    assert grounding_loss(probs, relevant, mixed).item() == pytest.approx(-math.log(0.1) / 2, rel=1e-4)


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


def test_deep_supervision_is_the_answer_loss_read_at_the_intermediate_layers(reference, batch):
    model, processor, _ = reference
    rows, inputs = batch
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                pixel_values=_pixels(processor, rows), labels=inputs["labels"], output_hidden_states=True)
    lm = model.model.language_model
    assert len(out.hidden_states) == len(lm.layers) + 1 == 3  # embeddings, after layer 0, final (normed)
    # by hand: the LM head on the normed state after layer 0, cross-entropy on the answer words only
    logits = model.lm_head(lm.norm(out.hidden_states[1]))[:, :-1]  # (B, L - 1, V)
    target = inputs["labels"][:, 1:]
    answers = target != -100
    assert answers.sum() == sum(1 + len(r["follow_ups"]) for r in rows)
    want = -torch.log_softmax(logits, -1)[answers].gather(-1, target[answers][:, None]).mean()
    got = intermediate_answer_loss(model, out.hidden_states, inputs["labels"])
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, out.loss)  # not the final layer's loss over again
    got.backward()
    assert lm.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert lm.layers[1].mlp.down_proj.weight.grad is None  # above the read-out layer: no gradient
    model.zero_grad()


def test_the_rope_base_reaches_the_decoder():
    from covipal.config import ReferenceModel
    from covipal.reference.model import build_reference

    small = dict(vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2,
                 text_intermediate=64)
    slow, default = (build_reference(ReferenceModel(**small, rope_theta=theta)) for theta in (1e9, 1e4))
    assert slow.config.text_config.rope_parameters["rope_theta"] == 1e9
    inv_slow = slow.model.language_model.rotary_emb.inv_freq
    inv_default = default.model.language_model.rotary_emb.inv_freq
    assert inv_slow[-1] < inv_default[-1] / 100  # its slowest dimension turns far more slowly


def _pixels(processor, rows):
    import numpy as np

    from covipal.world.dataset import make_sample

    pools = scan_pools(0)
    pics = [processor.pictures([np.asarray(im) for im in make_sample(DataConfig(), "train", i, pools)["images"]])
            for i in range(len(rows))]
    return torch.from_numpy(np.concatenate(pics))


def test_pruned_view_hides_only_irrelevant_vision_tokens():
    from covipal.reference.train import pruned_view

    B, L = 64, 40
    vision = torch.zeros(B, L, dtype=torch.bool)
    vision[:, 1:33] = True
    relevant = torch.zeros(B, L, dtype=torch.bool)
    relevant[:, [0, 5, 6]] = True  # <s> (text) and two cells
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:3, -2:] = 0  # padding stays padding
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(pruned_view(mask, vision, relevant, 0.0, 0.9, gen), mask)
    out = pruned_view(mask, vision, relevant, 0.5, 0.9, gen)
    hidden = (mask == 1) & (out == 0)
    assert not (hidden & ~vision).any() and not (hidden & relevant).any()
    assert torch.equal(out[:3, -2:], mask[:3, -2:])
    rows = hidden.any(1)
    assert 16 < rows.sum() < 48  # about half the rows
    share = hidden[rows].sum(1).float() / 30  # of the 30 hideable tokens
    assert share.max() <= 1.0 and share.mean() < 0.7  # rates drawn from [0, 0.9]


def test_salient_views_hide_empty_cells_before_digits():
    from covipal.reference.train import occupancy, pruned_view

    B, L = 64, 40
    vision = torch.zeros(B, L, dtype=torch.bool)
    vision[:, 1:33] = True
    relevant = torch.zeros(B, L, dtype=torch.bool)
    relevant[:, [5, 6]] = True
    occupied = torch.zeros(B, L, dtype=torch.bool)
    occupied[:, 5:15] = True  # cells 5, 6 (relevant) and 8 more digits; the other 22 cells empty
    mask = torch.ones(B, L, dtype=torch.long)
    out = pruned_view(mask, vision, relevant, 1.0, 0.9, torch.Generator().manual_seed(0), occupied, salient=1.0)
    hidden = out == 0
    assert not (hidden & (relevant | ~vision | occupied)).any()  # digits and relevant cells stay
    share = hidden.sum(1).float() / 22  # of the 22 empty cells
    assert share.max() > 0.9 and share.min() < 0.1  # shares drawn from [0, 1]: down to digits alone
    plain = pruned_view(mask, vision, relevant, 1.0, 0.9, torch.Generator().manual_seed(0))
    again = pruned_view(mask, vision, relevant, 1.0, 0.9, torch.Generator().manual_seed(0), occupied, salient=0.0)
    assert torch.equal(plain, again)  # salient 0: the default views, draw for draw
    pics = -np.ones((1, 3, 16, 16), dtype=np.float32)
    pics[0, 1, 9, 2] = 0.5  # one lit pixel in patch (row 1, col 0)
    assert occupancy(pics).tolist() == [False, False, True, False]


def test_a_hidden_token_is_a_removed_token_with_positions_kept(reference):
    """Masking a vision token out equals removing it while the others keep their positions,
    which is what the pruning runtime does: the pruned views train for exactly that input."""
    model, processor, _ = reference
    torch.manual_seed(0)
    n_v = processor.tokens_per_picture
    ids = torch.tensor([[processor.tokenizer.bos_token_id] + [processor.image_token_id] * n_v + [5, 6, 7]])
    embeds = torch.randn(1, ids.shape[1], model.config.text_config.hidden_size)
    llm = model.model.language_model
    drop = torch.tensor([3, 4, 10, 20])
    mask = torch.ones_like(ids)
    mask[0, drop] = 0
    keep = torch.tensor([i for i in range(ids.shape[1]) if i not in drop.tolist()])
    with torch.no_grad():
        masked = llm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, -1]
        removed = llm(inputs_embeds=embeds[:, keep], attention_mask=torch.ones(1, len(keep), dtype=torch.long),
                      position_ids=keep[None]).last_hidden_state[:, -1]  # a 2-D mask, as the runtime passes
    torch.testing.assert_close(masked, removed, rtol=1e-5, atol=1e-5)
