"""The digit world as a Hugging Face ``DatasetDict``, and a user's data set brought into its schema.

Prepared schema (one row per question; the ``prepare`` stage writes it to ``data/world``):

========================  ==========================================================
``images``                list of RGB images: one for an image, ``frames`` for a video
``modality``              ``"image"`` or ``"video"``
``question``              the prompt, words separated by spaces
``answer``                the training target: one string (a digit world answer is one word;
                          with human answer lists, the most frequent of them)
========================  ==========================================================

Optional columns, present when the source has them (the digit world has all but ``answers``):

========================  ==========================================================
``answers``               the human answers, ``list[str]`` (VQAv2 style; evaluation scores
                          against them, or against ``[answer]`` when absent)
``question_type``         a label; the digit world's are ``position``, ``colour``,
                          ``presence``, ``count``, ``relation``
``relevant``              ground-truth relevant cells as ``[frame, row, col]`` triples
``digits``                how many digits the scene holds (its difficulty)
``follow_ups``            more ``{question, answer, relevant, question_type}`` turns about the same
                          scene (digit world training rows only, ``train_turns - 1`` of them)
========================  ==========================================================

Cell ``(row, col)`` of a frame is the 8x8 patch at pixels ``[8 row : 8 row + 8, 8 col : 8 col + 8]``,
i.e. vision token ``row * grid + col`` of that frame in a patch-8 vision tower.
Validation and test scenes are drawn in handwriting (scans) that training never uses.

A user's ``DatasetDict`` (train, validation and test splits) is read with ``data.columns``
naming its column for each field (:func:`resolve_columns`); :func:`to_schema` converts it.
"""

from __future__ import annotations

import json
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
COLUMNS = ("images", "modality", "question", "answer")  # every prepared data set has them
OPTIONAL_COLUMNS = ("answers", "question_type", "relevant", "digits", "follow_ups")
WORLD_COLUMNS = ("images", "modality", "question", "answer", "question_type", "relevant", "digits", "follow_ups")
# data.columns left null: the first of these names the data set has
COLUMN_GUESSES = {
    "images": ("images", "image", "frames", "video"),
    "question": ("question", "query"),
    "answer": ("answers", "answer", "multiple_choice_answer"),
    "modality": ("modality",),
    "question_type": ("question_type",),
    "relevant": ("relevant",),
    "digits": ("digits",),
}
REQUIRED_FIELDS = ("images", "question", "answer")
_HOLDS = {"images": "the pictures (an image, a list of images or a video's frames)", "question": "the questions",
          "answer": "the answers (a string, a list of strings or VQAv2 {'answer': ...} records)"}
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def _feature(name: str):
    from datasets import Image, List, Value

    cells = List(List(Value("int32")))
    return {
        "images": List(Image()),
        "modality": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "answers": List(Value("string")),
        "question_type": Value("string"),
        "relevant": cells,
        "digits": Value("int32"),
        "follow_ups": List({"question": Value("string"), "answer": Value("string"), "relevant": cells,
                            "question_type": Value("string")}),
    }[name]


def prepared_features(names):
    """``Features`` of the prepared columns ``names``, in schema order."""
    from datasets import Features

    order = COLUMNS + OPTIONAL_COLUMNS
    return Features({n: _feature(n) for n in sorted(names, key=order.index)})


def features():
    """The digit world's ``Features``."""
    from datasets import Features

    return Features({n: _feature(n) for n in WORLD_COLUMNS})


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


def load_source(cfg: DataConfig, root: Path | None = None, log=print, cache_dir: Path | None = None,
                revision: str | None = None):
    """The data set ``cfg.source`` names in the prepared schema: the embedded world, or a saved
    folder or hub id (at ``revision``, a commit the ``sources`` stage resolved) converted by
    :func:`to_schema` (its Arrow files written to ``cache_dir``, in memory when None)."""
    if cfg.source == "digit-world":
        return build_world(cfg)
    return to_schema(read_source(cfg.source, root, revision), cfg.columns, log, cache_dir)


