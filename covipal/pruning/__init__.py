"""Prune the vision tokens of a Hugging Face LVLM before its language model sees them.

>>> from covipal.pruning import get_method
>>> pruner = get_method("covipal", reserve_ratio=0.25, ppm="models/ppm")
>>> with pruner(model):
...     out = model.generate(**inputs, max_new_tokens=32)

Methods are registered by name (:func:`register`, :func:`get_method`); per-family
knowledge lives in :data:`ADAPTERS`; the hook mechanics are in :mod:`.runtime`.
"""

from covipal.pruning.adapters import ADAPTERS, Adapter, get_adapter
from covipal.pruning.base import Pruner, PruningContext, n_keep, select
from covipal.pruning.covipal_pruner import CoViPALPruner
from covipal.pruning.random_pruner import RandomPruner
from covipal.pruning.registry import available_methods, get_method, register
from covipal.pruning.runtime import PruningRun

__all__ = ["ADAPTERS", "Adapter", "CoViPALPruner", "Pruner", "PruningContext", "PruningRun", "RandomPruner",
           "available_methods", "get_adapter", "get_method", "n_keep", "register", "select"]
