"""The ``evaluate`` stage: every configured method at every reserve ratio on the test split.

:func:`run_evaluate` is what ``pipelines/evaluate.py`` calls: it loads the frozen base
LVLM, the stage-2 PPM and the first ``evaluate.rows`` test rows, builds each method from
``evaluate`` (:func:`build_methods`), leaves out the methods that cannot prune this model
family (``Pruner.supports``, e.g. ``visionzip`` without a [CLS] token), runs
:func:`covipal.evaluation.harness.evaluate_methods` with the scoring of ``evaluate.scoring``
(:func:`resolve_scoring`) and summarises the outcomes (:mod:`covipal.evaluation.summary`);
:func:`outputs` turns them into the metrics file and the report.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

from covipal.config import ConfigError, EvaluateConfig, Params


def build_methods(cfg: EvaluateConfig, n_layers: int, ppm=None, guide_layer: int = 2,
                  root: Path | None = None) -> Callable:
    """``(method, ratio) -> Pruner`` for ``cfg.methods``, checked now against an LLM of ``n_layers`` layers.

    Fills in, unless ``cfg.method_args`` sets them: ``ppm`` (``covipal``), ``guide_layer``
    (``oracle``), ``seed`` (``random``) and ``match_layer_average`` (in-LLM methods).
    A variant's relative ``ppm`` folder is read from ``root``. Raises :class:`ConfigError`
    naming the key for an unknown method or a bad argument.
    """
    from covipal.pruning import available_methods, get_method

    base = {name: cfg.variants.get(name, {}).get("method", name) for name in cfg.methods}
    unknown = sorted(name for name in cfg.methods if base[name] not in available_methods())
    if unknown:
        raise ConfigError(f"evaluate.methods: unknown method(s) {unknown}; registered methods: "
                          f"{available_methods()}, or define a variant in evaluate.variants")
    stray = sorted(set(cfg.method_args) - set(available_methods()))
    if stray:
        raise ConfigError(f"evaluate.method_args: unknown method(s) {stray}; registered methods: {available_methods()}")
    kwargs = {}
    for name in cfg.methods:
        fields = {f.name for f in dataclasses.fields(type(get_method(base[name])))}
        defaults = {"ppm": ppm, "guide_layer": guide_layer, "seed": cfg.seed,
                    "match_layer_average": cfg.match_layer_average}
        variant = {k: v for k, v in cfg.variants.get(name, {}).items() if k != "method"}
        if isinstance(variant.get("ppm"), str) and root is not None:  # a PPM folder relative to the project
            variant["ppm"] = str(Path(root) / variant["ppm"])
        if base[name] == "covipal" and ppm is None and "ppm" not in variant:
            raise ConfigError("evaluate.methods lists covipal but no PPM was given; run the stage2 stage first")
        kwargs[name] = {**{k: v for k, v in defaults.items() if k in fields}, **cfg.method_args.get(base[name], {}),
                        **variant}
        try:
            get_method(base[name], reserve_ratio=0.5, **kwargs[name]).budget(64, n_layers)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"evaluate.method_args.{name}: {err}") from None

    def make(name: str, ratio: float):
        return get_method(base[name], reserve_ratio=ratio, **kwargs[name])

    return make


def resolve_scoring(scoring: str, pretrained: bool) -> str:
    """``evaluate.scoring`` for this base model: ``auto`` is ``generate`` for a pretrained one, else ``first_token``."""
    if scoring != "auto":
        return scoring
    return "generate" if pretrained else "first_token"


def cell_grids(data) -> Callable[[dict], int | None]:
    """``row -> G``: the grid a row's ``relevant`` cells lie on: ``data.cell_grid`` when set, else
    the digit world's ``image.grid`` / ``video.grid`` by modality when the data are the digit world."""
    if data.cell_grid is not None:
        return lambda row: data.cell_grid
    if data.source == "digit-world":
        return lambda row: data.video.grid if row["modality"] == "video" else data.image.grid
    return lambda row: None


