"""The MLflow pyfunc of a PPM, logged by :mod:`covipal.registry` as a model from code.

MLflow stores this file with the model and runs it on ``mlflow.pyfunc.load_model`` (and
in ``mlflow models serve``); the weights are the PPM folder (``config.json`` +
``model.safetensors``) logged as the artifact ``ppm``, checked against the SHA-256 sums
of the model config (``sha256``) and loaded with ``PPM.from_pretrained``. Nothing is pickled. Not
imported by covipal itself (importing it registers the model object with MLflow).

Input: a dict of numpy arrays ``vision`` (B, n_v, d) and ``text`` (B, n_t, d) float32,
``vision_mask`` (B, n_v) and ``text_mask`` (B, n_t) bool (optional, default all real).
Param ``reserve_ratio`` (default: the ratio the PPM was trained for).
Output: ``scores`` (B, n_v) float32, higher means keep, ``-inf`` where ``vision_mask`` is
False; ``keep`` (B, k) int64, the kept token indices of each sample in ascending order
(``covipal.pruning.select``), padded with -1 to the longest.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class PPMPyfunc(PythonModel):
    """Scores vision tokens with the PPM in the model's ``ppm`` artifact and selects the kept ones."""

    def load_context(self, context):
        from covipal.ppm import PPM, verify_checksums

        folder = Path(context.artifacts["ppm"])
        config = context.model_config or {}
        if "sha256" in config:
            verify_checksums(folder, config["sha256"], f"PPM artifact {folder}")
        self.ppm = PPM.from_pretrained(folder)
        self.default_ratio = float(config.get("reserve_ratio", 0.25))

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        from covipal.pruning.base import select

        def tensor(name, dtype):
            value = model_input.get(name)
            return None if value is None else torch.as_tensor(np.asarray(value)).to(dtype)

        vision = tensor("vision", torch.float32)
        vision_mask = tensor("vision_mask", torch.bool)
        if vision_mask is None:
            vision_mask = torch.ones(vision.shape[:2], dtype=torch.bool)
        ratio = float((params or {}).get("reserve_ratio") or self.default_ratio)
        if not 0 < ratio <= 1:
            raise ValueError(f"reserve_ratio must be in (0, 1], got {ratio}")
        with torch.no_grad():
            scores = self.ppm(vision, tensor("text", torch.float32), vision_mask, tensor("text_mask", torch.bool))
        # vision tokens are packed to the left: n_valid counts them
        kept = select(scores, vision_mask.sum(dim=1), ratio)
        keep = torch.full((len(kept), max((len(k) for k in kept), default=0)), -1, dtype=torch.long)
        for b, k in enumerate(kept):
            keep[b, :len(k)] = k
        return {"scores": scores.numpy(), "keep": keep.numpy()}


mlflow.models.set_model(PPMPyfunc())
