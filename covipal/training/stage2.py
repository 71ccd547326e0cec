"""Stage 2, end to end: the PPM learns from the frozen LVLM's answer loss through a soft mask.

Hard top-k has no gradient, so training simulates pruning. Each vision token ``k`` gets a
retention

    m_k = sigmoid((s_k - tau) / T)        (floored at ``min_retention``, so log m_k is finite)

from its PPM score ``s_k``, and ``log m_k`` is added to every attention logit that reads
key ``k``, in every layer and for every query: attention to ``k`` is multiplied by ``m_k``
before renormalisation, so ``m_k -> 0`` removes the token and ``m_k = 1`` leaves it as it
is. ``tau`` (``threshold``): ``"topk"`` (default) puts it, per sample and without
gradient, halfway between the ``k``-th and ``(k+1)``-th highest scores with
``k = ceil(r n_v)``, so the tokens hard top-k would keep are those with ``m > 0.5`` and
training matches inference; ``"zero"`` fixes ``tau = 0`` and leaves the kept share to
the ratio term. ``T`` (``temperature``) is in score units; stage 1 trains scores in
z units of the targets, so ``T = 1`` is moderately soft.

The bias is applied by replacing the LLM's 2-D attention mask with a 4-D float mask
(B, 1, L, L): 0 where the causal and padding mask allow, the dtype's minimum elsewhere,
plus ``log m_k`` on the columns of vision keys. transformers passes a 4-D mask through
unchanged, so SDPA still runs. The multimodal model computes its positions (M-RoPE
included) from the 2-D mask first; only the language model sees the 4-D one. On CUDA,
while gradients flow into the mask, SDPA is held to its math kernel: the backward of
the memory-efficient kernel with a learned bias failed on an H200 ("LSE is not
correctly aligned"; ``scripts/gpu_training_check.py`` checks this path).

``estimator = "straight_through"`` (an option, off by default) keeps the forward hard:
``m_k = 1`` for the top ``k`` scores and ``min_retention`` for the rest, exactly the tokens
inference keeps, while the backward passes the gradient of ``log m_k`` to ``s_k / T``
unchanged. A sigmoid passes almost nothing to scores far from ``tau`` (its slope
``m (1 - m) / T`` vanishes there), so a kept token whose attention raises the answer loss
(a distracting digit ranked well above the threshold) never learns to drop; here it
does, and the token that was next in rank comes in. Dropped tokens get ~no gradient
(their attention is ~0), so the ranking changes by kept tokens moving down or up. The
two regularisers are constant under the hard forward (logged, not trained).

Loss = LM loss on the answer tokens + ``lambda_bin * mean(m (1 - m))`` (pushes each
retention towards 0 or 1) + ``lambda_ratio * mean_b (mean_k m - r)^2`` (keeps the kept
share near ``r``). The LVLM is frozen (``requires_grad=False``, eval mode); only the PPM
changes. The PPM reads the prompt's text only: answer tokens (``labels != -100``) are
left out of ``H_t``, as at inference.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from covipal.pruning.adapters import get_adapter
from covipal.pruning.base import PruningContext, n_keep, select
from covipal.pruning.runtime import build_context
from covipal.training.ds import DeepSpeedConfig, export_ppm, fit, initialize, run_fingerprint

ScoreFn = Callable[[PruningContext], torch.Tensor]


@dataclass
class Stage2Config:
    """Stage-2 settings (optimizer and batch geometry are in :class:`DeepSpeedConfig`).

    Parameters
    ----------
    reserve_ratio : float
        ``r``: kept share of vision tokens aimed at (and of the hard top-k in validation).
    temperature : float
        ``T`` of the retention sigmoid, in score units (straight-through: the gradient scale).
    threshold : {"topk", "zero"}
        Where the sigmoid is centred (module docstring).
    lambda_bin, lambda_ratio : float
        Weights of the binarisation and kept-share terms (not tuned).
    min_retention : float
        Floor of ``m`` so that ``log m`` stays finite.
    epochs : int
    estimator : {"soft", "straight_through"}
        Sigmoid retention, or hard top-k with a straight-through gradient (module docstring).
    noise : float
        Straight-through only: scale of the Gumbel noise added to the scores before the top-k
        while gradients are on (0: none), so tokens near the threshold are sometimes kept
        and learn whether they help (the Gumbel top-k samples ``k`` tokens from
        ``softmax(s / noise)`` without replacement).
    """

    reserve_ratio: float = 0.25
    temperature: float = 1.0
    threshold: Literal["topk", "zero"] = "topk"
    lambda_bin: float = 0.5
    lambda_ratio: float = 5.0
    min_retention: float = 1e-6
    epochs: int = 1
    estimator: Literal["soft", "straight_through"] = "soft"
    noise: float = 0.0

    def __post_init__(self):
        if not 0 < self.reserve_ratio <= 1:
            raise ValueError(f"reserve_ratio must be in (0, 1], got {self.reserve_ratio!r}")
        if self.temperature <= 0 or not 0 < self.min_retention < 1:
            raise ValueError("temperature must be > 0 and min_retention in (0, 1)")
        if self.threshold not in ("topk", "zero"):
            raise ValueError(f"threshold must be 'topk' or 'zero', got {self.threshold!r}")
        if self.estimator not in ("soft", "straight_through"):
            raise ValueError(f"estimator must be 'soft' or 'straight_through', got {self.estimator!r}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise!r}")
        if self.lambda_bin < 0 or self.lambda_ratio < 0 or self.epochs < 1:
            raise ValueError("lambda_bin and lambda_ratio must be >= 0, epochs >= 1")


def retention(scores: torch.Tensor, mask: torch.Tensor, cfg: Stage2Config) -> torch.Tensor:
    """Retention ``m`` (B, n_v) in [min_retention, 1] from scores (B, n_v); 1 on padding."""
    mask = mask.bool()
    s = scores.float()
    if cfg.threshold == "zero":
        tau = torch.zeros(s.shape[0], 1, device=s.device)
    else:
        with torch.no_grad():
            ranked = torch.where(mask, s, float("-inf")).sort(dim=1, descending=True).values  # (B, n_v)
            n = mask.sum(dim=1)
            k = torch.tensor([n_keep(int(v), cfg.reserve_ratio) for v in n.tolist()], device=s.device)
            kth = ranked.gather(1, (k - 1).clamp_min(0)[:, None])
            nxt = ranked.gather(1, k.clamp(max=ranked.shape[1] - 1)[:, None])
            tau = torch.where((k < n)[:, None], (kth + nxt) / 2, float("-inf"))  # all kept: m = 1
    m = torch.sigmoid((torch.where(mask, s, 0.0) - tau) / cfg.temperature).clamp_min(cfg.min_retention)
    return torch.where(mask, m, 1.0)


def straight_through(scores: torch.Tensor, mask: torch.Tensor, cfg: Stage2Config
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard top-k retention ``m`` (B, n_v) in {min_retention, 1} (1 on padding) and ``log m``
    whose gradient reaches ``scores`` (B, n_v) as ``d log m / d s = 1 / T``. While gradients
    are on, the top-k ranks ``scores + noise * Gumbel``."""
    mask = mask.bool()
    s = scores.float()
    ranked = s.detach()
    if cfg.noise > 0 and torch.is_grad_enabled():
        u = torch.rand_like(ranked).clamp(1e-9, 1 - 1e-9)
        ranked = ranked - cfg.noise * torch.log(-torch.log(u))
    kept = torch.zeros_like(mask)
    for b, index in enumerate(select(torch.where(mask, ranked, float("-inf")), mask.sum(dim=1), cfg.reserve_ratio)):
        kept[b, index] = True
    m = torch.where(kept | ~mask, 1.0, cfg.min_retention)
    log_m = m.log() + torch.where(mask, s - s.detach(), 0.0) / cfg.temperature
    return m, log_m