def run_evaluate(params: Params, data_dir: Path, base_dir: Path, ppm_dir: Path, root: Path | None = None,
                 log=print) -> dict:
    """Evaluate on the test split; returns the outcomes and their summaries.

    Keys: ``records`` (:func:`covipal.evaluation.summary.table`'s rows), ``metrics`` (their
    nested form), ``leads`` (covipal's lead over each training-free baseline:
    :func:`covipal.evaluation.summary.leads`; every method but covipal, its variants and the
    oracle), ``retention`` (what covipal keeps of the unpruned accuracy and its paired
    difference from each of its variants: :func:`covipal.evaluation.summary.retention`; both
    empty when covipal is not evaluated), ``skipped`` (``{method: reason}`` for the methods
    that cannot prune this model family), ``unpruned`` (:func:`covipal.evaluation.summary.unpruned_check`),
    ``notes`` (what the report should say was not measured), ``scoring``, ``results`` (the
    per-row outcomes, with each answer given), ``test_rows`` (the rows), ``rows`` (their
    number) and ``minutes``. ``r = 1`` is always
    evaluated: the unpruned pass is run anyway.
    """
    import torch
    from datasets import load_from_disk

    from covipal.base_model import PRETRAINED_RECORD
    from covipal.evaluation.cells import NOT_MAPPED, cell_mapper
    from covipal.evaluation.harness import FULL, evaluate_methods, unsupported
    from covipal.evaluation.summary import leads, metrics, retention, table, unpruned_check
    from covipal.ppm import PPM
    from covipal.training.pipeline import _rows, load_frozen_base

    t0 = time.time()
    cfg = params.evaluate
    model, inputs = load_frozen_base(base_dir, params.model.prompt)
    scoring = resolve_scoring(cfg.scoring, (Path(base_dir) / PRETRAINED_RECORD).exists())
    n_layers = model.config.get_text_config().num_hidden_layers
    ppm = PPM.from_pretrained(ppm_dir) if "covipal" in cfg.methods else None
    make = build_methods(cfg, n_layers, ppm, params.targets.guide_layer, root)
    skipped = unsupported(model, make, cfg.methods)
    methods = [m for m in cfg.methods if m not in skipped]
    if not methods:
        raise ConfigError(f"evaluate.methods: none of {cfg.methods} can prune {type(model).__name__} ({skipped}); "
                          "list methods that support this model family")
    for name, reason in skipped.items():
        log(f"skipping {name}: {reason}")
    ratios = sorted(set(cfg.ratios) | {FULL}, reverse=True)
    rows = list(_rows(load_from_disk(str(data_dir))["test"], cfg.rows))  # decoded rows (PIL images)
    notes = [f"Not run on this model: {', '.join(skipped)} (reasons below)."] if skipped else []
    grid = cell_grids(params.data)
    if any(r.get("relevant") for r in rows) and cell_mapper(model, inputs.processor, rows, grid) is None:
        notes.append(NOT_MAPPED[0].upper() + NOT_MAPPED[1:] + ".")
    log(f"evaluating {len(methods)} methods at ratios {ratios} on {len(rows)} test rows ({scoring} scoring)")
    torch.manual_seed(cfg.seed)
    results = evaluate_methods(model, inputs, rows, make, methods, ratios, cfg.batch_size, scoring=scoring,
                               max_new_tokens=cfg.max_new_tokens, cell_grid=grid)
    records = table(results, rows, cfg.n_bootstrap, cfg.confidence, cfg.seed, scoring)
    method_of = {name: cfg.variants.get(name, {}).get("method", name) for name in methods}
    baselines = [name for name in methods if method_of[name] not in ("covipal", "oracle")]
    variants = [name for name in methods if method_of[name] == "covipal" and name != "covipal"]
    lead, kept = [], []
    if "covipal" in methods:
        lead = leads(results, rows, "covipal", baselines, cfg.n_bootstrap, cfg.confidence, cfg.seed)
        kept = retention(results, rows, "covipal", variants, cfg.n_bootstrap, cfg.confidence, cfg.seed)
    unpruned = unpruned_check(results[(methods[0], FULL)], rows, scoring)
    for check in unpruned:
        if check["status"] != "ok":
            log(f"warning: the unpruned {check['modality']} accuracy is {check['accuracy']:.3f} "
                f"({check['status']}; always answering {check['common_answer']!r} scores {check['chance']:.3f})")
    return {"records": records, "metrics": metrics(records), "leads": lead, "retention": kept, "skipped": skipped,
            "unpruned": unpruned, "notes": notes, "scoring": scoring, "results": results, "test_rows": rows,
            "rows": len(rows), "minutes": (time.time() - t0) / 60}


