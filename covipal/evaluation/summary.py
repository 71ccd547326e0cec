"""Turn per-row outcomes into the stage's metrics, plot table and Markdown report."""

from __future__ import annotations

from collections import Counter

import numpy as np

from covipal.evaluation.bootstrap import difference_interval, mean_interval
from covipal.evaluation.harness import FIRST_TOKEN, FULL, Results
from covipal.evaluation.vqa import normalize, row_references, vqa_score

ALL = "all"
CSV_FIELDS = ["method", "ratio", "modality", "question_type", "accuracy", "ci_low", "ci_high", "rows",
              "tokens_full", "tokens_target", "tokens_entering", "tokens_layer_average", "relevant_kept", "metric"]
OVER = 1.0  # a layer average more than this above the target is flagged: the method cannot reach the budget
MIN_LEAD = 0.03  # a clear lead of covipal over a training-free baseline: at least 3 points, intervals apart
CHANCE_MARGIN = 0.05  # an unpruned accuracy less than this above the most-common-answer baseline is at chance
METRIC = {"first_token": "first_token", "generate": "vqa"}  # the score a scoring gives a row
SCORING_TEXT = {"first_token": "share of rows whose greedy next token is the answer's first token",
                "generate": "VQA accuracy of the greedy generated answer against the reference answers"}


def ratio_key(ratio: float) -> str:
    """``0.25 -> "r0.25"``: the key of a ratio in ``metrics/evaluate.json``."""
    return f"r{ratio:g}"


def _nanmean(x: np.ndarray) -> float | None:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else None


def table(results: dict[tuple[str, float], Results], rows: list[dict], n_bootstrap: int, confidence: float,
          seed: int, scoring: str = FIRST_TOKEN) -> list[dict]:
    """One record per (method, ratio, modality, question type or ``"all"``): :data:`CSV_FIELDS`.

    ``accuracy`` (the mean score) with its bootstrap interval; ``tokens_*`` are the vision
    tokens per row (unpruned, the budget ``ceil(r n_v)``, entering the LLM, averaged over
    layers) and ``relevant_kept`` the share of relevant cells kept, averaged over the
    group's rows that have measured relevant cells (None when none has), ``metric`` what
    a row's score is (:data:`METRIC`: ``first_token`` or ``vqa``, after ``scoring``).
    Question types are grouped only when every row has a ``question_type``.
    """
    from covipal.pruning import n_keep

    modality = np.array([r["modality"] for r in rows])
    typed = all(r.get("question_type") is not None for r in rows)
    qtype = np.array([r["question_type"] if typed else ALL for r in rows])
    out = []
    for (method, ratio), res in results.items():
        for m in sorted(set(modality)):
            for t in [ALL] + (sorted(set(qtype[modality == m])) if typed else []):
                sel = (modality == m) & ((qtype == t) if t != ALL else True)
                ci = mean_interval(res.score[sel], n_bootstrap, confidence, seed)
                out.append({"method": method, "ratio": ratio, "modality": m, "question_type": t,
                            "accuracy": ci.mean, "ci_low": ci.low, "ci_high": ci.high, "rows": int(sel.sum()),
                            "tokens_full": float(res.n_vision[sel].mean()),
                            "tokens_target": float(np.mean([n_keep(int(v), ratio) for v in res.n_vision[sel]])),
                            "tokens_entering": float(res.entering[sel].mean()),
                            "tokens_layer_average": float(res.layer_average[sel].mean()),
                            "relevant_kept": _nanmean(res.relevant_kept[sel]), "metric": METRIC[scoring]})
    return out


def metrics(records: list[dict]) -> dict:
    """``{method: {"r0.25": {modality: {accuracy, ci_low, ci_high, rows, tokens_*, relevant_kept,
    by_type: {type: accuracy}}}}}`` from :func:`table`'s records."""
    out: dict = {}
    for rec in records:
        cell = out.setdefault(rec["method"], {}).setdefault(ratio_key(rec["ratio"]), {}).setdefault(rec["modality"], {})
        if rec["question_type"] == ALL:
            cell.update({k: rec[k] for k in CSV_FIELDS[4:]})
        else:
            cell.setdefault("by_type", {})[rec["question_type"]] = rec["accuracy"]
    return out


