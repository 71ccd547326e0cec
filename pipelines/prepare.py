"""DVC stage ``prepare``: write the data set (the digit world by default) to data/world."""

from common import ROOT, stage

from covipal.io import write_json
from covipal.world.dataset import prepare


def main() -> None:
    with stage("prepare", ["data"]) as (params, run):
        summary = prepare(params.data, ROOT / "data" / "world", root=ROOT)
        write_json(ROOT / "metrics" / "prepare.json", summary)
        run.metrics(summary)
        print({split: s["rows"] for split, s in summary.items()})


if __name__ == "__main__":
    main()
