"""covipal: learned visual-token pruning (CoViPAL) for vision-language models, and its pipeline.

``covipal.load_ppm("models:/covipal-ppm@champion")`` returns a ready-to-use pruner of the
registered PPM (:func:`covipal.registry.load_ppm`); mlflow is imported only then.
"""


def load_ppm(model_uri: str = "models:/covipal-ppm@champion", **kwargs):
    """A ready-to-use CoViPAL pruner for a registered PPM; see :func:`covipal.registry.load_ppm`."""
    from covipal.registry import load_ppm as _load

    return _load(model_uri, **kwargs)
