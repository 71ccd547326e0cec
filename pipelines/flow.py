"""Prefect flow that runs the DVC pipeline stage by stage, once, on a schedule or when new data lands.

A run holds the workspace (:mod:`covipal.workspace`: every other writer, a second flow run, a
stage under a plain ``dvc repro``, ``python -m covipal.workspace dvc ...``, waits its turn),
pulls from the DVC default remote when one is set, runs one ``dvc repro <stage>`` subprocess per
stage so DVC's cache decides what reruns, and pushes after a run in which something reran.
A stage past ``ops.stage_timeout_minutes`` is stopped; only transient failures (a busy lock, an
unreachable server, a killed process) are retried, with exponential backoff; a configuration
error (exit code 78) fails at once. The flow opens an MLflow run "pipeline" that the stages
nest their runs under, tagged ``covipal.outcome`` (``retrained`` or ``nothing new``). Every run
ends with the Markdown artifacts ``pipeline-summary`` (stages, what changed in dvc.lock, metrics,
or the failure) and ``pipeline-notice`` (a hook; failed runs and registry changes are also
POSTed to ``ops.notify_webhook``).

    python pipelines/flow.py [run] [--stages prepare,train] [--force]   # once (temporary server)
    python pipelines/flow.py serve     # the ops.deployment deployment on ops.schedule.cron
    python pipelines/flow.py data-landed --source data/incoming   # the deployment's event trigger

Every command first reads and checks the whole ``params.yaml`` (every section, those no
stage reads included), so a typo stops it before Prefect starts anything.

``serve`` needs a real Prefect server (``prefect server start``, ``PREFECT_API_URL``):
its scheduler creates the runs. It registers ``prefect.yaml``'s deployment (its one
definition) on the work pool ``ops.work_pool`` and runs a process worker of that pool,
so it makes the same deployment as ``prefect deploy``. The deployment admits one run at a
time (a concurrency limit of 1 that queues the others).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
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
from prefect.tasks import exponential_backoff  # noqa: E402

from covipal.config import ConfigError, Params, load_params  # noqa: E402
from covipal.tracking import PARENT_ENV, stage_run, tracking_uri  # noqa: E402
from covipal.workspace import CONFIG_ERROR_EXIT, WorkspaceLock, config_error, other_dvc  # noqa: E402

TAIL_LINES = 40
CHECKED = "checked, unchanged"  # the result of an always-changed stage whose outputs came out the same
# what a failed stage printed when rerunning it can help: DVC's locks, an unreachable server, a hung collective
TRANSIENT = re.compile(r"is busy|Unable to acquire lock|is unreachable|Connection(Error| refused| reset)|"
                       r"Temporary failure|timed out|NCCL|ECONNRESET|503 Service", re.IGNORECASE)


class StageFailed(RuntimeError):
    """A stage failed in a way a rerun would repeat (a bug, a configuration error, a timeout)."""


class TransientStageFailure(RuntimeError):
    """A stage failed for a reason that can pass (a lock, the network, a killed process): retried."""


def check_params(path: Path = ROOT / "params.yaml") -> Params:
    """Read and check the whole params file; exit with the problems named (key and fix) if it is wrong."""
    try:
        return load_params(path)
    except ConfigError as err:
        config_error(err)


def dvc_stages() -> list[str]:
    """Stage names in the order dvc.yaml lists them."""
    return list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def _env(parent_run_id: str = "") -> dict[str, str]:
    # stage commands say `python`: make it this interpreter, whatever PATH the caller had
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, PARENT_ENV: parent_run_id, "DVC_NO_ANALYTICS": "1"}


def run_command(cmd: list[str], timeout: float, log, env: dict[str, str] | None = None) -> tuple[int | None, list[str]]:
    """Run ``cmd`` in the project in its own process group, streaming its output to ``log``.

    Returns ``(exit code, last lines)``; the exit code is None when ``timeout`` seconds passed
    first, the whole process group then stopped (SIGTERM, SIGKILL 30 s later)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip()
            log(line)
            tail.append(line)
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=10)
    return code, list(tail) if code != 0 else lines