def read_source(source: str, root: Path | None = None, revision: str | None = None):
    """The ``DatasetDict`` of a folder written by ``save_to_disk`` (relative to ``root``) or a hub id
    (at ``revision``; None: its default branch), with its train, validation and test splits
    checked (present, readable, not empty)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(source)
    if root is not None and not path.is_absolute():
        path = root / path
    if path.exists():
        _check_saved_splits(path)
        try:
            ds = load_from_disk(str(path))
        except Exception as err:  # datasets reports a damaged folder in many ways
            raise ConfigError(f"data.source: {path} could not be read ({type(err).__name__}: {err}); write it "
                              "again with DatasetDict.save_to_disk") from err
    else:
        ds = load_dataset(source, revision=revision)
    if not isinstance(ds, DatasetDict):
        raise ConfigError(f"data.source: {source!r} holds one {type(ds).__name__}, not a DatasetDict; save "
                          "DatasetDict(train=..., validation=..., test=...) with save_to_disk")
    check_splits(ds)
    return ds


_SPLIT_FIX = ("every split needs rows: give it some (e.g. split one with Dataset.train_test_split) and save the "
              "DatasetDict again with save_to_disk")


def _check_saved_splits(path: Path) -> None:
    """Name a missing, unreadable or empty split of a saved folder before ``datasets`` reads it
    (an empty split fails there with an IndexError)."""
    import json

    if not (path / "dataset_dict.json").is_file():
        what = "one Dataset" if (path / "state.json").is_file() else "no dataset_dict.json"
        raise ConfigError(f"data.source: {path} holds {what}, not a DatasetDict; save DatasetDict(train=..., "
                          "validation=..., test=...) with save_to_disk")
    try:
        present = json.loads((path / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"data.source: {path / 'dataset_dict.json'} is unreadable ({err}); write the data set "
                          "again with DatasetDict.save_to_disk") from None
    _check_split_names(present)
    for split in SPLITS:
        try:
            files = json.loads((path / split / "state.json").read_text())["_data_files"]
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"data.source split {split!r} is unreadable ({path / split}: {err}); write the data "
                              "set again with DatasetDict.save_to_disk") from None
        if not files:
            raise ConfigError(f"data.source split {split!r} is empty (0 rows); {_SPLIT_FIX}")


def _check_split_names(present) -> None:
    missing = [s for s in SPLITS if s not in present]
    if missing:
        raise ConfigError(f"data.source lacks split(s) {missing} (it has {list(present)}); it needs {list(SPLITS)}: "
                          "rename a split, e.g. DatasetDict(validation=ds['val'], ...), or carve one out of train "
                          "with Dataset.train_test_split, then save_to_disk")


def check_splits(ds) -> None:
    """Refuse a ``DatasetDict`` that lacks a split or has an empty one, naming the split."""
    _check_split_names(list(ds))
    for split in SPLITS:
        if len(ds[split]) == 0:
            raise ConfigError(f"data.source split {split!r} is empty (0 rows); {_SPLIT_FIX}")


def resolve_columns(columns, names: list[str]) -> dict[str, str]:
    """``{field: column}`` for each field of ``columns`` (a :class:`covipal.config.ColumnMap`) that the
    data set with columns ``names`` has: the column named in ``data.columns``, or else the first of
    :data:`COLUMN_GUESSES` present. A named column that is absent, or a required field found
    nowhere, is a :class:`ConfigError` listing the data set's columns and the key to set."""
    given = {f: getattr(columns, f) for f in COLUMN_GUESSES if getattr(columns, f) is not None}
    for field, column in given.items():
        if column not in names:
            raise ConfigError(f"data.columns.{field}: {column!r} is not a column of data.source; its columns are "
                              f"{names}; set data.columns.{field} to the one holding its {field}")
    found = {}
    for field, guesses in COLUMN_GUESSES.items():
        hit = given.get(field) or next((g for g in guesses if g in names and g not in given.values()
                                        and g not in found.values()), None)
        if hit is not None:
            found[field] = hit
        elif field in REQUIRED_FIELDS:
            raise ConfigError(f"data.source has no {field} column (looked for {list(guesses)}); its columns are "
                              f"{names}; set data.columns.{field} to the one holding {_HOLDS[field]}")
    return found


