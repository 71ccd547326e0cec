"""Where the reference LVLM's grounded heads look, per question type (docs/reference_model.md).

    python scripts/grounding_hits.py                       # models/base on 600 test images
    python scripts/grounding_hits.py --model /tmp/base --rows 2000 --heads position=1

For each test question it reads the attention of decoder layer ``--layer`` at the last
question word (the token that predicts the answer), on the head grounded for the question's
type (``--heads``, default head 0, as ``base.grounding_heads``), and prints per type: the
attention mass on the ground-truth relevant cells, how often the most attended vision token
is one of them ("hit"), and the answer accuracy when it is and when it is not. A type whose
answers fail with hits high is a readout problem; with hits low, a grounding problem.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--data", default="data/world")
    ap.add_argument("--modality", default="image", choices=["image", "video"])
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--heads", nargs="*", default=[], help="type=head pairs, e.g. position=1")
    args = ap.parse_args()

    import numpy as np
    import torch
    from datasets import load_from_disk

    from covipal.base_model import load_base
    from covipal.reference.train import AttentionRows, EncodedSplit, batch_inputs, predict

    heads = {k: int(v) for k, v in (h.split("=") for h in args.heads)}
    model, processor = load_base(Path(args.model))
    split = load_from_disk(args.data)["test"].filter(lambda r: r["modality"] == args.modality,
                                                     keep_in_memory=True)
    data = EncodedSplit(model, processor, split.select(range(min(args.rows, len(split)))))
    answers = predict(model, processor, data, 64)
    probe = AttentionRows(model, args.layer)
    stats = defaultdict(lambda: defaultdict(list))
    for start in range(0, len(data), 64):
        idx = list(range(start, min(start + 64, len(data))))
        inputs = batch_inputs(model, processor, data, idx, train=False)
        probe.rows = torch.full((len(idx), 1), inputs["input_ids"].shape[1] - 1)  # left-padded: last = question end
        with torch.no_grad():
            model(**inputs)
        for j, i in enumerate(idx):
            row = data.rows[i]
            vision = (inputs["input_ids"][j] == processor.image_token_id).nonzero()[:, 0]
            attn = probe.probs[j, heads.get(row["question_type"], 0), 0, vision]  # (n_vision,)
            cells = [processor.token_index(f, r, c, row["n_frames"]) for f, r, c in row["relevant"]]
            s = stats[row["question_type"]]
            s["mass"].append(attn[cells].sum().item() if cells else float("nan"))
            s["hit"].append(bool(cells) and attn.argmax().item() in cells)
            s["ok"].append(answers[i] == row["answer"])
    probe.remove()
    print(f"{'type':10} {'n':>5} {'mass':>6} {'hit':>6} {'acc':>6} {'acc|hit':>8} {'acc|miss':>8}")
    for qtype, s in sorted(stats.items()):
        hit, ok = np.array(s["hit"]), np.array(s["ok"])
        on_hit = f"{ok[hit].mean():.3f}" if hit.any() else "-"
        on_miss = f"{ok[~hit].mean():.3f}" if (~hit).any() else "-"
        print(f"{qtype:10} {len(ok):5d} {np.nanmean(s['mass']):6.3f} {hit.mean():6.3f} {ok.mean():6.3f} "
              f"{on_hit:>8} {on_miss:>8}")


if __name__ == "__main__":
    main()
