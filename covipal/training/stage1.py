"""Stage 1, attention-guided: the PPM learns to predict the guide layer's attention targets.

The loss compares the PPM's scores ``S`` (B, n_v) with the targets ``A`` (B, n_v) of
:mod:`covipal.training.targets`, over each sample's real vision tokens:

- ``"mse"`` (default; the loss public reviews of the paper report):
  ``mean_k (S_k - norm(A)_k)^2`` per sample, averaged over samples. The targets are
  normalised per sample first (``normalize``), because their raw scale varies with the
  prompt (how much attention the text itself and the attention sinks absorb) while
  only their order matters at inference (top-k):
  ``"zscore"`` (default) gives each sample zero mean and unit standard deviation over
  its vision tokens, so scores are in z units (stage 2's temperature relies on it);
  ``"sum"`` divides by the sample's mean target (the attention share times ``n_v``).
  Samples with fewer than 2 vision tokens (or constant targets, for zscore) are skipped.
- ``"listnet"``: ``KL(softmax(norm(A)) || softmax(S))`` (ListNet top-1), with the same
  per-sample normalisation: the raw attention share is nearly flat over many vision
  tokens, which leaves the KL and its gradient tiny.
- ``"rank"``: RankNet pairwise logistic loss ``softplus(-(S_i - S_j))`` over all pairs
  with ``A_i > A_j``.

Validation reports the loss, the recall of the target's top-k by the PPM's top-k at the
reserve ratio ``r`` (``k = ceil(r n_v)``, :func:`covipal.pruning.n_keep`), and the
Spearman rank correlation of scores and targets, each averaged over samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from covipal.pruning.base import n_keep
from covipal.training.ds import DeepSpeedConfig, export_ppm, fit, initialize, run_fingerprint
from covipal.training.targets import TargetShards

LOSSES = ("mse", "listnet", "rank")
NORMALIZE = ("zscore", "sum")


@dataclass
class Stage1Config:
    """Stage-1 settings (the optimizer and batch geometry are in :class:`DeepSpeedConfig`).

    Parameters
    ----------
    loss : {"mse", "listnet", "rank"}
    normalize : {"zscore", "sum"}
        Per-sample target normalisation for ``mse`` and ``listnet`` (module docstring).
    reserve_ratio : float
        ``r`` of the validation recall.
    epochs : int
    eval_batch_size : int
    """

    loss: Literal["mse", "listnet", "rank"] = "mse"
    normalize: Literal["zscore", "sum"] = "zscore"
    reserve_ratio: float = 0.25
    epochs: int = 5
    eval_batch_size: int = 64

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if not 0 < self.reserve_ratio <= 1:
            raise ValueError(f"reserve_ratio must be in (0, 1], got {self.reserve_ratio!r}")
        if self.epochs < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs and eval_batch_size must be positive")


def normalize_targets(target: torch.Tensor, mask: torch.Tensor,
                      how: str = "zscore") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample normalised targets (B, n_v) and which samples are usable (B,) bool."""
    mask = mask.bool()
    n = mask.sum(dim=1, keepdim=True).clamp_min(1)
    t = torch.where(mask, target.float(), 0.0)
    mean = t.sum(dim=1, keepdim=True) / n
    if how == "zscore":
        std = (torch.where(mask, t - mean, 0.0).pow(2).sum(dim=1, keepdim=True) / n).sqrt()
        ok = (mask.sum(dim=1) >= 2) & (std.squeeze(1) > 1e-12)
        out = (t - mean) / std.clamp_min(1e-12)
    elif how == "sum":
        ok = (mask.sum(dim=1) >= 2) & (mean.squeeze(1) > 0)
        out = t / mean.clamp_min(1e-12)
    else:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {how!r}")
    return torch.where(mask, out, 0.0), ok


def stage1_loss(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, loss: str = "mse",
                normalize: str = "zscore") -> torch.Tensor:
    """Scalar loss of scores (B, n_v) against targets (B, n_v) over ``mask`` (B, n_v) bool."""
    mask = mask.bool()
    s = torch.where(mask, scores.float(), 0.0)  # the PPM gives -inf on padding
    usable = mask.sum(dim=1) >= 2
    if loss == "mse":
        t, usable = normalize_targets(target, mask, normalize)
        per = torch.where(mask, (s - t).pow(2), 0.0).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    elif loss == "listnet":
        t, usable = normalize_targets(target, mask, normalize)
        log_p = torch.where(mask, t, float("-inf")).log_softmax(dim=1)
        log_q = torch.where(mask, s, float("-inf")).log_softmax(dim=1)
        per = torch.where(mask, log_p.exp() * (log_p - log_q), 0.0).sum(dim=1)
    elif loss == "rank":
        t = target.float()
        pairs = mask[:, :, None] & mask[:, None, :] & (t[:, :, None] > t[:, None, :])  # (B, n_v, n_v): i above j
        margin = s[:, :, None] - s[:, None, :]
        per = torch.where(pairs, F.softplus(-margin), 0.0).sum(dim=(1, 2)) / pairs.sum(dim=(1, 2)).clamp_min(1)
        usable = usable & pairs.any(dim=(1, 2))
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not usable.any():
        return s.sum() * 0.0  # keeps the graph: every parameter gets a (zero) gradient
    return per[usable].mean()


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().float()


