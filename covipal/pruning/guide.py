"""The attention a guide layer pays each vision token: the stage-1 targets and the oracle's ranking.

For a frozen LVLM and a prompt, the target of vision token ``k`` is

    A_k = mean_{j in Q} sum_{h} softmax(q_j^h k^h / sqrt(d_h) + mask)[k]

at decoder layer ``guide_layer`` (0-based), where ``Q`` is the set of query tokens:

- ``"after_image"`` (default): the real text tokens after the sample's last vision token,
  i.e. the question. They have seen every vision token (causal attention), so no vision
  token is favoured by its position, and they are the tokens whose reading of the image
  decides the answer. Summed over heads as the reviewed formula does; averaged rather than
  summed over queries so that prompts of different lengths give targets of one scale.
  A sample with no text after its vision tokens falls back to its last token.
- ``"last"``: the last prompt token only (FastV's choice).
- ``"all"``: every real token (the review's gloss: "what all tokens pay to token k");
  early vision tokens are then favoured, being visible to more queries.

The attention weights are recomputed at that one layer only, by a forward pre-hook on its
self-attention module that reruns its ``q_proj``/``k_proj``, the model's own
``apply_rotary_pos_emb`` on the ``position_embeddings`` the layer receives, and the mask
it receives, for the needed query rows only. The model keeps its attention
implementation (SDPA); the forward stops after the guide layer's hook.

Part of the pruning core: the in-LLM methods (FastV, SparseVLM, DART, PyramidDrop) read
attention rows the same way (:func:`rows_attention`, :func:`query_rows`), and the training
stages build on :func:`guide_targets` (:mod:`covipal.training.targets`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from covipal.pruning.adapters import get_adapter
from covipal.pruning.base import PruningContext
from covipal.pruning.runtime import build_context

Queries = Literal["after_image", "last", "all"]
QUERIES = ("after_image", "last", "all")


class _Stop(Exception):
    """Raised by the guide-layer hook once it has what it needs: later layers are not run."""


@dataclass
class GuideTargets:
    """PPM inputs and stage-1 targets of one batch.

    Attributes
    ----------
    context : PruningContext
        ``H_v`` (B, n_v, d), ``H_t`` (B, n_t, d) and their masks, as the pruning runtime
        gives them to a pruner.
    target : torch.Tensor
        Shape (B, n_v), float32: guide-layer attention per vision token; 0 on padding.
    """

    context: PruningContext
    target: torch.Tensor


def query_rows(real: torch.Tensor, vision: torch.Tensor, queries: Queries = "after_image") -> torch.Tensor:
    """Which positions are query tokens, shape (B, L) bool, from ``real``/``vision`` (B, L) bool."""
    if queries not in QUERIES:
        raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
    L = real.shape[1]
    col = torch.arange(L, device=real.device).expand_as(real)
    last = torch.where(real, col, -1).max(dim=1).values  # (B,): last real column
    last_only = col == last[:, None]
    if queries == "last":
        return last_only & real
    if queries == "all":
        return real.clone()
    last_vision = torch.where(vision, col, -1).max(dim=1).values  # (B,), -1 without vision
    after = real & ~vision & (col > last_vision[:, None])
    return torch.where(after.any(dim=1, keepdim=True), after, last_only & real)


def _decoder_layers(llm: nn.Module) -> nn.ModuleList:
    layers = getattr(llm, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(llm).__name__} has no `layers`; guide-layer targets need a decoder-only LLM")
    return layers


def rows_attention(attn: nn.Module, args: tuple, kwargs: dict, rows: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of query positions ``rows`` (B, n_q) at module ``attn``.

    Mirrors the layer's own computation (projections, RoPE, mask, softmax in float32).
    Returns shape (B, H, n_q, L).
    """
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, L, d), normed by the layer
    if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
        raise NotImplementedError(f"{type(attn).__name__} normalises q/k; its targets are not supported yet")
    B, L, _ = h.shape
    hd = attn.head_dim
    q = attn.q_proj(h).view(B, L, -1, hd).transpose(1, 2)  # (B, H, L, hd)
    k = attn.k_proj(h).view(B, L, -1, hd).transpose(1, 2)  # (B, H_kv, L, hd)
    cos, sin = kwargs["position_embeddings"]
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own RoPE
    q, k = rope(q, k, cos, sin)
    q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, hd))  # (B, H, n_q, hd)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query heads
    scaling = getattr(attn, "scaling", hd ** -0.5)
    logits = torch.matmul(q.float(), k.float().transpose(2, 3)) * scaling  # (B, H, n_q, L)
    mask = kwargs.get("attention_mask")
    if mask is None:  # SDPA's is_causal path: plain causal, no padding
        allowed = torch.arange(L, device=h.device)[None, None, :] <= rows[..., None]  # (B, n_q, L)
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    else:
        if mask.ndim != 4:
            raise NotImplementedError(f"guide layer received a {mask.ndim}-D attention mask; 4-D expected")
        mask = mask[..., :L].expand(B, -1, -1, -1)
        mask = mask.gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, L))  # (B, 1|H, n_q, L)
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    return logits.softmax(dim=-1)