@task(task_run_name="dvc repro {stage}")
def repro(stage: str, force: bool, parent_run_id: str, timeout: float) -> str:
    """Run ``dvc repro <stage>`` (stopped after ``timeout`` s), streaming its output; return "ran" or
    "up to date". A failure raises :class:`TransientStageFailure` when a rerun can help."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", stage]
    if force:
        cmd += ["--force", "--single-item"]  # force this stage only, not its upstream
    code, lines = run_command(cmd, timeout, logger.info, _env(parent_run_id))
    tail = "\n".join(lines[-TAIL_LINES:])
    if code is None:
        raise StageFailed(f"dvc repro {stage} ran longer than its timeout of {timeout / 60:.1f} min "
                          f"(ops.stage_timeout_minutes) and was stopped; last output:\n{tail}")
    if code == CONFIG_ERROR_EXIT or f"exited with {CONFIG_ERROR_EXIT}" in tail:  # DVC exits 255 and says it
        raise StageFailed(f"dvc repro {stage} stopped on a configuration error (not retried); fix it and "
                          f"rerun; last output:\n{tail}")
    if code != 0:
        kind = TransientStageFailure if code < 0 or TRANSIENT.search(tail) else StageFailed
        raise kind(f"dvc repro {stage} failed (exit {code}); last output:\n{tail}")
    return "ran" if any(line.startswith(f"Running stage '{stage}'") for line in lines) else "up to date"


def transient_only(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a stage only after a :class:`TransientStageFailure`."""
    return isinstance(state.result(raise_on_failure=False), TransientStageFailure)


@task(task_run_name="dvc {action}")
def sync(action: str, timeout: float) -> bool:
    """``dvc pull`` (what the default remote has of dvc.lock's outputs) or ``dvc push``, as
    :mod:`covipal.remote` builds them; False when there is no remote. A failed transfer is transient,
    a remote configured wrongly is not."""
    from covipal.remote import RemoteConfigError, pull_command, push_command

    logger = get_run_logger()
    try:
        cmd = (pull_command if action == "pull" else push_command)(ROOT, logger.info)
    except RemoteConfigError as err:
        raise StageFailed(f"dvc {action}: {err}") from None
    if cmd is None:
        return False
    code, lines = run_command(cmd, timeout, logger.info)
    if code != 0:
        raise TransientStageFailure(f"dvc {action} failed (exit {code}); last output:\n" + "\n".join(lines[-TAIL_LINES:]))
    return True


def lock_entries() -> dict[str, dict[str, str]]:
    """Each stage's recorded inputs in dvc.lock: dependency path (or "params.<key>") -> its hash or value."""
    path = ROOT / "dvc.lock"
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.exists() else {}
    entries: dict[str, dict[str, str]] = {}
    for name, entry in stages.items():
        deps = {d["path"]: str(d.get("md5") or d.get("hash") or d.get("checksum") or "") for d in entry.get("deps", [])}
        for values in (entry.get("params") or {}).values():
            deps.update({f"params.{k}": json.dumps(v, sort_keys=True) for k, v in values.items()})
        entries[name] = deps
    return entries


def lock_outputs() -> dict[str, dict[str, str]]:
    """Each stage's recorded outputs in dvc.lock: path -> hash."""
    path = ROOT / "dvc.lock"
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.exists() else {}
    return {name: {o["path"]: str(o.get("md5") or o.get("hash") or "") for o in entry.get("outs", [])}
            for name, entry in stages.items()}


def always_changed() -> set[str]:
    """Stages that DVC runs every time (``always_changed: true``, e.g. ``sources``): a run of one whose
    outputs come out the same changed nothing."""
    return {name for name, s in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()
            if s.get("always_changed")}


def kind_of(dep: str) -> str:
    """What a dependency is, for the summary: params, code, or data (data and model sources)."""
    if dep.startswith("params."):
        return "params"
    if dep.startswith(("covipal/", "pipelines/")) or dep.endswith(".py"):
        return "code"
    return "data"


