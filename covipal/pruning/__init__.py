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

Importing this package imports no method: each method's module is imported when its name
is first used (:func:`get_method`) or its class is read from here (``FastVPruner``), so a
stage that never uses a method does not depend on its file (:mod:`covipal.deps`). Code in
the project imports a method's class from its module (``covipal.pruning.fastv``).
"""

import importlib

from covipal.pruning.adapters import ADAPTERS, Adapter, get_adapter
from covipal.pruning.base import Budget, Pruner, PruningContext, n_keep, select
from covipal.pruning.layers import LayerContext, LayerPruner, LayerPruningRun
from covipal.pruning.registry import available_methods, get_method, register
from covipal.pruning.runtime import PruningRun

METHOD_CLASSES = {  # class name -> its module, imported when the name is read
    "CoViPALPruner": "covipal.pruning.covipal_pruner", "DARTPruner": "covipal.pruning.dart",
    "FastVPruner": "covipal.pruning.fastv", "OraclePruner": "covipal.pruning.oracle",
    "PyramidDropPruner": "covipal.pruning.pyramiddrop", "RandomPruner": "covipal.pruning.random_pruner",
    "SparseVLMPruner": "covipal.pruning.sparsevlm", "VisionZipPruner": "covipal.pruning.visionzip",
}

__all__ = ["ADAPTERS", "Adapter", "Budget", "LayerContext", "LayerPruner", "LayerPruningRun", "Pruner",
           "PruningContext", "PruningRun", "available_methods", "get_adapter", "get_method", "n_keep", "register",
           "select", *METHOD_CLASSES]


def __getattr__(name: str):
    if name in METHOD_CLASSES:
        return getattr(importlib.import_module(METHOD_CLASSES[name]), name)
    raise AttributeError(f"module 'covipal.pruning' has no attribute {name!r}")
