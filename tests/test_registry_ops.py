"""Operating the registry: consumer API, integrity checks, promote/rollback, idempotent registration."""

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from test_registry import saved_ppm

from covipal.ppm import PPM
from covipal.registry import RegistryUnavailableError, load_ppm, register_ppm

ROOT = Path(__file__).resolve().parents[1]
LINEAGE = dict(base_model="reference@abc", guide_layer=2, reserve_ratio=0.25, data_version="dvc:123", commit="c0ffee")


@pytest.fixture
def registry(monkeypatch, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.chdir(tmp_path)  # default artifact location ./mlruns under tmp
    yield uri
    mlflow.set_tracking_uri(None)


def versions(name="covipal-ppm"):
    from mlflow import MlflowClient

    return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))


@pytest.fixture
def cli(capsys):
    """``python -m covipal.registry ARGS``, in this process; returns what it printed."""
    from covipal.registry import main

    def run(*args):
        capsys.readouterr()
        main(list(args))
        return capsys.readouterr().out

    return run


def test_load_ppm_gives_a_ready_pruner(registry, tmp_path):
    """In-process here; tests/test_operations_e2e.py loads the champion in a fresh process from a server."""
    import covipal
    from covipal.pruning import CoViPALPruner

    register_ppm(saved_ppm(tmp_path / "a", 0), metrics={"acc": 0.5}, metric="acc", **LINEAGE)
    pruner = covipal.load_ppm("models:/covipal-ppm@champion")
    ref = PPM.from_pretrained(tmp_path / "a")
    assert isinstance(pruner, CoViPALPruner) and pruner.reserve_ratio == 0.25
    assert all(torch.equal(a, b) for a, b in zip(pruner.ppm.state_dict().values(), ref.state_dict().values()))
    assert covipal.load_ppm("models:/covipal-ppm/1", reserve_ratio=0.5).reserve_ratio == 0.5
    with pytest.raises(LookupError, match="covipal-ppm@nope is not in the registry"):
        covipal.load_ppm("models:/covipal-ppm@nope")


