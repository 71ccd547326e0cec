"""A pretrained Hugging Face LVLM, pruned by any registered method, on a VQA-style data set.

    python -m covipal.evaluation.hf_vqa --model llava-hf/llava-1.5-7b-hf --data lmms-lab/VQAv2 \\
        --split validation --method fastv --ratio 0.25 --limit 1000 --output vqa_fastv.json

The data set (``datasets.load_from_disk`` for a local folder, else ``load_dataset``) needs
an image column, a question column and an answer column (names configurable); the
answer is one string or a list of human answers (VQAv2's ``answers``, as strings or
``{"answer": ...}`` records). The model (``AutoModelForImageTextToText`` +
``AutoProcessor``) gets the processor's chat template when it has one (one user turn:
the image, then the question in ``--prompt``), else ``"<image token>\\n<question>"``; it
answers greedily and the answer is scored after VQA normalisation (:func:`normalize`):

- ``vqa``: ``min(1, #matching human answers / 3)`` (the VQA accuracy, without the official
  10-choose-9 averaging);
- ``exact``: 1 if the answer equals any reference answer.

Every prompt is pruned by ``--method`` at ``--ratio`` (``--method none`` runs unpruned);
the result states the budget both ways (vision tokens entering the LLM, averaged over
its layers) next to the unpruned count.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# --- answer normalisation (after the official VQA evaluation's processPunctuation / processDigitArticle) ---

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "didnt": "didn't", "hasnt": "hasn't",
                 "havent": "haven't", "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's",
                 "whats": "what's", "shouldnt": "shouldn't", "couldnt": "couldn't", "wouldnt": "wouldn't"}
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")


def normalize(answer: str) -> str:
    """VQA normalisation: lower case, punctuation removed (decimal points kept), number words
    as digits, articles dropped, common contractions restored."""
    original = text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        if (p + " " in original or " " + p in original) or _COMMA_DIGITS.search(original) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def references(answer) -> list[str]:
    """A row's reference answers as strings: one string, a list of strings, or VQAv2 ``{"answer": ..}`` records."""
    if isinstance(answer, str):
        return [answer]
    if isinstance(answer, dict) and "answer" in answer:
        return references(answer["answer"])
    if isinstance(answer, (list, tuple)):
        return [a["answer"] if isinstance(a, dict) else str(a) for a in answer]
    raise ValueError(f"cannot read reference answers from {answer!r}; give a string or a list of strings")


def vqa_score(prediction: str, answers, metric: str = "vqa") -> float:
    """Score of ``prediction`` against the row's reference ``answers`` (see the module docstring)."""
    pred = normalize(prediction)
    refs = [normalize(a) for a in references(answers)]
    if metric == "exact":
        return float(pred in refs)
    if metric == "vqa":
        return min(1.0, sum(r == pred for r in refs) / 3)
    raise ValueError(f"metric must be 'vqa' or 'exact', got {metric!r}")


# --- the evaluator ----------------------------------------------------------------------------------


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


def build_prompts(processor, questions: list[str], template: str) -> list[str]:
    """One prompt per question: the chat template with an image and the question, or ``<image>\\nquestion``."""
    texts = [template.format(question=q) for q in questions]
    if getattr(processor, "chat_template", None):
        return [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                             {"type": "text", "text": t}]}],
                                              add_generation_prompt=True) for t in texts]
    image_token = getattr(processor, "image_token", None)
    if image_token is None:
        raise ValueError(f"{type(processor).__name__} has neither a chat template nor an image_token; "
                         "give a processor with one of them")
    return [f"{image_token}\n{t}" for t in texts]


def evaluate_vqa(model, processor, rows, method: str = "none", ratio: float = 1.0, method_args: dict | None = None,
                 image_column: str = "image", question_column: str = "question", answer_column: str = "answer",
                 prompt: str = "{question}", metric: str = "vqa", batch_size: int = 8, max_new_tokens: int = 16,
                 n_bootstrap: int = 1000, progress: bool = True) -> dict:
    """Accuracy of ``model`` pruned by ``method`` at ``ratio`` on ``rows``, with a bootstrap interval.

    Returns ``{"accuracy", "ci_low", "ci_high", "rows", "tokens_full", "tokens_entering",
    "tokens_layer_average", "method", "ratio", "metric", "predictions": [{question, prediction,
    answers, score, tokens_entering, tokens_layer_average}]}``; token counts are vision tokens
    per row (means over rows at the top level).
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from covipal.evaluation.bootstrap import mean_interval
    from covipal.pruning import get_method

    missing = [c for c in (image_column, question_column, answer_column) if c not in rows.column_names]
    if missing:
        raise ValueError(f"the data set lacks column(s) {missing} (it has {rows.column_names}); "
                         "name the right ones with --image-column / --question-column / --answer-column")
    pruner = None if method == "none" else get_method(method, reserve_ratio=ratio, **(method_args or {}))
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # generation continues every row from the last column
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc=f"vqa {method}@{ratio:g}", disable=not progress):
        batch = rows[start:start + batch_size]
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in batch[image_column]]
        texts = build_prompts(processor, batch[question_column], prompt)
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            if pruner is None:
                generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                n_vision = _vision_counts(model, inputs["input_ids"])
                budgets = [(n, float(n)) for n in n_vision]
            else:
                with pruner(model) as run:
                    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                n_vision = run.n_vision.tolist()
                budgets = [(b.entering, b.layer_average) for b in run.budget()]
        answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for q, a, refs, n, (entering, average) in zip(batch[question_column], answers, batch[answer_column],
                                                      n_vision, budgets):
            out.append({"question": q, "prediction": a.strip(), "answers": references(refs),
                        "score": vqa_score(a, refs, metric), "tokens_full": int(n), "tokens_entering": int(entering),
                        "tokens_layer_average": float(average)})
    ci = mean_interval(np.array([p["score"] for p in out]), n_bootstrap)
    mean = {k: float(np.mean([p[k] for p in out])) for k in ("tokens_full", "tokens_entering", "tokens_layer_average")}
    return {"method": method, "ratio": ratio, "metric": metric, "rows": len(out), "accuracy": ci.mean,
            "ci_low": ci.low, "ci_high": ci.high, **mean, "predictions": out}


def _vision_counts(model, input_ids) -> list[int]:
    """Vision tokens per prompt, by the adapter table's token ids."""
    import torch

    from covipal.pruning import get_adapter

    ids = torch.tensor(get_adapter(model).vision_token_ids(model.config), device=input_ids.device)
    return torch.isin(input_ids, ids).sum(dim=1).tolist()


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
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--question-column", default="question")
    parser.add_argument("--answer-column", default="answer")
    parser.add_argument("--prompt", default="{question}\nAnswer the question using a single word or phrase.",
                        help="user text; {question} is replaced by the question")
    parser.add_argument("--metric", choices=["vqa", "exact"], default="vqa")
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
