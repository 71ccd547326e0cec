"""New data arriving in the digit world: batches of new scenes appended to a folder ``data.source`` can name.

    python -m covipal.world.incoming --to data/incoming --rows 200                 # 200 new train rows
    python -m covipal.world.incoming --to data/incoming --rows 100 --question-types count,relation --digits 6

The folder is a ``DatasetDict`` saved with ``save_to_disk`` (train, validation and test, with
the digit world's columns, so the reference LVLM trains on it as on ``digit-world``) and a
manifest ``incoming.json`` of the batches it holds. The world's shape (grids, frames, video
share) comes from ``params.yaml``'s ``data`` section.

- The first drop creates the folder: the split named (``--split``, train by default) gets
  ``--rows`` rows, the other two the sizes ``data.sizes`` gives them, drawn like the
  embedded world's. Later drops append ``--rows`` rows to ``--split`` only, so a fixed test
  split keeps accuracy comparable across retrains (``--split test`` adds test rows on purpose).
- Rows are new scenes: a batch's rows are numbered after the rows already in its split, and
  row ``i`` of a split is drawn from the seed ``[seed, split, i]``, so no batch repeats an
  earlier one. Every batch uses the handwriting pools of the folder's first seed, so
  validation and test scenes stay in handwriting that no train row uses.
- ``--question-types`` and ``--digits`` shift a batch's mix: only those question types
  (video rows take those a video can ask; none: the batch is images only), scenes of
  exactly ``--digits`` digits.
- A drop replaces the folder atomically (readers see the old or the new folder, never half
  of one), and drops into the same folder take turns on a lock file beside it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from covipal.config import ConfigError, DataConfig, load_params
from covipal.io import atomic_output
from covipal.world.dataset import SPLITS, _png, features, make_sample
from covipal.world.scenes import scan_pools

MANIFEST = "incoming.json"


def drop(folder: str | Path, cfg: DataConfig, rows: int, split: str = "train", seed: int | None = None,
         question_types: list[str] | None = None, digits: int | None = None, log=print) -> dict:
    """Append ``rows`` new rows of ``split`` to the digit-world folder ``folder`` (created when absent);
    return its manifest. ``cfg`` is the world (``params.yaml``'s ``data``); ``seed`` defaults to
    the folder's first seed (``cfg.seed`` for a new folder)."""
    from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk

    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {list(SPLITS)}")
    if rows < 1:
        raise ConfigError(f"--rows {rows}: a drop needs at least 1 row")
    folder = Path(folder)
    with _turn(folder):
        manifest = read_manifest(folder)
        if manifest is None:
            manifest = {"pool_seed": cfg.seed, "batches": []}
            current = None
            plan = {s: (rows if s == split else getattr(cfg.sizes, s)) for s in SPLITS}
        else:
            current = load_from_disk(str(folder))
            plan = {split: rows}
        seed = manifest["pool_seed"] if seed is None else seed
        pools = scan_pools(manifest["pool_seed"])
        out = {}
        for name in SPLITS:
            have = 0 if current is None else len(current[name])
            if name not in plan:
                out[name] = current[name]
                continue
            shifted = name == split
            world = shifted_world(cfg, seed, question_types if shifted else None, digits if shifted else None)
            new = Dataset.from_list(_new_rows(world, name, have, plan[name], pools), features=features())
            out[name] = new if current is None else concatenate_datasets([current[name], new])
            manifest["batches"].append({"split": name, "first_row": have, "rows": plan[name], "seed": seed,
                                        "question_types": {"image": list(world.image.question_types),
                                                           "video": list(world.video.question_types)
                                                           if world.video_share > 0 else []},
                                        "digits": digits if shifted else None})
        with atomic_output(folder) as tmp:
            DatasetDict(out).save_to_disk(str(tmp))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"{folder}: " + ", ".join(f"{s} {len(out[s])} rows" for s in SPLITS) + f" (+{rows} {split})")
    return manifest


def shifted_world(cfg: DataConfig, seed: int, question_types: list[str] | None, digits: int | None) -> DataConfig:
    """``cfg`` with ``seed``, and with only ``question_types`` and scenes of exactly ``digits`` digits when given."""
    from pydantic import ValidationError

    image, video, video_share = cfg.image, cfg.video, cfg.video_share
    try:
        if question_types is not None:
            known = set(image.question_types) | set(video.question_types)
            unknown = sorted(set(question_types) - known)
            if unknown:
                raise ConfigError(f"--question-types: unknown {unknown}; the world asks {sorted(known)}")
            in_image = [t for t in question_types if t in image.question_types]
            in_video = [t for t in question_types if t in video.question_types]
            image = replace(image, question_types=in_image) if in_image else image
            video = replace(video, question_types=in_video) if in_video else video
            video_share = 0.0 if not in_video else 1.0 if not in_image else video_share  # only who can ask them
        if digits is not None:
            image = replace(image, digits=digits, min_train_digits=digits)
            video = replace(video, digits=digits, min_train_digits=digits)
        return replace(cfg, seed=seed, image=image, video=video, video_share=video_share)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"])) or "data"
        raise ConfigError(f"this batch's world is invalid ({where}: {first['msg']}); "
                          f"choose --digits (now {digits}) that fits the world's grids, at least 2") from None


def _new_rows(cfg: DataConfig, split: str, start: int, n: int, pools) -> list[dict]:
    rows = []
    for i in tqdm(range(start, start + n), desc=f"new {split} rows", unit="row", mininterval=2, disable=n < 500):
        row = make_sample(cfg, split, i, pools)
        row["images"] = [_png(im) for im in row["images"]]
        rows.append(row)
    return rows


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of an incoming folder; None when the folder does not exist. A folder that
    exists without one is not an incoming folder and is refused (a drop would overwrite it)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder} exists but is no incoming folder ({MANIFEST}: {err}); drop into a new folder, "
                          "or an empty path") from None


@contextmanager
def _turn(folder: Path):
    """Hold the lock of ``folder``'s drops (a hidden file beside it) for one drop."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covipal.world.incoming",
                                     description="Append a batch of new digit-world rows to a folder data.source "
                                                 "can point at (created with validation and test splits the first "
                                                 "time).")
    parser.add_argument("--to", required=True, help="the incoming folder, e.g. data/incoming")
    parser.add_argument("--rows", type=int, required=True, help="rows in this batch")
    parser.add_argument("--split", default="train", choices=SPLITS, help="split the batch goes to (default: train)")
    parser.add_argument("--seed", type=int, help="seed of the batch's scenes (default: the folder's first seed)")
    parser.add_argument("--question-types", help="comma-separated: only these question types in this batch")
    parser.add_argument("--digits", type=int, help="scenes of exactly this many digits in this batch")
    parser.add_argument("--params", default="params.yaml", help="the world's shape: its data section")
    args = parser.parse_args(argv)
    try:
        cfg = load_params(args.params).data
        types = [t.strip() for t in args.question_types.split(",") if t.strip()] if args.question_types else None
        drop(args.to, cfg, args.rows, args.split, args.seed, types, args.digits)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
