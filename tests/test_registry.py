"""Publishing PPMs to the MLflow registry: lineage tags, challenger alias, champion gate."""

import numpy as np
import pytest
import torch

from covipal.ppm import PPM, PPMConfig
from covipal.registry import decide, register_ppm

LINEAGE = dict(base_model="reference@abc", guide_layer=2, reserve_ratio=0.25, data_version="dvc:123", commit="c0ffee")


@pytest.fixture
def registry(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    monkeypatch.chdir(tmp_path)  # default artifact location ./mlruns under tmp
    yield uri
    mlflow.set_tracking_uri(None)


def saved_ppm(folder, seed):
    torch.manual_seed(seed)
    PPM(PPMConfig(d_model=8, d_ppm=8, n_layers=1, n_heads=2)).save_pretrained(folder)
    return folder


def test_decide_is_strict():
    assert decide("recall", 0.5, None, None)[0]
    assert decide("recall", 0.6, 0.5, "1")[0]
    assert not decide("recall", 0.5, 0.5, "1")[0]
    assert not decide("recall", 0.4, 0.5, "1")[0]
    assert not decide("recall", float("nan"), 0.5, "1")[0]
    assert not decide("recall", 0.9, None, "1")[0]  # champion without the metric: not comparable


def test_champion_moves_only_for_a_better_ppm(registry, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    first = register_ppm(saved_ppm(tmp_path / "a", 0), metrics={"val_recall": 0.6, "val_loss": 1.0},
                         metric="val_recall", **LINEAGE)
    assert first.promoted and first.version == "1" and "no champion" in first.reason
    worse = register_ppm(saved_ppm(tmp_path / "b", 1), metrics={"val_recall": 0.5}, metric="val_recall", **LINEAGE)
    tie = register_ppm(saved_ppm(tmp_path / "c", 2), metrics={"val_recall": 0.6}, metric="val_recall", **LINEAGE)
    assert not worse.promoted and not tie.promoted
    assert str(client.get_model_version_by_alias("covipal-ppm", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("covipal-ppm", "challenger").version) == "3"
    better = register_ppm(saved_ppm(tmp_path / "d", 3), metrics={"val_recall": 0.7}, metric="val_recall", **LINEAGE)
    assert better.promoted and better.champion == "4"
    assert str(client.get_model_version_by_alias("covipal-ppm", "champion").version) == "4"

    v2, v4 = client.get_model_version("covipal-ppm", "2"), client.get_model_version("covipal-ppm", "4")
    assert v2.tags["promotion"] == "kept_champion" and "does not beat" in v2.tags["promotion_reason"]
    assert v4.tags["promotion"] == "promoted" and "0.7 > 0.6" in v4.tags["promotion_reason"]
    assert client.get_model_version("covipal-ppm", "1").tags["superseded_by"] == "4"
    assert {k: v4.tags[k] for k in ("base_model", "guide_layer", "reserve_ratio", "data_version", "code_commit")} == \
        {"base_model": "reference@abc", "guide_layer": "2", "reserve_ratio": "0.25", "data_version": "dvc:123",
         "code_commit": "c0ffee"}
    assert float(v4.tags["metric.val_recall"]) == 0.7
    assert client.get_run(better.run_id).data.metrics["val_recall"] == 0.7

    # the champion loads as a pyfunc that scores exactly like the saved PPM
    model = mlflow.pyfunc.load_model("models:/covipal-ppm@champion")
    x = {"vision": np.random.rand(2, 5, 8).astype(np.float32), "text": np.random.rand(2, 3, 8).astype(np.float32),
         "vision_mask": np.ones((2, 5), bool), "text_mask": np.ones((2, 3), bool)}
    ppm = PPM.from_pretrained(tmp_path / "d")
    with torch.no_grad():
        want = ppm(*(torch.from_numpy(x[k]) for k in ("vision", "text", "vision_mask", "text_mask"))).numpy()
    out = model.predict(x)
    np.testing.assert_array_equal(out["scores"], want)
    assert out["keep"].shape == (2, 2)  # ceil(0.25 * 5) tokens, the default reserve ratio of LINEAGE
    np.testing.assert_array_equal(out["keep"], np.sort(np.argsort(-want, axis=1)[:, :2], axis=1))


def test_code_commit_is_clean_of_the_pipelines_own_outputs(tmp_path):
    """Stages rewrite dvc.lock, metrics/ and sources/: the commit stays clean; a code edit makes it dirty."""
    import subprocess

    from covipal.registry import code_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "metrics").mkdir()
    for name in ("dvc.lock", "metrics/base.json", "code.py"):
        (tmp_path / name).write_text("1")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "c")
    head = code_commit(tmp_path)
    assert len(head) == 40
    (tmp_path / "dvc.lock").write_text("2")
    (tmp_path / "metrics" / "base.json").write_text("2")
    assert code_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("2")
    assert code_commit(tmp_path) == head + "+dirty"
