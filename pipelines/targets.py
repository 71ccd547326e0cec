"""DVC stage ``targets``: the guide layer's attention to each vision token, as shards in data/targets.

The shards are written in the scratch folder checkpoints/targets (resumed shard by shard after
an interruption; no DVC output) and moved to data/targets when all are written.
"""

from common import ROOT, publish, stage

from covipal.training.pipeline import make_targets


def main() -> None:
    with stage("targets", ["targets"], distributed=True) as (params, run):
        summary = make_targets(params, ROOT / "data" / "world", ROOT / "models" / "base", ROOT / "data" / "targets",
                               ROOT / "checkpoints" / "targets")
        publish(run, "targets", summary)
        print({split: summary[split]["rows"] for split in ("train", "validation")}, f"{summary['minutes']:.1f} min")


if __name__ == "__main__":
    main()
