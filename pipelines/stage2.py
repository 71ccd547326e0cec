"""DVC stage ``stage2``: train the PPM end to end through the frozen LVLM into models/ppm; register it in MLflow.

DeepSpeed checkpoints each epoch go to the scratch folder checkpoints/stage2 (resumed after an
interruption; no DVC output).
"""

from common import ROOT, publish, stage

from covipal.training.pipeline import run_stage2


def main() -> None:
    with stage("stage2", ["stage2", "deepspeed", "registry", "pruning"], distributed=True) as (params, run):
        result = run_stage2(params, ROOT / "data" / "world", ROOT / "models" / "base", ROOT / "models" / "stage1",
                            ROOT / "models" / "ppm", ROOT / "checkpoints" / "stage2", ROOT)
        publish(run, "stage2", {"val": result["val"], "world_size": result["world_size"],
                                "minutes": result["minutes"]}, result["history"])
        publish(run, "register", result["registry"])
        if result["registry"]:  # rank 0
            print("stage 2 validation:", result["val"], "\nregistry:", result["registry"])


if __name__ == "__main__":
    main()
