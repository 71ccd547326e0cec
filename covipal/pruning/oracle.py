"""``oracle``: keep the vision tokens the frozen LLM's guide layer attends to most (an upper reference).

Not a published method: the pruning CoViPAL's PPM is trained to imitate (Tang et al.,
2025, https://arxiv.org/abs/2508.17243, stage 1). For each prompt the target of vision
token ``k`` is the attention the query tokens pay it at decoder layer ``guide_layer``,
summed over heads (:mod:`covipal.pruning.guide`); the oracle keeps the top
``ceil(r n_v)`` of exactly these targets, before the LLM. It reads the full sequence, so
it costs an extra forward of the vision tower and of the LLM's first ``guide_layer + 1``
layers (the targets hook stops there and recomputes only the needed attention rows; the
model keeps SDPA). A PPM can at best match it at its own guide layer.

Families: all of :data:`covipal.pruning.ADAPTERS` (as the targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from covipal.pruning.base import Pruner, PruningContext
from covipal.pruning.registry import register

_NOT_INPUTS = {"cache", "past_key_values", "use_cache", "cache_position", "logits_to_keep", "labels",
               "output_attentions", "output_hidden_states", "return_dict"}


@register("oracle")
@dataclass
class OraclePruner(Pruner):
    """Top ``ceil(r n_v)`` vision tokens by the frozen LLM's guide-layer attention.

    Parameters
    ----------
    guide_layer : int
        0-based decoder layer whose attention is read (as ``targets.guide_layer``).
    queries : {"after_image", "last", "all"}
        Query tokens whose attention is averaged (:func:`covipal.pruning.guide.query_rows`).
    """

    guide_layer: int = 2
    queries: str = "after_image"

    def __post_init__(self):
        super().__post_init__()
        from covipal.pruning.guide import QUERIES

        if self.queries not in QUERIES:
            raise ValueError(f"queries must be one of {QUERIES}, got {self.queries!r}")

    def attach(self, model: nn.Module, run) -> list:
        from covipal.pruning.adapters import get_adapter

        self._base, _ = get_adapter(model).locate(model)
        self._inputs: dict = {}

        def read_call(module, args, kwargs):
            if not run._scoring:
                self._inputs = {**({"input_ids": args[0]} if args else {}),
                                **{k: v for k, v in kwargs.items() if k not in _NOT_INPUTS and v is not None}}

        return [self._base.register_forward_pre_hook(read_call, with_kwargs=True)]

    def teardown(self, model: nn.Module) -> None:
        self._inputs, self._base = {}, None

    def score(self, ctx: PruningContext) -> torch.Tensor:
        """Shape (B, n_v): the guide-layer targets of this prompt, recomputed on the full sequence."""
        from covipal.pruning.guide import guide_targets

        got = guide_targets(self._base, self._inputs, self.guide_layer, self.queries)
        if not torch.equal(got.context.vision_index, ctx.vision_index):
            raise RuntimeError("the oracle's forward saw other vision tokens than the pruned prompt")
        return got.target.masked_fill(~ctx.vision_mask, float("-inf"))
