"""What every DVC stage entry point shares: read params, open the stage's MLflow run."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path

from covipal.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def stage(name: str, sections: list[str]):
    """Parse ``--params``, load and check them, and open the MLflow run of stage ``name``.

    Yields ``(params, run)``; ``sections`` are the params.yaml sections logged with the run.
    """
    from covipal.tracking import stage_run, tracking_uri

    parser = argparse.ArgumentParser(description=f"covipal stage '{name}'")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file (default: params.yaml)")
    args = parser.parse_args()
    params: Params = load_params(args.params)
    logged = {s: _as_dict(getattr(params, s)) for s in sections}
    with stage_run(name, logged, params.tracking.experiment, tracking_uri(params.tracking.tracking_uri, ROOT)) as run:
        yield params, run


def _as_dict(section) -> dict:
    from dataclasses import asdict

    return asdict(section)
