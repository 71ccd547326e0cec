"""``covipal``: keep the vision tokens a trained PPM scores highest (Tang et al., 2025).

Based on https://arxiv.org/abs/2508.17243. The PPM reads the vision embeddings the LLM
would see and the prompt's text embeddings; see :mod:`covipal.ppm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from covipal.ppm import PPM
from covipal.pruning.base import Pruner, PruningContext
from covipal.pruning.registry import register


@register("covipal")
@dataclass
class CoViPALPruner(Pruner):
    """Scores from a Plug-and-Play Pruning Module.

    Parameters
    ----------
    ppm : PPM or str or Path
        The module, or a folder written by ``PPM.save_pretrained`` (loaded on entering
        ``with pruner(model)``, onto the model's device).
    """

    ppm: PPM | str | Path | None = None

    def setup(self, model: nn.Module) -> None:
        """Load the PPM if given as a folder, put it on the model's device in eval mode."""
        if self.ppm is None:
            raise ValueError("CoViPALPruner needs `ppm`: a PPM or the folder it was saved to")
        if not isinstance(self.ppm, PPM):
            self.ppm = PPM.from_pretrained(self.ppm)
        d_model = model.config.get_text_config().hidden_size
        if self.ppm.config.d_model != d_model:
            raise ValueError(f"the PPM was built for an LLM of hidden size {self.ppm.config.d_model}, "
                             f"but {type(model).__name__} has {d_model}")
        self._was_training = self.ppm.training
        self.ppm.to(next(model.parameters()).device).eval()

    def teardown(self, model: nn.Module) -> None:
        """Give the PPM back its train/eval mode."""
        self.ppm.train(self._was_training)

    def score(self, ctx: PruningContext) -> torch.Tensor:
        """Shape (B, n_v): the PPM's scores, computed in the PPM's dtype."""
        dtype = next(self.ppm.parameters()).dtype
        return self.ppm(ctx.vision.to(dtype), ctx.text.to(dtype), ctx.vision_mask, ctx.text_mask)