def changes(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]], results: dict[str, str]) -> list[str]:
    """What changed in the inputs of the stages that ran, as summary lines ("stage: kind path old -> new")."""
    lines = []
    for stage, result in results.items():
        if result != "ran":
            continue
        old, new = before.get(stage), after.get(stage, {})
        if old is None:
            lines.append(f"{stage}: first run (nothing recorded before)")
            continue
        moved = [dep for dep in sorted(set(old) | set(new)) if old.get(dep) != new.get(dep)]
        lines += [f"{stage}: {kind_of(dep)} {dep} {_short(old.get(dep))} -> {_short(new.get(dep))}" for dep in moved]
        if not moved:
            lines.append(f"{stage}: reran with the same inputs (forced, or its outputs were missing)")
    return lines


def _short(value: str | None) -> str:
    return "(none)" if value is None else value if len(value) <= 16 else value[:12] + "…"


def read_metrics() -> dict[str, dict]:
    """Contents of ``metrics/*.json`` by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "metrics").glob("*.json"))}


def summary(results: dict[str, str], metrics: dict[str, dict], failure: str | None = None,
            changed: list[str] | None = None) -> str:
    """The run's Markdown report: each stage's result, what changed, then the failure's cause or the metrics."""
    lines = ["# covipal pipeline", "", "| stage | result |", "|---|---|"]
    lines += [f"| {stage} | {result} |" for stage, result in results.items()]
    if failure is None and changed is not None:
        lines += ["", "## What changed", ""]
        lines += [f"- {line}" for line in changed] if changed else ["nothing new: every stage was up to date"]
    if failure is not None:
        lines += ["", "## Failed", "", "```", failure[-4000:], "```"]
    for name, values in metrics.items():
        lines += ["", f"## metrics/{name}.json", "", "```json",
                  json.dumps(values, indent=2, sort_keys=True), "```"]
    return "\n".join(lines)


def wait_for_other_dvc(lock: WorkspaceLock, deadline: float, log) -> None:
    """Let a DVC process already at work here (a plain ``dvc repro`` whose stage waits for this
    lock) finish first: release the workspace while one is seen, then take it again."""
    while others := other_dvc(ROOT):
        log("another DVC process works in this workspace; letting it finish first:\n" + "\n".join(others))
        lock.release()
        while other_dvc(ROOT):
            if time.monotonic() > deadline:
                raise StageFailed("the flow's timeout (ops.flow_timeout_minutes) passed while another DVC "
                                  "process used the workspace:\n" + "\n".join(other_dvc(ROOT)))
            time.sleep(2)
        lock.acquire(timeout=max(1.0, deadline - time.monotonic()))


def notify(flow, flow_run, state) -> None:
    """Flow hook (completion and failure): log one line and write the ``pipeline-notice`` artifact for
    every run; POST it as JSON to ``ops.notify_webhook`` when the run failed or changed the registry."""
    logger = get_run_logger()
    failed = not state.is_completed()
    outcome = None if failed else state.result(raise_on_failure=False)
    registry = outcome.get("registry") if isinstance(outcome, dict) else None
    note = {"flow_run": flow_run.name, "flow_run_id": str(flow_run.id), "state": state.type.value,
            "message": (state.message or "")[-2000:], "registry": registry,
            "changed": outcome.get("changed") if isinstance(outcome, dict) else None}
    headline = (f"covipal pipeline run {flow_run.name} FAILED: {note['message'][:300]}" if failed else
                f"covipal pipeline run {flow_run.name} completed; registry: "
                f"{'unchanged' if registry is None else json.dumps(registry, sort_keys=True)}")
    (logger.error if failed else logger.info)(headline)
    create_markdown_artifact(f"# {headline}\n\n```json\n{json.dumps(note, indent=2, default=str)}\n```",
                             key="pipeline-notice", description=headline[:200])
    if not (failed or registry):
        return
    try:
        url = load_params(ROOT / "params.yaml").ops.notify_webhook
    except ConfigError:
        return
    if url:
        try:
            post_json(url, {"text": headline, **note})
        except OSError as err:  # a notification that cannot be sent must not change the run's outcome
            logger.warning(f"could not post the notification to {url}: {err}")


