"""``dart``: keep the vision tokens least duplicated with a few pivot tokens.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More" (DART), EMNLP 2025 (arXiv 2502.11494), code
https://github.com/ZichenWen1/DART (read through its fork xqy1111111/DART and the
LightCompress port, ``get_retained_image_token``). Rule, applied once at decoder layer
``K`` (default 2):

1. pivots: the ``pivot_image`` vision tokens and the ``pivot_text`` text tokens after the
   image (the question) whose **keys** at layer ``K-1`` (after RoPE, all heads
   concatenated) have the largest L1 norm;
2. for each pivot in turn (in prompt order), add the not yet chosen vision tokens with
   the **lowest cosine similarity** to it, comparing the hidden states entering layer
   ``K`` after the LLM's final norm; the image pivots are kept, the text pivots only
   guide the choice.

No attention weights are needed. DART keeps ``pivot_image + P * (budget // P)`` tokens
(``P`` pivots); here the ``budget - pivot_image`` non-pivot slots are shared out so that
exactly the budget is kept (the first pivots get one extra when ``P`` does not divide
it). Inside the LLM kept tokens keep their original positions (as DART does; M-RoPE ids
gathered for Qwen2-VL). With ``layer=0`` the same rule runs **before the LLM**, on its
input (keys of layer 0 from its own ``input_layernorm``/``k_proj``/RoPE, embeddings
after the final norm), through the pre-LLM runtime like ``covipal`` (positions as in
:mod:`covipal.pruning.adapters`): a variant for equal-budget comparisons with the
pre-LLM methods, not the paper's setting. Batches of any size
work (the official code indexes sample 0). Supported families: all of
:data:`covipal.pruning.ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from covipal.pruning.base import Pruner, PruningContext, n_keep
from covipal.pruning.fastv import matched_count
from covipal.pruning.layers import LayerContext, LayerPruner, decoder_layers, rope_keys
from covipal.pruning.registry import register


def dart_order(keys: torch.Tensor, hidden: torch.Tensor, vision: torch.Tensor, text: torch.Tensor, budget: int,
               pivot_image: int, pivot_text: int) -> list[int]:
    """DART's kept vision tokens for one sample, in the order they were chosen.

    Parameters
    ----------
    keys : torch.Tensor
        (L, d_k): keys per token (heads concatenated).
    hidden : torch.Tensor
        (L, d): normed hidden states per token.
    vision, text : torch.Tensor
        Long indices of the vision tokens and of the candidate text pivots.
    budget : int
        Vision tokens to keep.
    """
    norms = keys.float().abs().sum(dim=-1)
    img_piv = vision[norms[vision].topk(min(pivot_image, len(vision), budget)).indices]
    txt_piv = text[norms[text].topk(min(pivot_text, len(text))).indices] if len(text) else text[:0]
    pivots = torch.cat([img_piv, txt_piv]).sort().values.tolist()
    chosen = img_piv.sort().values.tolist()
    left = [i for i in vision.tolist() if i not in set(chosen)]
    extra = budget - len(chosen)
    share, rest = divmod(extra, max(len(pivots), 1))
    h = hidden.float()
    for n, pivot in enumerate(pivots):
        take = min(share + (n < rest), len(left))
        if take <= 0 or not left:
            continue
        sim = F.cosine_similarity(h[pivot][None], h[left], dim=-1)
        pick = (-sim).topk(take).indices.tolist()
        picked = [left[i] for i in pick]
        chosen += picked
        drop = set(picked)
        left = [i for i in left if i not in drop]
    return chosen


@register("dart")
@dataclass
class DARTPruner(LayerPruner):
    """DART at decoder layer ``layer``: pivots by key L1 norm, keep the least duplicated tokens.

    Parameters
    ----------
    reserve_ratio : float
        ``r``: ``ceil(r n_v)`` vision tokens remain from layer ``layer`` on, or with
        ``match_layer_average=True`` as many as make the layer average ``ceil(r n_v)``
        (as :class:`~covipal.pruning.fastv.FastVPruner`). With ``layer=0`` both budgets
        are ``ceil(r n_v)``.
    layer : int
        ``K``: first layer that sees the pruned sequence (paper: 2).
    pivot_image, pivot_text : int
        Number of vision and text pivots (paper: 4 and 4).
    match_layer_average : bool
        Which budget ``reserve_ratio`` sets.
    """

    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4
    match_layer_average: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.layer < 0 or self.pivot_image < 0 or self.pivot_text < 0 or self.pivot_image + self.pivot_text < 1:
            raise ValueError("dart needs layer >= 0 and at least one pivot")

    def _start(self, model, adapter):
        return Pruner._start(self, model, adapter) if self.layer == 0 else super()._start(model, adapter)

    def schedule(self, n_vision: int, n_layers: int) -> list[tuple[int, int]]:
        return Pruner.schedule(self, n_vision, n_layers) if self.layer == 0 else super().schedule(n_vision, n_layers)

    def stages(self, n_layers: int) -> list[int]:
        if self.layer >= n_layers:
            raise ValueError(f"dart layer {self.layer} is outside the LLM's {n_layers} decoder layers")
        return [self.layer]

    def counts(self, n_vision: int, n_layers: int) -> list[int]:
        if self.match_layer_average and self.layer > 0:
            return [matched_count(n_vision, self.reserve_ratio, self.layer, n_layers)]
        return [n_keep(n_vision, self.reserve_ratio)]

    def score_at(self, ctx: LayerContext) -> torch.Tensor:
        """Scores that rank DART's chosen tokens first, in the order chosen (inside the LLM)."""
        keys = ctx.keys(ctx.layer - 1)  # (B, H_kv, L_c, hd)
        budgets = [self.counts(int(n), len(decoder_layers(ctx.llm)))[0] for n in ctx.prompt_vision.sum(dim=1).tolist()]
        cols, mask = ctx.vision_columns()
        return self._scores(keys, ctx.llm.norm(ctx.hidden), ctx.real, ctx.vision, cols, mask, budgets)

    def score(self, ctx: PruningContext) -> torch.Tensor:
        """The same, before the LLM (``layer=0``): keys of layer 0 on the LLM's input."""
        from covipal.pruning.adapters import get_adapter

        llm = get_adapter(ctx.model).locate(ctx.model)[1]
        inputs = ctx.llm_inputs
        embeds = inputs["inputs_embeds"]
        B, L, _ = embeds.shape
        positions = inputs.get("position_ids")
        if positions is None:
            positions = torch.arange(L, device=embeds.device).expand(B, L)
        elif positions.ndim == 3 and positions.shape[0] == 4:  # M-RoPE with a leading text row
            positions = positions[1:]
        layer = decoder_layers(llm)[0]
        keys = rope_keys(layer.self_attn, layer.input_layernorm(embeds), llm.rotary_emb(embeds, positions))
        mask = inputs.get("attention_mask")
        real = mask.bool() if mask is not None else torch.ones(B, L, dtype=torch.bool, device=embeds.device)
        vision = torch.zeros_like(real)
        for b in range(B):
            vision[b, ctx.vision_index[b, ctx.vision_mask[b]]] = True
        budgets = [n_keep(int(n), self.reserve_ratio) for n in ctx.n_vision.tolist()]
        return self._scores(keys, llm.norm(embeds), real, vision, ctx.vision_index, ctx.vision_mask, budgets)

    def _scores(self, keys, hidden, real, vision, cols, mask, budgets) -> torch.Tensor:
        """(B, n_v) scores over the vision columns ``cols``: DART's choices first, in the order chosen."""
        from covipal.pruning.guide import query_rows

        keys = keys.transpose(1, 2).flatten(2)  # (B, L, H_kv * hd): heads concatenated
        question = query_rows(real, vision, "after_image") & ~vision  # text after the image
        scores = torch.full(cols.shape, float("-inf"), device=cols.device)
        for b in range(cols.shape[0]):
            n = int(mask[b].sum())
            if not n:
                continue
            order = dart_order(keys[b], hidden[b], cols[b, :n], question[b].nonzero().squeeze(1), budgets[b],
                               self.pivot_image, self.pivot_text)
            where = {c: i for i, c in enumerate(cols[b, :n].tolist())}
            for rank, c in enumerate(order):
                scores[b, where[c]] = float(len(order) - rank)
        return scores
