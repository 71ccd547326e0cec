"""Pruning inside the LLM: drop vision-token rows at the input of chosen decoder layers.

FastV, PyramidDrop and SparseVLM score vision tokens with what the LLM computed in its
first layers, so they cannot prune before it. A :class:`LayerPruner` names its *stages*
(decoder layers) and how many vision tokens survive each; at the input of every stage
layer the runtime asks ``score_at(ctx)`` for the current vision tokens, keeps the top
ones, and from then on every layer sees the shorter sequence:

>>> pruner = get_method("fastv", reserve_ratio=0.5, layer=2)
>>> with pruner(model) as run:
...     model.generate(**inputs, max_new_tokens=32)
>>> run.budget()  # per sample: Budget(entering=n_v, layer_average=...)

**Mechanism** (all hooks are added and removed by ``with pruner(model)``):

1. a pre-hook on the multimodal base model reads ``input_ids`` (where vision tokens are);
2. a pre-hook on the language model records the prompt (padding, vision tokens, input
   embeddings) on a prefill, or the attention-mask columns of the decoded tokens while
   decoding; it changes none of the LLM's inputs;
3. a pre-hook on the self-attention of each layer ``K-1`` before a stage ``K`` keeps that
   layer's attention inputs, so a score can recompute the attention rows it needs there
   (:func:`covipal.pruning.guide.rows_attention`: the layer's own ``q_proj``/``k_proj``
   and the model's ``apply_rotary_pos_emb``; the model keeps SDPA or whatever it uses);
4. a forward pre-hook (with kwargs) on every decoder layer from the first stage on. At a
   stage of a prefill it gathers the kept rows of ``hidden_states`` (packed, padding on
   the left so the last column stays every sample's last token), of the rotary
   ``position_embeddings`` and ``position_ids`` (kept tokens keep their *original*
   positions, as in FastV and DART), and builds the layer's attention mask for the
   shorter sequence with ``transformers.masking_utils.create_causal_mask``
   (``layer_idx`` = this layer, so it is sized by this layer's cache). Later layers get
   the same replacements, because the LLM hands every layer the full-sequence mask and
   position embeddings. While decoding, layers ``< K`` use the model's own mask on their
   full cache; each layer ``>= K`` gets a mask made of the pruned prompt's padding mask
   for its stage plus the mask columns of the tokens decoded since. Decoded tokens get
   their ordinary (full-sequence) positions in every layer.

A stage's kept set is chosen once, on the prefill, and the cache keeps it (FastV's
"KV-cache" variant, not the original re-pruning at every step); ``generate`` with
``use_cache=False`` prefills again at every step and may choose differently because the
last token changes.

**Supported:** LLMs whose decoder layers take ``hidden_states`` and the keyword
arguments ``attention_mask``, ``position_embeddings`` (``cos, sin`` of shape
(B or 1, L, head_dim)) and optionally ``position_ids``: the Llama / Qwen2 text models of
every family in :data:`covipal.pruning.ADAPTERS`, including Qwen2-VL's M-RoPE (its
cos/sin are already merged per token, so gathering rows keeps each token's 3-D
position). **Not supported** (clear errors): sliding-window layers, 4-D or dict
attention masks given by the caller, static/compileable caches.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from covipal.pruning.base import Budget, Pruner, schedule_budget, top_k
from covipal.pruning.runtime import _UNSET, PruningRun, _gather_rows, _pack, require_input_ids


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a language model (``llm.layers``)."""
    layers = getattr(llm, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(llm).__name__} has no `layers`; pruning inside the LLM needs a decoder-only LLM")
    return layers


def scaled_layers(fractions: tuple[float, ...], n_layers: int) -> list[int]:
    """Layer indices ``round(f * n_layers)``, deduplicated, kept in ``[1, n_layers - 1]``.

    Used to move a schedule given for a reference depth (e.g. layers 8/16/24 of 32) to
    another depth.
    """
    out = sorted({min(n_layers - 1, max(1, round(f * n_layers))) for f in fractions})
    return out


