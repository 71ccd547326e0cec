"""The ``evaluate`` stage: every configured method at every reserve ratio on the test split.

:func:`run_evaluate` is what ``pipelines/evaluate.py`` calls: it loads the frozen base
LVLM, the stage-2 PPM and the first ``evaluate.rows`` test rows, builds each method from
``evaluate`` (:func:`build_methods`), runs :func:`covipal.evaluation.harness.evaluate_methods`
and summarises the outcomes (:mod:`covipal.evaluation.summary`).
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


def run_evaluate(params: Params, data_dir: Path, base_dir: Path, ppm_dir: Path, root: Path | None = None,
                 log=print) -> dict:
    """Evaluate on the test split; returns ``{"records", "metrics", "leads", "retention", "rows", "minutes"}``.

    ``records`` are :func:`covipal.evaluation.summary.table`'s rows, ``metrics`` the nested
    form written to ``metrics/evaluate.json``, ``leads`` covipal's lead over each training-free
    baseline (:func:`covipal.evaluation.summary.leads`; every method but covipal, its variants
    and the oracle), ``retention`` what covipal keeps of the unpruned accuracy and its paired
    difference from each of its variants (:func:`covipal.evaluation.summary.retention`); both
    empty when covipal is not evaluated.
    """
    import torch
    from datasets import load_from_disk

    from covipal.evaluation.harness import evaluate_methods
    from covipal.evaluation.summary import leads, metrics, retention, table
    from covipal.ppm import PPM
    from covipal.training.pipeline import _rows, load_frozen_base

    t0 = time.time()
    cfg = params.evaluate
    model, inputs = load_frozen_base(base_dir)
    n_layers = model.config.get_text_config().num_hidden_layers
    ppm = PPM.from_pretrained(ppm_dir) if "covipal" in cfg.methods else None
    make = build_methods(cfg, n_layers, ppm, params.targets.guide_layer, root)
    test = _rows(load_from_disk(str(data_dir))["test"], cfg.rows)
    rows = list(test)  # decoded rows (PIL images)
    log(f"evaluating {len(cfg.methods)} methods at ratios {cfg.ratios} on {len(rows)} test rows")
    torch.manual_seed(cfg.seed)
    results = evaluate_methods(model, inputs, rows, make, cfg.methods, cfg.ratios, cfg.batch_size)
    records = table(results, rows, cfg.n_bootstrap, cfg.confidence, cfg.seed)
    method_of = {name: cfg.variants.get(name, {}).get("method", name) for name in cfg.methods}
    baselines = [name for name in cfg.methods if method_of[name] not in ("covipal", "oracle")]
    variants = [name for name in cfg.methods if method_of[name] == "covipal" and name != "covipal"]
    lead, kept = [], []
    if "covipal" in cfg.methods:
        lead = leads(results, rows, "covipal", baselines, cfg.n_bootstrap, cfg.confidence, cfg.seed)
        kept = retention(results, rows, "covipal", variants, cfg.n_bootstrap, cfg.confidence, cfg.seed)
    return {"records": records, "metrics": metrics(records), "leads": lead, "retention": kept, "rows": len(rows),
            "minutes": (time.time() - t0) / 60}