def describe_columns(found: dict[str, str]) -> str:
    """One line saying which column feeds each field, for the ``prepare`` log."""
    parts = [f"{field} <- {column!r}" for field, column in found.items()]
    if "modality" not in found:
        parts.append("modality from the number of pictures (1: image, more: video)")
    absent = [f for f in COLUMN_GUESSES if f not in found and f != "modality"]
    return "data.columns: " + ", ".join(parts) + (f"; not in the data set: {', '.join(absent)}" if absent else "")


def to_schema(ds, columns, log=print, cache_dir: Path | None = None):
    """A user's ``DatasetDict`` in the prepared schema (module docstring), columns found by
    :func:`resolve_columns` on the train split; other columns are dropped.

    Images are copied as their encoded bytes (never decoded); a list of answers gives
    ``answer`` (the most frequent, the first listed among equals) and ``answers``; without a
    modality column, one picture is an image and more are a video.
    """
    from datasets import DatasetDict

    check_splits(ds)
    found = resolve_columns(columns, ds["train"].column_names)
    log(describe_columns(found))
    out = {}
    for split in SPLITS:
        absent = [c for c in found.values() if c not in ds[split].column_names]
        if absent:
            raise ConfigError(f"data.source split {split!r} lacks column(s) {absent} that train has (its columns: "
                              f"{ds[split].column_names}); give every split the same columns")
        out[split] = _convert_split(ds[split], split, found, cache_dir)
    return DatasetDict(out)


def _convert_split(split_ds, split: str, found: dict[str, str], cache_dir: Path | None):
    from datasets import ClassLabel, Image, Value

    image_feature = split_ds.features[found["images"]]
    if not isinstance(image_feature, Image) and not isinstance(getattr(image_feature, "feature", None), Image):
        raise ConfigError(f"data.columns.images: column {found['images']!r} holds {image_feature}, not images; "
                          "give a column of datasets.Image or a list of them (a video as its frames)")
    answer_feature = split_ds.features[found["answer"]]
    labels = answer_feature if isinstance(answer_feature, ClassLabel) else None
    keep_answers = not isinstance(answer_feature, (Value, ClassLabel))  # lists of human answers
    follow_ups = "follow_ups" in split_ds.column_names and "follow_ups" not in found.values()  # a saved digit world
    names = set(found) | {"modality"} | ({"answers"} if keep_answers else set()) | (
        {"follow_ups"} if follow_ups else set())
    part = split_ds.select_columns(list(found.values()) + (["follow_ups"] if follow_ups else []))
    convert = _RowConverter(split, found, keep_answers, follow_ups, labels)
    kwargs = ({"keep_in_memory": True} if cache_dir is None
              else {"cache_file_name": str(Path(cache_dir) / f"{split}.arrow")})
    out = part.with_format("arrow").map(convert, batched=True, with_indices=True, remove_columns=part.column_names,
                                        features=prepared_features(names), desc=f"prepare {split}", **kwargs)
    return out.with_format(None)


class _RowConverter:
    """Arrow batches of a user's split to rows of the prepared schema (for ``Dataset.map``)."""

    def __init__(self, split: str, found: dict[str, str], keep_answers: bool, follow_ups: bool, labels=None):
        self.split, self.found, self.labels = split, found, labels
        self.keep_answers, self.follow_ups = keep_answers, follow_ups

    def __call__(self, batch, indices: list[int]) -> dict[str, list]:
        rows = batch.to_pylist()
        out = {}
        for i, row in zip(indices, rows):
            for key, value in self.row(row, f"data.source split {self.split!r} row {i}").items():
                out.setdefault(key, []).append(value)
        return out

    def row(self, row: dict, where: str) -> dict:
        col = self.found
        images = [_embedded(im, where) for im in _as_list(row[col["images"]])]
        if not images:
            raise ConfigError(f"{where} has no picture in column {col['images']!r}; every row needs at least one")
        question = row[col["question"]]
        if not isinstance(question, str):
            raise ConfigError(f"{where}: question {question!r} in column {col['question']!r} is not a string; "
                              "set data.columns.question to the column of questions")
        answers = _answers(row[col["answer"]], where, col["answer"], self.labels)
        out = {"images": images, "question": question, "answer": most_frequent(answers),
               "modality": self._modality(row, len(images), where)}
        if self.keep_answers:
            out["answers"] = answers
        if "question_type" in col:
            out["question_type"] = str(row[col["question_type"]])
        if "relevant" in col:
            out["relevant"] = _cells(row[col["relevant"]], where, col["relevant"])
        if "digits" in col:
            out["digits"] = int(row[col["digits"]])
        if self.follow_ups:
            out["follow_ups"] = row["follow_ups"] or []
        return out

    def _modality(self, row: dict, pictures: int, where: str) -> str:
        if "modality" not in self.found:
            return "image" if pictures == 1 else "video"
        value = row[self.found["modality"]]
        if value not in ("image", "video"):
            raise ConfigError(f"{where}: modality {value!r} in column {self.found['modality']!r} is neither 'image' "
                              "nor 'video'; fix the column or leave data.columns.modality null to infer it")
        return value


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def _embedded(image, where: str) -> dict:
    """An encoded image ``{bytes, path}`` with its bytes read in, so the prepared data stands alone."""
    if not isinstance(image, dict) or (image.get("bytes") is None and not image.get("path")):
        raise ConfigError(f"{where}: {image!r} is not an image")
    if image.get("bytes") is None:
        try:
            return {"bytes": Path(image["path"]).read_bytes(), "path": None}
        except OSError as err:
            raise ConfigError(f"{where}: image file {image['path']!r} cannot be read ({err}); store the images "
                              "in the data set (datasets.Image) before save_to_disk") from None
    return {"bytes": image["bytes"], "path": None}


