"""Prune the vision tokens of a Hugging Face LVLM before its language model sees them.

>>> from covipal.pruning import get_method
>>> pruner = get_method("covipal", reserve_ratio=0.25, ppm="models/ppm")
>>> with pruner(model):
...     out = model.generate(**inputs, max_new_tokens=32)

Methods are registered by name (:func:`register`, :func:`get_method`); per-family
knowledge lives in :data:`ADAPTERS`; the hook mechanics are in :mod:`.runtime` (before
the LLM) and :mod:`.layers` (inside it).

Registered methods: ``random``, ``covipal``, ``oracle``, ``visionzip`` (before the LLM);
``dart``, ``fastv``, ``pyramiddrop``, ``sparsevlm`` (inside the LLM). Every pruner
reports its budget both as tokens entering the LLM and averaged over layers
(:meth:`Pruner.budget`, ``run.budget()``).
"""

from covipal.pruning.adapters import ADAPTERS, Adapter, get_adapter
from covipal.pruning.base import Budget, Pruner, PruningContext, n_keep, select
from covipal.pruning.covipal_pruner import CoViPALPruner
from covipal.pruning.dart import DARTPruner
from covipal.pruning.fastv import FastVPruner
from covipal.pruning.layers import LayerContext, LayerPruner, LayerPruningRun
from covipal.pruning.oracle import OraclePruner
from covipal.pruning.pyramiddrop import PyramidDropPruner
from covipal.pruning.random_pruner import RandomPruner
from covipal.pruning.registry import available_methods, get_method, register
from covipal.pruning.runtime import PruningRun
from covipal.pruning.sparsevlm import SparseVLMPruner
from covipal.pruning.visionzip import VisionZipPruner

__all__ = ["ADAPTERS", "Adapter", "Budget", "CoViPALPruner", "DARTPruner", "FastVPruner", "LayerContext",
           "LayerPruner", "LayerPruningRun", "OraclePruner", "Pruner", "PruningContext", "PruningRun",
           "PyramidDropPruner", "RandomPruner", "SparseVLMPruner", "VisionZipPruner", "available_methods",
           "get_adapter", "get_method", "n_keep", "register", "select"]
