"""The MLflow pyfunc of a PPM, logged by :mod:`covipal.registry` as a model from code.

MLflow stores this file with the model and runs it on ``mlflow.pyfunc.load_model``; the
weights are the PPM folder (``config.json`` + ``model.safetensors``) logged as the
artifact ``ppm``, loaded with ``PPM.from_pretrained``. Nothing is pickled. Not imported
by covipal itself (importing it registers the model object with MLflow).

Input: a dict of numpy arrays ``vision`` (B, n_v, d) and ``text`` (B, n_t, d) float32,
``vision_mask`` (B, n_v) and ``text_mask`` (B, n_t) bool. Output: scores (B, n_v)
float32, higher means keep, ``-inf`` where ``vision_mask`` is False.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class PPMPyfunc(PythonModel):
    """Scores vision tokens with the PPM in the model's ``ppm`` artifact."""

    def load_context(self, context):
        from covipal.ppm import PPM

        self.ppm = PPM.from_pretrained(context.artifacts["ppm"])

    def predict(self, context, model_input, params=None):
        import torch

        def tensor(name, dtype):
            value = model_input.get(name)
            return None if value is None else torch.as_tensor(value).to(dtype)

        with torch.no_grad():
            scores = self.ppm(tensor("vision", torch.float32), tensor("text", torch.float32),
                              tensor("vision_mask", torch.bool), tensor("text_mask", torch.bool))
        return scores.numpy()


mlflow.models.set_model(PPMPyfunc())
