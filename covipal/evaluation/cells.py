"""Which ground-truth relevant cells a pruned prompt still holds.

A row's ``relevant`` cells are ``[frame, row, col]`` triples (schema in
:mod:`covipal.world.dataset`): cell ``(row, col)`` of a ``G x G`` grid laid over picture
``frame`` of the row. A pruner reports the *prompt positions* of the vision tokens it kept;
their rank among the prompt's vision tokens is the token index, and a cell is kept as far as
its tokens are.

- The reference processor gives each cell one vision token
  (:meth:`covipal.reference.processor.ReferenceProcessor.token_index`: ``row * grid + col``
  for an image; video frames are packed four to a picture, so a frame's cell lands in a
  quadrant of picture ``frame // 4``).
- A pretrained model's processor resizes each picture to its own grid of tokens; where the
  family's adapter knows that grid (:meth:`covipal.pruning.adapters.Adapter.picture_grids`:
  LLaVA-1.5, Qwen2-VL, Qwen2.5-VL), a cell is the set of tokens whose centres fall inside it.
  Families that tile pictures (LLaVA-NeXT, LLaVA-OneVision) are not mapped, nor are cells
  without a known ``G``: the share of relevant cells kept is then not measured.
"""

from __future__ import annotations

from typing import Callable

import torch

NOT_MAPPED = ("relevant kept is not measured: the rows have relevant cells, but their grid is unknown "
              "(set data.cell_grid) or this model family's processor tiles pictures, so a cell has no known tokens")

CellMapper = Callable[[list[dict], dict], list[list[int]]]


def relevant_tokens(relevant: list[list[int]], n_frames: int, processor) -> list[int]:
    """Sorted vision-token indices of the cells ``relevant`` of a sample with ``n_frames`` frames
    (the reference processor)."""
    return sorted({processor.token_index(f, r, c, n_frames) for f, r, c in relevant})


def grid_tokens(relevant: list[list[int]], grids: list[tuple[int, int]], cell_grid: int) -> list[int]:
    """Sorted vision-token indices of the cells ``relevant`` on a ``cell_grid`` grid, for pictures whose
    tokens form the row-major grids ``grids`` (``(rows, cols)`` each, in token order)."""
    starts = [0]
    for h, w in grids[:-1]:
        starts.append(starts[-1] + h * w)
    out = set()
    for frame, row, col in relevant:
        h, w = grids[frame]
        rows = [i for i in range(h) if int((i + 0.5) * cell_grid / h) == row]
        cols = [j for j in range(w) if int((j + 0.5) * cell_grid / w) == col]
        out.update(starts[frame] + i * w + j for i in rows for j in cols)
    return sorted(out)


def cell_mapper(model, processor, rows: list[dict], cell_grid: Callable[[dict], int | None]) -> CellMapper | None:
    """``(batch rows, batch prompt) -> relevant vision-token indices per row``, or None when ``rows`` have
    no ``relevant`` cells or they cannot be mapped (module docstring).

    ``cell_grid`` gives a row's ``G`` (None: unknown); the reference processor needs none.
    """
    if not any(r.get("relevant") for r in rows):
        return None
    if hasattr(processor, "token_index"):
        return lambda batch, prompt: [relevant_tokens(r.get("relevant") or [], len(r["images"]), processor)
                                      for r in batch]
    from covipal.pruning import get_adapter

    adapter = get_adapter(model)
    probe = {"image_grid_thw": torch.ones(1, 3, dtype=torch.long)}
    if adapter.picture_grids(model.config, probe, 0, 1) is None or any(
            r.get("relevant") and cell_grid(r) is None for r in rows):
        return None

    def tokens(batch: list[dict], prompt: dict) -> list[list[int]]:
        out, first = [], 0
        for r in batch:
            n = len(r["images"])
            grids = adapter.picture_grids(model.config, prompt, first, n)
            out.append(grid_tokens(r.get("relevant") or [], grids, cell_grid(r)) if r.get("relevant") else [])
            first += n
        return out

    return tokens


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