@dataclass
class LayerContext:
    """What an in-LLM pruner may look at, at the input of decoder layer ``layer`` in a prefill.

    The *current* sequence is the one entering ``layer``: the full prompt before the
    first stage, the packed survivors after it (padding on the left).

    Attributes
    ----------
    layer : int
        The stage layer.
    stage : int
        Index of this stage in the pruner's schedule.
    hidden : torch.Tensor
        (B, L_c, d): input hidden states of ``layer``.
    index : torch.Tensor
        (B, L_c) long: prompt position of each column (0 on padding).
    real : torch.Tensor
        (B, L_c) bool: non-padding columns.
    vision : torch.Tensor
        (B, L_c) bool: vision tokens still present.
    prompt_real, prompt_vision : torch.Tensor
        (B, L) bool: non-padding and vision tokens of the full prompt.
    embeds : torch.Tensor
        (B, L, d): the LLM's input embeddings of the full prompt.
    input_ids : torch.Tensor
        (B, L): the prompt.
    model, llm : nn.Module
        The LVLM and its language model.
    layer_kwargs : dict
        Keyword inputs of decoder layer ``layer`` for the current sequence (mask,
        position embeddings).
    """

    layer: int
    stage: int
    hidden: torch.Tensor
    index: torch.Tensor
    real: torch.Tensor
    vision: torch.Tensor
    prompt_real: torch.Tensor
    prompt_vision: torch.Tensor
    embeds: torch.Tensor
    input_ids: torch.Tensor
    model: nn.Module
    llm: nn.Module
    layer_kwargs: dict
    _captured: dict = field(default_factory=dict, repr=False)

    def vision_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(columns, mask)``, both (B, n_v): columns of the current vision tokens, packed left.

        ``score_at`` returns one score per entry, in this order.
        """
        cols, mask = _pack(self.vision, left=False)
        return cols, mask

    def last_token(self) -> torch.Tensor:
        """(B, 1): column of each sample's last real token (the last prompt token)."""
        col = torch.arange(self.real.shape[1], device=self.real.device).expand_as(self.real)
        return torch.where(self.real, col, -1).max(dim=1, keepdim=True).values.clamp_min(0)

    def columns_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Current columns of prompt positions ``positions`` (B, n); -1 where the token was dropped."""
        B, L = self.prompt_real.shape
        where = torch.full((B, L + 1), -1, dtype=torch.long, device=self.index.device)
        cols = torch.arange(self.index.shape[1], device=self.index.device).expand_as(self.index)
        where.scatter_(1, self.index.masked_fill(~self.real, L), cols)  # padding goes to the spare column L
        return where[:, :L].gather(1, positions)

    def _attn_inputs(self, at: int) -> tuple[nn.Module, tuple, dict]:
        """Self-attention module of layer ``at`` and its (args, kwargs) for the current sequence."""
        layers = decoder_layers(self.llm)
        if at == self.layer:
            layer = layers[at]
            kwargs = {**self.layer_kwargs, "hidden_states": layer.input_layernorm(self.hidden)}
            return layer.self_attn, (), kwargs
        if at == self.layer - 1 and at in self._captured:
            return self._captured[at]
        raise ValueError(f"attention inputs are available at layer {self.layer - 1} (captured) or {self.layer} "
                         f"(recomputed), not {at}")

    def attention(self, rows: torch.Tensor, at: int) -> torch.Tensor:
        """Attention probabilities of query columns ``rows`` (B, n_q) at decoder layer ``at``.

        ``at`` is ``layer - 1`` (the attention that layer computed in this forward, as
        FastV reads it) or ``layer`` (recomputed with this layer's ``input_layernorm``,
        q/k projections and RoPE on the current hidden states, as PyramidDrop does). Only
        the requested rows are computed, in float32. Returns (B, H, n_q, L_c).
        """
        from covipal.pruning.guide import rows_attention

        module, args, kwargs = self._attn_inputs(at)
        return rows_attention(module, args, kwargs, rows)

    def keys(self, at: int) -> torch.Tensor:
        """Keys after RoPE at decoder layer ``at`` (as cached by the model), shape (B, H_kv, L_c, head_dim)."""
        module, args, kwargs = self._attn_inputs(at)
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return rope_keys(module, h, kwargs["position_embeddings"])


def rope_keys(attn: nn.Module, hidden: torch.Tensor, position_embeddings: tuple) -> torch.Tensor:
    """Keys of self-attention ``attn`` for its (normed) input ``hidden`` (B, L, d), after the model's RoPE.

    Shape (B, H_kv, L, head_dim), as the layer writes them to its cache.
    """
    import sys

    B, L, _ = hidden.shape
    k = attn.k_proj(hidden).view(B, L, -1, attn.head_dim).transpose(1, 2)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    cos, sin = position_embeddings
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    return rope(k, k, cos, sin)[1]


@dataclass
class LayerPruner(Pruner):
    """Base of the methods that prune inside the LLM, at one or more decoder layers.

    Subclasses implement :meth:`stages`, :meth:`counts` and :meth:`score_at`. The meaning
    of ``reserve_ratio`` (tokens entering the LLM vs averaged over layers) is the
    subclass's to document; :meth:`budget` reports both.
    """

    def stages(self, n_layers: int) -> list[int]:
        """Sorted decoder layers (>= 1) at whose input vision tokens are dropped."""
        raise NotImplementedError(f"{type(self).__name__} must implement stages(n_layers)")

    def counts(self, n_vision: int, n_layers: int) -> list[int]:
        """Vision tokens that remain from each stage on, for a prompt with ``n_vision`` (non-increasing)."""
        raise NotImplementedError(f"{type(self).__name__} must implement counts(n_vision, n_layers)")

    def score_at(self, ctx: LayerContext) -> torch.Tensor:
        """Importance of the current vision tokens, (B, n_v) in ``ctx.vision_columns()`` order; higher keeps."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_at(ctx) -> (B, n_v)")

    def schedule(self, n_vision: int, n_layers: int) -> list[tuple[int, int]]:
        if n_vision == 0:
            return []
        return list(zip(self.stages(n_layers), self.counts(n_vision, n_layers)))

    def _start(self, model: nn.Module, adapter):
        return LayerPruningRun(self, model, adapter)


