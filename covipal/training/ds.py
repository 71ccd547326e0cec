"""DeepSpeed for PPM training: config, single-process setup, epoch loop with checkpoints and resume.

Only the PPM goes into :func:`initialize` (the LVLM stays outside, frozen). On a machine
without CUDA the engine runs on DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``,
gloo, fp32); on a GPU it uses NCCL and bf16 (``precision="auto"``). The optimizer is
torch's own AdamW (``torch_adam``) on both: DeepSpeed's fused Adam is a JIT-built CUDA op
that needs nvcc at run time and failed to build on an H200 host whose
``TORCH_CUDA_ARCH_LIST`` names ``9.0a`` (checked with ``scripts/gpu_training_check.py``).
Without a launcher, :func:`single_process_env` fills ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` where they are absent; under
``deepspeed``/``torchrun`` the launcher's values are kept.

:func:`fit` checkpoints after every epoch (``engine.save_checkpoint``, tag
``epoch-000e``) and resumes from the latest one: the data order of an epoch is a
function of ``(seed, epoch)`` and torch's RNG is reseeded at each epoch start, so a run
killed and resumed ends with the same weights as an uninterrupted one.

``deepspeed`` is imported inside the functions only.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
from torch import nn

from covipal.training.data import epoch_generator
from covipal.training.launch import join_process_group


@dataclass
class DeepSpeedConfig:
    """What the DeepSpeed config of a PPM run is built from (see :meth:`to_dict`).

    Parameters
    ----------
    zero_stage : {1, 2}
        ZeRO stage: 1 partitions optimizer states, 2 also gradients.
    micro_batch_size : int
        Samples per forward/backward (``train_micro_batch_size_per_gpu``).
    grad_accum : int
        Micro batches per optimizer step (``gradient_accumulation_steps``).
    lr, weight_decay, betas, eps : AdamW settings.
    gradient_clipping : float
        Max global grad norm (0 disables).
    precision : {"auto", "fp32", "bf16"}
        ``auto``: bf16 on a GPU, fp32 on the CPU (DeepSpeed's CPU path has no fp16).
    warmup_steps : int
        Linear warm-up of the learning rate over this many optimizer steps (0: none).
    seed : int
        Seed of the data order and of torch's RNG at each epoch start.
    """

    zero_stage: int = 2
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    gradient_clipping: float = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    warmup_steps: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.zero_stage not in (1, 2):
            raise ValueError(f"zero_stage must be 1 or 2, got {self.zero_stage!r} (stage 3 shards parameters, "
                             "which a PPM does not need)")
        for name in ("micro_batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.gradient_clipping < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0; weight_decay, gradient_clipping and warmup_steps must be >= 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")

    def bf16(self, on_gpu: bool) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and on_gpu)

    def to_dict(self, on_gpu: bool | None = None) -> dict:
        """The DeepSpeed JSON config (``on_gpu`` defaults to whether CUDA is available)."""
        on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        config = {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": self.gradient_clipping,
            "optimizer": {"type": "AdamW", "params": {
                "lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                "torch_adam": True}},  # no JIT-built fused Adam (see the module docstring)
            "zero_optimization": {"stage": self.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
            "bf16": {"enabled": self.bf16(on_gpu)},
            "fp16": {"enabled": False},
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        if self.warmup_steps:
            config["scheduler"] = {"type": "WarmupLR", "params": {
                "warmup_min_lr": 0.0, "warmup_max_lr": self.lr, "warmup_num_steps": self.warmup_steps,
                "warmup_type": "linear"}}
        return config


def initialize(ppm: nn.Module, cfg: DeepSpeedConfig):
    """A DeepSpeed engine training the trainable parameters of ``ppm`` (and nothing else)."""
    join_process_group()
    import deepspeed

    on_gpu = torch.cuda.is_available()
    params = [p for p in ppm.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=ppm, model_parameters=params, config=cfg.to_dict(on_gpu))
    return engine


def run_fingerprint(stage_cfg, ds: DeepSpeedConfig, **extra) -> dict:
    """What a resumed run must share with its checkpoint: ``ds``, ``extra`` and the stage
    config without ``epochs`` (so a run can be extended) and ``eval_batch_size``."""
    stage = {k: v for k, v in asdict(stage_cfg).items() if k not in ("epochs", "eval_batch_size")}
    return {"stage": stage, "ds": asdict(ds), **extra}


def checkpoint_tag(epoch: int) -> str:
    """Tag of the checkpoint written after ``epoch`` epochs."""
    return f"epoch-{epoch:04d}"


def fit(engine, batches: Callable[[int], Iterable], step: Callable[[object, object], tuple[torch.Tensor, dict]],
        epochs: int, checkpoint_dir: str | Path, *, seed: int = 0, evaluate: Callable[[int], dict] | None = None,
        fingerprint: dict | None = None, log=print, progress: bool = True) -> list[dict]:
    """Train for ``epochs`` epochs in total, resuming from the latest checkpoint in ``checkpoint_dir``.

    Parameters
    ----------
    engine
        From :func:`initialize`.
    batches : callable
        ``epoch -> iterable of micro batches``; its order must depend on ``(seed, epoch)``
        only. If it has a ``len``, the epoch is cut to a whole number of optimizer steps
        (the remainder of ``len % grad_accum`` micro batches is skipped), so no gradient
        is carried across a checkpoint.
    step : callable
        ``(engine, batch) -> (loss, metrics)``: scalar loss of one micro batch and floats to average.
    epochs : int
        Total epochs, counting those done before a resume.
    checkpoint_dir : str or Path
        Where ``engine.save_checkpoint`` writes; a ``latest`` file there means resume.
    evaluate : callable, optional
        ``epoch -> metrics`` after each epoch (before the checkpoint, so they are in it).
    fingerprint : dict, optional
        JSON-able settings stored with each checkpoint; resuming from a checkpoint with
        other settings is an error (``epochs`` should not be in it, so a run can be extended).

    Returns
    -------
    list of dict
        One entry per epoch (resumed ones included): ``epoch``, mean train ``loss`` and
        ``step`` metrics (prefixed ``train_``), the ``evaluate`` metrics.
    """
    from tqdm.auto import tqdm

    checkpoint_dir = Path(checkpoint_dir)
    history, start = [], 0
    settings = json.dumps(fingerprint, sort_keys=True, default=str)
    if (checkpoint_dir / "latest").is_file():
        _, client = engine.load_checkpoint(str(checkpoint_dir))
        if client.get("fingerprint", settings) != settings:
            raise ValueError(f"{checkpoint_dir} holds a run with other settings ({client['fingerprint']}, now "
                             f"{settings}); remove it to start afresh, or choose another checkpoint folder")
        start, history = int(client["epoch"]), list(client["history"])
        log(f"resumed from {checkpoint_dir} after epoch {start}")
    ga = engine.gradient_accumulation_steps()
    for epoch in range(start, epochs):
        torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=epoch_generator(seed, epoch))))
        engine.train()
        data = batches(epoch)
        n = len(data) // ga * ga if hasattr(data, "__len__") else None
        totals: dict[str, float] = {}
        count = 0
        for batch in tqdm(itertools.islice(data, n), total=n, desc=f"epoch {epoch + 1}/{epochs}",
                          disable=not progress, mininterval=5):
            loss, metrics = step(engine, batch)
            engine.backward(loss)
            engine.step()
            for k, v in {"loss": loss.item(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += 1
        record = {"epoch": epoch + 1, **{f"train_{k}": v / max(count, 1) for k, v in totals.items()}}
        if evaluate is not None:
            record.update(evaluate(epoch + 1))
        history.append(record)
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        engine.save_checkpoint(str(checkpoint_dir), tag=checkpoint_tag(epoch + 1),
                               client_state={"epoch": epoch + 1, "history": history, "fingerprint": settings})
    return history


def export_ppm(engine, folder: str | Path) -> None:
    """Save the engine's PPM with ``save_pretrained`` (weights as float32 safetensors)."""
    from covipal.ppm import PPM

    ppm = PPM(engine.module.config)
    ppm.load_state_dict({k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()})
    ppm.save_pretrained(folder)
