"""Pruning methods by name: the name used in ``params.yaml``, MLflow tags and plots.

>>> @register("knorm")
... @dataclass
... class KNormPruner(Pruner):
...     def score(self, ctx):
...         return ctx.vision.norm(dim=-1)
>>> get_method("knorm", reserve_ratio=0.5)
"""

from __future__ import annotations

import dataclasses
import re

from covipal.pruning.base import Pruner

_METHODS: dict[str, type[Pruner]] = {}


def register(name: str):
    """Class decorator: make a :class:`Pruner` subclass available as ``get_method(name)``."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"method name {name!r} must be lowercase letters, digits and underscores")

    def decorate(cls: type[Pruner]) -> type[Pruner]:
        if not (isinstance(cls, type) and issubclass(cls, Pruner)):
            raise TypeError(f"@register({name!r}) decorates Pruner subclasses, got {cls!r}")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"a pruning method named {name!r} already exists ({_METHODS[name].__name__}); "
                             "choose another name")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str, **kwargs) -> Pruner:
    """An instance of the method registered as ``name``, built from its dataclass fields."""
    if name not in _METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known methods: {available_methods()}")
    cls = _METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"pruning method {name!r} has no parameters {unknown}; its parameters are {sorted(fields)}")
    return cls(**kwargs)
