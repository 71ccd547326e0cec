"""Stage 2: the soft mask is exact at m = 1 and scales attention by m; only the PPM learns."""

import copy

import pytest
import torch
from tiny_lvlms import ROWS, make_batch, row_prompts, tiny_model, vision_positions

from covipal.ppm import PPM, PPMConfig
from covipal.pruning import n_keep
from covipal.training import stage2
from covipal.training.ds import DeepSpeedConfig
from covipal.pruning import get_method, select
from covipal.training.stage2 import Stage2Config, regularisers, retention, soft_forward, straight_through

LAYOUT = [(2, 0), (0, 0), (1, 0)]


def small_ppm(seed=0):
    torch.manual_seed(seed)
    return PPM(PPMConfig(d_model=32, d_ppm=16, n_layers=1, n_heads=2))


def random_scores(ctx):
    return torch.randn(ctx.vision_mask.shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_full_retention_leaves_logits_unchanged(family):
    model, batch = tiny_model(family), make_batch(family, LAYOUT)
    with torch.no_grad():
        want = model(**batch).logits
        got = soft_forward(model, lambda ctx: torch.full(ctx.vision_mask.shape, 1e4), batch,
                           Stage2Config(threshold="zero"))
    assert (got.retention == 1).all()
    real = batch["attention_mask"].bool()
    assert torch.equal(got.output.logits[real], want[real])


def test_retention_multiplies_attention_to_each_vision_key():
    model = copy.deepcopy(tiny_model("llava"))
    model.set_attn_implementation("eager")
    batch, cfg = make_batch("llava", LAYOUT), Stage2Config(reserve_ratio=0.25, temperature=0.5)
    with torch.no_grad():
        full = model(**batch, output_attentions=True).attentions[0]  # layer 0 sees the same hidden states
        soft = soft_forward(model, random_scores, {**batch, "output_attentions": True}, cfg)
    weight = torch.ones(full.shape[0], full.shape[-1])
    for b, vis in enumerate(vision_positions(batch)):
        weight[b, vis] = soft.retention[b, :len(vis)]
    scaled = full * weight[:, None, None, :]
    want = scaled / scaled.sum(-1, keepdim=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(soft.output.attentions[0].transpose(1, 2)[real], want.transpose(1, 2)[real],
                               rtol=1e-4, atol=1e-6)


def test_topk_threshold_keeps_the_hard_top_k():
    scores = torch.randn(3, 10)
    mask = torch.arange(10)[None] < torch.tensor([[10], [7], [0]])
    for r in (0.25, 0.5, 1.0):
        m = retention(scores, mask, Stage2Config(reserve_ratio=r))
        assert ((m > 0.5) & mask).sum(1).tolist() == [n_keep(10, r), n_keep(7, r), 0]
        assert (m[~mask] == 1).all() and (m > 0).all()
    binary, share = regularisers(torch.tensor([[1.0, 0.0, 0.5, 1.0]]), torch.tensor([[1, 1, 1, 0]]).bool(), 0.5)
    assert binary.item() == pytest.approx(0.25 / 3) and share.item() == 0.0


def test_straight_through_keeps_the_hard_top_k_and_passes_the_gradient_on():
    scores = torch.randn(3, 10, requires_grad=True)
    mask = torch.arange(10)[None] < torch.tensor([[10], [7], [0]])
    cfg = Stage2Config(reserve_ratio=0.25, estimator="straight_through", temperature=0.5)
    m, log_m = straight_through(scores, mask, cfg)
    kept = torch.zeros_like(mask)
    for b, index in enumerate(select(scores.detach(), mask.sum(1), 0.25)):
        kept[b, index] = True
    assert torch.equal(m == 1, kept | ~mask) and (m[mask & ~kept] == cfg.min_retention).all()
    weight = torch.randn(3, 10)
    (log_m * weight).sum().backward()
    torch.testing.assert_close(scores.grad, torch.where(mask, weight / 0.5, 0.0))


def test_straight_through_noise_explores_in_training_only():
    scores, mask = torch.randn(2, 16), torch.ones(2, 16, dtype=torch.bool)
    cfg = Stage2Config(reserve_ratio=0.25, estimator="straight_through", noise=1.0)
    with torch.no_grad():
        plain = straight_through(scores, mask, cfg)[0]
    assert torch.equal(plain, straight_through(scores, mask, Stage2Config(reserve_ratio=0.25))[0])
    sampled = [straight_through(scores.requires_grad_(), mask, cfg)[0] for _ in range(20)]
    assert all(((m == 1).sum(1) == n_keep(16, 0.25)).all() for m in sampled)
    assert any(not torch.equal(m, plain) for m in sampled)


def test_straight_through_forward_matches_hard_pruning():
    model, (batch, _) = tiny_model("llava"), val_batches()[0]
    ppm = small_ppm()
    with torch.no_grad():
        with get_method("covipal", reserve_ratio=0.5, ppm=ppm)(model):
            want = model(**batch).logits[:, -1]
        got = soft_forward(model, stage2.ppm_score_fn(ppm), batch,
                           Stage2Config(reserve_ratio=0.5, estimator="straight_through"))
    torch.testing.assert_close(got.output.logits[:, -1], want, rtol=1e-4, atol=1e-4)


def test_answer_tokens_are_hidden_from_the_ppm():
    model, batch = tiny_model("llava"), make_batch("llava", LAYOUT)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -2:] = batch["input_ids"][:, -2:]
    seen = []
    with torch.no_grad():
        for inputs in (batch, {**batch, "labels": labels}):
            soft_forward(model, lambda ctx: seen.append(ctx.text_mask.sum(1)) or random_scores(ctx), inputs,
                         Stage2Config())
    assert torch.equal(seen[1], seen[0] - 2)


def train_inputs(rows):
    """Prompts whose last token is the supervised answer."""
    batch = row_prompts("llava", rows)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -1] = batch["input_ids"][:, -1]
    return {**batch, "labels": labels}


