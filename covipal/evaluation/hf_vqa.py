"""A pretrained Hugging Face LVLM, pruned by any registered method, on a VQA-style data set.

    python -m covipal.evaluation.hf_vqa --model llava-hf/llava-1.5-7b-hf --data lmms-lab/VQAv2 \\
        --split validation --method fastv --ratio 0.25 --limit 1000 --output vqa_fastv.json

A command over the ``evaluate`` stage's harness (:func:`covipal.evaluation.harness.evaluate_methods`
with ``generate`` scoring), for a model and data set outside the pipeline. The data set
(``datasets.load_from_disk`` for a local folder, else ``load_dataset``) needs an image
column (one image, or a list of frames), a question column and an answer column (names
configurable); the answer is one string or a list of human answers (VQAv2's ``answers``,
as strings or ``{"answer": ...}`` records). The model (``AutoModelForImageTextToText`` +
``AutoProcessor``) is prompted as :class:`covipal.training.hf_inputs.HFInputs` prompts it
(the processor's chat template when it has one: one user turn, the images, then the
question in ``--prompt``); it answers greedily and the answer is scored after VQA
normalisation (:mod:`covipal.evaluation.vqa`: ``vqa`` accuracy or ``exact`` match).

Every prompt is pruned by ``--method`` at ``--ratio`` (``--method none`` runs unpruned);
the result states the budget both ways (vision tokens entering the LLM, averaged over
its layers) next to the unpruned count, and the unpruned accuracy on the same rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from covipal.evaluation.vqa import METRICS, references, vqa_score


def load_rows(data: str, split: str | None = None, config: str | None = None, limit: int | None = None):
    """The first ``limit`` rows of ``split`` of a saved folder or a hub data set."""
    from datasets import Dataset, load_dataset, load_from_disk

    if Path(data).exists():
        ds = load_from_disk(data)
        if not isinstance(ds, Dataset):
            if split is None or split not in ds:
                raise ValueError(f"{data} holds splits {list(ds)}; choose one with --split")
            ds = ds[split]
    else:
        ds = load_dataset(data, config, split=split or "validation")
    return ds if limit is None or limit >= len(ds) else ds.select(range(limit))


def vqa_rows(ds, image_column: str = "image", question_column: str = "question", answer_column: str = "answer",
             prompt: str = "{question}") -> list[dict]:
    """Rows of ``ds`` in the pipeline's schema: ``images`` (a list), ``question`` (``prompt`` filled in),
    ``answers``, ``answer`` (the most common one) and ``modality`` (video for several pictures)."""
    missing = [c for c in (image_column, question_column, answer_column) if c not in ds.column_names]
    if missing:
        raise ValueError(f"the data set lacks column(s) {missing} (it has {ds.column_names}); "
                         "name the right ones with --image-column / --question-column / --answer-column")
    rows = []
    for i, row in enumerate(ds):
        images = row[image_column]
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        answers = references(row[answer_column])
        if not images or not answers:
            raise ValueError(f"row {i} has no {'image' if not images else 'reference answer'}; "
                             "filter such rows out of the data set")
        rows.append({"images": images, "question": prompt.format(question=row[question_column]),
                     "answers": answers, "answer": Counter(answers).most_common(1)[0][0],
                     "modality": "image" if len(images) == 1 else "video"})
    return rows


def evaluate_vqa(model, processor, rows, method: str = "none", ratio: float = 1.0, method_args: dict | None = None,
                 image_column: str = "image", question_column: str = "question", answer_column: str = "answer",
                 prompt: str = "{question}", metric: str = "vqa", batch_size: int = 8, max_new_tokens: int = 16,
                 n_bootstrap: int = 1000, progress: bool = True) -> dict:
    """Accuracy of ``model`` pruned by ``method`` at ``ratio`` on the data set ``rows``, with a bootstrap interval.

    Returns ``{"accuracy", "ci_low", "ci_high", "unpruned_accuracy", "rows", "tokens_full",
    "tokens_entering", "tokens_layer_average", "method", "ratio", "metric", "predictions":
    [{question, prediction, answers, score, tokens_full, tokens_entering, tokens_layer_average}]}``;
    token counts are vision tokens per row (means over rows at the top level).
    """
    import numpy as np

    from covipal.evaluation.bootstrap import mean_interval
    from covipal.evaluation.harness import FULL, GENERATE, evaluate_methods
    from covipal.pruning import get_method
    from covipal.training.hf_inputs import HFInputs

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    if method == "none" and ratio != FULL:
        raise ValueError(f"--method none prunes nothing; its ratio is 1, not {ratio}")
    data = vqa_rows(rows, image_column, question_column, answer_column, prompt)
    ratios = sorted({FULL, ratio}, reverse=True)

    def make(name: str, r: float):
        return get_method(method, reserve_ratio=r, **(method_args or {}))

    out = evaluate_methods(model, HFInputs(processor), data, make, [method], ratios, batch_size, progress,
                           scoring=GENERATE, max_new_tokens=max_new_tokens)
    res, full = out[(method, ratio)], out[(method, FULL)]
    questions = rows[question_column]
    predictions = [{"question": q, "prediction": p, "answers": r["answers"],
                    "score": vqa_score(p, r["answers"], metric), "tokens_full": int(n), "tokens_entering": int(e),
                    "tokens_layer_average": float(a)}
                   for q, p, r, n, e, a in zip(questions, res.prediction, data, res.n_vision, res.entering,
                                               res.layer_average)]
    unpruned = [vqa_score(p, r["answers"], metric) for p, r in zip(full.prediction, data)]
    ci = mean_interval(np.array([p["score"] for p in predictions]), n_bootstrap)
    mean = {k: float(np.mean([p[k] for p in predictions]))
            for k in ("tokens_full", "tokens_entering", "tokens_layer_average")}
    return {"method": method, "ratio": ratio, "metric": metric, "rows": len(predictions), "accuracy": ci.mean,
            "ci_low": ci.low, "ci_high": ci.high, "unpruned_accuracy": float(np.mean(unpruned)), **mean,
            "predictions": predictions}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m covipal.evaluation.hf_vqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="hub id or local folder of the LVLM and its processor")
    parser.add_argument("--revision", default=None, help="model revision (hub)")
    parser.add_argument("--data", required=True, help="hub id or folder written by save_to_disk")
    parser.add_argument("--split", default=None, help="split (default: validation for hub data sets)")
    parser.add_argument("--config", default=None, help="data set configuration (hub)")
    parser.add_argument("--method", default="none", help="registered pruning method, or none (default)")
    parser.add_argument("--ratio", type=float, default=1.0, help="reserve ratio r in (0, 1] (default 1)")
    parser.add_argument("--method-args", default="{}", help='extra method fields as JSON, e.g. \'{"layer": 2}\'')
    parser.add_argument("--image-column", default="image", help="one image or a list of frames per row")
    parser.add_argument("--question-column", default="question")
    parser.add_argument("--answer-column", default="answer", help="one answer or a list of human answers per row")
    parser.add_argument("--prompt", default="{question}\nAnswer the question using a single word or phrase.",
                        help="user text; {question} is replaced by the question")
    parser.add_argument("--metric", choices=list(METRICS), default="vqa")
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="torch dtype of the model (auto, float16, bfloat16, float32)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--output", default=None, help="write the result (with every prediction) to this JSON file")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from covipal.io import write_json
    from covipal.pruning import available_methods

    if args.method != "none" and args.method not in available_methods():
        parser.error(f"--method {args.method!r} is not registered; choose none or one of {available_methods()}")
    if not 0 < args.ratio <= 1:
        parser.error(f"--ratio {args.ratio} is outside (0, 1]; it is the kept share of vision tokens")
    try:
        method_args = json.loads(args.method_args)
    except json.JSONDecodeError as err:
        parser.error(f"--method-args is not valid JSON ({err}); e.g. '{{\"layer\": 2}}'")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForImageTextToText.from_pretrained(args.model, revision=args.revision, dtype=dtype).to(device)
    processor = AutoProcessor.from_pretrained(args.model, revision=args.revision)
    rows = load_rows(args.data, args.split, args.config, args.limit)
    result = evaluate_vqa(model.eval(), processor, rows, args.method, args.ratio, method_args, args.image_column,
                          args.question_column, args.answer_column, args.prompt, args.metric, args.batch_size,
                          args.max_new_tokens)
    summary = {k: v for k, v in result.items() if k != "predictions"}
    print(json.dumps(summary, indent=2))
    if args.output:
        write_json(args.output, {**result, "model": args.model, "data": args.data, "split": args.split})
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
