"""Relevant cells on a pretrained model: a cell is the vision tokens whose centres fall inside it.

For LLaVA-1.5 and Qwen2-VL the adapter knows each picture's token grid (CLIP patches; Qwen's
merged patches, both row-major), so the harness can say what share of a row's relevant cells
a method kept. Checked against hand-computed token sets, and end to end with a pruner that keeps
the first tokens of each prompt (the top rows of its picture).
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_lvlms import tiny_model, tiny_processor

from covipal.evaluation.cells import cell_mapper, grid_tokens
from covipal.evaluation.harness import evaluate_methods
from covipal.pruning import Pruner
from covipal.training.hf_inputs import HFInputs


def test_cells_are_the_tokens_whose_centres_they_hold():
    assert grid_tokens([[0, 0, 1]], [(4, 4)], 2) == [2, 3, 6, 7]  # top-right quarter of a 4x4 grid
    assert grid_tokens([[1, 1, 0]], [(4, 4), (2, 2)], 2) == [16 + 2]  # second picture, after its 16 tokens
    assert grid_tokens([[0, 1, 1]], [(4, 4)], 3) == [5, 6, 9, 10]  # 3 cells over 4 tokens: the middle two
    assert grid_tokens([[0, 0, 0], [0, 0, 0]], [(2, 2)], 2) == [0]


@dataclass
class KeepFirst(Pruner):
    """Keeps the first vision tokens of each prompt: the top rows of a row-major picture."""

    def score(self, ctx):
        n = ctx.vision.shape[1]
        return -torch.arange(n, dtype=torch.float32).expand(ctx.vision.shape[0], n)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_share_of_relevant_cells_kept_follows_the_picture_grid(family):
    model = tiny_model(family)
    inputs = HFInputs(tiny_processor(family))
    rng = np.random.default_rng(0)
    pic = lambda: Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))  # noqa: E731
    rows = [{"images": [pic()], "question": "what colour is the square", "answer": "red", "modality": "image",
             "relevant": cells} for cells in ([[0, 0, 0]], [[0, 0, 1]], [[0, 1, 0]], [[0, 0, 0], [0, 1, 1]])]
    out = evaluate_methods(model, inputs, rows, lambda m, r: KeepFirst(reserve_ratio=r), ["first"], [1.0, 0.25],
                           batch_size=4, progress=False, scoring="generate", max_new_tokens=1,
                           cell_grid=lambda row: 2)
    # 16 tokens in a 4x4 grid; r = 0.25 keeps tokens 0-3, the top row: half of each top cell, none below
    assert out[("first", 0.25)].entering.tolist() == [4, 4, 4, 4]
    assert out[("first", 0.25)].relevant_kept.tolist() == [0.5, 0.5, 0.0, 0.25]
    assert out[("first", 1.0)].relevant_kept.tolist() == [1.0] * 4


def test_tiled_families_and_unknown_grids_are_not_mapped():
    rows = [{"images": [None], "relevant": [[0, 0, 0]], "modality": "image"}]
    assert cell_mapper(tiny_model("llava_next"), tiny_processor("llava_next"), rows, lambda row: 2) is None
    assert cell_mapper(tiny_model("llava"), tiny_processor("llava"), rows, lambda row: None) is None
    assert cell_mapper(tiny_model("llava"), tiny_processor("llava"), rows, lambda row: 2) is not None