def outputs(result: dict, cfg: EvaluateConfig) -> tuple[dict, str]:
    """``(metrics/evaluate.json, reports/evaluate.md)`` of :func:`run_evaluate`'s ``result``."""
    from covipal.evaluation.harness import FULL
    from covipal.evaluation.summary import (leads_report, ratio_key, report, retention_report, skipped_report,
                                            unpruned_report)

    lead: dict = {}
    for r in result["leads"]:
        lead.setdefault(r["modality"], {}).setdefault(ratio_key(r["ratio"]), {})[r["baseline"]] = {
            k: r[k] for k in ("lead", "ci_low", "ci_high", "separate", "clear", "equal_budget")}
    kept: dict = {}
    for r in result["retention"]:
        kept.setdefault(r["modality"], {})[ratio_key(r["ratio"])] = {k: r[k] for k in ("share", "accuracy", "full",
                                                                                      "versus")}
    checks = {c["modality"]: {k: v for k, v in c.items() if k != "modality"} for c in result["unpruned"]}
    data = {"rows": result["rows"], "minutes": result["minutes"], "scoring": result["scoring"],
            "methods": result["metrics"], "skipped": result["skipped"], "unpruned": checks,
            "covipal_lead": lead, "covipal_retention": kept}
    unpruned = next(res for (m, r), res in result["results"].items() if r == FULL)
    warning = unpruned_report(result["unpruned"], unpruned, result["test_rows"], result["scoring"],
                              cfg.max_new_tokens)
    markdown = report(result["records"], cfg.confidence, scoring=result["scoring"], notes=result["notes"],
                      preface=warning)
    markdown += (skipped_report(result["skipped"]) + retention_report(result["retention"], "covipal", cfg.confidence)
                 + leads_report(result["leads"], "covipal", cfg.confidence))
    return data, markdown


OUTPUTS = ("metrics/evaluate.json", "plots/evaluate_accuracy.csv", "plots/evaluate/accuracy.png",
           "reports/evaluate.md")


def write_outputs(result: dict, cfg: EvaluateConfig, root: Path) -> str:
    """Write :data:`OUTPUTS` under ``root`` (each atomically) from :func:`run_evaluate`'s ``result``;
    return the report's Markdown."""
    import csv

    from covipal.evaluation.figure import plot_accuracy
    from covipal.evaluation.summary import CSV_FIELDS
    from covipal.io import atomic_output, write_json

    data, markdown = outputs(result, cfg)
    write_json(root / "metrics" / "evaluate.json", data)
    with atomic_output(root / "plots" / "evaluate_accuracy.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(result["records"])
    with atomic_output(root / "plots" / "evaluate" / "accuracy.png") as tmp:
        plot_accuracy(result["records"], tmp)
    with atomic_output(root / "reports" / "evaluate.md") as tmp:
        tmp.write_text(markdown)
    return markdown


def registry_tags(result: dict, run_id: str, method: str = "covipal") -> dict[str, str]:
    """Tags for the evaluated PPM's registry version: the run, the rows, and ``method``'s accuracy
    [interval] per modality and ratio (``eval.image.r0.25``)."""
    from covipal.evaluation.summary import ALL, ratio_key

    tags = {"eval.run_id": run_id, "eval.rows": str(result["rows"])}
    for rec in result["records"]:
        if rec["method"] == method and rec["question_type"] == ALL:
            ci = "" if rec["ci_low"] is None else f" [{rec['ci_low']:.4f}, {rec['ci_high']:.4f}]"
            tags[f"eval.{rec['modality']}.{ratio_key(rec['ratio'])}"] = f"{rec['accuracy']:.4f}{ci}"
    return tags
