"""The PPM stages of the pipeline: targets, stage 1, stage 2 plus registration, from params to outputs.

Each function is what one DVC stage calls (``pipelines/targets.py``, ``stage1.py``,
``stage2.py``): it reads the upstream outputs, builds the library's configs from
:class:`covipal.config.Params` and calls the library.

Resume: work in progress lives in scratch folders that are no DVC outputs (``checkpoints/``,
ignored by git): the target shards being written (published to ``data/targets`` when all
are done) and the DeepSpeed checkpoints of each epoch. Deleting them never makes DVC rerun
a stage, and the stages' outputs stay ordinary cached outputs (DVC's run cache restores
them). :func:`resumable` decides what a new run may reuse: a folder left by an interrupted
run of the same inputs (base model, data, the code the stage runs and settings, hashed
into a key) is resumed; a folder left by a run that finished, or by other inputs, is
emptied first, since DVC only reruns a finished stage when something changed (or it is forced).

Checks before damage: everything that can be checked before work (the guide layer against
the base model's depth, read from its config; the stage-1 PPM's width against the base
model's hidden size; vision tokens in the prompts of the first rows) is checked before
:func:`resumable` empties a folder, so a failed check leaves the previous outputs in place.

With several processes (:mod:`covipal.training.launch`) every rank trains on its own
share of the data; rank 0 alone prepares the folders, exports the PPM and registers it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from covipal.config import ConfigError, Params
from covipal.io import atomic_output, content_hash, write_json
from covipal.training.launch import ShardsForRank, barrier, gather, is_main, rank, world_size

RESUME_FILE = "resume.json"
STAGE1_METRICS = "metrics.json"  # stage-1 validation metrics, next to the stage-1 PPM
SPLITS = ("train", "validation")
CHECK_ROWS = 4  # first train rows whose prompts must hold vision tokens before a stage starts
PROJECT = Path(__file__).resolve().parents[2]


# --- lineage and resume ----------------------------------------------------------------


def code_version(stage: str) -> str:
    """Hash of the code stage ``stage`` runs: a resumed run must run the same code.

    The files are the import closure (:func:`covipal.deps.import_closure`) of the stage's
    script ``pipelines/<stage>.py``, the same files ``dvc.yaml`` lists as its dependencies;
    without that script (the library used on its own), the closure of this module.
    """
    from covipal.deps import code_digest, import_closure

    script = PROJECT / "pipelines" / f"{stage}.py"
    script = script if script.is_file() else Path(__file__).resolve()
    return code_digest(import_closure(script, root=PROJECT), PROJECT)


def dvc_lock_md5(root: str | Path, path: str | Path) -> str | None:
    """The md5 that ``dvc.lock`` records for output ``path`` (relative to ``root``), if any."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return None
    rel = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == rel:
                return out.get("md5")
    return None


def resumable(folder: Path, key: dict, log=print) -> bool:
    """Make ``folder`` ready for a run with inputs ``key``; whether it holds an interrupted run to resume.

    Keeps the folder only if the run that wrote it had the same ``key`` and did not finish
    (:func:`mark_complete`); otherwise empties it. Call on one rank only.
    """
    key = json.loads(json.dumps(key))  # as the marker will hold it (tuples become lists)
    marker = folder / RESUME_FILE
    old = json.loads(marker.read_text()) if marker.is_file() else None
    resume = old is not None and old.get("key") == key and not old.get("complete")
    if folder.exists() and not resume:
        why = "no resume record" if old is None else "other inputs" if old.get("key") != key else "finished run"
        log(f"{folder}: starting afresh ({why})")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run = old.get("run") if resume else None
    write_json(marker, {"key": key, "complete": False, "run": run or uuid.uuid4().hex})
    return resume


def training_run(folder: Path) -> str:
    """The id of the run in ``folder`` (kept by a resumed run, new for a fresh one): the registration key."""
    return json.loads((folder / RESUME_FILE).read_text())["run"]