@contextmanager
def _capture(model: nn.Module, guide_layer: int, queries: Queries) -> Iterator[dict]:
    """Hooks filling the yielded dict with ``"targets"`` (a :class:`GuideTargets`) on a forward."""
    adapter = get_adapter(model)
    base, llm = adapter.locate(model)
    layers = _decoder_layers(llm)
    if not 0 <= guide_layer < len(layers):
        raise ValueError(f"guide_layer {guide_layer} is outside the LLM's {len(layers)} decoder layers "
                         f"(0..{len(layers) - 1})")
    token_ids = torch.tensor(adapter.vision_token_ids(model.config))
    state: dict = {}

    def read_ids(module, args, kwargs):
        state["input_ids"] = kwargs.get("input_ids", args[0] if args else None)

    def before_llm(module, args, kwargs):
        embeds, ids = kwargs.get("inputs_embeds"), state.get("input_ids")
        if embeds is None or ids is None:
            raise ValueError("guide targets need the LVLM called with `input_ids` (and pixel values)")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise NotImplementedError("guide targets need a 2-D attention mask (batch, sequence)")
        real = mask.bool() if mask is not None else torch.ones(embeds.shape[:2], dtype=torch.bool,
                                                                  device=embeds.device)
        vision = torch.isin(ids, token_ids.to(ids.device)) & real
        state["ctx"] = build_context(embeds, real, vision, ids, model)
        state["queries"] = query_rows(real, vision, queries)

    def at_guide(module, args, kwargs):
        ctx, is_query = state["ctx"], state["queries"]
        n_q = is_query.sum(dim=1)  # (B,)
        rows = torch.argsort((~is_query).int(), dim=1, stable=True)[:, :int(n_q.max())]  # (B, n_q)
        valid = torch.arange(rows.shape[1], device=rows.device)[None] < n_q[:, None]  # (B, n_q)
        probs = rows_attention(module, args, kwargs, rows).sum(dim=1)  # (B, n_q, L): summed over heads
        probs = probs.gather(2, ctx.vision_index[:, None, :].expand(-1, rows.shape[1], -1))  # (B, n_q, n_v)
        probs = torch.where(valid[..., None], probs, 0.0)  # padded rows may be NaN (fully masked)
        target = probs.sum(dim=1) / n_q.clamp_min(1)[:, None]
        state["targets"] = GuideTargets(ctx, target.masked_fill(~ctx.vision_mask, 0.0))
        raise _Stop

    handles = [base.register_forward_pre_hook(read_ids, with_kwargs=True),
               llm.register_forward_pre_hook(before_llm, with_kwargs=True),
               layers[guide_layer].self_attn.register_forward_pre_hook(at_guide, with_kwargs=True)]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def guide_targets(model: nn.Module, inputs: dict, guide_layer: int, queries: Queries = "after_image") -> GuideTargets:
    """PPM inputs and guide-layer attention targets for one batch of prompts.

    Parameters
    ----------
    model : nn.Module
        A frozen LVLM of a family in :data:`covipal.pruning.ADAPTERS`.
    inputs : dict
        Its forward keyword inputs (``input_ids``, ``attention_mask``, pixel values...).
    guide_layer : int
        0-based decoder layer whose attention is read.
    queries : {"after_image", "last", "all"}
        Query tokens averaged over (module docstring).
    """
    if model.training:
        raise ValueError("guide targets come from the frozen LVLM in eval mode; call model.eval() first")
    with _capture(model, guide_layer, queries) as state:
        try:
            model(**inputs, use_cache=False)
        except _Stop:
            pass
    if "targets" not in state:
        raise RuntimeError(f"decoder layer {guide_layer} was not reached; is `model` an LVLM with its LLM inside?")
    return state["targets"]