def retention_and_log(scores: torch.Tensor, mask: torch.Tensor, cfg: Stage2Config
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, log m)`` (B, n_v) of ``cfg.estimator``: :func:`retention` or :func:`straight_through`."""
    if cfg.estimator == "straight_through":
        return straight_through(scores, mask, cfg)
    m = retention(scores, mask, cfg)
    return m, m.log()


def soft_attention_mask(real: torch.Tensor, log_keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """4-D additive mask (B, 1, L, L) in ``dtype``.

    Causal and padding from ``real`` (B, L) bool (the dtype's minimum where not allowed),
    plus ``log_keep`` (B, L) on every allowed logit reading that key.
    """
    L = real.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=real.device).tril()
    allowed = causal[None] & real[:, None, :]  # (B, L, L): query i may read key j
    base = torch.zeros(allowed.shape, dtype=torch.float32, device=real.device)
    base = base.masked_fill(~allowed, torch.finfo(dtype).min)
    return (base + torch.where(allowed, log_keep[:, None, :].float(), 0.0)).to(dtype)[:, None]


@dataclass
class SoftOutput:
    """A soft-pruned forward: the model output and, per vision token, score and retention (B, n_v)."""

    output: object
    scores: torch.Tensor
    retention: torch.Tensor
    vision_mask: torch.Tensor


@contextmanager
def _soft_hooks(model: nn.Module, score_fn: ScoreFn, cfg: Stage2Config, exclude: torch.Tensor | None):
    adapter = get_adapter(model)
    base, llm = adapter.locate(model)
    token_ids = torch.tensor(adapter.vision_token_ids(model.config))
    state: dict = {}

    def read_ids(module, args, kwargs):
        state["input_ids"] = kwargs.get("input_ids", args[0] if args else None)

    def before_llm(module, args, kwargs):
        embeds, ids = kwargs.get("inputs_embeds"), state.pop("input_ids", None)
        if embeds is None or ids is None:
            raise ValueError("soft pruning needs the LVLM called with `input_ids` (and pixel values)")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise NotImplementedError("soft pruning needs a 2-D attention mask (batch, sequence)")
        if kwargs.get("cache") is not None and kwargs["cache"].get_seq_length() > 0:
            raise NotImplementedError("soft pruning applies to a full forward, not to decoding from a cache")
        real = mask.bool() if mask is not None else torch.ones(embeds.shape[:2], dtype=torch.bool,
                                                                  device=embeds.device)
        vision = torch.isin(ids, token_ids.to(ids.device)) & real
        prompt = real if exclude is None else real & ~exclude.to(real.device)
        ctx = build_context(embeds, prompt | vision, vision, ids, model)
        scores = score_fn(ctx)
        m, log_m = retention_and_log(scores, ctx.vision_mask, cfg)
        log_keep = torch.zeros(real.shape, dtype=torch.float32, device=real.device)
        log_keep = log_keep.scatter_add(1, ctx.vision_index, torch.where(ctx.vision_mask, log_m, 0.0))
        state.update(scores=scores, retention=m, vision_mask=ctx.vision_mask)
        return args, {**kwargs, "attention_mask": soft_attention_mask(real, log_keep, embeds.dtype)}

    handles = [base.register_forward_pre_hook(read_ids, with_kwargs=True),
               llm.register_forward_pre_hook(before_llm, with_kwargs=True)]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def soft_forward(model: nn.Module, score_fn: ScoreFn, inputs: dict, cfg: Stage2Config) -> SoftOutput:
    """One forward of ``model`` on ``inputs`` with vision tokens softly pruned by ``score_fn``'s scores.

    ``score_fn(ctx) -> (B, n_v)`` gets the :class:`PruningContext` of the prompt (a PPM:
    :func:`ppm_score_fn`). Gradients flow from the output into the scores.
    """
    labels = inputs.get("labels")
    exclude = labels != -100 if labels is not None else None
    on_cuda = next(model.parameters()).is_cuda
    kernels = sdpa_kernel(SDPBackend.MATH) if on_cuda and torch.is_grad_enabled() else nullcontext()
    with _soft_hooks(model, score_fn, cfg, exclude) as state, kernels:
        output = model(**inputs, use_cache=False)
    return SoftOutput(output, state["scores"], state["retention"], state["vision_mask"])


def ppm_score_fn(ppm: nn.Module) -> ScoreFn:
    """``ctx -> ppm(H_v, H_t, masks)`` in the PPM's dtype (``ppm`` may be a DeepSpeed engine)."""
    module = getattr(ppm, "module", ppm)

    def score(ctx: PruningContext) -> torch.Tensor:
        dtype = next(module.parameters()).dtype
        return ppm(ctx.vision.to(dtype), ctx.text.to(dtype), ctx.vision_mask, ctx.text_mask)

    return score


def regularisers(m: torch.Tensor, mask: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean(m (1 - m)), mean_b (mean_k m - r)^2)`` over real vision tokens / samples with any."""
    mask = mask.bool()
    n = mask.sum(dim=1)
    if not mask.any():
        zero = m.sum() * 0.0
        return zero, zero
    binary = (m * (1 - m))[mask].mean()
    kept = torch.where(mask, m, 0.0).sum(dim=1) / n.clamp_min(1)
    share = (kept - ratio).pow(2)[n > 0].mean()
    return binary, share


def _to(inputs: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def stage2_loss(model: nn.Module, score_fn: ScoreFn, inputs: dict, cfg: Stage2Config) -> tuple[torch.Tensor, dict]:
    """Scalar training loss of one batch (with ``labels``) and its parts as floats."""
    out = soft_forward(model, score_fn, inputs, cfg)
    binary, share = regularisers(out.retention, out.vision_mask, cfg.reserve_ratio)
    loss = out.output.loss + cfg.lambda_bin * binary + cfg.lambda_ratio * share
    kept = out.retention[out.vision_mask.bool()].mean().item() if out.vision_mask.any() else 1.0
    return loss, {"lm_loss": out.output.loss.item(), "binary": binary.item(), "ratio": share.item(),
                  "mean_retention": kept}


@torch.no_grad()
def evaluate(model: nn.Module, ppm: nn.Module, batches: Iterable[tuple[dict, torch.Tensor]],
             cfg: Stage2Config) -> dict:
    """Answer accuracy unpruned, soft-masked and hard top-k (the pruning runtime) at ``cfg.reserve_ratio``.

    ``batches`` yields ``(prompt_inputs, answer_ids)``: left-padded prompts (so the last
    column is each sample's last token) and the first answer token id (B,). Returns
    ``full_accuracy``, ``soft_accuracy``, ``hard_accuracy``, ``mean_retention`` (soft
    mask) and ``soft_kept`` (share with ``m > 0.5``).
    """
    from covipal.pruning import get_method

    module = getattr(ppm, "module", ppm)
    was_training = module.training
    module.eval()
    device = next(model.parameters()).device
    hits = {"full": 0, "soft": 0, "hard": 0}
    total, m_sum, kept_sum, m_count = 0, 0.0, 0.0, 0
    pruner = get_method("covipal", reserve_ratio=cfg.reserve_ratio, ppm=module)
    for inputs, answers in batches:
        inputs, answers = _to(inputs, device), answers.to(device)
        hits["full"] += int((model(**inputs).logits[:, -1].argmax(-1) == answers).sum())
        soft = soft_forward(model, ppm_score_fn(module), inputs, cfg)
        hits["soft"] += int((soft.output.logits[:, -1].argmax(-1) == answers).sum())
        with pruner(model):
            hits["hard"] += int((model(**inputs).logits[:, -1].argmax(-1) == answers).sum())
        m = soft.retention[soft.vision_mask.bool()]
        m_sum, kept_sum, m_count = m_sum + m.sum().item(), kept_sum + (m > 0.5).sum().item(), m_count + m.numel()
        total += len(answers)
    module.train(was_training)
    return {**{f"{k}_accuracy": v / max(total, 1) for k, v in hits.items()},
            "mean_retention": m_sum / max(m_count, 1), "soft_kept": kept_sum / max(m_count, 1)}


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter's ``requires_grad`` off."""
    return model.requires_grad_(False).eval()


def train(model: nn.Module, ppm: nn.Module, train_batches: Callable[[int], Iterable[dict]],
          val_batches: Callable[[], Iterable[tuple[dict, torch.Tensor]]] | None, cfg: Stage2Config,
          ds: DeepSpeedConfig, checkpoint_dir: str | Path, out_dir: str | Path | None = None,
          log=print, progress: bool = True) -> dict:
    """Train ``ppm`` end to end through the frozen ``model``; resume from ``checkpoint_dir`` if possible.

    Parameters
    ----------
    model : nn.Module
        The LVLM (frozen here).
    ppm : nn.Module
        The PPM, typically from stage 1.
    train_batches : callable
        ``epoch -> micro batches`` of model inputs with ``labels`` on the answers, ordered
        by ``(ds.seed, epoch)`` only (e.g. :class:`covipal.training.data.RowBatches`).
    val_batches : callable, optional
        ``() -> (prompt_inputs, answer_ids)`` batches for :func:`evaluate` after each epoch.

    Returns
    -------
    dict
        ``{"history": [...], "val": {...}}`` with :func:`evaluate`'s metrics of the last epoch.
    """
    freeze(model)
    engine = initialize(ppm, ds)
    device = next(model.parameters()).device
    score = ppm_score_fn(engine)

    def step(engine, inputs):
        return stage2_loss(model, score, _to(inputs, device), cfg)

    def evaluate_epoch(epoch):
        return {f"val_{k}": v for k, v in evaluate(model, engine.module, val_batches(), cfg).items()} \
            if val_batches else {}

    history = fit(engine, train_batches, step, cfg.epochs, checkpoint_dir, seed=ds.seed, evaluate=evaluate_epoch,
                  fingerprint=run_fingerprint(cfg, ds), log=log, progress=progress)
    if out_dir is not None:
        export_ppm(engine, out_dir)
    last = history[-1] if history else {}
    return {"history": history, "val": {k[4:]: v for k, v in last.items() if k.startswith("val_")}}