def mark_complete(folder: Path) -> None:
    """Record that the run in ``folder`` finished (a later run starts afresh)."""
    marker = folder / RESUME_FILE
    write_json(marker, {**json.loads(marker.read_text()), "complete": True})


def _read_key(folder: Path, what: str) -> dict:
    marker = folder / RESUME_FILE
    info = json.loads(marker.read_text()) if marker.is_file() else {}
    if not info.get("complete"):
        raise FileNotFoundError(f"{folder} holds no finished {what}; run its stage first (dvc repro)")
    return info["key"]


# --- shared glue -------------------------------------------------------------------------


def _device():
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def load_frozen_base(base_dir: Path, prompt: str = "{question}"):
    """The frozen base LVLM on this process's device and the inputs maker of its rows:
    :class:`~covipal.training.data.ReferenceInputs` for the reference model,
    :class:`~covipal.training.hf_inputs.HFInputs` (its own processor and chat template, the
    user text ``prompt``, i.e. ``model.prompt``) for a pretrained one."""
    from covipal.base_model import PRETRAINED_RECORD, load_base
    from covipal.training.data import ReferenceInputs
    from covipal.training.hf_inputs import HFInputs

    model, processor = load_base(base_dir)
    pretrained = (base_dir / PRETRAINED_RECORD).exists()
    inputs = HFInputs(processor, prompt) if pretrained else ReferenceInputs(processor)
    return model.to(_device()).requires_grad_(False).eval(), inputs


# --- checks before work ------------------------------------------------------------------


def base_config(base_dir: Path):
    """The base model's ``transformers`` config, read without its weights: from the recorded
    source of a pretrained model, from ``base_dir`` for the reference one."""
    from transformers import AutoConfig

    from covipal.base_model import PRETRAINED_RECORD

    record = base_dir / PRETRAINED_RECORD
    if record.exists():
        info = json.loads(record.read_text())
        return AutoConfig.from_pretrained(info["source"], revision=info["revision"])
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir} holds no base model; run its stage first (dvc repro base)")
    return AutoConfig.from_pretrained(base_dir)


def check_guide_layer(params: Params, base_dir: Path) -> None:
    """``targets.guide_layer`` against the depth of the base model's LLM (its config)."""
    params.check_guide_layer(base_config(base_dir).get_text_config().num_hidden_layers)


def check_ppm_width(ppm_dir: Path, base_dir: Path) -> None:
    """The PPM in ``ppm_dir`` reads hidden states of the base model's width (its config)."""
    from covipal.ppm import CONFIG_NAME

    path = ppm_dir / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run stage 1 first (dvc repro stage1)")
    d_model = json.loads(path.read_text()).get("d_model")
    hidden = base_config(base_dir).get_text_config().hidden_size
    if d_model != hidden:
        raise ConfigError(f"the stage-1 PPM in {ppm_dir} reads hidden states of width {d_model}, but the base model's "
                          f"LLM has hidden size {hidden}: it was trained for another model.source; rerun the targets "
                          "and stage1 stages for this model (dvc repro stage1)")


def check_vision_tokens(model, inputs, rows: list[dict], split: str) -> None:
    """Each of ``rows`` (of ``split``) gets a prompt holding the model's vision tokens."""
    import torch

    from covipal.pruning.adapters import get_adapter

    ids = get_adapter(model).vision_token_ids(model.config)
    prompt = inputs.prompt(rows)
    found = torch.isin(prompt["input_ids"], torch.tensor(ids)).sum(1).tolist()
    empty = [i for i, n in enumerate(found) if n == 0]
    if empty:
        raise ConfigError(f"the prompts of {split} rows {empty} hold none of the model's vision tokens (ids {ids}): "
                          "the processor's chat template or model.prompt drops the image placeholder; give "
                          "model.source a folder with the model's own processor and chat template, and keep "
                          "model.prompt to text around {question}")


