"""DVC stage ``evaluate``: accuracy of every method at every reserve ratio on the test split.

Writes metrics/evaluate.json, plots/evaluate_accuracy.csv, its figure plots/evaluate/accuracy.png
and reports/evaluate.md, logs them
to MLflow, and tags the evaluated PPM's registry version with its numbers.
"""

import csv

from common import ROOT, stage

from covipal.evaluation.figure import plot_accuracy
from covipal.evaluation.registry import attach, find_version
from covipal.evaluation.stage import run_evaluate
from covipal.evaluation.summary import CSV_FIELDS, leads_report, ratio_key, report, retention_report
from covipal.io import atomic_output, write_json


def main() -> None:
    with stage("evaluate", ["evaluate"]) as (params, run):
        ppm_dir = ROOT / "models" / "ppm"
        result = run_evaluate(params, ROOT / "data" / "world", ROOT / "models" / "base", ppm_dir, ROOT)
        records = result["records"]
        lead: dict = {}
        for r in result["leads"]:
            lead.setdefault(r["modality"], {}).setdefault(ratio_key(r["ratio"]), {})[r["baseline"]] = {
                k: r[k] for k in ("lead", "ci_low", "ci_high", "separate", "clear", "equal_budget")}
        kept: dict = {}
        for r in result["retention"]:
            kept.setdefault(r["modality"], {})[ratio_key(r["ratio"])] = {
                k: r[k] for k in ("share", "accuracy", "full", "versus")}
        write_json(ROOT / "metrics" / "evaluate.json",
                   {"rows": result["rows"], "minutes": result["minutes"], "methods": result["metrics"],
                    "covipal_lead": lead, "covipal_retention": kept})
        with atomic_output(ROOT / "plots" / "evaluate_accuracy.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                writer.writeheader()
                writer.writerows(records)
        with atomic_output(ROOT / "plots" / "evaluate" / "accuracy.png") as tmp:
            plot_accuracy(records, tmp)
        confidence = params.evaluate.confidence
        markdown = (report(records, confidence) + retention_report(result["retention"], "covipal", confidence)
                    + leads_report(result["leads"], "covipal", confidence))
        with atomic_output(ROOT / "reports" / "evaluate.md") as tmp:
            tmp.write_text(markdown)
        run.metrics({"rows": result["rows"], "minutes": result["minutes"], **result["metrics"]})
        for path in ("metrics/evaluate.json", "plots/evaluate_accuracy.csv", "plots/evaluate/accuracy.png",
                     "reports/evaluate.md"):
            run.artifact(ROOT / path)
        print(markdown)
        if "covipal" in params.evaluate.methods:
            name = params.registry.model_name
            version, champion = find_version(ppm_dir, name)
            if version is None:
                print(f"models/ppm is not a registered version of {name!r} in this tracking store; "
                      "its numbers were not attached (run `dvc repro stage2` to register it)")
                return
            tags = {"eval.run_id": run.run_id, "eval.rows": str(result["rows"])}
            for rec in records:
                if rec["method"] == "covipal" and rec["question_type"] == "all":
                    ci = "" if rec["ci_low"] is None else f" [{rec['ci_low']:.4f}, {rec['ci_high']:.4f}]"
                    tags[f"eval.{rec['modality']}.{ratio_key(rec['ratio'])}"] = f"{rec['accuracy']:.4f}{ci}"
            attach(name, version, tags)
            print(f"attached the covipal numbers to {name} version {version}"
                  + (" (champion)" if champion else " (not the champion)"))


if __name__ == "__main__":
    main()
