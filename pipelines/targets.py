"""DVC stage ``targets``: the guide layer's attention to each vision token, as shards in data/targets."""

from common import ROOT, publish, stage

from covipal.training.pipeline import make_targets


def main() -> None:
    with stage("targets", ["targets"], distributed=True) as (params, run):
        summary = make_targets(params, ROOT / "data" / "world", ROOT / "models" / "base", ROOT / "data" / "targets")
        publish(run, "targets", summary)
        print({split: summary[split]["rows"] for split in ("train", "validation")}, f"{summary['minutes']:.1f} min")


if __name__ == "__main__":
    main()
