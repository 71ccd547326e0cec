"""Data for PPM training: the order of each epoch, and data-set rows as reference-LVLM inputs.

Every shuffle is a function of ``(seed, epoch)`` only, so a run resumed at epoch ``e``
sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator determined by ``(seed, epoch)`` alone."""
    key = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(key)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` determined by ``(seed, epoch)``."""
    return torch.randperm(n, generator=epoch_generator(seed, epoch)).tolist()


@dataclass
class RowBatches:
    """Batches of data-set rows turned into model inputs by ``fn``, shuffled per epoch.

    ``len()`` is the number of batches, so the training loop can end an epoch on a
    gradient-accumulation boundary.

    Parameters
    ----------
    dataset : sequence of dict
        Indexable rows (e.g. a ``datasets.Dataset`` split).
    fn : callable
        ``rows -> batch`` (e.g. :meth:`ReferenceInputs.train`).
    batch_size : int
    seed : int or None
        Shuffle seed; ``None`` keeps the data-set order.
    epoch : int
    """

    dataset: Sequence[dict]
    fn: Callable[[list[dict]], object]
    batch_size: int
    seed: int | None = None
    epoch: int = 0

    def __len__(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator:
        n = len(self.dataset)
        order = epoch_order(n, self.seed, self.epoch) if self.seed is not None else list(range(n))
        for s in range(0, n, self.batch_size):
            yield self.fn([self.dataset[i] for i in order[s:s + self.batch_size]])


class ReferenceInputs:
    """Data-set rows (``images``, ``question``, ``answer``) as inputs of the reference LVLM.

    Parameters
    ----------
    processor : covipal.reference.processor.ReferenceProcessor
    """

    def __init__(self, processor):
        self.processor = processor

    @staticmethod
    def frames(row: dict) -> list[np.ndarray]:
        """A row's images as (H, W, 3) uint8 arrays."""
        return [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in row["images"]]

    def prompt(self, rows: list[dict]) -> dict:
        """Left-padded prompts without answers: ``input_ids``, ``attention_mask`` (B, L), ``pixel_values``."""
        return self.processor([r["question"] for r in rows], [self.frames(r) for r in rows])

    def train(self, rows: list[dict]) -> dict:
        """Right-padded ``<s> <image>.. question answer`` with the answer in ``labels`` (B, L), -100 elsewhere.

        One turn per row: the PPM sees the prompt's text, which at inference holds one question.
        """
        pics = [self.processor.pictures(self.frames(r)) for r in rows]
        out = self.processor.conversation_inputs([[(r["question"], r["answer"])] for r in rows],
                                                 [len(p) for p in pics])
        out["pixel_values"] = torch.from_numpy(np.concatenate(pics))
        return out

    def answers(self, rows: list[dict]) -> torch.Tensor:
        """Token id of each row's one-word answer, shape (B,)."""
        return torch.tensor(self.processor.tokenizer.convert_tokens_to_ids([r["answer"] for r in rows]))

    def evaluation(self, rows: list[dict]) -> tuple[dict, torch.Tensor]:
        """``(prompt(rows), answers(rows))``: a validation batch for :func:`covipal.training.stage2.evaluate`."""
        return self.prompt(rows), self.answers(rows)
