"""The baselines against their published rules on tiny models, and the in-LLM pruning runtime."""

import copy
import math

import pytest
import torch
from tiny_lvlms import (all_hooks, capture_llm_inputs, eager_attentions, make_batch, reference_layer_generate,
                        tiny_model, vision_positions)

from covipal.pruning import available_methods, get_method, n_keep
from covipal.pruning.base import Budget
from covipal.pruning.dart import dart_order
from covipal.pruning.fastv import matched_count
from covipal.pruning.layers import rope_keys
from covipal.pruning.sparsevlm import raters

DEPTH = 4  # decoder layers of the tiny models here: room for a layer K = 2 and several stages
LAYOUT = [(2, 0), (0, 0), (1, 0)]  # left-padded batch: two images, text only, one image
BASELINES = ["dart", "fastv", "oracle", "pyramiddrop", "sparsevlm", "visionzip"]


def setup(family="llava"):
    return tiny_model(family, layers=DEPTH), make_batch(family, LAYOUT)


def generate(model, batch, n=3, **kwargs):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits)


def last_row(batch, b):
    return int(batch["attention_mask"][b].nonzero().max())


def top(scores, k):
    return sorted(scores.topk(k).indices.tolist())


def test_registry_has_the_baselines():
    assert set(BASELINES) <= set(available_methods())


# --- budgets ------------------------------------------------------------------------------


def test_budgets_are_reported_both_ways():
    # FastV K=2, 144 of 576 kept after layer 2 of 32: the "~171 equivalent tokens" of SparseVLMs #12
    fastv = get_method("fastv", reserve_ratio=0.25)
    assert fastv.budget(576, 32) == Budget(entering=576, layer_average=(2 * 576 + 30 * 144) / 32)
    matched = get_method("fastv", reserve_ratio=0.25, match_layer_average=True)
    assert matched.schedule(576, 32) == [(2, matched_count(576, 0.25, 2, 32))] == [(2, 116)]  # ceil(115.2)
    assert 144 <= matched.budget(576, 32).layer_average < 145
    # PyramidDrop's paper schedule: 576 -> 288 -> 144 -> 72 at layers 8/16/24, average 270
    pdrop = get_method("pyramiddrop", lam=0.5)
    assert pdrop.schedule(576, 32) == [(8, 288), (16, 144), (24, 72)]
    assert pdrop.budget(576, 32).layer_average == 270
    assert 192 <= get_method("pyramiddrop", reserve_ratio=1 / 3).budget(576, 32).layer_average < 193
    assert 192 <= get_method("sparsevlm", reserve_ratio=1 / 3).budget(576, 32).layer_average < 193
    for name in ("oracle", "visionzip", "random"):
        assert get_method(name, reserve_ratio=0.25).budget(576, 32) == Budget(144, 144.0)
    assert get_method("dart", reserve_ratio=0.25, layer=0).budget(576, 32) == Budget(144, 144.0)


def test_run_reports_the_budget_of_the_last_prompt():
    model, batch = setup()
    with get_method("fastv", reserve_ratio=0.25)(model) as run, torch.no_grad():
        model(**batch)
    assert run.budget() == [Budget(32, (2 * 32 + 2 * 8) / 4), Budget(0, 0.0), Budget(16, (2 * 16 + 2 * 4) / 4)]
    with get_method("oracle", reserve_ratio=0.25, guide_layer=1)(model) as run, torch.no_grad():
        model(**batch)
    assert run.budget() == [Budget(8, 8.0), Budget(0, 0.0), Budget(4, 4.0)]


# --- FastV and the in-LLM runtime -----------------------------------------------------------


def test_fastv_keeps_the_top_tokens_by_last_token_attention_at_layer_k_minus_1():
    model, batch = setup()
    attentions = eager_attentions("llava", batch, DEPTH)
    for K in (1, 2, 3):
        with get_method("fastv", reserve_ratio=0.3, layer=K)(model) as run, torch.no_grad():
            model(**batch)
        assert [layer for layer, _ in run.stage_kept] == [K]
        for b, vis in enumerate(vision_positions(batch)):
            if len(vis):
                scores = attentions[K - 1][b].mean(0)[last_row(batch, b), vis]  # heads averaged, last prompt token
                assert run.kept_vision[b].tolist() == vis[top(scores, n_keep(len(vis), 0.3))].tolist()
            else:
                assert len(run.kept_vision[b]) == 0