def ranking_metrics(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, ratio: float) -> tuple[list, list]:
    """Per sample: recall of the target's top-k by the scores' top-k, and Spearman correlation.

    ``k = n_keep(n_v, ratio)``. Samples without vision tokens give no recall; fewer than
    two, no correlation. Returns ``(recalls, spearmans)`` as lists of floats.
    """
    recalls, spearmans = [], []
    for s, t, m in zip(scores.float(), target.float(), mask.bool()):
        s, t = s[m], t[m]
        n = len(s)
        if n == 0:
            continue
        k = n_keep(n, ratio)
        hit = set(s.topk(k).indices.tolist()) & set(t.topk(k).indices.tolist())
        recalls.append(len(hit) / k)
        if n >= 2:
            rs, rt = _ranks(s), _ranks(t)
            rs, rt = rs - rs.mean(), rt - rt.mean()
            denom = (rs.norm() * rt.norm()).item()
            spearmans.append((rs @ rt).item() / denom if denom > 0 else 0.0)
    return recalls, spearmans


def _ppm_inputs(module: nn.Module, batch: dict, device) -> tuple:
    dtype = next(module.parameters()).dtype
    return (batch["vision"].to(device, dtype), batch["text"].to(device, dtype),
            batch["vision_mask"].to(device), batch["text_mask"].to(device))


@torch.no_grad()
def evaluate(ppm: nn.Module, shards: TargetShards, cfg: Stage1Config) -> dict:
    """``{"loss", "recall", "spearman"}`` of ``ppm`` on ``shards``, averaged over samples."""
    was_training = ppm.training
    ppm.eval()
    device = next(ppm.parameters()).device
    losses, weights, recalls, spearmans = [], [], [], []
    for batch in shards.batches(cfg.eval_batch_size):
        scores = ppm(*_ppm_inputs(ppm, batch, device)).float().cpu()
        mask = batch["vision_mask"]
        losses.append(stage1_loss(scores, batch["target"], mask, cfg.loss, cfg.normalize).item())
        weights.append(int((mask.sum(dim=1) >= 2).sum()))
        r, s = ranking_metrics(scores, batch["target"], mask, cfg.reserve_ratio)
        recalls += r
        spearmans += s
    ppm.train(was_training)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"loss": sum(l * w for l, w in zip(losses, weights)) / max(sum(weights), 1),
            "recall": mean(recalls), "spearman": mean(spearmans)}


def train(ppm: nn.Module, train_shards: TargetShards, val_shards: TargetShards | None, cfg: Stage1Config,
          ds: DeepSpeedConfig, checkpoint_dir: str | Path, out_dir: str | Path | None = None,
          log=print, progress: bool = True) -> dict:
    """Train ``ppm`` on target shards with DeepSpeed; resume from ``checkpoint_dir`` if it holds a checkpoint.

    Batches are ``ds.micro_batch_size`` samples from one shard, shuffled by ``(ds.seed, epoch)``.
    Writes the trained PPM to ``out_dir`` (``save_pretrained``) if given.

    Returns
    -------
    dict
        ``{"history": [per-epoch metrics], "val": {"loss", "recall", "spearman"}}`` (``val``
        from the last epoch; empty without ``val_shards``).
    """
    engine = initialize(ppm, ds)

    def step(engine, batch):
        scores = engine(*_ppm_inputs(engine.module, batch, engine.device))
        return stage1_loss(scores, batch["target"].to(engine.device), batch["vision_mask"].to(engine.device),
                           cfg.loss, cfg.normalize), {}

    def evaluate_epoch(epoch):
        return {f"val_{k}": v for k, v in evaluate(engine.module, val_shards, cfg).items()} if val_shards else {}

    history = fit(engine, lambda epoch: train_shards.epoch(ds.micro_batch_size, ds.seed, epoch), step,
                  cfg.epochs, checkpoint_dir, seed=ds.seed, evaluate=evaluate_epoch,
                  fingerprint=run_fingerprint(cfg, ds, targets=train_shards.settings), log=log, progress=progress)
    if out_dir is not None:
        export_ppm(engine, out_dir)
    last = history[-1] if history else {}
    return {"history": history, "val": {k[4:]: v for k, v in last.items() if k.startswith("val_")}}

