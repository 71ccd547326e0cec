"""VQA scoring of generated answers: normalisation, reference answers, VQA accuracy, greedy generation.

A generated answer is scored after VQA normalisation (:func:`normalize`) against the row's
reference answers (:func:`row_references`: its ``answers``, else ``[answer]``):

- ``vqa``: ``min(1, #matching reference answers / 3)`` (the VQA accuracy, without the official
  10-choose-9 averaging);
- ``exact``: 1 if the answer equals any reference answer.
"""

from __future__ import annotations

import re

METRICS = ("vqa", "exact")

# after the official VQA evaluation's processPunctuation / processDigitArticle
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
    """Reference answers as strings: one string, a list of strings, or VQAv2 ``{"answer": ..}`` records."""
    if isinstance(answer, str):
        return [answer]
    if isinstance(answer, dict) and "answer" in answer:
        return references(answer["answer"])
    if isinstance(answer, (list, tuple)):
        return [a["answer"] if isinstance(a, dict) else str(a) for a in answer]
    raise ValueError(f"cannot read reference answers from {answer!r}; give a string or a list of strings")


def row_references(row: dict) -> list[str]:
    """A data-set row's reference answers: its ``answers`` when it has a non-empty list, else ``[answer]``."""
    answers = row.get("answers")
    return references(answers) if answers else [row["answer"]]


def vqa_score(prediction: str, answers, metric: str = "vqa") -> float:
    """Score of ``prediction`` against the reference ``answers`` (see the module docstring)."""
    pred = normalize(prediction)
    refs = [normalize(a) for a in references(answers)]
    if metric == "exact":
        return float(pred in refs)
    if metric == "vqa":
        return min(1.0, sum(r == pred for r in refs) / 3)
    raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")


def generate_answers(model, prompt: dict, tokenizer, max_new_tokens: int) -> list[str]:
    """Greedy answers of ``model`` to the left-padded ``prompt`` batch: the new tokens, decoded and stripped."""
    pad = getattr(tokenizer, "pad_token_id", None)
    extra = {} if pad is None else {"pad_token_id": pad}
    generated = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **extra)
    texts = tokenizer.batch_decode(generated[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip() for t in texts]