def with_text(batch, kept_vision):
    """Per sample: sorted prompt indices of all its text tokens and of ``kept_vision[b]``."""
    real, out = batch["attention_mask"].bool(), []
    for b, vis in enumerate(vision_positions(batch)):
        text = real[b].clone()
        text[vis] = False
        out.append(torch.tensor(sorted(text.nonzero().squeeze(1).tolist() + kept_vision[b].tolist())))
    return out


@pytest.mark.parametrize("method,kwargs", [("fastv", {"layer": 2}), ("pyramiddrop", {"lam": 0.5})])
def test_in_llm_generate_equals_a_layer_by_layer_reference(method, kwargs):
    """Layers before a stage see the whole (or previous) prompt, later ones text + kept tokens at their
    original positions, with batch padding, through prefill and decoding."""
    model, batch = setup()
    with get_method(method, reserve_ratio=0.3, **kwargs)(model) as run:
        tokens, logits = generate(model, batch)
    stages = [(layer, with_text(batch, kept)) for layer, kept in run.stage_kept]
    assert [layer for layer, _ in stages] == ([2] if method == "fastv" else [1, 2, 3])
    assert [k.tolist() for k in run.kept] == [k.tolist() for k in stages[-1][1]]
    ref_tokens, ref_logits = reference_layer_generate(model, batch, stages, n_new=3)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["fastv", "pyramiddrop"])
def test_in_llm_generate_equals_manual_prefill_and_decode(family, method):
    """A hand-written loop (full-prompt mask, generate's positions) decodes as generate does."""
    model, batch = setup(family)
    positions = []
    record = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: positions.append(kw["position_ids"]), with_kwargs=True)
    try:
        with get_method(method, reserve_ratio=0.3)(model) as run:
            expected, expected_logits = generate(model, batch)
            kept = [k.clone() for k in run.kept_vision]
            tokens, steps = [], []
            mask = batch["attention_mask"]
            with torch.no_grad():
                out = model(**batch, position_ids=positions[0], use_cache=True)
                for step in range(3):
                    steps.append(out.logits[:, -1])
                    tokens.append(out.logits[:, -1].argmax(-1))
                    if step == 2:
                        break
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    out = model(input_ids=tokens[-1][:, None], attention_mask=mask, cache=out.cache, use_cache=True,
                                position_ids=positions[step + 1])
    finally:
        record.remove()
    assert [k.tolist() for k in run.kept_vision] == [k.tolist() for k in kept]
    assert torch.equal(torch.stack(tokens, dim=1), expected)
    torch.testing.assert_close(torch.stack(steps), expected_logits, rtol=0, atol=1e-5)


def test_in_llm_full_ratio_is_bit_identical():
    model, batch = setup()
    base_tokens, base_logits = generate(model, batch)
    for name in ("fastv", "dart"):
        with get_method(name, reserve_ratio=1.0)(model) as run:
            tokens, logits = generate(model, batch)
        assert torch.equal(tokens, base_tokens) and torch.equal(logits, base_logits)
        assert run.budget()[0] == Budget(32, 32.0)


def test_fastv_choice_does_not_depend_on_the_batch():
    model, batch = setup()
    pad = int((batch["attention_mask"][2] == 0).sum())  # sample 2 is left-padded in the batch
    alone = {"input_ids": batch["input_ids"][2:, pad:], "attention_mask": batch["attention_mask"][2:, pad:],
             "pixel_values": batch["pixel_values"][2:]}
    with get_method("fastv", reserve_ratio=0.3)(model) as run, torch.no_grad():
        model(**batch)
        in_batch = run.kept_vision[2].tolist()
        model(**alone)
    assert [i + pad for i in run.kept_vision[0].tolist()] == in_batch


# --- PyramidDrop ------------------------------------------------------------------------------


