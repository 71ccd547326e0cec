"""Operations settings: the ops section, prefect.yaml in step with it, serve needs a real server."""

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
