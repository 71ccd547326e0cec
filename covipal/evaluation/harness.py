"""Run every pruning method at every reserve ratio on the same rows, model and prompts.

For each batch of rows the prompts are built once and the model runs once unpruned and
once per (method, ratio < 1) inside ``with pruner(model)``. Per row it records whether
the greedy next token is the answer, the vision-token budget both ways
(``run.budget()``: tokens entering the LLM, tokens averaged over its layers), and the
share of the row's ground-truth relevant cells among the vision tokens the method kept
(after its last pruning step; for in-LLM methods, the set the deepest layers see).

At ``r = 1`` every registered method leaves the model's computation unchanged bit for bit
(tested in ``tests/test_pruning_*``), so the unpruned pass stands for every method there.
Likewise, where a method's pruning schedule (``Pruner.schedule``: tokens left from each
layer on) at a ratio equals its schedule at a higher ratio of the same batch (an in-LLM
method below the lowest budget it can reach), it keeps the same tokens in every layer, and
that ratio's outcomes are reused (tested in ``tests/test_evaluation.py``).

The vision tower and projector run once per batch: their output is passed to every pass
as LLaVA's ``mm_encoder_outputs``, except to methods that hook the tower themselves
(``visionzip`` reads its [CLS] attention), which get the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from covipal.evaluation.cells import kept_tokens, relevant_share, relevant_tokens

FULL = 1.0


@dataclass
class Results:
    """Per-row outcomes of one (method, ratio), each array of shape (n_rows,) in row order.

    ``relevant_kept`` is NaN for rows without relevant cells.
    """

    correct: np.ndarray
    entering: np.ndarray
    layer_average: np.ndarray
    relevant_kept: np.ndarray
    n_vision: np.ndarray = field(repr=False)

    @classmethod
    def empty(cls, n: int) -> "Results":
        return cls(np.zeros(n, bool), np.zeros(n), np.zeros(n), np.full(n, np.nan), np.zeros(n))


def batches(rows: list[dict], batch_size: int) -> list[list[int]]:
    """Row indices in batches of one modality each (less padding), in row order within a modality."""
    out = []
    for modality in sorted({r["modality"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["modality"] == modality]
        out += [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    return out


@torch.no_grad()
def evaluate_methods(model, inputs, rows: list[dict], make_pruner: Callable[[str, float], object],
                     methods: list[str], ratios: list[float], batch_size: int,
                     progress: bool = True) -> dict[tuple[str, float], Results]:
    """Outcomes of every ``(method, ratio)`` on ``rows``.

    Parameters
    ----------
    model : LlavaForConditionalGeneration
        The frozen reference LVLM (eval mode).
    inputs : covipal.training.data.ReferenceInputs
        Turns rows into left-padded prompts (``prompt``) and answer token ids (``answers``).
    rows : list of dict
        Data-set rows (``images``, ``question``, ``answer``, ``modality``, ``relevant``).
    make_pruner : callable
        ``(method, ratio) -> Pruner``.
    methods, ratios : list
        What to evaluate; ``ratio == 1`` reuses the unpruned pass.
    """
    device = next(model.parameters()).device
    processor = inputs.processor
    image_token = processor.image_token_id
    n = len(rows)
    out = {(m, r): Results.empty(n) for m in methods for r in ratios}
    pruned = [r for r in ratios if r < FULL]
    relevant = [relevant_tokens(r["relevant"], len(r["images"]), processor) for r in rows]
    plan = batches(rows, batch_size)
    tower = model.model.vision_tower
    n_layers = model.config.get_text_config().num_hidden_layers
    bar = tqdm(total=len(plan) * (1 + len(methods) * len(pruned)), desc="evaluate", disable=not progress,
               mininterval=5)
    for idx in plan:
        chunk = [rows[i] for i in idx]
        prompt = {k: v.to(device) for k, v in inputs.prompt(chunk).items()}
        encoded = {k: v for k, v in prompt.items() if k != "pixel_values"}
        encoded["mm_encoder_outputs"] = {"image": model.model.get_image_features(
            pixel_values=prompt["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy)}
        answers = inputs.answers(chunk).to(device)
        n_vision = (prompt["input_ids"] == image_token).sum(dim=1).cpu().numpy()
        hit = (model(**encoded, logits_to_keep=1).logits[:, -1].argmax(-1) == answers).cpu().numpy()
        bar.update()
        for m in methods:
            if FULL in ratios:
                res = out[(m, FULL)]
                res.correct[idx], res.entering[idx], res.layer_average[idx] = hit, n_vision, n_vision
                res.n_vision[idx] = n_vision
                res.relevant_kept[idx] = [np.nan if not relevant[i] else 1.0 for i in idx]
            ran: dict[tuple, float] = {}  # schedule -> the ratio that ran it on this batch
            for ratio in pruned:
                pruner = make_pruner(m, ratio)
                key = _schedule(pruner, n_vision, n_layers)
                if key is not None and key in ran:
                    _copy(out[(m, ran[key])], out[(m, ratio)], idx)
                    bar.update()
                    continue
                if key is not None:
                    ran[key] = ratio
                before = _hooks(tower)
                with pruner(model) as run:
                    reads_tower = _hooks(tower) > before  # the method hooked the tower: give it the pixels
                    logits = model(**(prompt if reads_tower else encoded), logits_to_keep=1).logits[:, -1]
                res = out[(m, ratio)]
                res.correct[idx] = (logits.argmax(-1) == answers).cpu().numpy()
                budgets = run.budget()
                res.entering[idx] = [b.entering for b in budgets]
                res.layer_average[idx] = [b.layer_average for b in budgets]
                res.n_vision[idx] = n_vision
                for j, i in enumerate(idx):
                    kept = kept_tokens(run.kept_vision[j], prompt["input_ids"][j], image_token)
                    share = relevant_share(kept, relevant[i])
                    res.relevant_kept[i] = np.nan if share is None else share
                bar.update()
    bar.close()
    return out


def _schedule(pruner, n_vision: np.ndarray, n_layers: int) -> tuple | None:
    """The pruner's schedule for a batch whose rows all have the same number of vision tokens."""
    sizes = set(n_vision.tolist())
    return tuple(pruner.schedule(int(sizes.pop()), n_layers)) if len(sizes) == 1 else None


def _copy(src: Results, dst: Results, idx: list[int]) -> None:
    for name in ("correct", "entering", "layer_average", "relevant_kept", "n_vision"):
        getattr(dst, name)[idx] = getattr(src, name)[idx]


def _hooks(module: torch.nn.Module) -> int:
    """Number of forward hooks and pre-hooks on ``module`` and its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