def _answers(value, where: str, column: str, labels=None) -> list[str]:
    """A row's answers as strings: one string, a list of strings, VQAv2 records ``{"answer": ...}``
    (a list of them, or ``datasets``' dict of lists), or a class label."""
    if labels is not None and isinstance(value, int):
        return [labels.int2str(value)]
    if isinstance(value, dict) and "answer" in value:
        value = value["answer"]
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        value = [v["answer"] if isinstance(v, dict) and "answer" in v else v for v in value]
        if value and all(isinstance(v, str) for v in value):
            return value
    raise ConfigError(f"{where}: answer {value!r} in column {column!r} is neither a string, a non-empty list of "
                      "strings nor VQAv2 {'answer': ...} records; set data.columns.answer to the column of answers")


def most_frequent(answers: list[str]) -> str:
    """The answer given most often; among equals the first listed."""
    from collections import Counter

    return Counter(answers).most_common(1)[0][0]


def _cells(value, where: str, column: str) -> list[list[int]]:
    cells = value or []
    if not all(isinstance(c, (list, tuple)) and len(c) == 3 and all(isinstance(x, int) for x in c) for c in cells):
        raise ConfigError(f"{where}: relevant {value!r} in column {column!r} is not a list of [frame, row, col] "
                          "integer triples; fix the column or leave data.columns.relevant null")
    return [list(c) for c in cells]


def summarize(ds) -> dict:
    """Row counts per split, per modality and, when the data set has question types, per type
    (the ``prepare`` stage's metrics): keys ``rows``, ``<modality>`` or ``<modality>_<type>``."""
    out = {}
    for split in SPLITS:
        typed = "question_type" in ds[split].column_names
        rows = ds[split].select_columns(["modality"] + (["question_type"] if typed else [])).to_list()
        out[split] = {"rows": len(rows)}
        for r in rows:
            key = f"{r['modality']}_{r['question_type']}" if typed else r["modality"]
            out[split][key] = out[split].get(key, 0) + 1
    return out


def prepare(cfg: DataConfig, out: Path, root: Path | None = None, log=print, resolved: dict | None = None) -> dict:
    """Write the data set ``cfg.source`` names to ``out`` in the prepared schema, atomically; return
    :func:`summarize`.

    ``resolved`` is the ``sources`` stage's record of ``cfg.source`` (:mod:`covipal.sources`): a
    hub data set is read at its commit, and the record is saved as ``out/source.json`` (the
    data version the prepared rows came from). The rows pass :func:`check_rows` before anything
    is written: a source that fails a check leaves ``out`` as it was.
    """
    import tempfile

    from covipal.io import atomic_output

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    same = resolved is not None and resolved.get("source") == cfg.source
    revision = resolved["version"] if same and resolved["kind"] == "hub" else None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.convert-", dir=out.parent) as cache:
        ds = load_source(cfg, root, log, cache_dir=Path(cache), revision=revision)
        check_rows(ds)
        if same and resolved["kind"] == "folder":
            _check_unchanged(cfg.source, root, resolved["version"])
        with atomic_output(out) as tmp:
            ds.save_to_disk(str(tmp))
            if same:
                (tmp / SOURCE_RECORD).write_text(json.dumps(resolved, sort_keys=True, indent=2) + "\n")
        return summarize(ds)