def _first_rows(split, n: int = CHECK_ROWS) -> list[dict]:
    return [split[i] for i in range(min(n, len(split)))]


def _rows(split, n: int | None):
    """The first ``n`` rows of a ``datasets`` split (all if ``n`` is None or larger)."""
    return split if n is None or n >= len(split) else split.select(range(n))


def base_lineage(base_dir: Path) -> tuple[str, str]:
    """``(source, revision)`` of the base model: a pretrained id and revision, or ``reference`` and a content hash."""
    from covipal.base_model import PRETRAINED_RECORD

    record = base_dir / PRETRAINED_RECORD
    if record.exists():
        info = json.loads(record.read_text())
        return info["source"], info["revision"]
    return "reference", "sha256:" + content_hash(base_dir)


# --- the library's configs, from the params sections --------------------------------------


def deepspeed_config(params: Params, stage: str):
    """``DeepSpeedConfig`` of ``stage`` (the ``deepspeed`` section with the stage's overrides; the
    launch keys ``processes`` and ``hostfile`` pick the launcher instead)."""
    from covipal.config import LAUNCH_KEYS
    from covipal.training.ds import DeepSpeedConfig

    values = asdict(params.deepspeed_for(stage))
    return DeepSpeedConfig(**{k: v for k, v in values.items() if k not in LAUNCH_KEYS})


def ppm_config(params: Params, d_model: int):
    """``PPMConfig`` of ``stage1.ppm`` for a base model of hidden size ``d_model``."""
    from covipal.ppm import PPMConfig

    return PPMConfig(d_model=d_model, **asdict(params.stage1.ppm))


def stage1_config(params: Params):
    """``Stage1Config`` of the ``stage1`` section at ``pruning.reserve_ratio``."""
    from covipal.training.stage1 import Stage1Config

    s = params.stage1
    return Stage1Config(loss=s.loss, normalize=s.normalize, reserve_ratio=params.pruning.reserve_ratio,
                        epochs=s.epochs, eval_batch_size=s.eval_batch_size)


def stage2_config(params: Params):
    """``Stage2Config`` of the ``stage2`` section at ``pruning.reserve_ratio``."""
    from covipal.training.stage2 import Stage2Config

    s = params.stage2
    return Stage2Config(reserve_ratio=params.pruning.reserve_ratio, temperature=s.temperature,
                        threshold=s.threshold, lambda_bin=s.lambda_bin, lambda_ratio=s.lambda_ratio,
                        min_retention=s.min_retention, epochs=s.epochs, estimator=s.estimator, noise=s.noise)


# --- the stages ---------------------------------------------------------------------------


def make_targets(params: Params, data_dir: Path, base_dir: Path, out_dir: Path, work_dir: Path | None = None,
                 log=print) -> dict:
    """Stage ``targets``: guide-layer attention targets of the train and validation rows, as shards.

    Writes the shards of ``train`` and ``validation`` into ``work_dir`` (resumable shard by
    shard; default: the hidden sibling ``.<name>.work`` of ``out_dir``) and, once all are
    written, moves them to ``out_dir`` in one step. Under the launcher
    (``ops.targets_processes``) the processes split the shards between them. Returns per
    split the rows, shards written and skipped and mean vision tokens, and the minutes.
    """
    import torch
    from datasets import load_from_disk

    from covipal.training.targets import merge_summaries, write_target_shards

    t0 = time.time()
    cfg = params.targets
    work_dir = out_dir.with_name(f".{out_dir.name}.work") if work_dir is None else work_dir
    check_guide_layer(params, base_dir)  # from the config: before the weights load
    model, inputs = load_frozen_base(base_dir, params.model.prompt)
    ds = load_from_disk(str(data_dir))
    check_vision_tokens(model, inputs, _first_rows(ds["train"]), "train")
    if is_main():
        key = {"base": content_hash(base_dir), "data": content_hash(data_dir), "code": code_version("targets"),
               "targets": asdict(cfg), "prompt": params.model.prompt}
        if resumable(work_dir, key, log):
            log(f"resuming the target shards in {work_dir}")
    barrier()
    out = {}
    for split in SPLITS:  # with several processes each writes every world-th shard
        summary = write_target_shards(model, inputs.prompt, _rows(ds[split], getattr(cfg.rows, split)),
                                      work_dir / split, cfg.shard_size, guide_layer=cfg.guide_layer,
                                      queries=cfg.queries, batch_size=cfg.batch_size, dtype=getattr(torch, cfg.dtype),
                                      progress=is_main(), rank=rank(), world=world_size())
        parts = gather(summary)  # every rank has written its shards of the split
        if world_size() > 1 and is_main():
            summary = merge_summaries(parts, work_dir / split)
        out[split] = {k: summary[k] for k in ("rows", "shards", "written", "skipped", "mean_vision_tokens")}
    if is_main():
        mark_complete(work_dir)
        with atomic_output(out_dir) as tmp:
            shutil.move(work_dir, tmp)
    return {**out, "world_size": world_size(), "minutes": (time.time() - t0) / 60}


