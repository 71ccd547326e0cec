"""Pretrained checkpoints of every family, saved as real ones are, through the base stage's record.

For each family of tests/tiny_lvlms.py: a tiny random model and its processor saved with
``save_pretrained``, recorded by ``build_base`` and loaded by ``load_base``; prompts made by
``HFInputs`` from its processor and chat template for an image row and a video row (frames)
run forward, with as many vision tokens as the pruning runtime counts. Also: a checkpoint
swapped inside the same folder changes the recorded lineage, and the processors with a video
processor (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision) load where torchvision cannot be imported.
"""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_lvlms
import torch
from tiny_lvlms import FAMILIES, IMAGE, VIDEO, NormPruner, save_checkpoint

from covipal.base_model import PRETRAINED_RECORD, build_base, load_base, load_processor
from covipal.config import parse_params
from covipal.training.hf_inputs import HFInputs

PER_IMAGE = {"llava": 16, "llava_next": 10, "llava_onevision": 10, "qwen2_vl": 16, "qwen2_5_vl": 16}


def record_base(checkpoint: Path, out: Path) -> dict:
    """Run the base stage on ``model.source: <checkpoint>``; return its record."""
    params = parse_params({"model": {"source": str(checkpoint)}})
    assert build_base(params, out.parent / "unused-data", out, log=lambda *_: None) == {}
    return json.loads((out / PRETRAINED_RECORD).read_text())


def rows() -> list[dict]:
    """An image row (a 32x32 picture) and a video row (three 16x16 frames)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pic = lambda n: Image.fromarray(rng.integers(0, 255, (n, n, 3), dtype=np.uint8))  # noqa: E731
    return [{"images": [pic(32)], "question": "what colour is the square?", "answer": "red"},
            {"images": [pic(16) for _ in range(3)], "question": "how many frames are there", "answer": "two"}]


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tmp_path_factory):
    """``(family, model, processor, record)`` of a saved tiny checkpoint loaded through the base stage."""
    root = tmp_path_factory.mktemp(request.param)
    save_checkpoint(request.param, root / "checkpoint")
    record = record_base(root / "checkpoint", root / "base")
    model, processor = load_base(root / "base")
    return request.param, model, processor, record


def test_the_base_stage_records_a_local_checkpoint_by_its_content(loaded):
    family, model, processor, record = loaded
    assert record["local"] is True and record["requested_revision"] == "main"
    assert record["revision"].startswith("sha256:") and len(record["revision"]) == len("sha256:") + 16
    assert model.config.model_type == family and not model.training
    assert processor.chat_template and type(processor).__module__ == f"transformers.models.{family}.processing_{family}"


def test_prompts_of_images_and_frames_run_forward_with_the_counted_vision_tokens(loaded):
    family, model, processor, _ = loaded
    batch = HFInputs(processor).prompt(rows())
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    in_ids = (torch.isin(ids, torch.tensor([IMAGE, VIDEO])) & real).sum(1)
    assert in_ids.tolist() == [PER_IMAGE[family], 3 * PER_IMAGE[family]]  # a video row: one image per frame
    with NormPruner(reserve_ratio=0.5)(model) as run, torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all() and logits.shape[0] == 2
    assert run.n_vision.tolist() == in_ids.tolist()  # the adapter's vision ids are the processor's tokens
    assert [len(k) for k in run.kept_vision] == [(n + 1) // 2 for n in in_ids.tolist()]
    train = HFInputs(processor).train(rows())
    with torch.no_grad():
        assert torch.isfinite(model(**train).loss)


def test_a_saved_checkpoint_generates_until_its_eos(loaded):
    family, model, processor, _ = loaded
    batch = HFInputs(processor).prompt(rows()[:1])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] - batch["input_ids"].shape[1] in (1, 2, 3)
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id == 0


def test_a_checkpoint_swapped_in_the_same_folder_changes_the_recorded_lineage(tmp_path):
    from covipal.training.pipeline import base_lineage

    folder = tmp_path / "my-lvlm"
    save_checkpoint("llava", folder, seed=0)
    first = record_base(folder, tmp_path / "base")
    lineage = base_lineage(tmp_path / "base")
    assert record_base(folder, tmp_path / "base") == first  # same files, same record
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.lock").write_text("bookkeeping")  # hidden files are not the checkpoint
    assert record_base(folder, tmp_path / "base") == first
    shutil.rmtree(folder)
    save_checkpoint("llava", folder, seed=1)  # other weights, same folder
    second = record_base(folder, tmp_path / "base")
    assert second["source"] == first["source"] and second["revision"] != first["revision"]
    assert base_lineage(tmp_path / "base") == (str(folder), second["revision"]) != lineage
    model, _ = load_base(tmp_path / "base")  # the swapped weights are the ones loaded
    swapped = tiny_lvlms._build_model("llava", 2, seed=1).state_dict()
    assert model.state_dict().keys() == swapped.keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, swapped[name], msg=name)
    assert not torch.equal(model.lm_head.weight, tiny_lvlms.tiny_model("llava").lm_head.weight)


def test_a_folder_that_is_not_a_checkpoint_is_refused_by_name(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json.*save_pretrained"):
        record_base(tmp_path / "empty", tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_a_recorded_folder_that_moved_away_is_named(tmp_path):
    save_checkpoint("llava", tmp_path / "ck")
    record_base(tmp_path / "ck", tmp_path / "base")
    (tmp_path / "ck").rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"ck.*rerun the base stage"):
        load_base(tmp_path / "base")


WITHOUT_TORCHVISION = """  # a fresh interpreter in which torchvision is neither found nor importable
import builtins, sys
real = builtins.__import__
def refuse(name, *args, **kwargs):
    if name == "torchvision" or name.startswith("torchvision."):
        raise ModuleNotFoundError("No module named 'torchvision'")
    return real(name, *args, **kwargs)
