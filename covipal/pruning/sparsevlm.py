"""``sparsevlm``: text "rater" tokens score the vision tokens at several layers inside the LLM.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
Model Inference", ICML 2025 (arXiv 2410.04417), code https://github.com/Gumpest/SparseVLMs
(v1.5 rule, ``modelling_sparse_llama.py`` and ``score.py``):

1. **raters**, once, at the LLM input: ``m = softmax_over_text(H_v H_t^T)`` averaged over
   the vision tokens; the raters are the text tokens with ``m > mean(m)``. Text tokens
   here are the question (the text after the sample's last vision token);
2. at each pruning layer ``l`` in ``[2, 6, 15]`` (of 32) the layer runs on all current
   tokens, its attention is recomputed, averaged over heads, the rows of the raters and
   the columns of the vision tokens are averaged over raters, and the top vision tokens
   are kept for the layers after ``l``;
3. per-stage keep counts come from a table per budget, e.g. "192" -> 300, 200, 110 of
   576; "192" is the *layer-averaged* equivalent, not the tokens entering the LLM.

Here step 2 reads layer ``l``'s attention rows of the raters only (recomputed from its
q/k, the model keeps SDPA) and the stage is layer ``l + 1``; the pruning layers are
scaled to the model's depth. The keep counts keep the shape of the "192" row
(300 : 200 : 110) scaled by one factor chosen from ``reserve_ratio`` (the paper tabulates
other shapes for 128/96/64 tokens). **Not implemented:** recycling (v1.x clusters the top
30% of the pruned tokens into new tokens, which the keep-a-subset runtime cannot
express) and the v2.0 changes (attention-gravity correction, head selection). Batches of
any size work (the official code supports one sample). Families: all of
:data:`covipal.pruning.ADAPTERS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from covipal.pruning.base import n_keep, schedule_budget
from covipal.pruning.layers import LayerContext, LayerPruner
from covipal.pruning.registry import register

SHAPE = (300 / 576, 200 / 576, 110 / 576)  # SparseVLM v1.5, "192 tokens" of 576 on LLaVA-1.5


def raters(embeds: torch.Tensor, vision: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters of one sample: the text tokens (indices ``text``) rating above the mean.

    ``embeds`` (L, d) are the LLM's input embeddings, ``vision`` the vision-token indices.
    """
    if len(text) == 0 or len(vision) == 0:
        return text
    m = (embeds[vision].float() @ embeds[text].float().T).softmax(dim=-1).mean(dim=0)  # (n_t,)
    chosen = text[m > m.mean()]
    return chosen if len(chosen) else text


@register("sparsevlm")
@dataclass
class SparseVLMPruner(LayerPruner):
    """SparseVLM (v1.5, without recycling): rater-text attention at several layers.

    Parameters
    ----------
    reserve_ratio : float
        ``r``: with ``match_layer_average=True`` (default, SparseVLM's own accounting)
        the counts are scaled so that the vision tokens averaged over layers reach
        ``ceil(r n_v)``; else so that ``ceil(r n_v)`` remain after the last stage.
        Tokens entering the LLM are always all ``n_v``.
    layers : tuple of float
        Pruning layers as fractions of the depth (paper: 2, 6, 15 of 32).
    shape : tuple of float
        Relative keep counts of the stages (paper's "192" row).
    match_layer_average : bool
        Which budget ``reserve_ratio`` sets.
    """

    layers: tuple[float, ...] = (2 / 32, 6 / 32, 15 / 32)
    shape: tuple[float, ...] = SHAPE
    match_layer_average: bool = True

    def __post_init__(self):
        super().__post_init__()
        if len(self.layers) != len(self.shape) or not all(0 <= f < 1 for f in self.layers):
            raise ValueError("layers (fractions of the depth in [0, 1)) and shape need one entry per stage")

    def stages(self, n_layers: int) -> list[int]:
        locs = sorted({min(n_layers - 2, max(0, round(f * n_layers))) for f in self.layers})
        return [loc + 1 for loc in locs]

    def _counts(self, n_vision: int, n_stages: int, scale: float) -> list[int]:
        out, prev = [], n_vision
        for f in self.shape[len(self.shape) - n_stages:]:
            prev = min(prev, max(1, math.ceil(round(scale * f * n_vision, 6))))
            out.append(prev)
        return out

    def counts(self, n_vision: int, n_layers: int) -> list[int]:
        stages = self.stages(n_layers)
        if not self.match_layer_average:
            return self._counts(n_vision, len(stages), self.reserve_ratio / self.shape[-1])
        target = n_keep(n_vision, self.reserve_ratio)
        lo, hi = 0.0, 1.0 / min(self.shape)
        for _ in range(50):  # the smallest scale whose layer average reaches the target
            mid = (lo + hi) / 2
            sched = list(zip(stages, self._counts(n_vision, len(stages), mid)))
            if schedule_budget(sched, n_vision, n_layers).layer_average >= target:
                hi = mid
            else:
                lo = mid
        return self._counts(n_vision, len(stages), hi)

    def score_at(self, ctx: LayerContext) -> torch.Tensor:
        """Attention of the raters to each vision token at the pruning layer, averaged over heads and raters."""
        from covipal.pruning.guide import query_rows

        question = query_rows(ctx.prompt_real, ctx.prompt_vision, "after_image") & ~ctx.prompt_vision
        per_sample = [raters(ctx.embeds[b], ctx.prompt_vision[b].nonzero().squeeze(1), question[b].nonzero().squeeze(1))
                      for b in range(ctx.embeds.shape[0])]
        n_r = torch.tensor([len(r) for r in per_sample], device=ctx.hidden.device)
        width = max(int(n_r.max()), 1)
        positions = torch.zeros(len(per_sample), width, dtype=torch.long, device=ctx.hidden.device)
        for b, r in enumerate(per_sample):
            positions[b, :len(r)] = r
        rows = ctx.columns_of(positions).clamp_min(0)  # text tokens are never dropped
        valid = torch.arange(width, device=rows.device)[None] < n_r[:, None]
        probs = ctx.attention(rows, at=ctx.layer - 1).mean(dim=1)  # (B, n_r, L_c)
        probs = torch.where(valid[..., None], probs, 0.0).sum(dim=1) / n_r.clamp_min(1)[:, None]
        cols, mask = ctx.vision_columns()
        return probs.gather(1, cols).masked_fill(~mask, float("-inf"))