def test_pyramiddrop_stages_and_first_ranking():
    model, batch = setup()
    pruner = get_method("pyramiddrop", lam=0.5)
    assert pruner.stages(DEPTH) == [1, 2, 3] and pruner.stages(32) == [8, 16, 24]
    with pruner(model) as run, torch.no_grad():
        model(**batch)
    attentions = eager_attentions("llava", batch, DEPTH)
    for b, vis in enumerate(vision_positions(batch)):
        counts = [len(kept[b]) for _, kept in run.stage_kept]
        assert counts == ([len(vis) // 2, len(vis) // 4, len(vis) // 8] if len(vis) else [0, 0, 0])
        if len(vis):  # stage 1 ranks by layer 1's own attention of the last token, on the unpruned sequence
            scores = attentions[1][b].mean(0)[last_row(batch, b), vis]
            assert run.stage_kept[0][1][b].tolist() == vis[top(scores, len(vis) // 2)].tolist()
            nested = [set(kept[b].tolist()) for _, kept in run.stage_kept]
            assert nested[0] >= nested[1] >= nested[2]


# --- SparseVLM --------------------------------------------------------------------------------


def test_sparsevlm_raters_are_the_text_tokens_above_the_mean():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.5], [1.0, 1.0]])
    vision, text = torch.tensor([0, 1]), torch.tensor([2, 3, 4])
    m = torch.stack([torch.softmax(torch.tensor([2.0, 0.0, 1.0]), 0),
                     torch.softmax(torch.tensor([0.0, 0.5, 1.0]), 0)]).mean(0)  # by hand: H_v . H_t, softmax over text
    assert raters(e, vision, text).tolist() == text[m > m.mean()].tolist()


def test_sparsevlm_first_stage_ranks_by_rater_attention():
    model, batch = setup()
    pruner = get_method("sparsevlm", reserve_ratio=0.3)
    assert pruner.stages(32) == [3, 7, 16] and pruner.stages(DEPTH) == [1, 2, 3]
    with pruner(model) as run, torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.logits).all()
    attentions = eager_attentions("llava", batch, DEPTH)
    full = capture_llm_inputs(model, batch)["inputs_embeds"]
    for b, vis in enumerate(vision_positions(batch)):
        if not len(vis):
            continue
        question = torch.arange(int(vis.max()) + 1, batch["input_ids"].shape[1])
        r = raters(full[b], vis, question)
        scores = attentions[0][b].mean(0)[r][:, vis].mean(0)  # layer 0's attention, before stage layer 1
        k = len(run.stage_kept[0][1][b])
        assert run.stage_kept[0][1][b].tolist() == vis[top(scores, k)].tolist()


# --- DART -------------------------------------------------------------------------------------


def test_dart_rule_on_a_hand_example():
    # tokens 0..5 are vision, 6..7 text; L1 key norms make token 2 the image pivot and 7 the text pivot
    keys = torch.tensor([[1.0], [1.0], [5.0], [1.0], [1.0], [1.0], [1.0], [3.0]])
    hidden = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05], [0.0, 1.0], [-1.0, 0.2], [0.5, 0.5],
                           [0.0, 0.0], [1.0, -1.0]])
    vision, text = torch.arange(6), torch.tensor([6, 7])
    # budget 3: pivot 2 kept; 2 more shared by pivots 2 then 7: least cosine-similar to token 2 is token 4,
    # then among {0, 1, 3, 5} least similar to token 7 (direction (1, -1)) is token 3
    assert dart_order(keys, hidden, vision, text, 3, pivot_image=1, pivot_text=1) == [2, 4, 3]
    assert len(dart_order(keys, hidden, vision, text, 6, pivot_image=1, pivot_text=1)) == 6


@pytest.mark.parametrize("layer", [0, 2])
def test_dart_in_a_model_follows_its_rule(layer):
    model, batch = setup()
    with torch.no_grad():
        out = model(**batch, use_cache=True, output_hidden_states=True)
        llm = model.model.language_model
        if layer:
            keys = out.cache.layers[layer - 1].keys  # after RoPE, as DART reads them
            hidden = llm.norm(out.hidden_states[layer])  # input of layer K, final norm
        else:
            e = capture_llm_inputs(model, batch)["inputs_embeds"]
            pe = llm.rotary_emb(e, torch.arange(e.shape[1])[None])
            keys = rope_keys(llm.layers[0].self_attn, llm.layers[0].input_layernorm(e), pe)
            hidden = llm.norm(e)
    keys = keys.transpose(1, 2).flatten(2)
    with get_method("dart", reserve_ratio=0.3, layer=layer, pivot_image=2, pivot_text=2)(model) as run, \
            torch.no_grad():
        model(**batch)
    for b, vis in enumerate(vision_positions(batch)):
        if not len(vis):
            continue
        text = torch.arange(int(vis.max()) + 1, batch["input_ids"].shape[1])
        want = dart_order(keys[b], hidden[b], vis, text, n_keep(len(vis), 0.3), 2, 2)
        assert run.kept_vision[b].tolist() == sorted(want)


# --- VisionZip --------------------------------------------------------------------------------


