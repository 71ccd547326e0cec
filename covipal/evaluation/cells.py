"""Which ground-truth relevant cells a pruned prompt still holds.

A row's ``relevant`` cells are ``[frame, row, col]`` triples (schema in
:mod:`covipal.world.dataset`). The reference processor gives each cell one vision token
(:meth:`covipal.reference.processor.ReferenceProcessor.token_index`: ``row * grid + col``
for an image; video frames are packed four to a picture, so a frame's cell lands in a
quadrant of picture ``frame // 4``). A pruner reports the *prompt positions* of the
vision tokens it kept; their rank among the prompt's vision tokens is the token index.

Other processors (a pretrained model's) resize, crop, tile or merge patches in their own
ways, so no cell maps to one known token: :func:`cell_mapper` gives None for them, and
the share of relevant cells kept is not measured.
"""

from __future__ import annotations

from typing import Callable

import torch

NOT_MAPPED = ("relevant kept is not measured: the rows have relevant cells, but only the reference model's "
              "processor maps a cell to one vision token (a pretrained model's processor resizes, tiles or "
              "merges patches in its own way)")


def relevant_tokens(relevant: list[list[int]], n_frames: int, processor) -> list[int]:
    """Sorted vision-token indices of the cells ``relevant`` of a sample with ``n_frames`` frames."""
    return sorted({processor.token_index(f, r, c, n_frames) for f, r, c in relevant})


def cell_mapper(processor, rows: list[dict]) -> Callable[[dict], list[int]] | None:
    """``row -> relevant vision-token indices`` when ``rows`` have ``relevant`` cells and ``processor``
    maps cells to tokens (``token_index``: the reference processor); else None."""
    if not any(r.get("relevant") for r in rows) or not hasattr(processor, "token_index"):
        return None
    return lambda row: relevant_tokens(row.get("relevant") or [], len(row["images"]), processor)


def kept_tokens(kept_positions: torch.Tensor, input_ids: torch.Tensor, vision_ids) -> list[int]:
    """Vision-token indices (0..n_v-1) of the kept prompt positions ``kept_positions`` (n,) of one prompt.

    ``input_ids`` (L,) is that prompt; its vision tokens are those whose id is ``vision_ids``
    (one id, or a list of them).
    """
    ids = torch.as_tensor(vision_ids, device=input_ids.device).reshape(-1)
    vision = torch.isin(input_ids, ids).nonzero().squeeze(1)  # (n_v,) prompt positions in order
    kept = kept_positions.to(vision.device)
    index = torch.searchsorted(vision, kept)
    if len(index) and (index.max() >= len(vision) or not torch.equal(vision[index], kept)):
        raise ValueError("kept positions are not vision tokens of this prompt")
    return index.tolist()


def relevant_share(kept: list[int], relevant: list[int]) -> float | None:
    """Share of the ``relevant`` token indices that are in ``kept``; None when there are none
    (e.g. "is there a 7" answered "no")."""
    if not relevant:
        return None
    return len(set(kept) & set(relevant)) / len(relevant)