@dataclass
class _Stage:
    """The current sequence after the latest stage of this forward."""

    index: torch.Tensor | None  # (B, L') prompt positions (prefill only)
    real: torch.Tensor | None   # (B, L') bool (prefill only)
    vision: torch.Tensor | None
    mask: torch.Tensor | None   # the attention mask the layers from this stage on receive
    position_embeddings: tuple | None = None
    position_ids: torch.Tensor | None = None


@dataclass
class _Forward:
    """What one LLM call needs while its layers run."""

    prefill: bool
    cache: object
    real: torch.Tensor | None = None
    vision: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    counts: list[list[int]] | None = None
    tail: torch.Tensor | None = None  # decoding: (B, n_tail) mask columns after the prompt
    cur: _Stage | None = None
    captured: dict = field(default_factory=dict)


@dataclass
class _LayerPrompt:
    """What decoding needs to know about the last pruned prefill."""

    cache: weakref.ref | None
    full_len: int
    masks: dict  # stage layer -> (B, L_s) padding mask of the sequence entering it, or None if unpruned

    def owns(self, cache) -> bool:
        return self.cache is not None and self.cache() is cache


class LayerPruningRun(PruningRun):
    """The hooks of one ``with pruner(model)`` block for a :class:`LayerPruner`.

    Attributes
    ----------
    kept, kept_vision : list of torch.Tensor or None
        For the last prompt, per sample: prompt indices of the tokens (of the vision
        tokens) present after the last stage.
    stage_kept : list of (int, list of torch.Tensor)
        Per stage layer: per sample, prompt indices of the vision tokens kept there.
    n_vision : torch.Tensor or None
        (B,): vision tokens per sample before pruning.
    """

    def __init__(self, pruner, model: nn.Module, adapter):
        super().__init__(pruner, model, adapter)
        self.stage_kept: list[tuple[int, list[torch.Tensor]]] = []
        self._fwd: _Forward | None = None
        self._llm: nn.Module | None = None
        self._stages: list[int] = []

    def attach(self, base: nn.Module, llm: nn.Module) -> list:
        self._llm = llm
        layers = decoder_layers(llm)
        n = len(layers)
        if getattr(llm, "has_sliding_layers", False):
            raise NotImplementedError(f"{type(llm).__name__} has sliding-window layers; pruning inside the LLM "
                                      "supports full-attention layers only")
        self._stages = list(self.pruner.stages(n))
        if self._stages != sorted(set(self._stages)) or not all(1 <= s < n for s in self._stages):
            raise ValueError(f"{type(self.pruner).__name__}.stages({n}) must be sorted distinct layers in "
                             f"1..{n - 1} (layer 0 would be pruning before the LLM), got {self._stages}")
        handles = super().attach(base, llm)
        for s in self._stages:
            handles.append(layers[s - 1].self_attn.register_forward_pre_hook(self._capture_hook(s - 1),
                                                                              with_kwargs=True))
        first = self._stages[0] if self._stages else n
        for j in range(first, n):
            handles.append(layers[j].register_forward_pre_hook(self._layer_hook(j), with_kwargs=True))
        return handles

    def budget(self) -> list[Budget]:
        """Per sample of the last prompt: vision tokens entering the LLM (all) and averaged over its layers."""
        if self.n_vision is None:
            raise RuntimeError("no prompt has been pruned yet; call the model inside the `with` block first")
        n_layers = len(decoder_layers(self._llm))
        out = []
        for b, n in enumerate(self.n_vision.tolist()):
            sched = [(layer, len(kept[b])) for layer, kept in self.stage_kept]
            out.append(schedule_budget(sched, int(n), n_layers))
        return out

    # LLM hooks -----------------------------------------------------------------------

    def before_llm(self, module, args, kwargs):
        """Pre-hook on the language model: note the prompt (prefill) or the decoded tokens' mask."""
        if self._scoring:
            return None
        input_ids, self._input_ids = self._input_ids, _UNSET
        self._take_cache_from_output = False
        self._fwd = None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
            raise NotImplementedError("pruning inside the LLM supports 2-D attention masks (batch, sequence) only")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if getattr(cache, "is_compileable", False):
            raise NotImplementedError("pruning inside the LLM needs a dynamic cache (layers of different lengths)")
        past = cache.get_seq_length() if cache is not None else 0
        n_layers = len(decoder_layers(module))
        B, q = embeds.shape[:2]
        if past == 0:
            self._prompt = None
            if input_ids is _UNSET:
                return None
            require_input_ids(input_ids)
            if tuple(input_ids.shape) != (B, q):
                raise ValueError(f"input_ids {tuple(input_ids.shape)} do not line up with the LLM input {(B, q)}")
            real = mask.bool() if mask is not None else torch.ones(B, q, dtype=torch.bool, device=embeds.device)
            vision = self._has_vision(input_ids).to(real.device) & real
            self.n_vision = vision.sum(dim=1)
            self.kept_vision = [row.nonzero().squeeze(1) for row in vision]
            self.kept = [row.nonzero().squeeze(1) for row in real]
            self.stage_kept = []
            counts = [self.pruner.counts(int(n), n_layers) if n else [] for n in self.n_vision.tolist()]
            self._fwd = _Forward(prefill=True, cache=cache, real=real, vision=vision, embeds=embeds,
                                 input_ids=input_ids, counts=counts)
            self._prompt = _LayerPrompt(cache=weakref.ref(cache) if cache is not None else None, full_len=q,
                                        masks={})
            self._take_cache_from_output = cache is None
            return None
        if self._prompt is not None and self._prompt.owns(cache):
            n_tail = past - self._prompt.full_len + q
            if mask is None:
                tail = torch.ones(B, n_tail, dtype=torch.long, device=embeds.device)
            elif mask.shape[1] == self._prompt.full_len + n_tail:
                tail = mask[:, mask.shape[1] - n_tail:]
            else:
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; while decoding a prompt pruned "
                                 f"inside the LLM it must cover the full prompt ({self._prompt.full_len} + {n_tail} "
                                 "columns)")
            self._fwd = _Forward(prefill=False, cache=cache, tail=tail)
            return None
        if input_ids is not _UNSET and input_ids is not None and self._has_vision(input_ids).any():
            raise NotImplementedError("covipal prunes vision tokens in the prefill only; continuing a non-empty "
                                      "cache with new images or videos is not supported")
        return None

    def after_llm(self, module, args, kwargs, output):
        super().after_llm(module, args, kwargs, output)
        self._fwd = None  # drop references to this forward's tensors

    # layer hooks ---------------------------------------------------------------------

    def _capture_hook(self, j: int):
        def hook(module, args, kwargs):
            if self._fwd is not None and self._fwd.prefill and not self._scoring:
                self._fwd.captured[j] = (module, args, kwargs)
        return hook

    def _layer_hook(self, j: int):
        def hook(module, args, kwargs):
            f = self._fwd
            if f is None or self._scoring:
                return None
            if j in self._stages:
                if f.prefill:
                    return self._prune_at(j, args, kwargs)
                mask = self._prompt.masks.get(j)
                if mask is not None:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    full = torch.cat([mask.to(f.tail.dtype), f.tail], dim=1)
                    f.cur = _Stage(None, None, None, self._mask4d(hidden, full, f.cache, j))
            return self._substitute(args, kwargs, f.cur)
        return hook

    @staticmethod
    def _substitute(args: tuple, kwargs: dict, cur: _Stage | None):
        if cur is None:
            return None
        new = {**kwargs, "attention_mask": cur.mask}
        if cur.position_embeddings is not None:
            new["position_embeddings"] = cur.position_embeddings
            if kwargs.get("position_ids") is not None:
                new["position_ids"] = cur.position_ids
        return args, new

    def _mask4d(self, hidden: torch.Tensor, mask2d: torch.Tensor, cache, j: int):
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self._llm.config, inputs_embeds=hidden, attention_mask=mask2d,
                                  cache=cache, position_ids=None, layer_idx=j)

    def _prune_at(self, j: int, args: tuple, kwargs: dict):
        f = self._fwd
        stage = self._stages.index(j)
        sub = self._substitute(args, kwargs, f.cur)
        if sub is not None:
            args, kwargs = sub
        hidden = args[0] if args else kwargs["hidden_states"]
        B, L = hidden.shape[:2]
        if f.cur is None:
            index = torch.arange(L, device=hidden.device).expand(B, L)
            real, vision = f.real, f.vision
        else:
            index, real, vision = f.cur.index, f.cur.real, f.cur.vision
        ctx = LayerContext(layer=j, stage=stage, hidden=hidden, index=index, real=real, vision=vision,
                           prompt_real=f.real, prompt_vision=f.vision, embeds=f.embeds, input_ids=f.input_ids,
                           model=self.model, llm=self._llm, layer_kwargs=kwargs, _captured=f.captured)
        cols, cols_mask = ctx.vision_columns()
        n_cur = cols_mask.sum(dim=1)
        want = [c[stage] if c else 0 for c in f.counts]
        if all(w >= int(n) for w, n in zip(want, n_cur.tolist())):  # nothing to drop at this stage
            self.stage_kept.append((j, [index[b, cols[b, :int(n)]] for b, n in enumerate(n_cur.tolist())]))
            self._prompt.masks[j] = f.cur.real if f.cur is not None else None
            f.captured.clear()
            return sub
        scores = self._scores(self.pruner.score_at, ctx, tuple(cols_mask.shape))
        keep = real & ~vision
        chosen = top_k(scores, n_cur, want)
        for b, c in enumerate(chosen):
            keep[b, cols[b, c]] = True
        pick, new_real = _pack(keep, left=True)  # (B, L'): kept columns in order, padding on the left
        new_index = index.gather(1, pick).masked_fill(~new_real, 0)
        new_vision = vision.gather(1, pick) & new_real
        new_hidden = _gather_rows(hidden, pick)
        cos, sin = kwargs["position_embeddings"]
        pe = tuple(_gather_rows(t.expand(B, *t.shape[1:]), pick) for t in (cos, sin))
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.shape[-1] == L:
            pos = pos.expand(*pos.shape[:-2], B, L).gather(-1, pick.expand(*pos.shape[:-2], B, -1))
        f.cur = _Stage(index=new_index, real=new_real, vision=new_vision,
                       mask=self._mask4d(new_hidden, new_real, f.cache, j), position_embeddings=pe, position_ids=pos)
        self._prompt.masks[j] = new_real
        self.stage_kept.append((j, [new_index[b, new_vision[b]] for b in range(B)]))
        self.kept_vision = [new_index[b, new_vision[b]] for b in range(B)]
        self.kept = [new_index[b, new_real[b]] for b in range(B)]
        f.captured.clear()
        new_args, new_kwargs = self._substitute(args, kwargs, f.cur)
        if new_args:
            new_args = (new_hidden, *new_args[1:])
        else:
            new_kwargs["hidden_states"] = new_hidden
        return new_args, new_kwargs