def cls_attention_eager(family, pixel_values):
    """[CLS] row of the tower's selected layer, summed over heads, by eager attention: (crops, P)."""
    model = copy.deepcopy(tiny_model(family, layers=DEPTH))
    model.set_attn_implementation("eager")
    tower = model.model.vision_tower
    with torch.no_grad():
        att = tower(pixel_values.flatten(0, -4), output_attentions=True).attentions
    n = len(att)
    layer = model.config.vision_feature_layer % (n + 1) - 1
    return att[layer][:, :, 0, 1:].sum(1)


def test_visionzip_keeps_the_top_cls_attention_patches_llava():
    model, batch = setup()
    cls = cls_attention_eager("llava", batch["pixel_values"])  # (images, 16)
    with get_method("visionzip", reserve_ratio=0.25)(model) as run:
        generate(model, batch, n=2)
    image = 0
    for b, vis in enumerate(vision_positions(batch)):
        n_img = len(vis) // 16
        scores = cls[image:image + n_img].flatten()
        image += n_img
        assert run.kept_vision[b].tolist() == (vis[top(scores, n_keep(len(vis), 0.25))].tolist() if len(vis) else [])


def test_visionzip_maps_crops_through_the_llava_next_packing():
    model, batch = setup("llava_next")
    cls = cls_attention_eager("llava_next", batch["pixel_values"])  # (images * 2 crops, 4)
    per_image = cls.view(-1, 2, cls.shape[-1], 1)
    packed, _ = model.model.pack_image_features(list(per_image), batch["image_sizes"], "default",
                                                image_newline=torch.tensor([float("-inf")]))
    with get_method("visionzip", reserve_ratio=0.3)(model) as run, torch.no_grad():
        model(**batch)
    image = 0
    for b, vis in enumerate(vision_positions(batch)):
        n_img = len(vis) // 10
        scores = torch.cat([p[:, 0] for p in packed[image:image + n_img]]) if n_img else torch.zeros(0)
        image += n_img
        assert run.kept_vision[b].tolist() == (vis[top(scores, n_keep(len(vis), 0.3))].tolist() if len(vis) else [])


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_visionzip_names_the_unsupported_families(family):
    with pytest.raises(NotImplementedError, match=r"\[CLS\].*supported families: llava, llava_next"):
        with get_method("visionzip")(tiny_model(family, layers=DEPTH)):
            pass


# --- oracle -----------------------------------------------------------------------------------


def test_oracle_keeps_the_top_guide_layer_targets():
    from covipal.pruning.guide import guide_targets

    model, batch = setup("qwen2_vl")
    targets = guide_targets(model, batch, 2, "after_image")
    with get_method("oracle", reserve_ratio=0.3, guide_layer=2)(model) as run:
        generate(model, batch, n=2)
    for b, vis in enumerate(vision_positions(batch)):
        n = len(vis)
        assert run.kept_vision[b].tolist() == (vis[top(targets.target[b, :n], n_keep(n, 0.3))].tolist() if n else [])


# --- hooks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BASELINES)
def test_hooks_are_removed_after_exit(name):
    model, batch = setup("llava")
    with torch.no_grad():
        before = model(**batch).logits
    hooks = all_hooks(model)
    pruner = get_method(name, reserve_ratio=0.3)
    with pruner(model):
        assert len(all_hooks(model)) > len(hooks)
        generate(model, batch, n=2)
    with pytest.raises(KeyError), pruner(model):
        raise KeyError("an error inside the block still removes the hooks")
    assert all_hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_in_llm_errors_name_the_problem():
    model, batch = setup()
    with pytest.raises(ValueError, match="outside the LLM's 4 decoder layers"):
        with get_method("fastv", layer=4)(model):
            pass
    with pytest.raises(ValueError, match="layer must be >= 1"):
        get_method("fastv", layer=0)
    with get_method("fastv")(model), pytest.raises(RuntimeError, match="already attached"), \
            get_method("pyramiddrop")(model):
        pass


# --- each rule on a small hand-computed example ------------------------------------------------


class HandContext:
    """Builds a LayerContext for one prompt ``[<s>, v0, v1, v2, v3, t0, t1]`` (4 vision tokens) whose
    ``attention(rows, at)`` returns given probabilities and records what was asked."""

    @staticmethod
    def make(layer, probs, embeds=None):
        from covipal.pruning.layers import LayerContext

        class Ctx(LayerContext):
            def attention(self, rows, at):
                self.asked.append((rows.tolist(), at))
                return probs  # (B, H, n_q, L)

        L = 7
        vision = torch.tensor([[False, True, True, True, True, False, False]])
        real = torch.ones(1, L, dtype=torch.bool)
        embeds = torch.zeros(1, L, 2) if embeds is None else embeds
        ctx = Ctx(layer=layer, stage=0, hidden=torch.zeros(1, L, 2), index=torch.arange(L)[None], real=real,
                  vision=vision, prompt_real=real, prompt_vision=vision, embeds=embeds,
                  input_ids=torch.zeros(1, L, dtype=torch.long), model=None, llm=None, layer_kwargs={})
        ctx.asked = []
        return ctx


