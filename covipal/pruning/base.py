"""The pruner contract: a dataclass with one ``score`` method, a shared top-k ``select``.

Usage (any registered method)::

    pruner = get_method("covipal", reserve_ratio=0.25, ppm="models/ppm")
    with pruner(model) as run:
        out = model.generate(**inputs, max_new_tokens=32)
    run.kept_vision  # per sample: indices (into the prompt) of the vision tokens kept

Inside the ``with`` block the LLM of ``model`` sees each prompt's text tokens and
``ceil(r * n_v)`` of its ``n_v`` vision tokens (see :func:`n_keep`); nothing else about
the model changes, and every hook is removed on exit. How the pruned sequence is built
and kept consistent while decoding is in :mod:`covipal.pruning.runtime`.

Methods that prune *inside* the LLM (FastV, PyramidDrop, SparseVLM) subclass
:class:`covipal.pruning.layers.LayerPruner` instead and implement ``score_at``; they share
this context manager and the budget accounting below.

**Budgets** are counted two ways in the literature, and every method reports both
(:meth:`Pruner.budget` for a planned prompt, ``run.budget()`` for the last one seen):
the vision tokens *entering the LLM*, and the vision tokens *averaged over the decoder
layers* (``sum_l n_l / N``, the "equivalent tokens" of SparseVLM and PyramidDrop
tables). They are equal for methods that prune before the LLM.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass
class PruningContext:
    """What a pruner may look at to score the vision tokens of one prefill.

    Each sample's vision tokens and text tokens are packed to the left in their
    original order and padded on the right.

    Attributes
    ----------
    vision : torch.Tensor
        ``H_v``, shape (B, n_v, d): vision embeddings as the LLM receives them (after
        the projector), zero where ``vision_mask`` is False.
    vision_mask : torch.Tensor
        Shape (B, n_v), bool: True for real vision tokens. A text-only sample has none.
    vision_index : torch.Tensor
        Shape (B, n_v), long: position of each vision token in the prompt (0 on padding).
    text : torch.Tensor
        ``H_t``, shape (B, n_t, d): embeddings of the prompt's other (non-padding) tokens.
    text_mask : torch.Tensor
        Shape (B, n_t), bool: True for real text tokens.
    text_index : torch.Tensor
        Shape (B, n_t), long: position of each text token in the prompt (0 on padding).
    input_ids : torch.Tensor
        Shape (B, L): the prompt.
    model : torch.nn.Module
        The LVLM being pruned.
    llm_inputs : dict or None
        The keyword inputs the language model received for this prefill, unpruned
        (``inputs_embeds``, ``attention_mask``, ``position_ids``...), for methods that run
        part of the LLM themselves (``oracle``); None outside the pruning runtime.
    """

    vision: torch.Tensor
    vision_mask: torch.Tensor
    vision_index: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    text_index: torch.Tensor
    input_ids: torch.Tensor
    model: nn.Module
    llm_inputs: dict | None = None

    @property
    def n_vision(self) -> torch.Tensor:
        """Shape (B,): number of vision tokens of each sample."""
        return self.vision_mask.sum(dim=1)


def n_keep(n: int, ratio: float) -> int:
    """Number of vision tokens kept out of ``n`` at reserve ratio ``ratio``.

    ``ceil(ratio * n)``, at least 1 when ``n > 0`` and 0 when ``n == 0``. The product is
    rounded to 6 decimals first so that float error does not add a token
    (``0.1 * 30 == 3.0000000000000004`` keeps 3, not 4).
    """
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(round(ratio * n, 6))))


def select(scores: torch.Tensor, n_valid: torch.Tensor, ratio: float) -> list[torch.Tensor]:
    """Kept vision tokens of each sample: the top ``n_keep(n_valid[b], ratio)`` by score.

    Parameters
    ----------
    scores : torch.Tensor
        Shape (B, n_v); higher means keep. Only the first ``n_valid[b]`` entries of row
        ``b`` are considered (vision tokens are packed to the left).
    n_valid : torch.Tensor
        Shape (B,): number of real vision tokens per sample.
    ratio : float
        Reserve ratio ``r`` in (0, 1].

    Returns
    -------
    list of torch.Tensor
        One LongTensor per sample, shape (n_keep(n_valid[b], ratio),), sorted ascending so
        the kept tokens stay in their original order. Ties are broken by ``torch.topk``.
    """
    return top_k(scores, n_valid, [n_keep(int(n), ratio) for n in n_valid.tolist()])


def top_k(scores: torch.Tensor, n_valid: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Per sample, the sorted indices of the ``counts[b]`` highest of its first ``n_valid[b]`` scores."""
    return [row[:n].topk(min(k, n)).indices.sort().values
            for row, n, k in zip(scores, n_valid.tolist(), counts)]


@dataclass(frozen=True)
class Budget:
    """Vision tokens one prompt costs the LLM, counted the two ways of the literature.

    Attributes
    ----------
    entering : int
        Vision tokens in the LLM's input (layer 0).
    layer_average : float
        Vision tokens present at the input of each decoder layer, averaged over the layers.
    """

    entering: int
    layer_average: float


