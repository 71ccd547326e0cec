"""What the rest of the budget should hold once the relevant cells are kept (docs/evaluation.md).

    python scripts/budget_fill.py                       # models/base, test images, r = 0.25 and 0.125
    python scripts/budget_fill.py --modality video --types relation
    python scripts/budget_fill.py --ppm models/stage1 models/ppm   # what each PPM's budget holds

Every test question of the chosen types is answered by the base model pruned three ways, side
by side on the same rows: the ground-truth relevant cells are always kept, and the rest of the
budget (ceil(r n_v) tokens) is filled with other digits first, random cells, or empty cells
first (random order within each group, seed 0). Prints accuracy per way, ratio and type.
With ``--ppm``, prints instead what each PPM's own top-k holds on those rows: the share of the
relevant cells kept, and the share of digits (non-empty cells) among its other kept tokens.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FILLS = ("digits_first", "random", "empty_first")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--data", default="data/world")
    ap.add_argument("--modality", default="image", choices=["image", "video"])
    ap.add_argument("--types", nargs="+", default=["colour", "count", "relation"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.125])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ppm", nargs="+", help="PPM folders: report what their budgets hold instead")
    args = ap.parse_args()

    import numpy as np
    import torch
    from datasets import load_from_disk

    from covipal.base_model import load_base
    from covipal.evaluation.cells import relevant_tokens
    from covipal.evaluation.harness import evaluate_methods
    from covipal.pruning.base import Pruner
    from covipal.reference.train import occupancy
    from covipal.training.data import ReferenceInputs

    @dataclass
    class Preset(Pruner):
        """Scores fixed in advance for one batch: ``table`` (B, n_v)."""

        table: torch.Tensor | None = None

        def score(self, ctx):
            return self.table[:, :ctx.vision_mask.shape[1]].to(ctx.vision.device)

    model, processor = load_base(Path(args.model))
    inputs = ReferenceInputs(processor)
    split = load_from_disk(args.data)["test"]
    rows = list(split.filter(lambda r: r["modality"] == args.modality and r["question_type"] in args.types,
                             keep_in_memory=True))
    if args.ppm:
        return ppm_budgets(model, inputs, rows, args)
    rng = np.random.default_rng(0)
    correct = defaultdict(list)
    for start in range(0, len(rows), args.batch):
        chunk = rows[start:start + args.batch]
        occupied = [occupancy(processor.pictures(inputs.frames(r))) for r in chunk]  # (n_v,) bool each
        width = max(len(o) for o in occupied)
        tables = {fill: torch.zeros(len(chunk), width) for fill in FILLS}
        for j, (row, occ) in enumerate(zip(chunk, occupied)):
            noise = rng.random(len(occ)) * 0.5
            relevant = relevant_tokens(row["relevant"], len(row["images"]), processor)
            for fill, bonus in zip(FILLS, (occ, 0.0, ~occ)):
                s = noise + bonus
                s[relevant] += 10.0
                tables[fill][j, :len(occ)] = torch.from_numpy(s)
        out = evaluate_methods(model, inputs, chunk, lambda m, r: Preset(reserve_ratio=r, table=tables[m]),
                               list(FILLS), args.ratios, batch_size=args.batch, progress=False)
        for (fill, ratio), res in out.items():
            for j, row in enumerate(chunk):
                correct[(fill, ratio, row["question_type"])].append(bool(res.score[j]))
    print(f"{args.modality}: accuracy with the relevant cells kept, by what fills the rest")
    print(f"{'fill':14} {'r':>6} " + " ".join(f"{t:>9}" for t in args.types))
    for ratio in args.ratios:
        for fill in FILLS:
            print(f"{fill:14} {ratio:6.3f} " + " ".join(f"{np.mean(correct[(fill, ratio, t)]):9.3f}"
                                                         for t in args.types))


def ppm_budgets(model, inputs, rows: list[dict], args) -> None:
    """Per PPM and ratio: mean share of relevant cells kept, mean digit share of the other kept tokens."""
    import numpy as np
    import torch

    from covipal.evaluation.cells import kept_tokens, relevant_tokens
    from covipal.pruning import get_method
    from covipal.reference.train import occupancy

    processor = inputs.processor
    print(f"{args.modality}: what each PPM keeps ({len(rows)} rows of {', '.join(args.types)})")
    print(f"{'ppm':20} {'r':>6} {'relevant kept':>14} {'digits among the rest':>22}")
    for ppm in args.ppm:
        for ratio in args.ratios:
            relevant_kept, digits = [], []
            for start in range(0, len(rows), args.batch):
                chunk = rows[start:start + args.batch]
                prompt = inputs.prompt(chunk)
                with torch.no_grad(), get_method("covipal", reserve_ratio=ratio, ppm=ppm)(model) as run:
                    model(**prompt)
                for j, row in enumerate(chunk):
                    kept = kept_tokens(run.kept_vision[j], prompt["input_ids"][j], processor.image_token_id)
                    relevant = set(relevant_tokens(row["relevant"], len(row["images"]), processor))
                    occupied = occupancy(processor.pictures(inputs.frames(row)))
                    rest = [k for k in kept if k not in relevant]
                    if relevant:
                        relevant_kept.append(np.mean([k in kept for k in relevant]))
                    if rest:
                        digits.append(np.mean(occupied[rest]))
            print(f"{ppm:20} {ratio:6.3f} {np.mean(relevant_kept):14.3f} {np.mean(digits):22.3f}")


if __name__ == "__main__":
    main()
