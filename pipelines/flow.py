"""Prefect flow that runs the DVC pipeline stage by stage, once or on a schedule.

Each stage is one ``dvc repro <stage>`` subprocess, so DVC's cache decides what reruns;
stages run one at a time because parallel ``dvc repro`` calls fight over DVC's lock.
A failed stage is retried (``ops.stage_retries``). The flow opens an MLflow run
"pipeline" and the stages nest their runs under it; every run, failed or not, ends with
a Markdown artifact ``pipeline-summary`` in the Prefect UI.

    python pipelines/flow.py [run] [--stages prepare,train] [--force]   # once (temporary server)
    python pipelines/flow.py serve     # the ops.deployment deployment on ops.schedule.cron

Both commands first read and check the whole ``params.yaml`` (every section, those no
stage reads included), so a typo stops them before Prefect starts anything.

``serve`` needs a real Prefect server (``prefect server start``, ``PREFECT_API_URL``):
its scheduler creates the runs. The deployment admits one run at a time (a deployment
concurrency limit of 1 that queues the others), so two runs started together run one
after the other. ``prefect.yaml`` describes the same deployment for a work pool.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Prefect reads these when it starts its temporary local server; set them before importing it.
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # its heartbeat races SQLite on slow hosts

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from covipal.config import ConfigError, Params, load_params  # noqa: E402
from covipal.tracking import PARENT_ENV, stage_run, tracking_uri  # noqa: E402

TAIL_LINES = 40


def check_params(path: Path = ROOT / "params.yaml") -> Params:
    """Read and check the whole params file; exit with the problems named (key and fix) if it is wrong."""
    try:
        return load_params(path)
    except ConfigError as err:
        sys.exit(f"error: {err}")


def dvc_stages() -> list[str]:
    """Stage names in the order dvc.yaml lists them."""
    return list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


@task(task_run_name="dvc repro {stage}")
def repro(stage: str, force: bool, parent_run_id: str) -> str:
    """Run ``dvc repro <stage>``, streaming its output; return "ran" or "up to date"."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", stage]
    if force:
        cmd += ["--force", "--single-item"]  # force this stage only, not its upstream
    # stage commands say `python`: make it this interpreter, whatever PATH the caller had
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, PARENT_ENV: parent_run_id, "DVC_NO_ANALYTICS": "1"}
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    ran = False
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            logger.info(line)
            tail.append(line)
            ran = ran or line.startswith(f"Running stage '{stage}'")
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro {stage} failed (exit {proc.returncode}); last output:\n"
                           + "\n".join(tail))
    return "ran" if ran else "up to date"


def read_metrics() -> dict[str, dict]:
    """Contents of ``metrics/*.json`` by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "metrics").glob("*.json"))}


def summary(results: dict[str, str], metrics: dict[str, dict], failure: str | None = None) -> str:
    """The run's Markdown report: each stage's result, then the failure's cause or the metrics."""
    lines = ["# covipal pipeline", "", "| stage | result |", "|---|---|"]
    lines += [f"| {stage} | {result} |" for stage, result in results.items()]
    if failure is not None:
        lines += ["", "## Failed", "", "```", failure[-4000:], "```"]
    for name, values in metrics.items():
        lines += ["", f"## metrics/{name}.json", "", "```json",
                  json.dumps(values, indent=2, sort_keys=True), "```"]
    return "\n".join(lines)


@flow(name="covipal-pipeline")
def pipeline(stages: list[str] | None = None, force: bool = False) -> dict[str, str]:
    """Reproduce ``stages`` (all of dvc.yaml when None) in pipeline order, one at a time."""
    results: dict[str, str] = {}
    try:
        known = dvc_stages()
        unknown = sorted(set(stages or []) - set(known))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml defines {known}")
        selected = [s for s in known if stages is None or s in stages]
        params = load_params(ROOT / "params.yaml")
        retrying = repro.with_options(retries=params.ops.stage_retries,
                                      retry_delay_seconds=params.ops.retry_delay_seconds)
        uri = tracking_uri(params.tracking.tracking_uri, ROOT)
        with stage_run("pipeline", {"stages": ",".join(selected), "force": force},
                       params.tracking.experiment, uri) as run:
            for stage in selected:
                results[stage] = "failed"
                results[stage] = retrying(stage, force, run.run_id)
            metrics = read_metrics()
            run.metrics(metrics)
    except Exception as err:
        create_markdown_artifact(summary(results, {}, failure=f"{type(err).__name__}: {err}"),
                                 key="pipeline-summary", description="The pipeline failed: stages run and the cause")
        raise
    create_markdown_artifact(summary(results, metrics), key="pipeline-summary",
                             description="Stages run and their metrics")
    return results


def serve() -> None:
    """Serve the ``ops.deployment`` deployment with ``ops.schedule`` until interrupted (needs a real server)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        sys.exit("error: schedules need a real Prefect server: run `prefect server start` and "
                 "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (see docs/operations.md)")
    ops = load_params(ROOT / "params.yaml").ops
    pipeline.serve(
        name=ops.deployment, schedules=[Cron(ops.schedule.cron, timezone=ops.schedule.timezone,
                                             active=ops.schedule.active)],
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        limit=1, tags=["covipal"], description="Retrain the covipal PPM: dvc repro, stage by stage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["run", "serve"], default="run",
                        help="run the pipeline once (default) or serve the scheduled deployment")
    parser.add_argument("--stages", help="comma-separated stage names (default: all, in dvc.yaml order)")
    parser.add_argument("--force", action="store_true", help="rerun the stages even if DVC finds no change")
    args = parser.parse_args()
    check_params()  # before Prefect starts a server or a run
    if args.command == "serve":
        serve()
    else:
        pipeline(stages=args.stages.split(",") if args.stages else None, force=args.force)


if __name__ == "__main__":
    main()
