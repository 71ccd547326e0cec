"""The PPM stages (targets, stage 1, stage 2) on saved tiny checkpoints of every family, images and video.

``tests/test_pretrained_e2e.py`` runs all seven stages through DVC for LLaVA and Qwen2-VL; this
runs the three training stages' library functions, as the DVC stages call them, on every
supported family with a prepared VQA-shaped split that mixes images and 2-frame videos.
Stage 2 is trained here without the registration that ``run_stage2`` adds (that needs a
tracking store and is covered by the end-to-end tests).
"""

import math

import pytest
import torch
from test_evaluation_pretrained import vqa_split
from tiny_lvlms import FAMILIES, save_checkpoint

from covipal.config import parse_params

quiet = {"log": lambda *a, **k: None}


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_stage1_and_stage2_run_on_the_saved_checkpoint(family, tmp_path):
    from datasets import load_from_disk

    from covipal.base_model import build_base
    from covipal.ppm import PPM
    from covipal.training import stage2
    from covipal.training.data import RowBatches
    from covipal.training.pipeline import (deepspeed_config, load_frozen_base, make_targets, run_stage1,
                                           stage2_config)
    from covipal.training.targets import TargetShards

    save_checkpoint(family, tmp_path / "checkpoint")
    vqa_split(n_images=4, n_videos=4).save_to_disk(str(tmp_path / "data"))
    params = parse_params({
        "model": {"source": str(tmp_path / "checkpoint")},
        "targets": {"guide_layer": 1, "shard_size": 4, "batch_size": 4, "rows": {"train": 8, "validation": 8}},
        "deepspeed": {"micro_batch_size": 4},
        "stage1": {"epochs": 1, "eval_batch_size": 8, "ppm": {"d_ppm": 16, "n_layers": 1, "n_heads": 2}},
        "stage2": {"rows": {"train": 8, "validation": 8}}})
    base = tmp_path / "base"
    build_base(params, tmp_path / "data", base, **quiet)

    targets = make_targets(params, tmp_path / "data", base, tmp_path / "targets", **quiet)
    assert targets["train"]["rows"] == targets["validation"]["rows"] == 8
    shards = TargetShards(tmp_path / "targets" / "train")
    assert shards.d_model == 32

    one = run_stage1(params, tmp_path / "targets", tmp_path / "stage1", tmp_path / "ckpt1", **quiet)
    assert len(one["history"]) == 1 and all(math.isfinite(v) for v in one["val"].values())

    model, inputs = load_frozen_base(base, params.model.prompt)
    data = load_from_disk(str(tmp_path / "data"))
    assert sorted(set(data["train"]["modality"])) == ["image", "video"]
    ppm = PPM.from_pretrained(tmp_path / "stage1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = stage2_config(params)
    ds = deepspeed_config(params, "stage2")
    result = stage2.train(model, ppm, lambda epoch: RowBatches(data["train"], inputs.train, 4, ds.seed, epoch),
                          lambda: RowBatches(data["validation"], inputs.evaluation, 8), cfg, ds, tmp_path / "ckpt2",
                          tmp_path / "ppm", progress=False, **quiet)
    val = result["val"]
    assert 0 <= val["hard_accuracy"] <= 1 and 0 <= val["full_accuracy"] <= 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the LVLM stays frozen
    trained, start = PPM.from_pretrained(tmp_path / "ppm"), PPM.from_pretrained(tmp_path / "stage1")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))