def post_json(url: str, body: dict, timeout: float = 10) -> None:
    """POST ``body`` as JSON to ``url``."""
    request = urllib.request.Request(url, data=json.dumps(body, default=str).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        reply.read()


def registry_change(before: dict | None, results: dict[str, str]) -> dict | None:
    """``metrics/register.json`` when a stage that ran wrote a new one (a version registered), else None."""
    path = ROOT / "metrics" / "register.json"
    if "ran" not in results.values() or not path.exists():
        return None
    now = json.loads(path.read_text())
    return None if now == before else now


@flow(name="covipal-pipeline", on_completion=[notify], on_failure=[notify])
def pipeline(stages: list[str] | None = None, force: bool = False) -> dict:
    """Reproduce ``stages`` (all of dvc.yaml when None) in pipeline order, one at a time, holding the
    workspace: pull from the DVC remote, ``dvc repro`` each stage, push after success.

    Returns ``{"stages": {stage: "ran" | "up to date" | CHECKED}, "changed": [...], "registry": register.json or None}``.
    """
    results: dict[str, str] = {}
    logger = get_run_logger()
    lock = None
    try:
        known = dvc_stages()
        unknown = sorted(set(stages or []) - set(known))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml defines {known}")
        selected = [s for s in known if stages is None or s in stages]
        checked_only = always_changed()
        params = load_params(ROOT / "params.yaml")
        ops = params.ops
        deadline = time.monotonic() + ops.flow_timeout_minutes * 60
        lock = WorkspaceLock(ROOT, f"flow run {flow_run_name()} (pid {os.getpid()})", log=logger.info)
        lock.acquire(timeout=ops.flow_timeout_minutes * 60)
        retrying = repro.with_options(retries=ops.stage_retries, retry_condition_fn=transient_only,
                                      retry_delay_seconds=exponential_backoff(ops.retry_delay_seconds)(
                                          max(ops.stage_retries, 1)), retry_jitter_factor=0.2)
        syncing = sync.with_options(retries=ops.stage_retries, retry_condition_fn=transient_only,
                                    retry_delay_seconds=exponential_backoff(ops.retry_delay_seconds)(
                                        max(ops.stage_retries, 1)))
        syncing("pull", max(1.0, deadline - time.monotonic()))
        before = lock_entries()
        registered = (json.loads((ROOT / "metrics" / "register.json").read_text())
                      if (ROOT / "metrics" / "register.json").exists() else None)
        uri = tracking_uri(params.tracking.tracking_uri, ROOT)
        with stage_run("pipeline", {"stages": ",".join(selected), "force": force},
                       params.tracking.experiment, uri) as run:
            for stage in selected:
                wait_for_other_dvc(lock, deadline, logger.info)
                results[stage] = "failed"
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StageFailed(f"the flow ran past ops.flow_timeout_minutes ({ops.flow_timeout_minutes} min) "
                                      f"before stage {stage}")
                outs = lock_outputs().get(stage)
                results[stage] = retrying(stage, force, run.run_id, min(ops.stage_timeout_minutes * 60, left))
                if results[stage] == "ran" and stage in checked_only and lock_outputs().get(stage) == outs:
                    results[stage] = CHECKED
            changed = changes(before, lock_entries(), results)
            metrics = read_metrics()
            ran = "ran" in results.values()
            mark_outcome(run.run_id, uri, ran, changed)
            if ran:
                run.metrics(metrics)
        if ran:
            syncing("push", max(1.0, deadline - time.monotonic()))
        registry = registry_change(registered, results)
    except Exception as err:
        create_markdown_artifact(summary(results, {}, failure=f"{type(err).__name__}: {err}"),
                                 key="pipeline-summary", description="The pipeline failed: stages run and the cause")
        raise
    finally:
        if lock is not None:
            lock.release()
    logger.info("what changed:\n" + "\n".join(changed) if ran else "nothing new: every stage was up to date")
    create_markdown_artifact(summary(results, metrics if ran else {}, changed=changed), key="pipeline-summary",
                             description="Stages run, what changed, and their metrics" if ran else "nothing new")
    return {"stages": results, "changed": changed, "registry": registry}


def flow_run_name() -> str:
    from prefect.runtime import flow_run

    return flow_run.name or "ad hoc"


def mark_outcome(run_id: str, uri: str, ran: bool, changed: list[str]) -> None:
    """Tag the parent MLflow run with what the pipeline run did, so a run with nothing new is not read as a result."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    client.set_tag(run_id, "covipal.outcome", "retrained" if ran else "nothing new")
    client.set_tag(run_id, "mlflow.note.content", "\n".join(changed) if ran else
                   "nothing new: every stage was up to date; no metrics logged")


DEFAULT_SPEC = {"concurrency_limit": {"limit": 1, "collision_strategy": "ENQUEUE"}, "tags": ["covipal"],
                "description": "Retrain the covipal PPM: pull, dvc repro stage by stage, push"}


def deployment_spec() -> dict:
    """prefect.yaml's deployment (the one definition; its name, schedule and pool agree with ``ops``);
    without the file, one run at a time and no event trigger."""
    path = ROOT / "prefect.yaml"
    if not path.exists():
        print(f"note: no {path.name} in {ROOT}: serving the cron schedule without its event trigger", file=sys.stderr)
        return DEFAULT_SPEC
    [spec] = yaml.safe_load(path.read_text())["deployments"]
    return spec


def serve() -> None:
    """Register prefect.yaml's deployment (its name and schedule from ``ops``) on the work pool
    ``ops.work_pool``, then run a process worker of that pool here until interrupted: the same
    deployment ``prefect deploy`` makes, so the two never replace each other (needs a real server)."""
    import asyncio

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL
    from prefect.workers.process import ProcessWorker

    if not PREFECT_API_URL.value():
        sys.exit("error: schedules need a real Prefect server: run `prefect server start` and "
                 "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (see docs/operations.md)")
    ops = load_params(ROOT / "params.yaml").ops
    spec = deployment_spec()
    triggers = [DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"}) for t in spec.get("triggers", [])]
    limit = spec["concurrency_limit"]
    ensure_work_pool(ops.work_pool)
    # to_deployment + apply: Flow.deploy's check for online workers fails with a 422 on Prefect 3.8.8
    pipeline.from_source(str(ROOT), "pipelines/flow.py:pipeline").to_deployment(
        name=ops.deployment, work_pool_name=ops.work_pool,
        work_queue_name=(spec.get("work_pool") or {}).get("work_queue_name"),
        schedules=[Cron(ops.schedule.cron, timezone=ops.schedule.timezone, active=ops.schedule.active)],
        triggers=triggers, concurrency_limit=ConcurrencyLimitConfig(
            limit=limit["limit"], collision_strategy=ConcurrencyLimitStrategy(limit["collision_strategy"])),
        tags=spec.get("tags"), description=spec.get("description"), parameters=spec.get("parameters") or {},
    ).apply(work_pool_name=ops.work_pool)

    async def work() -> None:
        async with ProcessWorker(work_pool_name=ops.work_pool, limit=1) as worker:
            await worker.start()

    asyncio.run(work())


def ensure_work_pool(name: str) -> None:
    """Create the process work pool ``name`` with a concurrency limit of 1 unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", concurrency_limit=1))
        except ObjectAlreadyExists:
            pass


def data_landed(source: str) -> None:
    """Emit the ``covipal.data.landed`` event for ``source``: the deployment's trigger starts a run."""
    from prefect.events import emit_event

    name = Path(source).name or source
    event = emit_event(event="covipal.data.landed", resource={"prefect.resource.id": f"covipal.data.{name}",
                                                              "covipal.source": str(source)})
    print(f"emitted covipal.data.landed for {source}" if event else
          "error: no Prefect server to tell (set PREFECT_API_URL)", file=sys.stderr if not event else sys.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["run", "serve", "data-landed"], default="run",
                        help="run the pipeline once (default), serve the scheduled deployment, or tell the "
                             "server that new data landed (the deployment's event trigger)")
    parser.add_argument("--stages", help="comma-separated stage names (default: all, in dvc.yaml order)")
    parser.add_argument("--force", action="store_true", help="rerun the stages even if DVC finds no change")
    parser.add_argument("--source", default="data", help="data-landed: the folder that received new data")
    args = parser.parse_args()
    check_params()  # before Prefect starts a server or a run
    if args.command == "serve":
        serve()
    elif args.command == "data-landed":
        data_landed(args.source)
    else:
        pipeline(stages=args.stages.split(",") if args.stages else None, force=args.force)


if __name__ == "__main__":
    main()