def run_stage1(params: Params, targets_dir: Path, out_dir: Path, checkpoint_dir: Path, log=print) -> dict:
    """Stage ``stage1``: train a fresh PPM on the target shards with DeepSpeed; export it to ``out_dir``.

    Returns ``{"history", "val": {loss, recall, spearman}, "world_size", "minutes"}`` (on every rank).
    """
    import torch

    from covipal.ppm import PPM
    from covipal.training import stage1
    from covipal.training.targets import TargetShards

    t0 = time.time()
    train, val = TargetShards(targets_dir / "train"), TargetShards(targets_dir / "validation")
    cfg = stage1_config(params)
    ds = deepspeed_config(params, "stage1")
    world = world_size()
    if is_main():
        key = {"targets": _read_key(targets_dir, "targets"), "code": code_version("stage1"), "world_size": world,
               "stage1": {**asdict(cfg), "epochs": None}, "ppm": asdict(params.stage1.ppm),
               "deepspeed": asdict(ds)}
        if resumable(checkpoint_dir, key, log):
            log(f"resuming stage 1 from {checkpoint_dir}")
    barrier()
    torch.manual_seed(ds.seed)
    ppm = PPM(ppm_config(params, train.d_model))
    source = train if world == 1 else ShardsForRank(train, rank(), world)
    result = stage1.train(ppm, source, val if is_main() else None, cfg, ds, checkpoint_dir,
                          out_dir if is_main() else None, log=log)
    if is_main():
        write_json(out_dir / STAGE1_METRICS, result["val"])
        mark_complete(checkpoint_dir)
    return {**result, "world_size": world, "minutes": (time.time() - t0) / 60}