def val_batches():
    batch = row_prompts("llava", ROWS[:4])
    return [(batch, batch["input_ids"][:, -1])]


def test_stage2_trains_only_the_ppm(tmp_path):
    model = copy.deepcopy(tiny_model("llava")).train()  # stage 2 must freeze and eval it itself
    lvlm_before = {k: v.clone() for k, v in model.state_dict().items()}
    ppm = small_ppm()
    ppm_before = {k: v.clone() for k, v in ppm.state_dict().items()}
    batches = lambda epoch: [train_inputs(ROWS[i:i + 3]) for i in (0, 3)]  # noqa: E731
    result = stage2.train(model, ppm, batches, val_batches, Stage2Config(reserve_ratio=0.5),
                          DeepSpeedConfig(zero_stage=2, micro_batch_size=3, lr=1e-2), tmp_path / "ckpt",
                          tmp_path / "ppm", progress=False, log=lambda *_: None)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, lvlm_before[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, ppm_before[k]) for k, v in ppm.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    history = result["history"][0]
    assert {"train_lm_loss", "train_binary", "train_ratio", "train_mean_retention"} <= set(history)
    val = result["val"]
    assert set(val) == {"full_accuracy", "soft_accuracy", "hard_accuracy", "mean_retention", "soft_kept"}
    assert all(0 <= v <= 1 for v in val.values())
    assert PPM.from_pretrained(tmp_path / "ppm").config == ppm.config


def test_reference_lvlm_inputs(reference):
    from covipal.training.data import ReferenceInputs

    model, processor, rows = reference
    inputs = ReferenceInputs(processor)
    ppm = PPM(PPMConfig(d_model=model.config.text_config.hidden_size, d_ppm=16, n_layers=1, n_heads=2))
    batch = inputs.train(rows[3:5])  # an image and a video
    texts = []

    def score(ctx):
        texts.append(ctx.text_mask.sum(1).tolist())
        return stage2.ppm_score_fn(ppm)(ctx)

    with torch.no_grad():
        out = soft_forward(model, score, batch, Stage2Config())
    assert torch.isfinite(out.output.loss)
    assert texts == [[1 + len(r["question"].split()) for r in rows[3:5]]]  # <s> + question, no answer
    assert out.vision_mask.sum(1).tolist() == [64, 128]
    metrics = stage2.evaluate(model, ppm, [inputs.evaluation(rows)], Stage2Config(reserve_ratio=0.25))
    assert all(0 <= v <= 1 for v in metrics.values())
