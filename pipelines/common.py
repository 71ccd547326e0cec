"""What every DVC stage entry point shares: read params, open the stage's MLflow run, publish metrics."""

from __future__ import annotations

import argparse
import csv
import sys
from contextlib import contextmanager
from pathlib import Path

from covipal.config import ConfigError, Params, load_params
from covipal.workspace import config_error, hold_workspace

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def stage(name: str, sections: list[str], distributed: bool = False):
    """Parse ``--params``, load and check the whole file (a bad key anywhere exits with it named),
    and open the MLflow run of stage ``name``.

    Yields ``(params, run)``; ``sections`` are the params.yaml sections logged with the run.
    ``distributed``: the stage runs in several processes (:func:`launch_settings`): more than one
    process (or a ``deepspeed.hostfile``) restarts this script under DeepSpeed's launcher
    (:mod:`covipal.training.launch`); this process then only waits and exits with the
    launcher's status. Under a launcher, ranks other than 0 get a run that logs nothing.
    """
    from covipal.training.launch import is_main, needs_launcher, relaunch

    parser = argparse.ArgumentParser(description=f"covipal stage '{name}'")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by `deepspeed` launches
    args = parser.parse_args()
    try:
        params: Params = load_params(args.params)  # the whole file, sections this stage does not read included
    except ConfigError as err:
        config_error(err)
    hold_workspace(ROOT, name)  # waits while another writer has the workspace; held until this process exits
    if distributed:
        processes, hostfile = launch_settings(params, name)
        if needs_launcher(processes, hostfile):
            hostfile = None if hostfile is None else ROOT / hostfile
            sys.exit(relaunch(Path(sys.argv[0]).resolve(), ["--params", str(Path(args.params).resolve())],
                              processes, hostfile, cwd=ROOT))
    if not is_main():
        yield params, QuietRun()
        return
    from covipal.tracking import stage_run, tracking_uri

    logged = {s: _as_dict(getattr(params, s)) for s in sections}
    with stage_run(name, logged, params.tracking.experiment, tracking_uri(params.tracking.tracking_uri, ROOT)) as run:
        try:
            yield params, run
        except ConfigError as err:  # found by the stage (its data, its model): rerunning cannot help
            config_error(err)


def launch_settings(params: Params, name: str) -> tuple[int, str | None]:
    """Processes per host and hostfile of stage ``name``: ``ops.targets_processes`` for targets
    (the DeepSpeed launcher splits the shards), ``deepspeed.processes`` (with the stage's overrides)
    for the training stages; ``deepspeed.hostfile`` for both."""
    if name == "targets":
        return params.ops.targets_processes, params.deepspeed.hostfile
    ds = params.deepspeed_for(name)
    return ds.processes, ds.hostfile


class QuietRun:
    """The run of a rank other than 0: logs nothing (rank 0 logs the stage)."""

    def metrics(self, values: dict, step: int | None = None) -> None:
        pass

    def artifact(self, path) -> None:
        pass


def publish(run, name: str, metrics: dict, history: list[dict] | None = None) -> None:
    """Write ``metrics/<name>.json`` (and ``plots/<name>_history.csv``) and log them to ``run``; rank 0 only."""
    from covipal.io import atomic_output, write_json
    from covipal.training.launch import is_main

    if not is_main():
        return
    write_json(ROOT / "metrics" / f"{name}.json", metrics)
    run.metrics(metrics)
    run.artifact(ROOT / "metrics" / f"{name}.json")
    if history is not None:
        fields = list(dict.fromkeys(k for row in history for k in row))
        with atomic_output(ROOT / "plots" / f"{name}_history.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(history)
        for row in history:
            run.metrics({k: v for k, v in row.items() if k != "epoch"}, step=row.get("epoch"))


def _as_dict(section) -> dict:
    from dataclasses import asdict

    return asdict(section)
