"""Stage-1 losses and ranking metrics (no DeepSpeed here; see test_training_ds.py)."""

import math

import pytest
import torch

from covipal.ppm import PPM, PPMConfig
from covipal.training.stage1 import Stage1Config, evaluate, normalize_targets, ranking_metrics, stage1_loss
from covipal.training.targets import TargetShards

MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]).bool()  # 4, 3 and 0 vision tokens


def targets():
    torch.manual_seed(0)
    return torch.where(MASK, torch.rand(MASK.shape) + 0.01, 0.0)


def padded(scores):
    return scores.masked_fill(~MASK, float("-inf"))  # as the PPM gives them


def test_normalised_targets_per_sample():
    z, ok = normalize_targets(targets(), MASK, "zscore")
    assert ok.tolist() == [True, True, False]
    for row, m in zip(z[:2], MASK[:2]):
        assert abs(row[m].mean()) < 1e-6 and abs(row[m].pow(2).mean() - 1) < 1e-5
    s, _ = normalize_targets(targets(), MASK, "sum")
    assert torch.allclose(s[0][MASK[0]].mean(), torch.tensor(1.0))
    assert (z[~MASK] == 0).all() and (s[~MASK] == 0).all()


@pytest.mark.parametrize("normalize", ["zscore", "sum"])
def test_mse_is_zero_at_the_normalised_target(normalize):
    t = targets()
    perfect = normalize_targets(t, MASK, normalize)[0]
    assert stage1_loss(padded(perfect), t, MASK, "mse", normalize).item() < 1e-10
    assert stage1_loss(padded(perfect + 1), t, MASK, "mse", normalize).item() == pytest.approx(1.0)


def test_listnet_is_zero_when_the_softmaxes_agree():
    t = targets()
    z = normalize_targets(t, MASK, "zscore")[0]
    assert abs(stage1_loss(padded(z + 3.0), t, MASK, "listnet").item()) < 1e-6  # softmax ignores a shift
    assert stage1_loss(padded(torch.zeros_like(t)), t, MASK, "listnet").item() > 0


def test_rank_loss_prefers_the_right_order():
    t = targets()
    right, wrong = stage1_loss(padded(100 * t), t, MASK, "rank"), stage1_loss(padded(-100 * t), t, MASK, "rank")
    assert right < 0.1 < 1 < wrong


@pytest.mark.parametrize("loss", ["mse", "listnet", "rank"])
def test_losses_are_finite_with_padding_and_give_gradients(loss):
    scores = padded(torch.randn(MASK.shape)).requires_grad_()
    value = stage1_loss(scores, targets(), MASK, loss)
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(scores.grad).all() and scores.grad[~MASK].abs().sum() == 0
    empty = torch.zeros(2, 3, dtype=torch.bool)
    no_vision = torch.full((2, 3), float("-inf"), requires_grad=True)  # the PPM's scores without vision tokens
    assert stage1_loss(no_vision, torch.zeros(2, 3), empty, loss).item() == 0


def test_ranking_metrics():
    t = targets()
    recall, rho = ranking_metrics(padded(t), t, MASK, 0.5)
    assert recall == [1.0, 1.0] and rho == pytest.approx([1.0, 1.0])
    recall, rho = ranking_metrics(padded(-t), t, MASK, 0.5)
    assert recall == [0.0, 0.5] and rho  # k = 2 of 4: disjoint; k = 2 of 3: one shared == pytest.approx([-1.0, -1.0])
    recall, _ = ranking_metrics(padded(t), t, MASK, 0.25)  # k = 1 of 4, 1 of 3
    assert recall == [1.0, 1.0]


def test_evaluate_on_shards(llava_shards):
    torch.manual_seed(0)
    ppm = PPM(PPMConfig(d_model=32, d_ppm=16, n_layers=1, n_heads=2)).train()
    metrics = evaluate(ppm, TargetShards(llava_shards), Stage1Config(reserve_ratio=0.25))
    assert set(metrics) == {"loss", "recall", "spearman"} and 0 <= metrics["recall"] <= 1
    assert -1 <= metrics["spearman"] <= 1 and metrics["loss"] > 0 and ppm.training
