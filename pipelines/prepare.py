"""DVC stage ``prepare``: check the data set (the digit world by default) and write it to data/world."""

from common import ROOT, stage

from covipal.io import write_json
from covipal.sources import DATA_RECORD, describe, read_record
from covipal.world.dataset import prepare


def main() -> None:
    with stage("prepare", ["data"]) as (params, run):
        resolved = read_record(ROOT / DATA_RECORD)  # the version the sources stage resolved
        summary = prepare(params.data, ROOT / "data" / "world", root=ROOT, resolved=resolved)
        write_json(ROOT / "metrics" / "prepare.json", summary)
        run.metrics(summary)
        print({split: s["rows"] for split, s in summary.items()})
        if resolved is not None:
            print(f"data.source: {describe(resolved)}")


if __name__ == "__main__":
    main()
