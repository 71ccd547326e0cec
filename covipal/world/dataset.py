"""The digit world as a Hugging Face ``DatasetDict``, and loading a user's data set in its schema.

Schema (one row per question):

========================  ==========================================================
``images``                list of RGB images: one for an image, ``frames`` for a video
``modality``              ``"image"`` or ``"video"``
``question``              the prompt, words separated by spaces
``answer``                one word (a digit, a colour, ``yes``/``no``, a count)
``question_type``         ``position``, ``colour``, ``presence``, ``count``, ``relation``
``relevant``              ground-truth relevant cells as ``[frame, row, col]`` triples
``digits``                how many digits the scene holds (its difficulty)
``follow_ups``            more ``{question, answer, relevant, question_type}`` turns about the same
                          scene (training rows only, ``train_turns - 1`` of them; empty elsewhere)
========================  ==========================================================

Cell ``(row, col)`` of a frame is the 8x8 patch at pixels ``[8 row : 8 row + 8, 8 col : 8 col + 8]``,
i.e. vision token ``row * grid + col`` of that frame in a patch-8 vision tower.
Validation and test scenes are drawn in handwriting (scans) that training never uses.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from covipal.config import ConfigError, DataConfig
from covipal.world.questions import Shape, ask, sample_question
from covipal.world.render import render_frame
from covipal.world.scenes import scan_pools

SPLITS = ("train", "validation", "test")
COLUMNS = ("images", "modality", "question", "answer", "question_type", "relevant", "digits")
OPTIONAL_COLUMNS = ("follow_ups",)
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def features():
    from datasets import Features, Image, List, Value

    return Features({
        "images": List(Image()),
        "modality": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "question_type": Value("string"),
        "relevant": List(List(Value("int32"))),
        "digits": Value("int32"),
        "follow_ups": List({"question": Value("string"), "answer": Value("string"),
                            "relevant": List(List(Value("int32"))), "question_type": Value("string")}),
    })


def make_sample(cfg: DataConfig, split: str, index: int, pools=None) -> dict:
    """Row ``index`` of ``split``: the same for a given seed, whatever else is generated."""
    pools = pools or scan_pools(cfg.seed)
    rng = np.random.default_rng([cfg.seed, _SPLIT_IDS[split], index])
    is_video = rng.random() < cfg.video_share
    world = cfg.video if is_video else cfg.image
    lo = world.min_train_digits if split == "train" else world.digits
    digits = int(rng.integers(lo, world.digits + 1))
    shape = Shape(frames=cfg.video.frames if is_video else 1, rows=world.grid, cols=world.grid, digits=digits)
    types = list(world.question_types)
    s = sample_question(rng, pools[split], shape, types)
    follow_ups = []
    weights = np.array([cfg.follow_up_weights.get(t, 1.0) for t in types])
    uniform = np.all(weights == weights[0])  # then the draw (and so the data) is that of worlds before weights
    for _ in range(cfg.train_turns - 1 if split == "train" else 0):
        pick = rng.integers(len(types)) if uniform else rng.choice(len(types), p=weights / weights.sum())
        qtype = types[int(pick)]
        turn = ask(rng, s.frames, qtype)
        if turn is not None:
            follow_ups.append({"question": turn[0], "answer": turn[1], "relevant": [list(t) for t in turn[2]],
                               "question_type": qtype})
    return {
        "images": [render_frame(f) for f in s.frames],
        "modality": "video" if is_video else "image",
        "question": s.question,
        "answer": s.answer,
        "question_type": s.question_type,
        "relevant": [list(t) for t in s.relevant],
        "digits": digits,
        "follow_ups": follow_ups,
    }


def build_world(cfg: DataConfig, sizes: dict[str, int] | None = None):
    """Generate the digit world's train/validation/test ``DatasetDict``."""
    from datasets import Dataset, DatasetDict

    sizes = sizes or {"train": cfg.sizes.train, "validation": cfg.sizes.validation, "test": cfg.sizes.test}
    workers = min(os.cpu_count() or 1, 8)
    out = {}
    # rows depend only on (seed, split, index), so chunks built in other processes come out the same;
    # forked workers (numpy and PIL only) need no `if __name__ == "__main__"` guard in the caller
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        for split in SPLITS:
            n = sizes[split]
            step = max(1, min(CHUNK, -(-n // workers)))
            chunks = [pool.submit(_encoded_rows, cfg, split, start, min(start + step, n)) for start in range(0, n, step)]
            rows = []
            for chunk in tqdm(chunks, desc=f"digit world {split}", unit="chunk", mininterval=2):
                rows += chunk.result()
            out[split] = Dataset.from_list(rows, features=features())
    return DatasetDict(out)


CHUNK = 1000  # rows per task of the process pool


def _encoded_rows(cfg: DataConfig, split: str, start: int, stop: int) -> list[dict]:
    """Rows ``start..stop-1`` of ``split`` with their images encoded as PNG."""
    pools = scan_pools(cfg.seed)
    rows = []
    for i in range(start, stop):
        row = make_sample(cfg, split, i, pools)
        row["images"] = [_png(im) for im in row["images"]]
        rows.append(row)
    return rows


def _png(pixels: np.ndarray) -> dict:
    """Encode once with PIL; ``datasets`` would otherwise convert arrays slowly row by row."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def load_source(cfg: DataConfig, root: Path | None = None):
    """The data set ``cfg.source`` names: the embedded world, a saved folder or a hub id."""
    if cfg.source == "digit-world":
        return build_world(cfg)
    from datasets import load_dataset, load_from_disk

    path = Path(cfg.source)
    if root is not None and not path.is_absolute():
        path = root / path
    ds = load_from_disk(str(path)) if path.exists() else load_dataset(cfg.source)
    check_schema(ds)
    return ds


def check_schema(ds) -> None:
    """Refuse a data set that lacks a split or a column of the schema, naming what is missing."""
    missing_splits = [s for s in SPLITS if s not in ds]
    if missing_splits:
        raise ConfigError(f"data.source lacks split(s) {missing_splits}; it needs {list(SPLITS)}")
    for split in SPLITS:
        missing = [c for c in COLUMNS if c not in ds[split].column_names]
        if missing:
            raise ConfigError(f"data.source split {split!r} lacks column(s) {missing}; "
                              f"see the schema in covipal/world/dataset.py")


def summarize(ds) -> dict:
    """Row counts per split, modality and question type (the ``prepare`` stage's metrics)."""
    out = {}
    for split in SPLITS:
        rows = ds[split].select_columns(["modality", "question_type"]).to_list()
        out[split] = {"rows": len(rows)}
        for r in rows:
            key = f"{r['modality']}_{r['question_type']}"
            out[split][key] = out[split].get(key, 0) + 1
    return out


def prepare(cfg: DataConfig, out: Path, root: Path | None = None) -> dict:
    """Write the data set ``cfg.source`` names to ``out`` atomically; return :func:`summarize`."""
    from covipal.io import atomic_output

    ds = load_source(cfg, root)
    with atomic_output(out) as tmp:
        ds.save_to_disk(str(tmp))
    return summarize(ds)
