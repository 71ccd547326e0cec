"""Which ground-truth relevant cells a pruned prompt still holds.

A row's ``relevant`` cells are ``[frame, row, col]`` triples (schema in
:mod:`covipal.world.dataset`). The reference processor gives each cell one vision token
(:meth:`covipal.reference.processor.ReferenceProcessor.token_index`: ``row * grid + col``
for an image; video frames are packed four to a picture, so a frame's cell lands in a
quadrant of picture ``frame // 4``). A pruner reports the *prompt positions* of the
vision tokens it kept; their rank among the prompt's vision tokens is the token index.
"""

from __future__ import annotations

import torch


def relevant_tokens(relevant: list[list[int]], n_frames: int, processor) -> list[int]:
    """Sorted vision-token indices of the cells ``relevant`` of a sample with ``n_frames`` frames."""
    return sorted({processor.token_index(f, r, c, n_frames) for f, r, c in relevant})


def kept_tokens(kept_positions: torch.Tensor, input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Vision-token indices (0..n_v-1) of the kept prompt positions ``kept_positions`` (n,) of one prompt.

    ``input_ids`` (L,) is that prompt; its vision tokens are those equal to ``image_token_id``.
    """
    vision = (input_ids == image_token_id).nonzero().squeeze(1)  # (n_v,) prompt positions in order
    index = torch.searchsorted(vision, kept_positions.to(vision.device))
    if len(index) and (index.max() >= len(vision) or not torch.equal(vision[index], kept_positions.to(vision.device))):
        raise ValueError("kept positions are not vision tokens of this prompt")
    return index.tolist()


def relevant_share(kept: list[int], relevant: list[int]) -> float | None:
    """Share of the ``relevant`` token indices that are in ``kept``; None when there are none
    (e.g. "is there a 7" answered "no")."""
    if not relevant:
        return None
    return len(set(kept) & set(relevant)) / len(relevant)