SOURCE_RECORD = "source.json"  # in the prepared folder: the record of the source version it holds
MAX_NAMED = 20  # problems listed in the error of a source that fails its checks


def check_rows(ds) -> None:
    """Refuse prepared data that would train or test wrongly, naming each bad row by split and index.

    Checked: every split has rows and the schema's columns (:data:`COLUMNS`, pictures as
    images); every picture decodes; every row has a question and an answer (not empty); no
    validation or test row repeats a train row by content (the same image bytes and question).
    A :class:`ConfigError` lists the first :data:`MAX_NAMED` problems and how many there are.
    """
    check_splits(ds)
    problems = []
    for split in SPLITS:
        missing = [c for c in COLUMNS if c not in ds[split].column_names]
        if missing:
            problems.append(f"split {split!r} lacks column(s) {missing} (its columns: {ds[split].column_names})")
    if problems:
        raise ConfigError("data.source fails its checks: " + "; ".join(problems) + "; give every split the "
                          "prepared schema's columns (covipal/world/dataset.py)")
    seen: dict[bytes, int] = {}
    for split in SPLITS:
        part = ds[split].select_columns(["images", "question", "answer"]).with_format("arrow")
        for start in tqdm(range(0, len(part), CHECK_BATCH), desc=f"check {split}", unit="batch", mininterval=5,
                          disable=len(part) <= CHECK_BATCH):
            for offset, row in enumerate(part[start:start + CHECK_BATCH].to_pylist()):
                index = start + offset
                problems += [f"{split} row {index}: {p}" for p in _row_problems(row)]
                key = _content_key(row)
                if split == "train":
                    seen.setdefault(key, index)
                elif key in seen:
                    problems.append(f"{split} row {index} repeats train row {seen[key]} (the same images and "
                                    "question): it would be scored on a row trained on")
    if problems:
        named = "; ".join(problems[:MAX_NAMED]) + (f"; and {len(problems) - MAX_NAMED} more" if len(problems) >
                                                    MAX_NAMED else "")
        raise ConfigError(f"data.source fails its checks ({len(problems)} problem(s)): {named}. Fix or remove these "
                          "rows in the source and save it again; the previous prepared data stay as they were")


CHECK_BATCH = 1000


def _row_problems(row: dict) -> list[str]:
    out = []
    for i, image in enumerate(row["images"] or []):
        error = _decode_error(image)
        if error:
            out.append(f"image {i} cannot be decoded ({error})")
    if not row["images"]:
        out.append("no picture")
    if not (row["question"] or "").strip():
        out.append("no question (empty)")
    if not (row["answer"] or "").strip():
        out.append("no answer (empty)")
    return out


def _decode_error(image: dict | None) -> str | None:
    """Why the encoded ``image`` does not decode, or None (JPEGs decoded at a reduced size: fast)."""
    import io

    from PIL import Image

    data = (image or {}).get("bytes")
    if not data:
        return "no image bytes"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as err:  # PIL raises many kinds for damaged files
        return f"{type(err).__name__}: {err}"
    return None


def _content_key(row: dict) -> bytes:
    import hashlib

    digest = hashlib.sha256((row["question"] or "").encode() + b"\0")
    for image in row["images"] or []:
        digest.update(hashlib.sha256((image or {}).get("bytes") or b"").digest())
    return digest.digest()


def _check_unchanged(source: str, root: Path | None, version: str) -> None:
    """A folder that changed since the ``sources`` stage hashed it is read again by the next run."""
    from covipal.sources import folder_version

    path = Path(source) if root is None or Path(source).is_absolute() else Path(root) / source
    now = folder_version(path)
    if now != version:
        raise RuntimeError(f"data.source {source!r} changed while this run read it (the sources stage saw {version}, "
                           f"now {now}: a drop landed); run again (dvc repro) to prepare the new version")
