"""``fastv``: drop vision tokens once inside the LLM, by the attention the last token pays them.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024 (arXiv 2403.06764), code
https://github.com/pkunlp-icler/FastV. Rule (``modeling_llama.py`` of the FastV fork):
at layer ``K`` take the attention map layer ``K-1`` computed, average it over heads, take
the row of the **last prompt token** and the image columns, keep the top image tokens
(sorted back into order); layers ``>= K`` see text plus kept image tokens, kept tokens
keep their original RoPE positions. Paper default ``K = 2``, ``R = 50%`` pruned.

Here the attention row is recomputed at layer ``K-1`` only (its own q/k projections and
RoPE, see :mod:`covipal.pruning.layers`), so the model keeps SDPA; batches of any size
and padding work; the kept set is chosen on the prefill and kept in the cache while
decoding (FastV's KV-cache variant). Supported families: all of
:data:`covipal.pruning.ADAPTERS` (Llama / Qwen2 text models, 1-D RoPE or M-RoPE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from covipal.pruning.base import n_keep
from covipal.pruning.layers import LayerContext, LayerPruner
from covipal.pruning.registry import register


def matched_count(n_vision: int, ratio: float, full_layers: int, n_layers: int) -> int:
    """Vision tokens to keep after ``full_layers`` unpruned layers so that the layer average is ``ceil(r n_v)``.

    ``ceil((N * ceil(r n_v) - K * n_v) / (N - K))``, clamped to ``[1, n_v]``: the average
    is then the target or at most one token above it. When the target is below
    ``K n_v / N`` (the first ``K`` layers alone cost more), one token is kept and the
    average stays above the target; :meth:`Pruner.budget` reports the true value.
    """
    if n_vision == 0:
        return 0
    target = n_keep(n_vision, ratio)
    k = math.ceil(round((n_layers * target - full_layers * n_vision) / (n_layers - full_layers), 6))
    return min(n_vision, max(1, k))


@register("fastv")
@dataclass
class FastVPruner(LayerPruner):
    """FastV: at layer ``layer``, keep the top vision tokens by last-token attention at ``layer - 1``.

    Parameters
    ----------
    reserve_ratio : float
        ``r``: with ``match_layer_average=False`` (FastV's own ``R = 1 - r``),
        ``ceil(r n_v)`` vision tokens remain after layer ``K``; with ``True``, as many as
        make the vision tokens *averaged over all decoder layers* ``ceil(r n_v)``
        (:func:`matched_count`), for comparisons with pre-LLM methods at equal compute.
        Tokens entering the LLM are always all ``n_v``.
    layer : int
        ``K`` >= 1: the first decoder layer that sees the pruned sequence.
    match_layer_average : bool
        Which budget ``reserve_ratio`` sets (see above).
    """

    layer: int = 2
    match_layer_average: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.layer < 1:
            raise ValueError(f"layer must be >= 1 (FastV reads the attention of layer K-1), got {self.layer}")

    def stages(self, n_layers: int) -> list[int]:
        if self.layer >= n_layers:
            raise ValueError(f"fastv layer {self.layer} is outside the LLM's {n_layers} decoder layers")
        return [self.layer]

    def counts(self, n_vision: int, n_layers: int) -> list[int]:
        if self.match_layer_average:
            return [matched_count(n_vision, self.reserve_ratio, self.layer, n_layers)]
        return [n_keep(n_vision, self.reserve_ratio)]

    def score_at(self, ctx: LayerContext) -> torch.Tensor:
        """Head-averaged attention of the last prompt token to each vision token at layer ``K-1``."""
        probs = ctx.attention(ctx.last_token(), at=ctx.layer - 1).mean(dim=1)[:, 0]  # (B, L_c)
        cols, mask = ctx.vision_columns()
        return probs.gather(1, cols).masked_fill(~mask, float("-inf"))
