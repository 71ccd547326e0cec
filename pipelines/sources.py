"""DVC stage ``sources``: resolve ``data.source`` and ``model.source`` to versions that cannot move.

Writes ``sources/data.json`` and ``sources/model.json`` (:mod:`covipal.sources`), which
``prepare`` and ``base`` depend on. The stage runs at the start of every ``dvc repro``
(``always_changed``) and opens no MLflow run: when nothing moved it rewrites the same bytes
and no later stage reruns.
"""

import argparse
from pathlib import Path

from covipal.config import ConfigError, load_params
from covipal.sources import describe, write_sources
from covipal.workspace import config_error, hold_workspace

ROOT = Path(__file__).resolve().parents[1]  # not pipelines/common.py: its imports would become this stage's deps


def main() -> None:
    parser = argparse.ArgumentParser(description="covipal stage 'sources'")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file (default: params.yaml)")
    args = parser.parse_args()
    try:
        params = load_params(args.params)
        hold_workspace(ROOT, "sources")
        records = write_sources(params.data.source, params.model.source, params.model.revision, ROOT)
    except ConfigError as err:
        config_error(err)
    print(f"data: {describe(records['data'])}\nmodel: {describe(records['model'])}")


if __name__ == "__main__":
    main()
