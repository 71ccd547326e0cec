"""DVC stage ``stage1``: train the PPM on the guide-layer targets (DeepSpeed) into models/stage1.

DeepSpeed checkpoints each epoch go to the scratch folder checkpoints/stage1 (resumed after an
interruption; no DVC output).
"""

from common import ROOT, publish, stage

from covipal.training.pipeline import run_stage1


def main() -> None:
    with stage("stage1", ["stage1", "deepspeed", "pruning"], distributed=True) as (params, run):
        result = run_stage1(params, ROOT / "data" / "targets", ROOT / "models" / "stage1",
                            ROOT / "checkpoints" / "stage1")
        publish(run, "stage1", {"val": result["val"], "world_size": result["world_size"],
                                "minutes": result["minutes"]}, result["history"])
        if result["val"]:  # rank 0
            print("stage 1 validation:", result["val"])


if __name__ == "__main__":
    main()