def schedule_budget(schedule: list[tuple[int, int]], n_vision: int, n_layers: int) -> Budget:
    """The :class:`Budget` of a schedule ``[(layer, vision tokens from that layer on), ...]``.

    Layers before the first entry see all ``n_vision`` tokens; entries are sorted by layer.
    """
    counts = [n_vision] * n_layers
    for layer, count in schedule:
        counts[layer:] = [count] * (n_layers - layer)
    return Budget(entering=counts[0] if n_layers else n_vision, layer_average=sum(counts) / max(n_layers, 1))


@dataclass
class Pruner:
    """Base of every pruning method: score vision tokens, keep the top ``ceil(r * n_v)``.

    Subclasses are dataclasses that implement :meth:`score` and are registered by name
    with :func:`covipal.pruning.register`.

    Parameters
    ----------
    reserve_ratio : float
        ``r`` in (0, 1]: share of each sample's vision tokens the LLM keeps; ``r = 1``
        leaves the model's computation unchanged bit for bit.
    """

    reserve_ratio: float = 0.25

    name = "base"  # set by @register
    # True for a method that reads the vision tower's own computation (its hooks on the tower): such a
    # method must be given the pixels, not vision features computed before the ``with`` block
    reads_vision_tower = False

    def __post_init__(self):
        if not 0 < self.reserve_ratio <= 1:
            raise ValueError(f"reserve_ratio must be in (0, 1], got {self.reserve_ratio!r}; "
                             "it is the kept share of vision tokens")

    def score(self, ctx: PruningContext) -> torch.Tensor:
        """Importance of each vision token, shape (B, n_v); higher means keep.

        Entries where ``ctx.vision_mask`` is False are ignored.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement score(ctx) -> (B, n_v)")

    def supports(self, model: nn.Module) -> str | None:
        """Why this method cannot prune ``model`` (a part of the model it reads that ``model`` lacks), or None.

        Callers check it before running a method on a model family (the ``evaluate`` stage
        skips a method with this reason); entering ``with pruner(model)`` on such a model raises.
        """
        return None

    def setup(self, model: nn.Module) -> None:
        """Called on entering ``with pruner(model)``, before any hook is added (e.g. to load weights)."""

    def teardown(self, model: nn.Module) -> None:
        """Called on leaving ``with pruner(model)``, after every hook is removed."""

    def attach(self, model: nn.Module, run) -> list:
        """Extra hooks the method needs (e.g. on the vision tower); their handles are removed on exit."""
        return []

    def schedule(self, n_vision: int, n_layers: int) -> list[tuple[int, int]]:
        """``[(layer, count)]``: from decoder ``layer`` on, ``count`` of the ``n_vision`` vision tokens remain.

        Pruning before the LLM is ``[(0, ceil(r * n_vision))]``.
        """
        return [(0, n_keep(n_vision, self.reserve_ratio))]

    def budget(self, n_vision: int, n_layers: int) -> Budget:
        """Vision tokens entering the LLM and averaged over its ``n_layers`` layers, for ``n_vision`` tokens."""
        return schedule_budget(self.schedule(n_vision, n_layers), n_vision, n_layers)

    def _start(self, model: nn.Module, adapter):
        """The run object whose hooks carry out this method (pre-LLM pruning here)."""
        from covipal.pruning.runtime import PruningRun

        return PruningRun(self, model, adapter)

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator["PruningRun"]:
        """Prune the vision tokens of every prompt ``model`` processes inside the block.

        Adds a forward pre-hook on the multimodal base model (to read ``input_ids``), a
        forward pre-hook and hook on its language model (to prune the prefill and keep
        decoding consistent), pre-hooks on decoder layers for methods pruning inside the
        LLM, and the method's own (:meth:`attach`); all are removed in a ``finally``. Raises
        ``NotImplementedError`` with :meth:`supports`'s reason for a model the method cannot prune.
        Yields a :class:`~covipal.pruning.runtime.PruningRun` recording what was kept.
        """
        from covipal.pruning.adapters import get_adapter
        from covipal.pruning.runtime import PruningRun

        adapter = get_adapter(model)
        reason = self.supports(model)
        if reason is not None:
            raise NotImplementedError(f"{self.name} cannot prune {type(model).__name__}: {reason}")
        base, llm = adapter.locate(model)
        if any(isinstance(getattr(h, "__self__", None), PruningRun) for h in llm._forward_pre_hooks.values()):
            raise RuntimeError(f"a pruner is already attached to {type(model).__name__}; nested pruning is not "
                               "supported, leave the other `with pruner(model)` block first")
        run = self._start(model, adapter)
        handles = []
        self.setup(model)
        try:
            handles.extend(run.attach(base, llm))
            handles.extend(self.attach(model, run))
            yield run
        finally:
            for handle in handles:
                handle.remove()
            self.teardown(model)
