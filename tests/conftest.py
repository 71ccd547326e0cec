"""Shared fixtures of the training tests."""

import os

import pytest

# Set in this process by in-process DeepSpeed tests (covipal.training.launch.single_process_env), whose gloo
# group keeps its port: a pipeline started afterwards as a subprocess must not inherit them.
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _distributed_env_stays_in_its_test():
    before = {k: os.environ.get(k) for k in DISTRIBUTED_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def reference():
    """A tiny random reference LVLM, its processor, and 6 validation rows of the digit world (2 videos)."""
    from covipal.config import DataConfig, ReferenceModel
    from covipal.reference.model import build_reference
    from covipal.reference.processor import ReferenceProcessor, build_tokenizer
    from covipal.world.dataset import make_sample
    from covipal.world.scenes import scan_pools

    cfg = ReferenceModel(vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2,
                         text_heads=2, text_intermediate=64)
    processor = ReferenceProcessor(build_tokenizer(), image_px=64)
    model = build_reference(cfg, processor.image_px, seed=0).eval()
    pools = scan_pools(0)
    rows = [make_sample(DataConfig(), "validation", i, pools) for i in range(6)]
    return model, processor, rows


@pytest.fixture(scope="session")
def llava_shards(tmp_path_factory):
    """Target shards of tiny-llava prompts (7 rows, shards of 3): a folder for TargetShards."""
    from tiny_lvlms import ROWS, row_prompts, tiny_model

    from covipal.training.targets import write_target_shards

    out = tmp_path_factory.mktemp("shards")
    write_target_shards(tiny_model("llava"), lambda rows: row_prompts("llava", rows), ROWS, out, shard_size=3,
                        guide_layer=1, batch_size=4, progress=False)
    return out
