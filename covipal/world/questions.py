"""Question types of the digit world: each builds a scene around its answer.

Every constructor takes a random generator, the scan pool of its split and the scene
shape, and returns a :class:`Sample`: frames, question, single-word answer and the
ground-truth relevant cells ``(frame, row, col)`` the answer depends on. Questions
are built answer-first (e.g. pick the count, then draw a scene with that many copies),
so answers are balanced and always well defined (a looked-up digit is unique).

Questions end on the word they are about (no trailing "?") and name a cell in one word
(chess-style: column letter, row number from 1, "c5" = row 4, column 2), so the token
that predicts the answer already holds what to look up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covipal.world.scenes import COLOURS, DIGITS, Frame, cells_of, empty_frame, fill, place

MAX_COUNT = 3  # count answers are 0..MAX_COUNT
MAX_GRID = 16
COLUMN_LETTERS = "abcdefghijklmnop"


def cell_name(row: int, col: int) -> str:
    """(row, col) -> chess-style name: ``cell_name(4, 2) == "c5"``."""
    return f"{COLUMN_LETTERS[col]}{row + 1}"


CELL_NAMES = [cell_name(r, c) for r in range(MAX_GRID) for c in range(MAX_GRID)]


@dataclass
class Shape:
    """Scene shape: ``frames`` grids of ``rows`` x ``cols`` cells, ``digits`` digits in all."""

    frames: int
    rows: int
    cols: int
    digits: int  # total digits over all frames (incl. the ones the question needs)


@dataclass
class Sample:
    frames: list[Frame]
    question: str
    answer: str
    question_type: str
    relevant: list[tuple[int, int, int]]


def _others(d: int) -> list[int]:
    return [x for x in DIGITS if x != d]


def _new(shape: Shape) -> list[Frame]:
    return [empty_frame(shape.rows, shape.cols) for _ in range(shape.frames)]


def _spread(rng, frames: list[Frame], pool, n: int, allowed: list[int], cap: int | None) -> None:
    """Spread ``n`` distractors from ``allowed`` over random frames."""
    for f in rng.integers(len(frames), size=max(n, 0)):
        fill(rng, frames[f], pool, 1, allowed, max_per_digit=cap, frames=frames)


def _placed_total(frames: list[Frame]) -> int:
    return sum(cell is not None for fr in frames for row in fr for cell in row)


def position(rng, pool, shape: Shape) -> Sample:
    """"which digit is at c5" (column letter, row number from 1; images only)."""
    frames = _new(shape)
    _spread(rng, frames, pool, shape.digits, list(DIGITS), cap=MAX_COUNT)
    occupied = [(f, r, c) for f, fr in enumerate(frames) for r, row in enumerate(fr)
                for c, cell in enumerate(row) if cell is not None]
    f, r, c = occupied[rng.integers(len(occupied))]
    q = f"which digit is at {cell_name(r, c)}"
    return Sample(frames, q, str(frames[f][r][c].digit), "position", [(f, r, c)])


def colour(rng, pool, shape: Shape) -> Sample:
    """"what colour is the d" with d unique in the scene (in one frame of a video)."""
    frames = _new(shape)
    d = int(rng.integers(10))
    f = int(rng.integers(shape.frames))
    r, c = place(rng, frames[f], pool, d)
    _spread(rng, frames, pool, shape.digits - 1, _others(d), cap=MAX_COUNT)
    return Sample(frames, f"what colour is the {d}", frames[f][r][c].colour, "colour", [(f, r, c)])


def presence(rng, pool, shape: Shape) -> Sample:
    """"is there a d" anywhere in the image or video."""
    frames = _new(shape)
    d = int(rng.integers(10))
    k = int(rng.integers(1, 3)) if rng.random() < 0.5 else 0
    for f in rng.choice(shape.frames, size=k, replace=shape.frames < k):
        place(rng, frames[int(f)], pool, d)
    _spread(rng, frames, pool, shape.digits - k, _others(d), cap=MAX_COUNT)
    return Sample(frames, f"is there a {d}", "yes" if k else "no", "presence", cells_of(frames, d))


def count(rng, pool, shape: Shape) -> Sample:
    """Images: "how many d"; videos: "in how many frames is there a d"."""
    frames = _new(shape)
    d = int(rng.integers(10))
    k = int(rng.integers(MAX_COUNT + 1))
    if shape.frames == 1:
        for _ in range(k):
            place(rng, frames[0], pool, d)
        q = f"how many {d}"
    else:
        for f in rng.choice(shape.frames, size=k, replace=False):
            place(rng, frames[int(f)], pool, d)
        q = f"in how many frames is there a {d}"
    _spread(rng, frames, pool, shape.digits - k, _others(d), cap=MAX_COUNT)
    return Sample(frames, q, str(k), "count", cells_of(frames, d))


def relation(rng, pool, shape: Shape) -> Sample:
    """"what is right of the d" with d unique and a digit in the cell to its right."""
    frames = _new(shape)
    d, e = (int(x) for x in rng.choice(10, size=2, replace=False))
    f = int(rng.integers(shape.frames))
    r, c = int(rng.integers(shape.rows)), int(rng.integers(shape.cols - 1))
    place(rng, frames[f], pool, d, at=(r, c))
    place(rng, frames[f], pool, e, at=(r, c + 1))
    _spread(rng, frames, pool, shape.digits - 2, _others(d), cap=MAX_COUNT)
    return Sample(frames, f"what is right of the {d}", str(e), "relation", [(f, r, c), (f, r, c + 1)])


IMAGE_TYPES = {"position": position, "colour": colour, "presence": presence, "count": count, "relation": relation}
VIDEO_TYPES = {"colour": colour, "presence": presence, "count": count, "relation": relation}
ANSWER_WORDS = [str(d) for d in DIGITS] + list(COLOURS) + ["yes", "no"]


def sample_question(rng: np.random.Generator, pool, shape: Shape, types: list[str]) -> Sample:
    """Draw one question of a type chosen uniformly from ``types``."""
    table = IMAGE_TYPES if shape.frames == 1 else VIDEO_TYPES
    qtype = types[int(rng.integers(len(types)))]
    if qtype not in table:
        kind = "image" if shape.frames == 1 else "video"
        raise ValueError(f"question type {qtype!r} is not defined for {kind}s; choose from {sorted(table)}")
    return table[qtype](rng, pool, shape)


# --- follow-up questions about an existing scene (multi-turn training conversations) -------


def _occupied(frames: list[Frame]) -> list[tuple[int, int, int]]:
    return [(f, r, c) for f, fr in enumerate(frames) for r, row in enumerate(fr)
            for c, cell in enumerate(row) if cell is not None]


def ask(rng: np.random.Generator, frames: list[Frame], qtype: str) -> tuple[str, str, list] | None:
    """A question of ``qtype`` about the given scene, its answer and its relevant cells, or None
    if the scene has no digit the question could be about (e.g. no unique digit for a colour
    lookup)."""
    occupied = _occupied(frames)
    unique = [d for d in DIGITS if len(cells_of(frames, d)) == 1]
    if qtype == "position" and len(frames) == 1 and occupied:
        f, r, c = occupied[rng.integers(len(occupied))]
        return f"which digit is at {cell_name(r, c)}", str(frames[f][r][c].digit), [(f, r, c)]
    if qtype == "colour" and unique:
        d = unique[rng.integers(len(unique))]
        f, r, c = cells_of(frames, d)[0]
        return f"what colour is the {d}", frames[f][r][c].colour, [(f, r, c)]
    if qtype == "presence":
        present = sorted({frames[f][r][c].digit for f, r, c in occupied})
        absent = [d for d in DIGITS if d not in present]
        pick_present = present and (not absent or rng.random() < 0.5)
        options = present if pick_present else absent
        d = options[rng.integers(len(options))]
        return f"is there a {d}", "yes" if pick_present else "no", cells_of(frames, d)
    if qtype == "count":
        d = int(rng.integers(10))
        where = cells_of(frames, d)
        if len(frames) == 1:
            return f"how many {d}", str(len(where)), where
        return f"in how many frames is there a {d}", str(len({f for f, _, _ in where})), where
    if qtype == "relation":
        options = [d for d in unique for f, r, c in cells_of(frames, d)
                   if c + 1 < len(frames[f][r]) and frames[f][r][c + 1] is not None]
        if options:
            d = options[rng.integers(len(options))]
            f, r, c = cells_of(frames, d)[0]
            return f"what is right of the {d}", str(frames[f][r][c + 1].digit), [(f, r, c), (f, r, c + 1)]
    return None
