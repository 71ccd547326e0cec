"""DeepSpeed on the CPU: ZeRO-1/2 steps train the PPM; a resumed run ends with the same weights."""

import pytest
import torch

from covipal.ppm import PPM, PPMConfig
from covipal.training import stage1
from covipal.training.ds import DeepSpeedConfig, fit, initialize
from covipal.training.targets import TargetShards


def small_ppm(seed: int, dropout: float = 0.0) -> PPM:
    torch.manual_seed(seed)
    return PPM(PPMConfig(d_model=32, d_ppm=16, n_layers=1, n_heads=2, dropout=dropout))


def state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_config_dict_per_device():
    cfg = DeepSpeedConfig(zero_stage=1, micro_batch_size=4, grad_accum=3, lr=2e-3, warmup_steps=10)
    cpu, gpu = cfg.to_dict(on_gpu=False), cfg.to_dict(on_gpu=True)
    assert cpu["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                            "weight_decay": 0.01, "torch_adam": True}}
    assert gpu["optimizer"]["params"]["torch_adam"] is True  # no JIT-built fused Adam on GPU hosts either
    assert not cpu["bf16"]["enabled"] and gpu["bf16"]["enabled"] and not gpu["fp16"]["enabled"]
    assert cpu["zero_optimization"]["stage"] == 1 and cpu["gradient_accumulation_steps"] == 3
    assert cpu["train_micro_batch_size_per_gpu"] == 4 and cpu["scheduler"]["params"]["warmup_num_steps"] == 10
    assert DeepSpeedConfig(precision="fp32").to_dict(on_gpu=True)["bf16"]["enabled"] is False
    with pytest.raises(ValueError, match="zero_stage"):
        DeepSpeedConfig(zero_stage=3)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_step_changes_only_the_ppm(zero_stage, llava_shards, tmp_path):
    ppm = small_ppm(0)
    before = state(ppm)
    engine = initialize(ppm, DeepSpeedConfig(zero_stage=zero_stage, micro_batch_size=2, lr=1e-2))
    assert engine.zero_optimization_stage() == zero_stage and engine.module is ppm
    shards = TargetShards(llava_shards)

    def step(engine, batch):
        scores = engine(batch["vision"].float(), batch["text"].float(), batch["vision_mask"], batch["text_mask"])
        return stage1.stage1_loss(scores, batch["target"], batch["vision_mask"]), {}

    history = fit(engine, lambda epoch: shards.epoch(2, 0, epoch), step, 1, tmp_path, progress=False,
                  log=lambda *_: None)
    assert history[0]["epoch"] == 1 and history[0]["train_loss"] > 0
    after = state(ppm)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "vision_in.1.weight" in changed and "head.3.weight" in changed
    assert (tmp_path / "latest").read_text() == "epoch-0001"


def test_resumed_run_reaches_the_same_weights(llava_shards, tmp_path):
    shards = TargetShards(llava_shards)
    ds = DeepSpeedConfig(zero_stage=2, micro_batch_size=2, grad_accum=2, lr=1e-2, seed=7)  # 5 batches -> 2 steps
    cfg1, cfg2 = stage1.Stage1Config(epochs=1), stage1.Stage1Config(epochs=2)
    quiet = dict(progress=False, log=lambda *_: None)

    straight = small_ppm(0, dropout=0.1)  # dropout: the RNG must be reproduced too
    full = stage1.train(straight, shards, shards, cfg2, ds, tmp_path / "a", tmp_path / "a_ppm", **quiet)

    stage1.train(small_ppm(0, dropout=0.1), shards, None, cfg1, ds, tmp_path / "b", **quiet)  # "killed" after 1
    resumed_ppm = small_ppm(99, dropout=0.1)  # a new process starts from other weights: the checkpoint wins
    resumed = stage1.train(resumed_ppm, shards, shards, cfg2, ds, tmp_path / "b", tmp_path / "b_ppm", **quiet)

    a, b = state(straight), state(resumed_ppm)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(resumed["history"]) == 2 and resumed["history"][1] == full["history"][1]
    assert resumed["val"] == full["val"] and set(full["val"]) == {"loss", "recall", "spearman"}
    saved = state(PPM.from_pretrained(tmp_path / "b_ppm"))
    assert all(torch.equal(saved[k], b[k]) for k in b)
    with pytest.raises(ValueError, match="other settings"):  # a checkpoint of another recipe is not resumed
        stage1.train(small_ppm(0, dropout=0.1), shards, None, stage1.Stage1Config(epochs=3, loss="rank"), ds,
                     tmp_path / "b", **quiet)


def test_training_modules_import_no_heavy_packages():
    import subprocess
    import sys

    code = ("import sys, covipal.training.stage1, covipal.training.stage2, covipal.registry; "
            "print(sorted(m for m in ('deepspeed', 'mlflow', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_single_process_env_keeps_a_launchers_values(monkeypatch):
    from covipal.training.launch import single_process_env

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_PORT", "29999")
    added = single_process_env()
    assert added["RANK"] == "0" and added["WORLD_SIZE"] == "1" and "MASTER_PORT" not in added
    import os

    assert os.environ["MASTER_PORT"] == "29999"


def test_interpreter_tools_come_first_on_path_once(monkeypatch):
    """DeepSpeed's JIT op build must always find this venv's ninja (each switch rebuilds the op)."""
    import os
    import sys
    from pathlib import Path

    from covipal.training.launch import interpreter_tools_first

    tools = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    interpreter_tools_first()
    interpreter_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == [tools, "/usr/bin", "/bin"]


LEAVE = """
import atexit, torch
from covipal.training.launch import join_process_group
join_process_group()
print("joined", torch.distributed.is_initialized())
atexit._run_exitfuncs()
print("left", not torch.distributed.is_initialized())
"""


def test_a_process_that_joins_the_group_leaves_it_at_exit():
    """An open gloo group at interpreter exit can abort the process (status -6, seen once in CI)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    run = subprocess.run([sys.executable, "-c", LEAVE], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "joined True" in run.stdout and "left True" in run.stdout
