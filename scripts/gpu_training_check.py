"""GPU check of the training and pruning paths: CUDA, bf16, DeepSpeed on NCCL, in one command.

Runs on a tiny random reference LVLM and a few digit-world rows, so it needs no data
folder and no download (a few minutes with model builds on one GPU)::

    python scripts/gpu_training_check.py --out gpu_check

It writes ``gpu_training_check.json``: for the ``targets`` stage (shards from the SDPA model
in bf16), stage 1 and stage 2 (DeepSpeed with ``precision: auto``, i.e. bf16 on a GPU:
losses, whether the PPM changed, the engine's precision) and every registered pruning
method (generation inside the pruner, kept tokens and budgets). Each part is recorded as
``ok`` or with its error, so one failure does not hide the others.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch


def _check(name: str, report: dict, fn) -> None:
    t0 = time.time()
    try:
        report[name] = {"ok": True, **fn()}
    except Exception as err:  # recorded, the other checks still run
        report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
    report[name]["seconds"] = round(time.time() - t0, 1)
    print(name, json.dumps({k: v for k, v in report[name].items() if k != "trace"}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=64)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from covipal.config import DataConfig, ReferenceModel, parse_params
    from covipal.ppm import PPM
    from covipal.pruning import available_methods, get_method
    from covipal.reference.model import build_reference
    from covipal.reference.processor import ReferenceProcessor, build_tokenizer
    from covipal.training import stage1, stage2
    from covipal.training.data import ReferenceInputs, RowBatches
    from covipal.training.pipeline import deepspeed_config, ppm_config, stage1_config, stage2_config
    from covipal.training.targets import TargetShards, write_target_shards
    from covipal.world.dataset import make_sample
    from covipal.world.scenes import scan_pools

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__}
    params = parse_params({"deepspeed": {"micro_batch_size": 16}, "stage1": {"epochs": 2},
                           "stage2": {"deepspeed": {"micro_batch_size": 8}}})
    processor = ReferenceProcessor(build_tokenizer(), image_px=64)
    model = build_reference(ReferenceModel(), processor.image_px, seed=0).to(device, torch.bfloat16).eval()
    model.requires_grad_(False)
    inputs = ReferenceInputs(processor)
    pools = scan_pools(0)
    train_rows = [make_sample(DataConfig(), "train", i, pools) for i in range(args.rows)]
    val_rows = [make_sample(DataConfig(), "validation", i, pools) for i in range(args.rows // 2)]
    work = Path(tempfile.mkdtemp(prefix="covipal-gpu-"))

    def targets():
        out = {}
        for split, rows in (("train", train_rows), ("validation", val_rows)):
            s = write_target_shards(model, inputs.prompt, rows, work / "targets" / split, 32, guide_layer=2,
                                    batch_size=16, dtype=torch.bfloat16, progress=False)
            out[split] = {"rows": s["rows"], "mean_vision_tokens": s["mean_vision_tokens"]}
        t = TargetShards(work / "targets" / "train").load(0)["target"]
        out["target_finite"] = bool(torch.isfinite(t.float()).all())
        return out

    def train_stage1():
        shards = TargetShards(work / "targets" / "train")
        ppm = PPM(ppm_config(params, shards.d_model))
        before = [p.detach().clone() for p in ppm.parameters()]
        res = stage1.train(ppm, shards, TargetShards(work / "targets" / "validation"),
                           stage1_config(params), deepspeed_config(params, "stage1"),
                           work / "ckpt1", work / "stage1", progress=False)
        changed = any(not torch.equal(b.cpu().float(), p.detach().cpu().float()) for b, p in zip(before, ppm.parameters()))
        return {"history": res["history"], "val": res["val"], "ppm_changed": changed,
                "ppm_dtype": str(next(ppm.parameters()).dtype)}

    def train_stage2():
        ppm = PPM.from_pretrained(work / "stage1")
        ds = deepspeed_config(params, "stage2")
        res = stage2.train(model, ppm, lambda e: RowBatches(train_rows, inputs.train, ds.micro_batch_size, ds.seed, e),
                           lambda: RowBatches(val_rows, inputs.evaluation, 16), stage2_config(params), ds,
                           work / "ckpt2", work / "ppm", progress=False)
        return {"history": res["history"], "val": res["val"],
                "lvlm_frozen": not any(p.requires_grad for p in model.parameters())}

    def pruning():
        out = {}
        batch = {k: v.to(device) for k, v in inputs.prompt(val_rows[:4]).items()}
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        for name in available_methods():
            kwargs = {"ppm": str(work / "ppm")} if name == "covipal" else {}
            pruner = get_method(name, reserve_ratio=0.25, **kwargs)
            with pruner(model) as run:
                gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
            out[name] = {"new_tokens": int(gen.shape[1] - batch["input_ids"].shape[1]),
                         "budget": [[b.entering, round(b.layer_average, 2)] for b in run.budget()]}
        return out

    _check("targets", report, targets)
    _check("stage1", report, train_stage1)
    _check("stage2", report, train_stage2)
    _check("pruning", report, pruning)
    (args.out / "gpu_training_check.json").write_text(json.dumps(report, indent=2, default=str))
    print("all ok" if all(v.get("ok") for v in report.values() if isinstance(v, dict)) else "SOME CHECKS FAILED")


if __name__ == "__main__":
    main()
