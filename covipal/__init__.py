"""covipal: learned visual-token pruning (CoViPAL) for vision-language models, and its pipeline.

``covipal.load_ppm("models:/covipal-ppm@champion")`` returns a ready-to-use pruner of the
registered PPM (:func:`covipal.registry.load_ppm`). The top-level names in :data:`API` are
resolved on first use, so ``import covipal`` imports nothing else (mlflow, torch) until one is.
"""

from importlib import import_module

API = {"load_ppm": "covipal.registry"}  # top-level name -> the module that defines it


def __getattr__(name: str):
    if name in API:
        return getattr(import_module(API[name]), name)
    raise AttributeError(f"module 'covipal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
