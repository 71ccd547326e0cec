"""Guide-layer targets: equal to eager attention, shards atomic and resumable, reader order by seed."""

import copy
import functools

import pytest
import torch
from tiny_lvlms import ROWS, all_hooks, make_batch, row_prompts, tiny_model, vision_positions

from covipal.pruning.guide import guide_targets, query_rows
from covipal.training.targets import TargetShards, write_target_shards


@functools.cache
def eager_attentions(family: str, layout: tuple) -> tuple:
    model = copy.deepcopy(tiny_model(family))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return model(**make_batch(family, list(layout)), output_attentions=True).attentions


def reference_targets(batch, attentions, layer, queries):
    """Per sample with vision: the target from the eager model's full attention maps."""
    out = {}
    for b, vis in enumerate(vision_positions(batch)):
        if not len(vis):
            continue
        real = batch["attention_mask"][b].bool()
        col = torch.arange(len(real))
        if queries == "after_image":
            q = real & (col > vis.max()) & ~torch.isin(col, vis)
        elif queries == "last":
            q = col == real.nonzero().max()
        else:
            q = real
        out[b] = attentions[layer][b].sum(0)[q][:, vis].mean(0)
    return out


LAYOUT = ((2, 0), (0, 0), (1, 0))
CASES = [("llava", 0, "after_image"), ("llava", 1, "after_image"), ("llava", 1, "last"), ("llava", 1, "all"),
         ("qwen2_vl", 1, "after_image"), ("qwen2_vl", 0, "all")]


@pytest.mark.parametrize("family,layer,queries", CASES)
def test_targets_equal_eager_attention(family, layer, queries):
    model, batch = tiny_model(family), make_batch(family, list(LAYOUT))
    with torch.no_grad():
        model(**batch)  # transformers installs its own lazy hooks on a first call
    hooks = all_hooks(model)
    got = guide_targets(model, batch, layer, queries)
    assert all_hooks(model) == hooks and model.config._attn_implementation == "sdpa"
    want = reference_targets(batch, eager_attentions(family, LAYOUT), layer, queries)
    for b, vis in enumerate(vision_positions(batch)):
        n = len(vis)
        assert torch.equal(got.context.vision_index[b, :n], vis)
        assert torch.equal(got.target[b, n:], torch.zeros_like(got.target[b, n:]))
        if n:
            torch.testing.assert_close(got.target[b, :n], want[b], rtol=1e-5, atol=1e-6)
    assert got.target[1].abs().sum() == 0  # the text-only sample


def test_query_rows_fall_back_to_the_last_token():
    real = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()
    vision = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]).bool()  # row 0 ends on its image
    assert query_rows(real, vision).tolist() == [[False] * 4 + [True], [False] * 3 + [True, True]]
    assert query_rows(real, vision, "last").tolist() == [[False] * 4 + [True]] * 2


# --- shards ------------------------------------------------------------------------------

def llava_inputs(rows, calls=None):
    return row_prompts("llava", rows, calls)


def write(out, fn=llava_inputs, **kw):
    return write_target_shards(tiny_model("llava"), fn, ROWS, out, shard_size=3, guide_layer=1, batch_size=2,
                               progress=False, **kw)