def kept_by(pruner, ctx, k):
    from covipal.pruning.base import top_k

    return top_k(pruner.score_at(ctx), torch.tensor([4]), [k])[0].tolist()


def test_fastv_rule_by_hand():
    # last token (column 6) attends to v0..v3 with heads [.5 .1 .2 .2] and [.1 .1 .6 .2]: mean [.3 .1 .4 .2]
    probs = torch.zeros(1, 2, 1, 7)
    probs[0, 0, 0, 1:5] = torch.tensor([0.5, 0.1, 0.2, 0.2])
    probs[0, 1, 0, 1:5] = torch.tensor([0.1, 0.1, 0.6, 0.2])
    ctx = HandContext.make(layer=2, probs=probs)
    pruner = get_method("fastv", reserve_ratio=0.5, layer=2)
    assert kept_by(pruner, ctx, 2) == [0, 2]  # v2 (.4) and v0 (.3)
    assert ctx.asked == [([[6]], 1)]  # the last prompt token's row, at layer K - 1
    assert pruner.schedule(4, 4) == [(2, 2)]  # from layer K = 2 on, ceil(0.5 * 4) tokens


def test_pyramiddrop_rule_by_hand():
    probs = torch.zeros(1, 2, 1, 7)
    probs[0, 0, 0, 1:5] = torch.tensor([0.1, 0.4, 0.1, 0.2])
    probs[0, 1, 0, 1:5] = torch.tensor([0.1, 0.4, 0.3, 0.0])  # mean [.1 .4 .2 .1]
    ctx = HandContext.make(layer=8, probs=probs)
    pruner = get_method("pyramiddrop", lam=0.5)
    assert kept_by(pruner, ctx, 2) == [1, 2]
    assert ctx.asked == [([[6]], 8)]  # the last token's row, recomputed at the stage layer itself
    assert pruner.schedule(8, 32) == [(8, 4), (16, 2), (24, 1)]  # lambda = 0.5 at layers 8, 16, 24 of 32


def test_sparsevlm_rule_by_hand():
    # raters: v . t is 2 for t0 and 0 for t1 for every vision token, softmax over text [.88 .12]: only t0 is
    # above the mean. t0's attention (column 5) over v0..v3, heads [.1 .6 .3 .0] and [.1 .2 .3 .4]: mean [.1 .4 .3 .2]
    embeds = torch.tensor([[[0.0, 0.0], [1, 0], [1, 0], [1, 0], [1, 0], [2, 0], [0, 0]]])
    probs = torch.zeros(1, 2, 1, 7)
    probs[0, 0, 0, 1:5] = torch.tensor([0.1, 0.6, 0.3, 0.0])
    probs[0, 1, 0, 1:5] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    ctx = HandContext.make(layer=3, probs=probs, embeds=embeds)
    pruner = get_method("sparsevlm", reserve_ratio=0.5)
    assert kept_by(pruner, ctx, 2) == [1, 2]
    assert ctx.asked == [([[5]], 2)]  # the raters' rows, at the pruning layer l; layer l + 1 sees the result
    assert pruner.stages(32) == [3, 7, 16]  # pruning layers 2, 6, 15 of 32


def test_visionzip_rule_by_hand():
    from torch import nn

    from covipal.pruning.visionzip import cls_attention

    attn = nn.Module()
    attn.q_proj, attn.k_proj, attn.head_dim, attn.scale = nn.Identity(), nn.Identity(), 1, 1.0  # 2 heads of size 1
    hidden = torch.tensor([[[1.0, 0.0], [1, 0], [0, 0], [2, 0]]])  # [CLS], p0, p1, p2
    # head 0: [CLS] logits [1, 1, 0, 2]; head 1: query 0, uniform 1/4; summed over heads
    e = [math.exp(v) for v in (1, 1, 0, 2)]
    want = torch.tensor([[x / sum(e) + 0.25 for x in e]])
    torch.testing.assert_close(cls_attention(attn, hidden), want)
    assert want[0, 1:].topk(2).indices.sort().values.tolist() == [0, 2]  # dominant patches p0 and p2
