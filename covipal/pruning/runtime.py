"""The hooks behind ``with pruner(model)``: prune the prefill once, keep decoding consistent.

Three hooks, all added and removed by :meth:`covipal.pruning.Pruner.__call__`:

1. a forward pre-hook on the multimodal base model (``LlavaModel``, ``Qwen2VLModel``...)
   reads ``input_ids``, which say where the vision tokens are;
2. a forward pre-hook on its language model rewrites the LLM's inputs;
3. a forward hook on the language model remembers the cache a pruned prefill created.

**Prefill** (the LLM is called with an empty or no cache): the pruner scores each
sample's vision tokens, :func:`~covipal.pruning.base.select` keeps the top
``ceil(r * n_v)`` per sample (over all its images and video frames together; text-only
samples keep everything), and the LLM receives ``inputs_embeds``, ``attention_mask``
and ``position_ids`` with the pruned tokens removed. Rows of the batch that end up
shorter are padded on the left, so the last column is every sample's last token and the
batch stays rectangular. Every kept token keeps its position in the full prompt
(1-D RoPE or M-RoPE, per the adapter table :mod:`covipal.pruning.adapters`). When nothing is removed (``r = 1``, or no vision tokens)
the inputs are passed on untouched, so the model's computation is bit-identical.

**Decode** (later calls on the cache that pruned prefill filled): ``generate`` keeps
extending the attention mask and position ids of the *full* prompt. The pre-hook replaces
the prompt part of the mask by the pruned prompt's mask (keeping the columns for the
tokens decoded since) and gives each new token the position after the full prompt's
last one plus the number of tokens decoded before it; incoming positions are replaced.
A manual decoding loop may pass either the full-prompt mask or the pruned one.

Limits: the prompt must come as ``input_ids`` (not only ``inputs_embeds``); a prompt
continued from a non-empty cache cannot add vision tokens; 4-D attention masks and
compileable static caches are not supported.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from covipal.pruning.adapters import Adapter
from covipal.pruning.base import Budget, PruningContext, select

_UNSET = object()  # the base model's pre-hook did not run before this LLM call


def require_input_ids(input_ids) -> None:
    """Refuse a prefill that came as ``inputs_embeds`` only: the vision tokens are found by id."""
    if input_ids is None:
        raise ValueError("pruning needs `input_ids` to find the vision tokens, but the model was called "
                         "with `inputs_embeds` only; pass `input_ids` (and pixel values) instead")


@dataclass
class _PrunedPrompt:
    """What decoding needs to know about the last pruned prefill."""

    cache: weakref.ref | None
    full_len: int            # L: columns of the full prompt
    mask: torch.Tensor       # (B, L') bool: attention mask of the pruned prompt
    next_text: torch.Tensor  # (B,) long: 1-D position of the first token after the prompt
    next_mrope: torch.Tensor | None  # (3, B) long: its M-RoPE position (mrope families)

    def owns(self, cache) -> bool:
        return self.cache is not None and self.cache() is cache


def _pack(flags: torch.Tensor, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices gathering the True columns of ``flags`` (B, L) in order, padded per row.

    Returns ``(index, mask)``, both (B, n) with ``n`` the largest count of a row; padding
    goes to the right (``left=False``) or the left (``left=True``) and points at False
    columns. ``mask`` is True on gathered True columns.
    """
    n = int(flags.sum(dim=1).max())
    if left:  # stable ascending sort: False columns first, then True ones, each in order
        index = torch.argsort(flags.int(), dim=1, stable=True)[:, flags.shape[1] - n:]
    else:
        index = torch.argsort((~flags).int(), dim=1, stable=True)[:, :n]
    return index, flags.gather(1, index)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B, L, d) gathered along L at ``index`` (B, n) -> (B, n, d)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def build_context(embeds: torch.Tensor, real: torch.Tensor, vision: torch.Tensor, input_ids: torch.Tensor,
                  model: nn.Module, llm_inputs: dict | None = None) -> PruningContext:
    """Split the LLM input ``embeds`` (B, L, d) into the packed vision and text parts.

    ``real`` and ``vision`` (B, L) bool mark non-padding and vision tokens; ``llm_inputs``
    are the LLM's keyword inputs, passed on as :attr:`PruningContext.llm_inputs`.
    """
    v_index, v_mask = _pack(vision, left=False)
    t_index, t_mask = _pack(real & ~vision, left=False)
    return PruningContext(
        vision=_gather_rows(embeds, v_index) * v_mask[..., None],
        vision_mask=v_mask,
        vision_index=v_index.masked_fill(~v_mask, 0),
        text=_gather_rows(embeds, t_index) * t_mask[..., None],
        text_mask=t_mask,
        text_index=t_index.masked_fill(~t_mask, 0),
        input_ids=input_ids,
        model=model,
        llm_inputs=llm_inputs,
    )


