"""Operations settings: the ops section, prefect.yaml in step with it (and its event trigger), serve needs a real server."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from covipal.config import ConfigError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_describes_the_deployment_of_params():
    ops = load_params(ROOT / "params.yaml").ops
    [deployment] = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert deployment["name"] == ops.deployment and deployment["work_pool"]["name"] == ops.work_pool
    [schedule] = deployment["schedules"]
    assert (schedule["cron"], schedule["timezone"], schedule["active"]) == \
        (ops.schedule.cron, ops.schedule.timezone, ops.schedule.active)
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    path, _, name = deployment["entrypoint"].partition(":")
    assert (ROOT / path).is_file() and f"def {name}(" in (ROOT / path).read_text()


@pytest.mark.parametrize("schedule, message", [
    ({"cron": "0 25 * * *"}, "ops.schedule.*cron '0 25 \\* \\* \\*' is not a valid cron line"),
    ({"timezone": "Mars/Olympus"}, "ops.schedule.*timezone 'Mars/Olympus' is unknown"),
    ({"every": "day"}, "ops.schedule.every"),
])
def test_bad_schedule_names_the_key_and_the_fix(schedule, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({"ops": {"schedule": schedule}})


def test_serve_without_a_server_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)
    run = subprocess.run([sys.executable, str(ROOT / "pipelines" / "flow.py"), "serve"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "prefect server start" in run.stderr and "PREFECT_API_URL" in run.stderr


def test_the_deployment_starts_on_new_data_as_well_as_on_the_cron():
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    [deployment] = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    [trigger] = [DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"}) for t in deployment["triggers"]]
    assert trigger.expect == {"covipal.data.landed"} and trigger.enabled
    assert trigger.match.root == {"prefect.resource.id": "covipal.data.*"}
    assert "data-landed" in (ROOT / "pipelines" / "flow.py").read_text()


@pytest.mark.parametrize("ops, message", [
    ({"stage_timeout_minutes": 0}, "ops.stage_timeout_minutes"),
    ({"flow_timeout_minutes": -1}, "ops.flow_timeout_minutes"),
    ({"notify_webhook": "hooks.example.com"}, "ops.notify_webhook.*not an http\\(s\\) URL"),
])
def test_bad_timeouts_and_webhooks_name_the_key(ops, message):
    with pytest.raises(ConfigError, match=message):
        parse_params({"ops": ops})
