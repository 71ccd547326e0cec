"""Scenes of the digit world: grids of real handwritten digit scans, drawn in colours.

A scene is a list of frames (one for an image, several for a video); a frame is a grid
of cells, each empty or holding one digit scan from scikit-learn's bundled 8x8 digits
(``sklearn.datasets.load_digits``), drawn in one of a few colours. Everything is drawn
from a ``numpy.random.Generator`` so a seed fixes the whole world.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.2, 0.2),
    "green": (0.2, 1.0, 0.2),
    "blue": (0.3, 0.3, 1.0),
    "yellow": (1.0, 1.0, 0.2),
}
DIGITS = tuple(range(10))
CELL_PX = 8  # a digit scan is 8x8 pixels; one cell is one scan


@dataclass(frozen=True)
class Cell:
    """One occupied cell: which digit, in which colour, drawn from which scan."""

    digit: int
    colour: str
    scan: int  # index into ``load_digits().images``


Frame = list[list["Cell | None"]]  # [row][col]


@lru_cache(maxsize=1)
def digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """All bundled scans and their labels: ((1797, 8, 8) float in [0, 1], (1797,) int)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def scan_pools(seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> dict[str, dict[int, np.ndarray]]:
    """Split the scans per digit into disjoint train/validation/test pools.

    Test scenes are drawn only in handwriting the model never saw in training.
    Returns ``{split: {digit: scan indices}}``.
    """
    _, labels = digit_scans()
    rng = np.random.default_rng(seed)
    pools: dict[str, dict[int, np.ndarray]] = {"train": {}, "validation": {}, "test": {}}
    for d in DIGITS:
        idx = rng.permutation(np.flatnonzero(labels == d))
        a = int(len(idx) * fractions[0])
        b = a + int(len(idx) * fractions[1])
        pools["train"][d], pools["validation"][d], pools["test"][d] = idx[:a], idx[a:b], idx[b:]
    return pools


def empty_frame(rows: int, cols: int) -> Frame:
    return [[None] * cols for _ in range(rows)]


def free_cells(frame: Frame) -> list[tuple[int, int]]:
    return [(r, c) for r, row in enumerate(frame) for c, cell in enumerate(row) if cell is None]


def cells_of(frames: list[Frame], digit: int) -> list[tuple[int, int, int]]:
    """(frame, row, col) of every cell holding ``digit``."""
    return [
        (f, r, c)
        for f, frame in enumerate(frames)
        for r, row in enumerate(frame)
        for c, cell in enumerate(row)
        if cell is not None and cell.digit == digit
    ]


def place(rng: np.random.Generator, frame: Frame, pool: dict[int, np.ndarray], digit: int,
          at: tuple[int, int] | None = None, colour: str | None = None) -> tuple[int, int]:
    """Put a random scan of ``digit`` into a free cell (or ``at``); return its (row, col)."""
    if at is None:
        options = free_cells(frame)
        at = options[rng.integers(len(options))]
    r, c = at
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    frame[r][c] = Cell(digit, colour, int(rng.choice(pool[digit])))
    return at


def fill(rng: np.random.Generator, frame: Frame, pool: dict[int, np.ndarray], n: int,
         allowed: list[int], max_per_digit: int | None = None, frames: list[Frame] | None = None) -> None:
    """Add ``n`` distractor digits drawn from ``allowed`` to free cells of ``frame``.

    ``max_per_digit`` caps how often any digit may occur across ``frames`` (default: this frame).
    """
    scope = frames if frames is not None else [frame]
    for _ in range(n):
        if not free_cells(frame):
            return
        ok = [d for d in allowed if max_per_digit is None or len(cells_of(scope, d)) < max_per_digit]
        if not ok:
            return
        place(rng, frame, pool, int(rng.choice(ok)))