builtins.__import__ = refuse
import importlib.util
find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "torchvision" else find(name, *a)
from covipal.base_model import load_processor
p = load_processor(sys.argv[1])
assert "torchvision" not in sys.modules
print(type(p).__name__, type(p.video_processor).__name__, bool(p.chat_template))
import numpy as np
try:
    p(text=[p.video_token], videos=[np.zeros((2, 16, 16, 3), np.uint8)])
except RuntimeError as err:
    print(str(err).replace("\\n", " "))
"""


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_processors_with_a_video_processor_load_without_torchvision(tmp_path, family):
    """Without torchvision importable, the processor is the family's own class with its image processor,
    tokenizer and chat template, and a video processor that refuses videos with a message saying why."""
    import importlib.util

    save_checkpoint(family, tmp_path / "ck")
    if importlib.util.find_spec("torchvision") is None:  # this install has none: the natural case, in-process
        processor = load_processor(tmp_path / "ck")
        assert "torchvision" not in sys.modules
    # and in a fresh interpreter where importing torchvision fails, whether or not it is installed
    out = subprocess.run([sys.executable, "-c", WITHOUT_TORCHVISION, str(tmp_path / "ck")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (name, video, template), refusal = out.stdout.splitlines()[0].split(), out.stdout.splitlines()[1]
    assert "built without torchvision" in refusal and "frames as images" in refusal
    expected = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                "llava_onevision": "LlavaOnevisionProcessor"}[family]
    assert (name, video, template) == (expected, "FramesOnlyVideoProcessor", "True")
    if importlib.util.find_spec("torchvision") is None:
        assert type(processor).__name__ == expected and processor.chat_template
        again = pickle.loads(pickle.dumps(processor))  # worker processes get a working copy
        assert type(again).__mro__[1] is type(processor).__mro__[1] and again.video_processor.to_dict() == \
            processor.video_processor.to_dict()
        saved = tmp_path / "resaved"
        processor.save_pretrained(saved)  # the stand-in saves the real video processor's settings back
        video = json.loads((saved / "processor_config.json").read_text())["video_processor"]
        original = json.loads((tmp_path / "ck" / "processor_config.json").read_text())["video_processor"]
        assert video == original and not video["video_processor_type"].startswith("FramesOnly")
