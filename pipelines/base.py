"""DVC stage ``base``: train the reference LVLM (or record the pretrained one) into models/base."""

import csv

from common import ROOT, stage

from covipal.base_model import build_base
from covipal.io import atomic_output, write_json
from covipal.sources import MODEL_RECORD, read_record


def main() -> None:
    with stage("base", ["model", "base"]) as (params, run):
        result = build_base(params, ROOT / "data" / "world", ROOT / "models" / "base",
                            resolved=read_record(ROOT / MODEL_RECORD))
        history = result.pop("history", [])
        write_json(ROOT / "metrics" / "base.json", result)
        with atomic_output(ROOT / "plots" / "base_history.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["step", "loss", "grounding", "minutes", "image", "video"])
                writer.writeheader()
                writer.writerows(history)
        run.metrics(result)
        for row in history:
            run.metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        run.artifact(ROOT / "metrics" / "base.json")
        for modality, table in result.get("test", {}).items():
            print(f"{modality:6s} " + "  ".join(f"{k} {v:.3f}" for k, v in table.items()))


if __name__ == "__main__":
    main()
