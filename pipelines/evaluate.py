"""DVC stage ``evaluate``: accuracy of every method at every reserve ratio on the test split.

Writes metrics/evaluate.json, plots/evaluate_accuracy.csv, its figure plots/evaluate/accuracy.png
and reports/evaluate.md, logs them to MLflow, and tags the evaluated PPM's registry version
with its numbers.
"""

from common import ROOT, stage

from covipal.evaluation.registry import attach, find_version
from covipal.evaluation.stage import OUTPUTS, registry_tags, run_evaluate, write_outputs


def main() -> None:
    with stage("evaluate", ["evaluate"]) as (params, run):
        ppm_dir = ROOT / "models" / "ppm"
        result = run_evaluate(params, ROOT / "data" / "world", ROOT / "models" / "base", ppm_dir, ROOT)
        markdown = write_outputs(result, params.evaluate, ROOT)
        run.metrics({"rows": result["rows"], "minutes": result["minutes"], **result["metrics"]})
        for path in OUTPUTS:
            run.artifact(ROOT / path)
        print(markdown)
        if "covipal" in params.evaluate.methods and "covipal" not in result["skipped"]:
            name = params.registry.model_name
            version, champion = find_version(ppm_dir, name)
            if version is None:
                print(f"models/ppm is not a registered version of {name!r} in this tracking store; "
                      "its numbers were not attached (run `dvc repro stage2` to register it)")
                return
            attach(name, version, registry_tags(result, run.run_id))
            print(f"attached the covipal numbers to {name} version {version}"
                  + (" (champion)" if champion else " (not the champion)"))


if __name__ == "__main__":
    main()
