"""``pyramiddrop``: drop vision tokens in stages inside the LLM, ranked by the last instruction token.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", CVPR 2025 (arXiv 2410.17247), code
https://github.com/Cooperx521/PyramidDrop (``pdrop_rank_drop``). Rule: the LLM is split
into stages at ``layer_list = [8, 16, 24]`` (of 32 layers); at each boundary the kept
vision tokens are cut by ``lambda = 0.5``, ranked by the attention of the **last
instruction token** (the last prompt token at inference), recomputed with the *next*
layer's ``input_layernorm`` and q/k projections on the current hidden states, averaged
over heads. 576 vision tokens go 576 -> 288 -> 144 -> 72.

Here a stage at layer ``l`` scores with layer ``l``'s own normed q/k before layer ``l``
runs (the same recomputation), so layers ``0..l-1`` see the previous set. The boundaries
are scaled to the model's depth (``round(8/32 * N)``...). **Deviation:** kept tokens keep
their original RoPE positions (as FastV/DART do), where the official code re-indexes
them contiguously after each stage. Batches of any size and either padding side work
(the official code is per-sample, right padding only). Supported families: all of
:data:`covipal.pruning.ADAPTERS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from covipal.pruning.base import n_keep
from covipal.pruning.layers import LayerContext, LayerPruner, scaled_layers
from covipal.pruning.registry import register


def _counts(n_vision: int, lam: float, n_stages: int) -> list[int]:
    out, prev = [], n_vision
    for s in range(1, n_stages + 1):
        prev = min(prev, max(1, math.ceil(round(lam ** s * n_vision, 6))))
        out.append(prev)
    return out


@register("pyramiddrop")
@dataclass
class PyramidDropPruner(LayerPruner):
    """PyramidDrop: multi-stage pruning, each stage keeping ``lambda`` of the vision tokens.

    Parameters
    ----------
    reserve_ratio : float
        ``r``, used to choose ``lambda`` when ``lam`` is None: with
        ``match_layer_average=True`` (default; how PyramidDrop is compared at "192
        tokens") ``lambda`` is the smallest that brings the vision tokens averaged over
        layers to ``ceil(r n_v)`` (at most a token above it, stage counts being whole;
        more where even one token per stage exceeds it), else such that ``ceil(r n_v)`` remain after the last stage
        (``lambda = r ** (1 / stages)``). Tokens entering the LLM are always all ``n_v``.
    layers : tuple of float
        Stage boundaries as fractions of the depth; the paper's 8/16/24 of 32.
    lam : float or None
        A fixed ``lambda`` (the paper's 0.5); ``reserve_ratio`` is then not used.
    match_layer_average : bool
        Which budget ``reserve_ratio`` sets (see above).
    """

    layers: tuple[float, ...] = (8 / 32, 16 / 32, 24 / 32)
    lam: float | None = None
    match_layer_average: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.lam is not None and not 0 < self.lam <= 1:
            raise ValueError(f"lam must be in (0, 1], got {self.lam!r}")
        if not self.layers or not all(0 < f < 1 for f in self.layers):
            raise ValueError(f"layers are fractions of the depth in (0, 1), got {self.layers!r}")

    def stages(self, n_layers: int) -> list[int]:
        return scaled_layers(tuple(self.layers), n_layers)

    def lam_for(self, n_vision: int, n_layers: int) -> float:
        """The ``lambda`` used for a prompt of ``n_vision`` vision tokens (see ``reserve_ratio``)."""
        if self.lam is not None:
            return self.lam
        stages = self.stages(n_layers)
        if not self.match_layer_average:
            return self.reserve_ratio ** (1 / len(stages))
        target = n_keep(n_vision, self.reserve_ratio)
        lo, hi = 0.0, 1.0
        for _ in range(50):  # the layer average grows with lambda: the smallest lambda reaching the target
            mid = (lo + hi) / 2
            if self._average(n_vision, n_layers, mid) >= target:
                hi = mid
            else:
                lo = mid
        return hi

    def _average(self, n_vision: int, n_layers: int, lam: float) -> float:
        from covipal.pruning.base import schedule_budget

        sched = list(zip(self.stages(n_layers), _counts(n_vision, lam, len(self.stages(n_layers)))))
        return schedule_budget(sched, n_vision, n_layers).layer_average

    def counts(self, n_vision: int, n_layers: int) -> list[int]:
        return _counts(n_vision, self.lam_for(n_vision, n_layers), len(self.stages(n_layers)))

    def score_at(self, ctx: LayerContext) -> torch.Tensor:
        """Head-averaged attention of the last prompt token, recomputed with this layer's normed q/k."""
        probs = ctx.attention(ctx.last_token(), at=ctx.layer).mean(dim=1)[:, 0]  # (B, L_c)
        cols, mask = ctx.vision_columns()
        return probs.gather(1, cols).masked_fill(~mask, float("-inf"))
