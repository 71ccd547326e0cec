"""Pruning methods by name: the name used in ``params.yaml``, MLflow tags and plots.

>>> @register("knorm")
... @dataclass
... class KNormPruner(Pruner):
...     def score(self, ctx):
...         return ctx.vision.norm(dim=-1)
>>> get_method("knorm", reserve_ratio=0.5)

The built-in methods are listed in :data:`METHOD_MODULES` and imported on first use by name,
so code that never uses a method never imports (nor depends on) its file.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

from covipal.pruning.base import Pruner

METHOD_MODULES = {  # built-in method name -> the module that registers it (read by covipal.deps too)
    "covipal": "covipal.pruning.covipal_pruner",
    "dart": "covipal.pruning.dart",
    "fastv": "covipal.pruning.fastv",
    "oracle": "covipal.pruning.oracle",
    "pyramiddrop": "covipal.pruning.pyramiddrop",
    "random": "covipal.pruning.random_pruner",
    "sparsevlm": "covipal.pruning.sparsevlm",
    "visionzip": "covipal.pruning.visionzip",
}
_METHODS: dict[str, type[Pruner]] = {}


def register(name: str):
    """Class decorator: make a :class:`Pruner` subclass available as ``get_method(name)``.

    A built-in name (:data:`METHOD_MODULES`) is taken by the class its module defines.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"method name {name!r} must be lowercase letters, digits and underscores")

    def decorate(cls: type[Pruner]) -> type[Pruner]:
        if not (isinstance(cls, type) and issubclass(cls, Pruner)):
            raise TypeError(f"@register({name!r}) decorates Pruner subclasses, got {cls!r}")
        builtin = METHOD_MODULES.get(name)
        if builtin is not None and cls.__module__ != builtin:
            raise ValueError(f"a pruning method named {name!r} already exists (the built-in one of {builtin}); "
                             "choose another name")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"a pruning method named {name!r} already exists ({_METHODS[name].__name__}); "
                             "choose another name")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """Names of the registered methods (the built-in ones whether imported yet or not), sorted."""
    return sorted(set(_METHODS) | set(METHOD_MODULES))


def method_class(name: str) -> type[Pruner]:
    """The class registered as ``name``; a built-in method's module is imported on first use."""
    if name not in _METHODS and name in METHOD_MODULES:
        importlib.import_module(METHOD_MODULES[name])
    if name not in _METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known methods: {available_methods()}")
    return _METHODS[name]


def get_method(name: str, **kwargs) -> Pruner:
    """An instance of the method registered as ``name``, built from its dataclass fields."""
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"pruning method {name!r} has no parameters {unknown}; its parameters are {sorted(fields)}")
    return cls(**kwargs)