def run_stage2(params: Params, data_dir: Path, base_dir: Path, stage1_dir: Path, out_dir: Path,
               checkpoint_dir: Path, root: Path, log=print) -> dict:
    """Stage ``stage2``: train the stage-1 PPM end to end through the frozen LVLM, export and register it.

    Registration (rank 0, inside the active MLflow run) tags the version with its lineage:
    base model and revision, guide layer, reserve ratio, data version (content hash of
    ``data_dir``; ``dvc.lock``'s md5 as ``data_dvc_md5``) and code commit.

    Returns ``{"history", "val", "registry", "world_size", "minutes"}``; ``val`` holds
    ``full_accuracy`` (unpruned), ``soft_accuracy``, ``hard_accuracy`` (top-k at the
    reserve ratio), ``soft_hard_gap``, ``pruning_drop`` (full - hard), ``mean_retention``
    and ``soft_kept``. ``registry`` is empty on ranks other than 0.
    """
    import torch
    from datasets import load_from_disk

    from covipal.ppm import PPM
    from covipal.training import stage2
    from covipal.training.data import RowBatches

    t0 = time.time()
    cfg = stage2_config(params)
    ds_cfg = deepspeed_config(params, "stage2")
    world, data_version = world_size(), content_hash(data_dir)
    check_ppm_width(stage1_dir, base_dir)  # from the configs: before the weights load
    torch.manual_seed(ds_cfg.seed)
    model, inputs = load_frozen_base(base_dir, params.model.prompt)
    data = load_from_disk(str(data_dir))
    check_vision_tokens(model, inputs, _first_rows(data["train"]), "train")
    if is_main():
        key = {"base": content_hash(base_dir), "data": data_version, "stage1": content_hash(stage1_dir),
               "code": code_version("stage2"), "world_size": world, "stage2": {**asdict(params.stage2), "epochs": None},
               "reserve_ratio": params.pruning.reserve_ratio, "deepspeed": asdict(ds_cfg),
               "prompt": params.model.prompt}
        if resumable(checkpoint_dir, key, log):
            log(f"resuming stage 2 from {checkpoint_dir}")
    barrier()
    train = _rows(data["train"], params.stage2.rows.train)
    if world > 1:  # this rank's rows; the same count on every rank
        train = train.select(range(rank(), len(train) // world * world, world))
    val = _rows(data["validation"], params.stage2.rows.validation)
    result = stage2.train(
        model, PPM.from_pretrained(stage1_dir),
        lambda epoch: RowBatches(train, inputs.train, ds_cfg.micro_batch_size, ds_cfg.seed, epoch),
        (lambda: RowBatches(val, inputs.evaluation, params.stage2.eval_batch_size)) if is_main() else None,
        cfg, ds_cfg, checkpoint_dir, out_dir if is_main() else None, log=log)
    out = {**result, "registry": {}, "world_size": world}
    if not is_main():
        return {**out, "minutes": (time.time() - t0) / 60}
    v = result["val"]
    v.update(soft_hard_gap=v["soft_accuracy"] - v["hard_accuracy"], pruning_drop=v["full_accuracy"] - v["hard_accuracy"])
    # registered before the run is marked finished: if registration fails (tracking server down),
    # the rerun resumes the finished checkpoint instead of training again, and completes the same version
    out["registry"] = register(params, out_dir, v, stage1_dir, base_dir, data_dir, data_version, root,
                               registration_key=training_run(checkpoint_dir))
    mark_complete(checkpoint_dir)
    return {**out, "minutes": (time.time() - t0) / 60}


def register(params: Params, ppm_dir: Path, val: dict, stage1_dir: Path, base_dir: Path, data_dir: Path,
             data_version: str, root: Path, registration_key: str | None = None) -> dict:
    """Register the PPM in ``ppm_dir`` with its lineage; the champion gate decides on ``registry.metric``."""
    from covipal.registry import code_commit, register_ppm

    stage1_val = json.loads((stage1_dir / STAGE1_METRICS).read_text())
    metrics = {**val, **{f"stage1_{k}": v for k, v in stage1_val.items()}}
    source, revision = base_lineage(base_dir)
    lock_md5 = dvc_lock_md5(root, data_dir)
    reg = register_ppm(ppm_dir, metrics=metrics, metric=params.registry.metric, base_model=f"{source}@{revision}",
                       guide_layer=params.targets.guide_layer, reserve_ratio=params.pruning.reserve_ratio,
                       data_version=f"sha256:{data_version}", commit=code_commit(root), name=params.registry.model_name,
                       tags={"base_source": source, "base_revision": revision, "targets_queries": params.targets.queries,
                             **({"data_dvc_md5": lock_md5} if lock_md5 else {})},
                       registration_key=registration_key)
    return {"name": reg.name, "version": int(reg.version), "promoted": reg.promoted, "reason": reg.reason,
            "champion": int(reg.champion), "model_uri": reg.model_uri, "metric": params.registry.metric,
            "aliases": ["challenger", "champion"] if reg.promoted else ["challenger"]}
