"""``random``: keep a uniformly random subset of vision tokens (the floor every method must beat)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from covipal.pruning.base import Pruner, PruningContext
from covipal.pruning.registry import register


@register("random")
@dataclass
class RandomPruner(Pruner):
    """Uniform random scores, reproducible per sample.

    Each sample's scores come from a generator seeded by ``seed`` and the sample's token
    ids (padding excluded), so a sample keeps the same tokens whatever batch it is in,
    and the beams of one sample agree in beam search.

    Parameters
    ----------
    seed : int
        Seed of the generators drawing the scores.
    """

    seed: int = 0

    def score(self, ctx: PruningContext) -> torch.Tensor:
        """Shape (B, n_v): uniform noise, drawn on the CPU so that it does not depend on the device."""
        scores = torch.zeros(ctx.vision_mask.shape)
        for b in range(scores.shape[0]):
            index = torch.cat([ctx.text_index[b, ctx.text_mask[b]], ctx.vision_index[b, ctx.vision_mask[b]]])
            tokens = ctx.input_ids[b, index.sort().values].cpu().numpy().tobytes()
            key = zlib.crc32(self.seed.to_bytes(8, "little", signed=True) + tokens)  # the CPU generator uses 32 bits
            generator = torch.Generator().manual_seed(key)
            scores[b] = torch.rand(scores.shape[1], generator=generator)
        return scores.to(ctx.vision.device)
