"""The digit world: deterministic, and every answer right when re-read from the pixels alone."""

from collections import defaultdict

import numpy as np
import pytest

from covipal.config import DataConfig
from covipal.world.dataset import (COLUMNS, OPTIONAL_COLUMNS, WORLD_COLUMNS, build_world, features, make_sample,
                                   summarize)
from covipal.world.scenes import COLOURS, digit_scans, scan_pools

CFG = DataConfig()


@pytest.fixture(scope="module")
def world():
    return build_world(CFG, {"train": 150, "validation": 60, "test": 90})


@pytest.fixture(scope="module")
def lookup():
    """Rendered bytes of every scan in every colour -> (digit, colour, scan)."""
    scans, labels = digit_scans()
    table = {}
    for name, tint in COLOURS.items():
        px = np.round(scans[..., None] * np.asarray(tint, dtype=np.float32) * 255).astype(np.uint8)
        for i in range(len(scans)):
            table[px[i].tobytes()] = (int(labels[i]), name, i)
    return table


def parse(frame: np.ndarray, lookup) -> dict[tuple[int, int], tuple[int, str, int]]:
    """Read a rendered frame back into {(row, col): (digit, colour, scan)} by exact pixel match."""
    cells = {}
    for r in range(frame.shape[0] // 8):
        for c in range(frame.shape[1] // 8):
            patch = np.ascontiguousarray(frame[8 * r:8 * r + 8, 8 * c:8 * c + 8])
            if patch.any():
                assert patch.tobytes() in lookup, f"cell {(r, c)} is not a tinted scan"
                cells[(r, c)] = lookup[patch.tobytes()]
    return cells


KINDS = {"which digit is at": "position", "what colour": "colour", "is there": "presence", "how many": "count",
         "in how many frames": "count", "what is right of": "relation"}


def kind(question: str) -> str:
    """The question type a question's wording says."""
    return next(t for prefix, t in KINDS.items() if question.startswith(prefix))


def solve(question: str, frames: list[dict]) -> tuple[str, set]:
    """Answer a question from parsed frames, independently of the generator."""
    words = question.split()
    where = defaultdict(list)
    for f, cells in enumerate(frames):
        for (r, c), (digit, _, _) in cells.items():
            where[digit].append((f, r, c))
    if question.startswith("which digit is at"):
        name = words[-1]
        r, c = int(name[1:]) - 1, "abcdefghijklmnop".index(name[0])
        return str(frames[0][(r, c)][0]), {(0, r, c)}
    d = int(words[-1])
    if question.startswith("what colour"):
        assert len(where[d]) == 1, "a looked-up digit must be unique"
        f, r, c = where[d][0]
        return frames[f][(r, c)][1], {(f, r, c)}
    if question.startswith("is there"):
        return ("yes" if where[d] else "no"), set(where[d])
    if question.startswith("how many"):
        return str(len(where[d])), set(where[d])
    if question.startswith("in how many frames"):
        return str(len({f for f, _, _ in where[d]})), set(where[d])
    if question.startswith("what is right of"):
        assert len(where[d]) == 1, "a related digit must be unique"
        f, r, c = where[d][0]
        return str(frames[f][(r, c + 1)][0]), {(f, r, c), (f, r, c + 1)}
    raise AssertionError(f"unknown question {question!r}")


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_answers_and_relevant_cells_match_the_pixels(world, lookup, split):
    for row in world[split]:
        frames = [parse(np.asarray(im.convert("RGB")), lookup) for im in row["images"]]
        answer, relevant = solve(row["question"], frames)
        assert row["answer"] == answer, row["question"]
        assert {tuple(t) for t in row["relevant"]} == relevant, row["question"]
        assert sum(len(f) for f in frames) == row["digits"]
        assert row["question_type"] == kind(row["question"])
        for turn in row["follow_ups"]:
            assert solve(turn["question"], frames) == (turn["answer"], {tuple(t) for t in turn["relevant"]}), turn["question"]
            assert turn["question_type"] == kind(turn["question"]), turn["question"]
    if split == "train":
        assert sum(len(r["follow_ups"]) for r in world[split]) > 5 * len(world[split])
    else:
        assert not any(r["follow_ups"] for r in world[split])


def test_held_out_splits_use_unseen_handwriting(world, lookup):
    train_scans = {int(s) for pool in scan_pools(CFG.seed)["train"].values() for s in pool}
    for split in ("validation", "test"):
        for row in world[split]:
            for im in row["images"]:
                for _, _, scan in parse(np.asarray(im.convert("RGB")), lookup).values():
                    assert scan not in train_scans


def test_shapes_modalities_and_schema(world):
    assert set(world) == {"train", "validation", "test"}
    assert world["train"].column_names == list(WORLD_COLUMNS) and world["train"].features == features()
    assert set(COLUMNS) <= set(WORLD_COLUMNS) <= set(COLUMNS + OPTIONAL_COLUMNS)  # all but `answers`
    for row in world["test"]:
        n = len(row["images"])
        if row["modality"] == "image":
            assert n == 1 and row["images"][0].size == (64, 64)
        else:
            assert n == CFG.video.frames and all(im.size == (32, 32) for im in row["images"])
    types = set(world["train"]["question_type"])
    assert types == {"position", "colour", "presence", "count", "relation"}
    summary = summarize(world)  # the prepare stage's metrics: per modality and question type
    assert summary["test"]["rows"] == 90 and sum(v for k, v in summary["test"].items() if k != "rows") == 90
    assert {k.split("_")[0] for k in summary["train"] if k != "rows"} == {"image", "video"}


def test_same_seed_same_world_other_seed_other_world():
    a = make_sample(CFG, "test", 7)
    b = make_sample(CFG, "test", 7)
    assert a["question"] == b["question"] and all((x == y).all() for x, y in zip(a["images"], b["images"]))
    other = DataConfig(seed=1)
    differs = [make_sample(other, "test", i)["question"] != make_sample(CFG, "test", i)["question"]
               or not np.array_equal(make_sample(other, "test", i)["images"][0], make_sample(CFG, "test", i)["images"][0])
               for i in range(5)]
    assert any(differs)


def test_follow_up_weights_shift_the_follow_ups_only():
    weighted = DataConfig(follow_up_weights={"position": 4.0, "colour": 0.0})
    plain, heavy = [], []
    for i in range(40):
        a, b = make_sample(CFG, "train", i), make_sample(weighted, "train", i)
        assert (a["question"], a["answer"]) == (b["question"], b["answer"])  # the first question and scene stay
        assert all(np.array_equal(x, y) for x, y in zip(a["images"], b["images"]))
        plain += [t["question_type"] for t in a["follow_ups"]]
        heavy += [t["question_type"] for t in b["follow_ups"]]
    assert "colour" in plain and "colour" not in heavy
    assert heavy.count("position") > 2 * plain.count("position")


def test_answers_are_balanced(world):
    by_type = defaultdict(list)
    for row in world["train"]:
        by_type[row["question_type"]].append(row["answer"])
    presence = by_type["presence"]
    assert 0.25 < presence.count("yes") / len(presence) < 0.75
    assert set(by_type["count"]) <= {"0", "1", "2", "3"} and len(set(by_type["count"])) >= 3