def test_pyfunc_reserve_ratio_param_picks_the_top_scores(registry, tmp_path):
    import mlflow

    register_ppm(saved_ppm(tmp_path / "a", 0), metrics={"acc": 0.5}, metric="acc", **LINEAGE)
    model = mlflow.pyfunc.load_model("models:/covipal-ppm@champion")
    rng = np.random.default_rng(0)
    mask = np.array([[True] * 6, [True] * 4 + [False] * 2])  # the second sample has 4 real vision tokens
    x = {"vision": rng.random((2, 6, 8), dtype=np.float32), "text": rng.random((2, 3, 8), dtype=np.float32),
         "vision_mask": mask, "text_mask": np.ones((2, 3), bool)}
    out = model.predict(x, params={"reserve_ratio": 0.5})
    assert out["keep"].shape == (2, 3)  # ceil(0.5 * 6) and ceil(0.5 * 4) = 2, padded with -1
    for b, n in enumerate((6, 4)):
        want = np.sort(np.argsort(-out["scores"][b, :n])[: -(-n // 2)])
        np.testing.assert_array_equal(out["keep"][b, : len(want)], want)
    assert out["keep"][1, 2] == -1 and np.isneginf(out["scores"][1, 4:]).all()


def test_tampered_or_corrupt_artifact_is_refused(registry, tmp_path):
    import mlflow
    import yaml

    register_ppm(saved_ppm(tmp_path / "a", 0), metrics={"acc": 0.5}, metric="acc", **LINEAGE)
    [weights] = list(tmp_path.glob("mlruns/**/model.safetensors"))
    # the logged folder is the PPM as saved, file for file (evaluation finds a version by its content)
    assert sorted(p.name for p in weights.parent.iterdir()) == ["config.json", "model.safetensors"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight: still a readable safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is corrupt or was tampered with"):
        load_ppm("models:/covipal-ppm@champion")
    with pytest.raises(ValueError, match="corrupt or was tampered"):  # the served pyfunc checks its model config
        mlflow.pyfunc.load_model("models:/covipal-ppm@champion")
    # a tamperer who also rewrites the sums in the model's MLmodel is still caught by the registry's tags
    from covipal.ppm import file_checksums

    [mlmodel] = list(tmp_path.glob("mlruns/**/MLmodel"))
    spec = yaml.safe_load(mlmodel.read_text())
    spec["flavors"]["python_function"]["config"]["sha256"] = file_checksums(weights.parent)
    mlmodel.write_text(yaml.safe_dump(spec))
    mlflow.pyfunc.load_model("models:/covipal-ppm@champion")  # fooled
    with pytest.raises(ValueError, match="recorded at registration"):
        load_ppm("models:/covipal-ppm@champion")


def test_promote_and_rollback_are_one_command_each(registry, tmp_path, cli):
    from mlflow import MlflowClient

    for i, acc in enumerate((0.5, 0.4, 0.6)):  # v1 champion, v2 worse (kept out), v3 better (champion)
        register_ppm(saved_ppm(tmp_path / str(i), i), metrics={"acc": acc}, metric="acc", **LINEAGE)
    client = MlflowClient()
    champion = lambda: str(client.get_model_version_by_alias("covipal-ppm", "champion").version)  # noqa: E731
    assert champion() == "3" and client.get_model_version("covipal-ppm", "3").tags["previous_champion"] == "1"

    assert "champion rolled back to v1" in cli("rollback", "--reason", "latency regression")
    assert champion() == "1"
    v3 = client.get_model_version("covipal-ppm", "3")
    assert v3.tags["promotion"] == "rolled_back" and v3.tags["rollback_reason"] == "latency regression"

    assert "champion is now v2 (was v1)" in cli("promote", "--version", "2", "--reason", "won the A/B test")
    v2 = client.get_model_version("covipal-ppm", "2")
    assert champion() == "2" and v2.tags["promotion"] == "promoted_by_hand"
    assert v2.tags["promotion_reason"] == "promoted by hand: won the A/B test" and v2.tags["previous_champion"] == "1"
    shown = json.loads(cli("show"))
    assert [v["version"] for v in shown] == ["3", "2", "1"] and "champion" in shown[1]["aliases"]
    assert all("metric.acc" in v and "code_commit" in v and "promotion_reason" in v for v in shown)


def test_registration_failing_midway_is_completed_not_repeated(registry, tmp_path, monkeypatch):
    """The server goes away after the version was created: the retry finishes that version."""
    from mlflow import MlflowClient

    register_ppm(saved_ppm(tmp_path / "a", 0), metrics={"acc": 0.5}, metric="acc", **LINEAGE)
    real = MlflowClient.set_registered_model_alias
    calls = {"n": 0}

    def flaky(self, name, alias, version):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("connection reset by peer")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", flaky)
    ppm = saved_ppm(tmp_path / "b", 1)
    with pytest.raises(ConnectionError):
        register_ppm(ppm, metrics={"acc": 0.9}, metric="acc", registration_key="run-b", **LINEAGE)
    assert versions() == [1, 2]  # created, not promoted yet
    again = register_ppm(ppm, metrics={"acc": 0.9}, metric="acc", registration_key="run-b", **LINEAGE)
    assert again.version == "2" and again.promoted and versions() == [1, 2]
    once_more = register_ppm(ppm, metrics={"acc": 0.9}, metric="acc", registration_key="run-b", **LINEAGE)
    assert once_more.version == "2" and once_more.promoted and versions() == [1, 2]
    tags = MlflowClient().get_model_version("covipal-ppm", "2").tags
    assert tags["registration_key"] == "run-b" and tags["promotion"] == "promoted" and tags["previous_champion"] == "1"


def test_unreachable_tracking_server_is_a_clear_error(tmp_path, monkeypatch):
    import mlflow

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    uri = f"http://127.0.0.1:{port}"
    try:
        with pytest.raises(RegistryUnavailableError, match=f"{uri} is unreachable.*mlflow server"):
            register_ppm(saved_ppm(tmp_path / "a", 0), metrics={"acc": 0.5}, metric="acc", tracking_uri=uri,
                         **LINEAGE)
    finally:
        mlflow.set_tracking_uri(None)
