"""Run every pruning method at every reserve ratio on the same rows, model and prompts.

For each batch of rows the prompts are built once (by the inputs maker: the reference
processor, or a pretrained model's own processor and chat template) and the model runs
once unpruned and once per (method, ratio < 1) inside ``with pruner(model)``. Per row it
records the answer and its score, the vision-token budget both ways (``run.budget()``:
tokens entering the LLM, tokens averaged over its layers), and, where rows have
ground-truth relevant cells that the processor maps to vision tokens
(:func:`covipal.evaluation.cells.cell_mapper`), the share of them among the vision tokens
the method kept (after its last pruning step; for in-LLM methods, the set the deepest
layers see). Vision tokens are the prompt tokens with the ids of the model family's
adapter (:func:`covipal.pruning.get_adapter`).

Two ways to score an answer:

- ``first_token``: the greedy next token after the prompt, right when it is the first
  token of the row's answer (score 1 or 0); the reference model's answers are one word;
- ``generate``: up to ``max_new_tokens`` tokens generated greedily, scored by VQA
  accuracy against the row's reference answers (:mod:`covipal.evaluation.vqa`).

At ``r = 1`` every registered method leaves the model's computation unchanged bit for bit
(tested in ``tests/test_pruning_*``), so the unpruned pass stands for every method there.
Likewise, where a method's pruning schedule (``Pruner.schedule``: tokens left from each
layer on) at a ratio equals its schedule at a higher ratio of the same batch (an in-LLM
method below the lowest budget it can reach), it keeps the same tokens in every layer, and
that ratio's outcomes are reused (tested in ``tests/test_evaluation.py``).

With ``first_token`` scoring on a LLaVA model (whose forward takes ``mm_encoder_outputs``)
the vision tower and projector run once per batch and their output is passed to every
pass, except to methods that read the tower themselves (``Pruner.reads_vision_tower``,
e.g. ``visionzip``), which get the pixels; every other pass gets the full prompt.
A method that cannot prune the model (``Pruner.supports``) must be left out
(:func:`unsupported` names them and why).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from covipal.evaluation.cells import cell_mapper, kept_tokens, relevant_share
from covipal.evaluation.vqa import generate_answers, row_references, vqa_score

FULL = 1.0
FIRST_TOKEN, GENERATE = "first_token", "generate"
SCORINGS = (FIRST_TOKEN, GENERATE)
FIELDS = ("score", "entering", "layer_average", "relevant_kept", "n_vision", "prediction")


@dataclass
class Results:
    """Per-row outcomes of one (method, ratio), each array of shape (n_rows,) in row order.

    ``score`` is 1/0 (first-token scoring) or the VQA accuracy in [0, 1] (generate scoring);
    ``prediction`` the answer the model gave (its first token, or the generated text);
    ``relevant_kept`` is NaN for rows without relevant cells, or when they are not measured.
    """

    score: np.ndarray
    entering: np.ndarray
    layer_average: np.ndarray
    relevant_kept: np.ndarray
    n_vision: np.ndarray = field(repr=False)
    prediction: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.prediction is None:
            self.prediction = np.full(len(self.score), "", dtype=object)

    @classmethod
    def empty(cls, n: int) -> "Results":
        return cls(np.zeros(n), np.zeros(n), np.zeros(n), np.full(n, np.nan), np.zeros(n))


def batches(rows: list[dict], batch_size: int) -> list[list[int]]:
    """Row indices in batches of one modality each (less padding), in row order within a modality."""
    out = []
    for modality in sorted({r["modality"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["modality"] == modality]
        out += [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    return out


def unsupported(model, make_pruner: Callable[[str, float], object], methods: list[str]) -> dict[str, str]:
    """``{method: reason}`` for the ``methods`` that cannot prune ``model`` (``Pruner.supports``)."""
    reasons = {m: make_pruner(m, 0.5).supports(model) for m in methods}
    return {m: reason for m, reason in reasons.items() if reason is not None}


@torch.no_grad()
def evaluate_methods(model, inputs, rows: list[dict], make_pruner: Callable[[str, float], object],
                     methods: list[str], ratios: list[float], batch_size: int, progress: bool = True,
                     scoring: str = FIRST_TOKEN, max_new_tokens: int = 16,
                     cell_grid: Callable[[dict], int | None] = lambda row: None) -> dict[tuple[str, float], Results]:
    """Outcomes of every ``(method, ratio)`` on ``rows``.

    Parameters
    ----------
    model : transformers LVLM
        The frozen LVLM (eval mode) of a family in ``covipal.pruning.ADAPTERS``.
    inputs : covipal.training.data.ReferenceInputs or covipal.training.hf_inputs.HFInputs
        Turns rows into left-padded prompts (``prompt``) and answer token ids (``answers``,
        first-token scoring only); its ``processor`` decodes answers.
    rows : list of dict
        Data-set rows (``images``, ``question``, ``answer``, ``modality``; optional ``answers``
        and ``relevant``).
    make_pruner : callable
        ``(method, ratio) -> Pruner``.
    methods, ratios : list
        What to evaluate; ``ratio == 1`` reuses the unpruned pass.
    scoring : {"first_token", "generate"}
        How an answer is scored (module docstring); ``max_new_tokens`` bounds a generated one.
    cell_grid : callable
        ``row -> G``, the grid its ``relevant`` cells lie on (None: unknown), for a pretrained
        model (:func:`covipal.evaluation.cells.cell_mapper`).
    """
    from covipal.pruning import get_adapter

    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {list(SCORINGS)}, got {scoring!r}")
    pruned = [r for r in ratios if r < FULL]
    cannot = unsupported(model, make_pruner, methods) if pruned else {}  # r = 1 prunes nothing
    if cannot:
        raise ValueError(f"method(s) {sorted(cannot)} cannot prune {type(model).__name__}: {cannot}; leave them out")
    device = next(model.parameters()).device
    answer = _Answerer(model, getattr(inputs.processor, "tokenizer", inputs.processor), scoring, max_new_tokens)
    vision_ids = torch.tensor(get_adapter(model).vision_token_ids(model.config), device=device)
    cells = cell_mapper(model, inputs.processor, rows, cell_grid)
    relevant: list[list[int]] = [[] for _ in rows]
    n = len(rows)
    out = {(m, r): Results.empty(n) for m in methods for r in ratios}
    plan = batches(rows, batch_size)
    n_layers = model.config.get_text_config().num_hidden_layers
    bar = tqdm(total=len(plan) * (1 + len(methods) * len(pruned)), desc="evaluate", disable=not progress,
               mininterval=5)
    for idx in plan:
        chunk = [rows[i] for i in idx]
        prompt = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.prompt(chunk).items()}
        if cells is not None:
            for i, tokens in zip(idx, cells(chunk, prompt)):
                relevant[i] = tokens
        encoded = precompute_tower(model, prompt) if scoring == FIRST_TOKEN else None
        target = inputs.answers(chunk).to(device) if scoring == FIRST_TOKEN else [row_references(r) for r in chunk]
        n_vision = torch.isin(prompt["input_ids"], vision_ids).sum(dim=1).cpu().numpy()
        score, prediction = answer(encoded or prompt, target)
        bar.update()
        for m in methods:
            if FULL in ratios:
                res = out[(m, FULL)]
                res.score[idx], res.prediction[idx] = score, prediction
                res.entering[idx], res.layer_average[idx], res.n_vision[idx] = n_vision, n_vision, n_vision
                res.relevant_kept[idx] = [1.0 if relevant[i] else np.nan for i in idx]
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
                given = prompt if encoded is None or getattr(pruner, "reads_vision_tower", False) else encoded
                with pruner(model) as run:
                    res = out[(m, ratio)]
                    res.score[idx], res.prediction[idx] = answer(given, target)
                budgets = run.budget()
                res.entering[idx] = [b.entering for b in budgets]
                res.layer_average[idx] = [b.layer_average for b in budgets]
                res.n_vision[idx] = n_vision
                for j, i in enumerate(idx):
                    share = relevant_share(kept_tokens(run.kept_vision[j], prompt["input_ids"][j], vision_ids),
                                           relevant[i]) if relevant[i] else None
                    res.relevant_kept[i] = np.nan if share is None else share
                bar.update()
    bar.close()
    return out


def precompute_tower(model, prompt: dict) -> dict | None:
    """``prompt`` with its pixels replaced by the vision tower and projector's output (LLaVA's
    ``mm_encoder_outputs``), computed once; None for a model whose forward does not take it."""
    base = getattr(model, "model", None)
    if (model.config.model_type != "llava" or "pixel_values" not in prompt or base is None
            or "mm_encoder_outputs" not in inspect.signature(base.forward).parameters):
        return None
    encoded = {k: v for k, v in prompt.items() if k != "pixel_values"}
    encoded["mm_encoder_outputs"] = {"image": base.get_image_features(
        pixel_values=prompt["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        image_sizes=prompt.get("image_sizes"))}
    return encoded


class _Answerer:
    """``(batch, target) -> (scores (B,), predictions (B,))`` by first-token or generate scoring.

    ``target``: the answers' first token ids (B,), or each row's reference answers.
    """

    def __init__(self, model, tokenizer, scoring: str, max_new_tokens: int):
        self.model, self.tokenizer, self.scoring, self.max_new_tokens = model, tokenizer, scoring, max_new_tokens

    def __call__(self, batch: dict, target) -> tuple[np.ndarray, np.ndarray]:
        if self.scoring == FIRST_TOKEN:
            ids = self.model(**batch, logits_to_keep=1).logits[:, -1].argmax(-1)
            words = [self.tokenizer.decode([int(i)]).strip() for i in ids]
            return (ids == target).cpu().numpy().astype(float), np.array(words, dtype=object)
        words = generate_answers(self.model, batch, self.tokenizer, self.max_new_tokens)
        return np.array([vqa_score(w, refs) for w, refs in zip(words, target)]), np.array(words, dtype=object)


def _schedule(pruner, n_vision: np.ndarray, n_layers: int) -> tuple | None:
    """The pruner's schedule for a batch whose rows all have the same number of vision tokens."""
    sizes = set(n_vision.tolist())
    return tuple(pruner.schedule(int(sizes.pop()), n_layers)) if len(sizes) == 1 else None


def _copy(src: Results, dst: Results, idx: list[int]) -> None:
    for name in FIELDS:
        getattr(dst, name)[idx] = getattr(src, name)[idx]