def over_budget(rec: dict) -> bool:
    """Whether a record's layer-averaged budget exceeds its target by more than rounding."""
    return rec["tokens_layer_average"] > rec["tokens_target"] + OVER


def _fmt(rec: dict) -> str:
    mark = " †" if over_budget(rec) else ""
    if rec["ci_low"] is None:
        return f"{rec['accuracy']:.3f}{mark}"
    return f"{rec['accuracy']:.3f} [{rec['ci_low']:.3f}, {rec['ci_high']:.3f}]{mark}"


def report(records: list[dict], confidence: float, title: str = "Accuracy at equal budgets",
           scoring: str = FIRST_TOKEN, notes: list[str] | None = None, preface: str = "") -> str:
    """Markdown: per modality, accuracy [interval] of each method at each ratio, then the budgets
    (entering / layer average) and, when measured, the relevant cells kept.

    ``scoring`` names how answers were scored (:data:`SCORING_TEXT`); ``notes`` are lines
    added under the explanation (methods skipped, what was not measured); ``preface`` is
    Markdown placed before the tables (e.g. :func:`unpruned_report`'s warning).
    """
    ratios = sorted({r["ratio"] for r in records}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in records))
    allrec = {(r["method"], r["ratio"], r["modality"]): r for r in records if r["question_type"] == ALL}
    cells = any(r["relevant_kept"] is not None for r in records)
    lines = [f"# {title}", "",
             f"Test-split accuracy ({SCORING_TEXT[scoring]}) with {confidence:.0%} bootstrap intervals. Budget: "
             "vision tokens per row entering the LLM / averaged over its layers."
             + (" Relevant kept: share of the ground-truth relevant cells among the vision tokens kept (rows with "
                "relevant cells)." if cells else ""),
             "", "† more vision tokens averaged over layers than the budget ceil(r n_v): an in-LLM method whose "
             "first layers, which see every token, already cost more (it keeps one token after them)."]
    lines += [f"\n{note}" for note in notes or []]
    if preface:
        lines.append(preface.rstrip("\n"))
    for modality in sorted({r["modality"] for r in records}):
        some = next(r for r in records if r["modality"] == modality and r["question_type"] == ALL)
        lines += ["", f"## {modality} ({some['rows']} rows, {some['tokens_full']:.0f} vision tokens per row)", "",
                  "| method | " + " | ".join(f"r = {r:g}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_fmt(allrec[(m, r, modality)]) for r in ratios) + " |")
        lines += ["", "| budget (entering / layer avg)" + (", relevant kept" if cells else "") + " | "
                  + " | ".join(f"r = {r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for m in methods:
            row = []
            for r in ratios:
                rec = allrec[(m, r, modality)]
                kept = "–" if rec["relevant_kept"] is None else f"{rec['relevant_kept']:.2f}"
                row.append(f"{rec['tokens_entering']:.1f} / {rec['tokens_layer_average']:.1f}"
                           + (f", {kept}" if cells else ""))
            lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def unpruned_check(unpruned: Results, rows: list[dict], scoring: str) -> list[dict]:
    """Per modality, whether the unpruned model's accuracy is zero or at chance.

    Chance is the accuracy of always giving the modality's most common answer (``answer``
    after VQA normalisation), scored as the model's answers are: for a yes/no set about
    0.5. Each record: ``modality, rows, accuracy, chance, common_answer`` and ``status``:
    ``"zero"``, ``"chance"`` (less than :data:`CHANCE_MARGIN` above chance, and not every
    answer right) or ``"ok"``.
    """
    modality = np.array([r["modality"] for r in rows])
    out = []
    for m in sorted(set(modality)):
        sel = np.flatnonzero(modality == m)
        common = Counter(normalize(rows[i]["answer"]) for i in sel).most_common(1)[0][0]
        if scoring == FIRST_TOKEN:
            chance = float(np.mean([normalize(rows[i]["answer"]) == common for i in sel]))
        else:
            chance = float(np.mean([vqa_score(common, row_references(rows[i])) for i in sel]))
        accuracy = float(unpruned.score[sel].mean())
        status = "zero" if accuracy == 0 else "chance" if accuracy < min(chance + CHANCE_MARGIN, 1.0) else "ok"
        out.append({"modality": m, "rows": len(sel), "accuracy": accuracy, "chance": chance,
                    "common_answer": common, "status": status})
    return out


def unpruned_report(checks: list[dict], unpruned: Results, rows: list[dict], scoring: str,
                    max_new_tokens: int, examples: int = 3) -> str:
    """Markdown: a warning for each modality whose unpruned accuracy is zero or at chance, with the
    likely causes and a few of the model's answers; empty when every modality is above chance."""
    bad = [c for c in checks if c["status"] != "ok"]
    if not bad:
        return ""
    lines = ["", "## Warning: the unpruned model does not answer these rows", ""]
    for c in bad:
        what = ("every answer is wrong" if c["status"] == "zero" else
                f"no better than always answering \"{c['common_answer']}\", which scores {c['chance']:.3f}")
        lines.append(f"- {c['modality']}: the unpruned model scores {c['accuracy']:.3f} on {c['rows']} rows: {what}.")
    lengths = (f"`evaluate.max_new_tokens` ({max_new_tokens}) cuts the answers short"
               if scoring != FIRST_TOKEN else
               "the answers have several tokens but only the first one is scored (set `evaluate.scoring: generate`)")
    lines += ["", "Pruned accuracies compared against this say little about the methods. Likely causes: the prompt "
              "(the model's chat template and `model.prompt`) does not ask for the short answer the data set holds; "
              "the answer format differs (a sentence, a synonym or a different number format where the references "
              "hold one word; answers are compared after VQA normalisation); " + lengths + "; the model was never "
              "trained for this task (random or untrained weights).", "", "Some of its answers:", "",
              "| modality | question | answer given | reference answers |", "|---|---|---|---|"]
    for c in bad:
        for i in [i for i, r in enumerate(rows) if r["modality"] == c["modality"]][:examples]:
            refs = ", ".join(dict.fromkeys(row_references(rows[i])))
            lines.append(f"| {c['modality']} | {_cell(rows[i]['question'])} | {_cell(unpruned.prediction[i])} | "
                         f"{_cell(refs)} |")
    return "\n".join(lines) + "\n"


def skipped_report(skipped: dict[str, str]) -> str:
    """Markdown: the methods not run on this model, each with the reason; empty when none was skipped."""
    if not skipped:
        return ""
    lines = ["", "## Methods not run on this model", ""]
    lines += [f"- {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines) + "\n"


def _cell(text) -> str:
    """``text`` as one Markdown table cell: one line, no pipes."""
    return str(text).replace("\n", " ").replace("|", "/") or "(empty)"


def leads(results: dict[tuple[str, float], Results], rows: list[dict], leader: str, baselines: list[str],
          n_bootstrap: int, confidence: float, seed: int) -> list[dict]:
    """Accuracy lead of ``leader`` over each baseline, per modality and ratio < 1, on the same rows.

    Each record: ``modality, ratio, baseline, lead`` (accuracy difference) with its paired
    bootstrap interval ``ci_low, ci_high``; ``separate``: the two methods' own intervals
    (as in :func:`table`) do not overlap; ``clear``: a lead of at least :data:`MIN_LEAD`
    with separate intervals; ``equal_budget``: the baseline kept to the budget averaged over
    layers (an in-LLM method cannot go below what its first, unpruned layers cost, e.g.
    r = 0.125 on a 4-layer LLM), else the comparison is not at equal budgets.
    """
    from covipal.pruning import n_keep

    modality = np.array([r["modality"] for r in rows])
    ratios = sorted({r for (m, r) in results if m == leader and r < 1}, reverse=True)
    out = []
    for m in sorted(set(modality)):
        sel = modality == m
        for ratio in ratios:
            ours = results[(leader, ratio)].score[sel]
            own = mean_interval(ours, n_bootstrap, confidence, seed)
            for base in baselines:
                theirs = results[(base, ratio)].score[sel]
                other = mean_interval(theirs, n_bootstrap, confidence, seed)
                diff = difference_interval(ours, theirs, n_bootstrap, confidence, seed)
                separate = own.low is not None and other.high is not None and own.low > other.high
                res = results[(base, ratio)]
                target = np.mean([n_keep(int(v), ratio) for v in res.n_vision[sel]])
                out.append({"modality": m, "ratio": ratio, "baseline": base, "lead": diff.mean,
                            "ci_low": diff.low, "ci_high": diff.high, "separate": bool(separate),
                            "clear": bool(separate and diff.mean >= MIN_LEAD),
                            "equal_budget": bool(res.layer_average[sel].mean() <= target + OVER)})
    return out


def leads_report(records: list[dict], leader: str, confidence: float) -> str:
    """Markdown: per modality, the lead of ``leader`` over each baseline at each ratio."""
    if not records:
        return ""
    ratios = sorted({r["ratio"] for r in records}, reverse=True)
    lines = ["", f"## Lead of {leader} over the training-free baselines", "",
             f"Accuracy of {leader} minus the baseline's on the same rows, with a {confidence:.0%} paired bootstrap "
             f"interval. ✓: a lead of at least {MIN_LEAD * 100:.0f} points with the two methods' own intervals "
             "apart; ✗ otherwise. † the baseline could not keep to the budget (more vision "
             "tokens averaged over layers), so that comparison is not at equal budgets."]
    for modality in sorted({r["modality"] for r in records}):
        lines += ["", f"### {modality}", "", "| baseline | " + " | ".join(f"r = {r:g}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        by = {(r["baseline"], r["ratio"]): r for r in records if r["modality"] == modality}
        for base in dict.fromkeys(r["baseline"] for r in records):
            cells = []
            for ratio in ratios:
                rec = by[(base, ratio)]
                ci = "" if rec["ci_low"] is None else f" [{rec['ci_low']:+.3f}, {rec['ci_high']:+.3f}]"
                cells.append(f"{rec['lead']:+.3f}{ci} {'✓' if rec['clear'] else '✗'}"
                             + ("" if rec["equal_budget"] else " †"))
            lines.append(f"| {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def retention(results: dict[tuple[str, float], Results], rows: list[dict], leader: str, variants: list[str],
              n_bootstrap: int, confidence: float, seed: int) -> list[dict]:
    """What ``leader`` keeps of the unpruned accuracy, and how it compares with its ``variants``.

    One record per modality and ratio < 1: ``share`` (``leader``'s accuracy over the unpruned
    accuracy at ``r = 1``; None when ``r = 1`` was not evaluated), ``accuracy``, ``full``, and
    ``versus``: per variant (e.g. the PPM after stage 1 alone) ``leader``'s accuracy minus the
    variant's on the same rows with its paired bootstrap interval (``lead, ci_low, ci_high``).
    """
    paired = {(r["modality"], r["ratio"], r["baseline"]): r
              for r in leads(results, rows, leader, variants, n_bootstrap, confidence, seed)}
    modality = np.array([r["modality"] for r in rows])
    out = []
    for m in sorted(set(modality)):
        sel = modality == m
        full = float(results[(leader, FULL)].score[sel].mean()) if (leader, FULL) in results else None
        for ratio in sorted({r for (name, r) in results if name == leader and r < 1}, reverse=True):
            acc = float(results[(leader, ratio)].score[sel].mean())
            versus = {v: {k: paired[(m, ratio, v)][k] for k in ("lead", "ci_low", "ci_high")} for v in variants}
            out.append({"modality": m, "ratio": ratio, "accuracy": acc, "full": full,
                        "share": acc / full if full else None, "versus": versus})
    return out


def retention_report(records: list[dict], leader: str, confidence: float) -> str:
    """Markdown: per modality and ratio, the share of the unpruned accuracy ``leader`` keeps and its
    paired difference from each variant (:func:`retention`)."""
    if not records:
        return ""
    variants = list(records[0]["versus"])
    lines = ["", f"## What {leader} keeps of the unpruned accuracy", "",
             f"Share: {leader}'s accuracy over the unpruned accuracy."
             + (f" Against a variant: {leader}'s accuracy minus the variant's on the same rows, with a "
                f"{confidence:.0%} paired bootstrap interval." if variants else ""), "",
             "| modality | ratio | share |" + "".join(f" − {v} |" for v in variants),
             "|---|---|---|" + "---|" * len(variants)]
    for rec in records:
        share = "–" if rec["share"] is None else f"{rec['share']:.1%}"
        cells = []
        for v in variants:
            d = rec["versus"][v]
            cells.append(f"{d['lead']:+.3f}" + ("" if d["ci_low"] is None else f" [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"))
        lines.append(f"| {rec['modality']} | {rec['ratio']:g} | {share} |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines) + "\n"