class PruningRun:
    """The hooks of one ``with pruner(model)`` block and a record of what they kept.

    Attributes
    ----------
    kept : list of torch.Tensor or None
        For the last prompt: per sample, sorted indices into the prompt of every token the
        LLM saw (its text tokens and kept vision tokens; padding excluded).
    kept_vision : list of torch.Tensor or None
        Per sample, sorted indices into the prompt of the kept vision tokens.
    n_vision : torch.Tensor or None
        Shape (B,): vision tokens per sample before pruning.
    """

    def _scores(self, score_fn, ctx: PruningContext, expected: tuple) -> torch.Tensor:
        """``score_fn(ctx)`` without grad, with the hooks told to ignore the pruner's own forward
        passes; refuses scores whose shape is not ``expected`` = (B, n_v)."""
        self._scoring = True
        try:
            with torch.no_grad():
                scores = score_fn(ctx)
        finally:
            self._scoring = False
        if tuple(scores.shape) != expected:
            raise ValueError(f"{type(self.pruner).__name__}.{score_fn.__name__} returned shape "
                             f"{tuple(scores.shape)}, expected (B, n_v) = {expected}")
        return scores
    def __init__(self, pruner, model: nn.Module, adapter: Adapter):
        self.pruner, self.model, self.adapter = pruner, model, adapter
        self.vision_token_ids = torch.tensor(adapter.vision_token_ids(model.config), dtype=torch.long)
        self.kept: list[torch.Tensor] | None = None
        self.kept_vision: list[torch.Tensor] | None = None
        self.n_vision: torch.Tensor | None = None
        self._input_ids = _UNSET
        self._prompt: _PrunedPrompt | None = None
        self._take_cache_from_output = False
        self._scoring = False  # a pruner runs part of the model itself (oracle): leave those calls alone

    def attach(self, base: nn.Module, llm: nn.Module) -> list:
        """Register this run's hooks; returns their handles."""
        return [base.register_forward_pre_hook(self.read_input_ids, with_kwargs=True),
                llm.register_forward_pre_hook(self.before_llm, with_kwargs=True),
                llm.register_forward_hook(self.after_llm, with_kwargs=True)]

    def budget(self) -> list[Budget]:
        """Per sample of the last prompt: vision tokens entering the LLM and averaged over its layers.

        Pruning before the LLM, both are the number of kept vision tokens.
        """
        if self.kept_vision is None:
            raise RuntimeError("no prompt has been pruned yet; call the model inside the `with` block first")
        return [Budget(entering=len(k), layer_average=float(len(k))) for k in self.kept_vision]

    # hooks ---------------------------------------------------------------------------

    def read_input_ids(self, module, args, kwargs):
        """Pre-hook on the multimodal base model: remember this call's ``input_ids``."""
        if self._scoring:
            return
        self._input_ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)

    def before_llm(self, module, args, kwargs):
        """Pre-hook on the language model: prune a prefill, or align a decoding step with it."""
        if self._scoring:
            return None
        input_ids, self._input_ids = self._input_ids, _UNSET
        self._take_cache_from_output = False
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:  # LLM called on token ids: not through the multimodal model
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            self._prompt = None
            if input_ids is _UNSET:
                return None
            require_input_ids(input_ids)
            new_kwargs = self._prune_prompt(kwargs, input_ids, cache)
            return None if new_kwargs is None else (args, new_kwargs)
        if self._prompt is not None and self._prompt.owns(cache):
            return args, self._decode_step(kwargs, past)
        if input_ids is not _UNSET and input_ids is not None and self._has_vision(input_ids).any():
            raise NotImplementedError("covipal prunes vision tokens in the prefill only; continuing a non-empty "
                                      "cache with new images or videos is not supported")
        return None

    def after_llm(self, module, args, kwargs, output):
        """Hook on the language model: remember the cache a pruned prefill created."""
        if self._scoring:
            return
        if self._take_cache_from_output and self._prompt is not None:
            cache = getattr(output, "cache", None)
            if cache is None:
                cache = getattr(output, "past_key_values", None)
            self._prompt.cache = weakref.ref(cache) if cache is not None else None
        self._take_cache_from_output = False

    # prefill -------------------------------------------------------------------------

    def _has_vision(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(input_ids, self.vision_token_ids.to(input_ids.device))

    def _prune_prompt(self, kwargs: dict, input_ids: torch.Tensor, cache) -> dict | None:
        embeds = kwargs["inputs_embeds"]
        B, L, _ = embeds.shape
        if tuple(input_ids.shape) != (B, L):
            raise ValueError(f"input_ids {tuple(input_ids.shape)} do not line up with the LLM input {(B, L)}")
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
            raise NotImplementedError("pruning supports 2-D attention masks (batch, sequence) only")
        real = mask.bool() if mask is not None else torch.ones(B, L, dtype=torch.bool, device=embeds.device)
        vision = self._has_vision(input_ids).to(real.device) & real
        keep = real & ~vision
        self.n_vision = vision.sum(dim=1)
        self.kept_vision = [torch.empty(0, dtype=torch.long, device=real.device) for _ in range(B)]
        if vision.any():
            ctx = build_context(embeds, real, vision, input_ids, self.model, llm_inputs=kwargs)
            scores = self._scores(self.pruner.score, ctx, tuple(ctx.vision_mask.shape))
            for b, chosen in enumerate(select(scores, ctx.n_vision, self.pruner.reserve_ratio)):
                self.kept_vision[b] = ctx.vision_index[b, chosen]
                keep[b, self.kept_vision[b]] = True
        self.kept = [row.nonzero().squeeze(1) for row in keep]
        if torch.equal(keep, real):  # nothing removed: leave the model's computation untouched
            return None

        index, new_mask = _pack(keep, left=True)  # (B, L'): kept tokens in order, padding on the left
        positions, next_text, next_mrope = self._prompt_positions(kwargs.get("position_ids"), index, new_mask, real)
        self._prompt = _PrunedPrompt(cache=weakref.ref(cache) if cache is not None else None, full_len=L,
                                     mask=new_mask, next_text=next_text, next_mrope=next_mrope)
        self._take_cache_from_output = cache is None
        return {**kwargs, "inputs_embeds": _gather_rows(embeds, index),
                "attention_mask": new_mask.to(mask.dtype if mask is not None else torch.long),
                "position_ids": positions}

    def _prompt_positions(self, incoming: torch.Tensor | None, index: torch.Tensor, new_mask: torch.Tensor,
                          real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Positions of the pruned prompt, gathered from the full prompt's at ``index`` (B, L').

        Returns ``(positions, next_text, next_mrope)``: the LLM's ``position_ids`` ((B, L'), or
        (3 or 4, B, L') for M-RoPE; 0 on padding) and the positions decoding continues from
        ((B,) 1-D and (3, B) M-RoPE, the latter None for 1-D families).
        """
        B, L = real.shape
        if incoming is None:  # what the text model would make itself
            incoming = torch.arange(L, device=index.device).expand(B, L)
        last = real.long().cumsum(dim=1).argmax(dim=1)  # (B,): column of each sample's last token
        rows = torch.arange(B, device=index.device)
        if self.adapter.positions == "rope":
            full = incoming.expand(B, L)
            kept = full.gather(1, index).masked_fill(~new_mask, 0)  # (B, L')
            return kept, full[rows, last] + 1, None
        renumbered = (new_mask.long().cumsum(dim=1) - 1).clamp_min(0)  # (B, L'): 0..n_kept-1, padding at 0
        has_text_row = incoming.ndim == 3 and incoming.shape[0] == 4
        full = incoming[-3:] if incoming.ndim == 3 else incoming[None]
        full = full.expand(3, B, L)  # (3, B, L)
        kept = full.gather(2, index[None].expand(3, -1, -1)).masked_fill(~new_mask, 0)  # (3, B, L')
        next_mrope = full[:, rows, last] + 1  # (3, B), as generate continues
        positions = torch.cat([renumbered[None], kept]) if has_text_row else kept
        return positions, new_mask.sum(dim=1), next_mrope

    # decode --------------------------------------------------------------------------

    def _decode_step(self, kwargs: dict, past: int) -> dict:
        prompt = self._prompt
        embeds = kwargs["inputs_embeds"]
        B, q = embeds.shape[:2]
        if B != prompt.mask.shape[0]:
            raise ValueError(f"decoding a batch of {B} on a cache pruned for a batch of {prompt.mask.shape[0]}")
        pruned_len = prompt.mask.shape[1]
        n_tail = past - pruned_len + q  # columns for tokens after the prompt, this step's included
        mask = kwargs.get("attention_mask")
        if mask is None:
            tail = torch.ones(B, n_tail, dtype=torch.long, device=embeds.device)
        elif mask.ndim == 2 and mask.shape[1] in (prompt.full_len + n_tail, pruned_len + n_tail):
            tail = mask[:, mask.shape[1] - n_tail:]
        else:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; while decoding a pruned prompt it must "
                             f"cover the full prompt ({prompt.full_len} + {n_tail} columns) or the pruned one "
                             f"({pruned_len} + {n_tail})")
        new_mask = torch.cat([prompt.mask.to(tail.dtype), tail], dim=1)
        steps = torch.arange(past - pruned_len, n_tail, device=embeds.device)  # (q,): tokens since the prompt
        text = prompt.next_text[:, None] + steps  # (B, q)
        if prompt.next_mrope is None:
            positions = text
        else:
            positions = prompt.next_mrope[..., None] + steps  # (3, B, q)
            incoming = kwargs.get("position_ids")
            if incoming is not None and incoming.ndim == 3 and incoming.shape[0] == 4:
                positions = torch.cat([text[None], positions])
        return {**kwargs, "attention_mask": new_mask, "position_ids": positions}
