"""Properties of ``with pruner(model)`` on every family of the adapter table."""

import pytest
import torch
from tiny_lvlms import (FAMILIES, VIDEO_FAMILIES, NormPruner, all_hooks, capture_llm_inputs, make_batch,
                        reference_generate, reference_kept, tiny_model)

from covipal.pruning import ADAPTERS, n_keep

LAYOUTS = {"one_image": [(1, 0)], "mixed": [(2, 0), (0, 0), (1, 0)], "video": [(1, 1), (0, 1), (0, 0)]}
CASES = [(f, name) for f in FAMILIES for name in LAYOUTS if name != "video" or f in VIDEO_FAMILIES]
MROPE = [f for f in FAMILIES if ADAPTERS[f].positions == "mrope"]


def generate(model, batch, **kwargs):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_every_adapter_is_tested():
    assert sorted(ADAPTERS) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_ratio_is_bit_identical(family):
    model, batch = tiny_model(family), make_batch(family, LAYOUTS["mixed"])
    base_logits, (base_tokens, base_scores) = logits(model, batch), generate(model, batch)
    with NormPruner(reserve_ratio=1.0)(model) as run:
        assert torch.equal(logits(model, batch), base_logits)
        tokens, scores = generate(model, batch)
    assert torch.equal(tokens, base_tokens) and torch.equal(scores, base_scores)
    assert [len(k) for k in run.kept_vision] == run.n_vision.tolist()


@pytest.mark.parametrize("family,layout", CASES)
def test_pruned_generate_equals_manual_prefill_and_decode(family, layout):
    model, batch, ratio = tiny_model(family), make_batch(family, LAYOUTS[layout]), 0.3
    full = capture_llm_inputs(model, batch)
    kept = reference_kept(family, batch, full, ratio)
    ref_tokens, ref_logits = reference_generate(model, family, full, kept, n_new=3)
    with NormPruner(reserve_ratio=ratio)(model) as run:
        tokens, scores = generate(model, batch)
    assert [k.tolist() for k in run.kept] == [k.tolist() for k in kept]
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_kept_set_is_the_top_k_in_order(family, ratio):
    model, batch = tiny_model(family), make_batch(family, LAYOUTS["mixed"])
    full = capture_llm_inputs(model, batch)
    base = logits(model, batch)
    with NormPruner(reserve_ratio=ratio)(model) as run:
        pruned = logits(model, batch)
    for b, kept_vision in enumerate(run.kept_vision):
        n = int(run.n_vision[b])
        assert len(kept_vision) == n_keep(n, ratio)
        assert torch.equal(kept_vision, kept_vision.sort().values)
        vision = run.kept[b][torch.isin(run.kept[b], kept_vision)]
        assert torch.equal(vision, kept_vision)
    assert [k.tolist() for k in run.kept] == [k.tolist() for k in reference_kept(family, batch, full, ratio)]
    assert pruned.shape[1] < base.shape[1]  # the LLM saw fewer tokens
    assert not torch.allclose(pruned[:, -1], base[:, -1])  # and it changed the answer's logits


@pytest.mark.parametrize("family", FAMILIES)
def test_model_is_unchanged_after_exit(family):
    model, batch = tiny_model(family), make_batch(family, LAYOUTS["mixed"])
    before = logits(model, batch)  # also lets transformers install its own lazy hooks first
    hooks, modules = all_hooks(model), [(n, type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = NormPruner(reserve_ratio=0.25)
    with pruner(model):
        assert len(all_hooks(model)) > len(hooks)
        generate(model, batch)
    with pytest.raises(KeyError), pruner(model):
        raise KeyError("an error inside the block still removes the hooks")
    assert all_hooks(model) == hooks
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, batch), before)
    assert model.config.get_text_config()._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", MROPE)
def test_mrope_positions_are_the_full_sequence_positions_at_kept_tokens(family):
    model, batch = tiny_model(family), make_batch(family, LAYOUTS["video"])
    full_positions = capture_llm_inputs(model, batch)["position_ids"]  # (3, B, L)
    seen = {}
    with NormPruner(reserve_ratio=0.25)(model) as run:
        handle = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.update(kw), with_kwargs=True)  # runs after the pruner's hook
        try:
            logits(model, batch)
        finally:
            handle.remove()
    positions, mask = seen["position_ids"], seen["attention_mask"].bool()
    for b, kept in enumerate(run.kept):
        assert torch.equal(positions[:, b][:, mask[b]], full_positions[:, b, kept])


@pytest.mark.parametrize("family", FAMILIES)
def test_manual_decoding_inside_the_block_matches_generate(family):
    """Hand-written loops pass no positions and the full-prompt mask, the pruned one or none."""
    model, batch = tiny_model(family), make_batch(family, LAYOUTS["mixed"])
    with NormPruner(reserve_ratio=0.3)(model) as run:
        expected, _ = generate(model, batch)
        lengths = [len(k) for k in run.kept]
        pruned_mask = torch.tensor([[0] * (max(lengths) - n) + [1] * n for n in lengths])
        for mask in (batch["attention_mask"], pruned_mask, None):
            tokens = []
            with torch.no_grad():
                out = model(**batch, use_cache=True)
                for _ in range(3):
                    tokens.append(out.logits[:, -1].argmax(-1))
                    if mask is not None:
                        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    out = model(input_ids=tokens[-1][:, None], attention_mask=mask, cache=out.cache, use_cache=True)
            assert torch.equal(torch.stack(tokens, dim=1), expected)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generate_without_cache_prunes_every_step_the_same_way(family):
    model, batch = tiny_model(family), make_batch(family, LAYOUTS["mixed"])
    with NormPruner(reserve_ratio=0.3)(model):
        cached, _ = generate(model, batch)
        uncached, _ = generate(model, batch, use_cache=False)
    assert torch.equal(cached, uncached)


def test_errors_name_the_problem():
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(ValueError, match=r"model family 'llama'.*supported families.*'llava'.*'qwen2_vl'"):
        with NormPruner()(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, vocab_size=8))):
            pass
    model, batch = tiny_model("llava"), make_batch("llava", LAYOUTS["one_image"])
    logits(model, batch)
    hooks = all_hooks(model)
    with NormPruner()(model), pytest.raises(RuntimeError, match="already attached"), NormPruner()(model):
        pass
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with NormPruner()(model), pytest.raises(ValueError, match="needs `input_ids`"):
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])

    class Wrong(NormPruner):
        def score(self, ctx):
            return super().score(ctx)[:, 1:]

    with Wrong()(model), pytest.raises(ValueError, match=r"returned shape .* expected \(B, n_v\)"):
        logits(model, batch)
    assert all_hooks(model) == hooks