def test_shards_hold_inputs_and_targets(tmp_path):
    summary = write(tmp_path)
    assert summary["shards"] == 3 and summary["written"] == 3
    shards = TargetShards(tmp_path)
    assert len(shards) == 7 and shards.settings["guide_layer"] == 1 and shards.d_model == 32
    seen = {}
    for batch in shards.batches(2):
        for i, row in enumerate(batch["row"].tolist()):
            seen[row] = {k: v[i] for k, v in batch.items()}
    assert sorted(seen) == list(range(7))
    for row in (0, 1, 5):  # no image, 1 image, 2 images
        want = guide_targets(tiny_model("llava"), llava_inputs([ROWS[row]]), 1)
        got = seen[row]
        n = int(got["vision_mask"].sum())
        assert n == 16 * ROWS[row]["images"] == int(want.context.vision_mask.sum())
        torch.testing.assert_close(got["target"][:n], want.target[0, :n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["vision"][:n].float(), want.context.vision[0, :n].half().float())
        assert got["vision"].dtype == torch.float16 and got["target"].dtype == torch.float32
        assert int(got["text_mask"].sum()) == int(want.context.text_mask.sum())


def test_interrupted_run_resumes_to_the_same_shards(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    write(full)

    def crash_at_row_4(rows):
        if any(r["seed"] == 4 for r in rows):
            raise KeyboardInterrupt
        return llava_inputs(rows)

    with pytest.raises(KeyboardInterrupt):
        write(part, crash_at_row_4)
    assert sorted(p.name for p in part.iterdir()) == ["shard-00000.json", "shard-00000.safetensors"]
    calls = []
    summary = write(part, lambda rows: llava_inputs(rows, calls))
    assert summary["skipped"] == 1 and sorted(calls) == [3, 4, 5, 6]
    a, b = TargetShards(full), TargetShards(part)
    for i in range(3):
        x, y = a.load(i), b.load(i)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    (part / "shard-00002.json").unlink()  # data written, manifest not: rewritten
    calls.clear()
    write(part, lambda rows: llava_inputs(rows, calls))
    assert calls == [6]
    with pytest.raises(ValueError, match="other folder"):
        write_target_shards(tiny_model("llava"), llava_inputs, ROWS, part, shard_size=3, guide_layer=0,
                            progress=False)


def test_reader_order_is_a_function_of_seed_and_epoch(tmp_path):
    write(tmp_path)
    shards = TargetShards(tmp_path)
    order = lambda seed, epoch: [r for b in shards.batches(2, seed, epoch) for r in b["row"].tolist()]  # noqa: E731
    assert order(0, 1) == order(0, 1) and sorted(order(0, 1)) == list(range(7))
    assert len({tuple(order(0, e)) for e in range(4)}) > 1
    assert len(shards.epoch(2, 0, 0)) == shards.n_batches(2) == 5 == len(list(shards.epoch(2, 0, 0)))
    batch = next(shards.batches(3))
    assert batch["vision"].shape[1] == int(batch["vision_mask"].sum(1).max())  # trimmed to the batch


def test_reference_lvlm_targets_from_world_rows(tmp_path, reference):
    from covipal.training.data import ReferenceInputs

    model, processor, rows = reference
    write_target_shards(model, ReferenceInputs(processor).prompt, rows, tmp_path, shard_size=4, guide_layer=1,
                        batch_size=3, progress=False)
    shards = TargetShards(tmp_path)
    batch = next(shards.batches(len(rows)))
    n_v = batch["vision_mask"].sum(1).tolist()
    assert n_v == [64 if r["modality"] == "image" else 128 for r in rows[:4]]
    assert (batch["target"].sum(1) > 0).all()
    assert batch["text_mask"].sum(1).tolist() == [1 + len(r["question"].split()) for r in rows[:4]]  # <s> + words


def test_processes_split_the_shards_into_what_one_process_writes(tmp_path):
    from covipal.training.targets import SUMMARY_NAME, merge_summaries

    one, split = tmp_path / "one", tmp_path / "split"
    alone = write(one)
    calls = {0: [], 1: []}
    parts = [write(split, lambda rows, r=r: llava_inputs(rows, calls[r]), rank=r, world=2) for r in (0, 1)]
    assert sorted(calls[0]) == [0, 1, 2, 6] and sorted(calls[1]) == [3, 4, 5]  # shards 0, 2 and shard 1
    assert not (split / SUMMARY_NAME).exists()  # each rank's summary is partial
    merged = merge_summaries(parts, split)
    assert {k: merged[k] for k in ("shards", "written", "skipped", "rows", "mean_vision_tokens")} == \
        {k: alone[k] for k in ("shards", "written", "skipped", "rows", "mean_vision_tokens")}
    a, b = TargetShards(one), TargetShards(split)
    for i in range(3):
        x, y = a.load(i), b.load(i)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        write(split, rank=2, world=2)


SHARDED = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tiny_lvlms import ROWS, row_prompts, tiny_model
from covipal.training.launch import gather, is_main, rank, world_size
from covipal.training.targets import merge_summaries, write_target_shards
part = write_target_shards(tiny_model("llava"), lambda rows: row_prompts("llava", rows), ROWS, sys.argv[2],
                           shard_size=3, guide_layer=1, batch_size=2, progress=False, rank=rank(), world=world_size())
parts = gather(part)
if is_main():
    print("MERGED", json.dumps(merge_summaries(parts, sys.argv[2])))
"""


def test_two_processes_under_the_launcher_share_the_shards(tmp_path):
    """``ops.targets_processes: 2`` on a CPU: DeepSpeed's launcher starts two gloo processes, each writes
    its shards, rank 0 gathers the summaries."""
    import json
    import subprocess
    from pathlib import Path

    from covipal.training.launch import launcher_command, launcher_env

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    env = launcher_env(2)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    tests = Path(__file__).resolve().parent
    run = subprocess.run(launcher_command(script, [str(tests), str(tmp_path / "split")], 2), env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [line] = [ln for ln in run.stdout.splitlines() if "MERGED" in ln]
    merged = json.loads(line.split("MERGED", 1)[1])
    alone = write(tmp_path / "one")
    assert merged["written"] == 3 and merged["mean_vision_tokens"] == alone["mean_vision_tokens"]
    a, b = TargetShards(tmp_path / "one"), TargetShards(tmp_path / "split")
    for i in range(3):
        x, y = a.load(i), b.load(i)
        assert all(torch.equal(x[k], y[k]) for k in x)
