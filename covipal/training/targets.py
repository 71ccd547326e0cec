"""Stage-1 targets: the attention a deep guide layer pays each vision token.

For a frozen LVLM and a prompt, the target of vision token ``k`` is

    A_k = mean_{j in Q} sum_{h} softmax(q_j^h k^h / sqrt(d_h) + mask)[k]

at decoder layer ``guide_layer`` (0-based), where ``Q`` is the set of query tokens:

- ``"after_image"`` (default): the real text tokens after the sample's last vision token,
  i.e. the question. They have seen every vision token (causal attention), so no vision
  token is favoured by its position, and they are the tokens whose reading of the image
  decides the answer. Summed over heads as the reviewed formula does; averaged rather than
  summed over queries so that prompts of different lengths give targets of one scale.
  A sample with no text after its vision tokens falls back to its last token.
- ``"last"``: the last prompt token only (FastV's choice).
- ``"all"``: every real token (the review's gloss: "what all tokens pay to token k");
  early vision tokens are then favoured, being visible to more queries.

The attention weights are recomputed at that one layer only, by a forward pre-hook on its
self-attention module that reruns its ``q_proj``/``k_proj``, the model's own
``apply_rotary_pos_emb`` on the ``position_embeddings`` the layer receives, and the mask
it receives, for the needed query rows only. The model keeps its attention
implementation (SDPA); the forward stops after the guide layer's hook.

:func:`write_target_shards` streams a data set through this and writes shards of PPM
inputs plus targets; :class:`TargetShards` reads them back for training.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from covipal.io import atomic_output, write_json
from covipal.pruning.adapters import get_adapter
from covipal.pruning.base import PruningContext
from covipal.pruning.runtime import build_context
from covipal.training.data import epoch_generator

Queries = Literal["after_image", "last", "all"]
QUERIES = ("after_image", "last", "all")
SHARD_FORMAT = "covipal-targets"
SUMMARY_NAME = "targets.json"


class _Stop(Exception):
    """Raised by the guide-layer hook once it has what it needs: later layers are not run."""


@dataclass
class GuideTargets:
    """PPM inputs and stage-1 targets of one batch.

    Attributes
    ----------
    context : PruningContext
        ``H_v`` (B, n_v, d), ``H_t`` (B, n_t, d) and their masks, as the pruning runtime
        gives them to a pruner.
    target : torch.Tensor
        Shape (B, n_v), float32: guide-layer attention per vision token; 0 on padding.
    """

    context: PruningContext
    target: torch.Tensor


def query_rows(real: torch.Tensor, vision: torch.Tensor, queries: Queries = "after_image") -> torch.Tensor:
    """Which positions are query tokens, shape (B, L) bool, from ``real``/``vision`` (B, L) bool."""
    if queries not in QUERIES:
        raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
    L = real.shape[1]
    col = torch.arange(L, device=real.device).expand_as(real)
    last = torch.where(real, col, -1).max(dim=1).values  # (B,): last real column
    last_only = col == last[:, None]
    if queries == "last":
        return last_only & real
    if queries == "all":
        return real.clone()
    last_vision = torch.where(vision, col, -1).max(dim=1).values  # (B,), -1 without vision
    after = real & ~vision & (col > last_vision[:, None])
    return torch.where(after.any(dim=1, keepdim=True), after, last_only & real)


def _decoder_layers(llm: nn.Module) -> nn.ModuleList:
    layers = getattr(llm, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(llm).__name__} has no `layers`; guide-layer targets need a decoder-only LLM")
    return layers


def rows_attention(attn: nn.Module, args: tuple, kwargs: dict, rows: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of query positions ``rows`` (B, n_q) at module ``attn``.

    Mirrors the layer's own computation (projections, RoPE, mask, softmax in float32).
    Returns shape (B, H, n_q, L).
    """
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, L, d), normed by the layer
    if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
        raise NotImplementedError(f"{type(attn).__name__} normalises q/k; its targets are not supported yet")
    B, L, _ = h.shape
    hd = attn.head_dim
    q = attn.q_proj(h).view(B, L, -1, hd).transpose(1, 2)  # (B, H, L, hd)
    k = attn.k_proj(h).view(B, L, -1, hd).transpose(1, 2)  # (B, H_kv, L, hd)
    cos, sin = kwargs["position_embeddings"]
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own RoPE
    q, k = rope(q, k, cos, sin)
    q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, hd))  # (B, H, n_q, hd)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query heads
    scaling = getattr(attn, "scaling", hd ** -0.5)
    logits = torch.matmul(q.float(), k.float().transpose(2, 3)) * scaling  # (B, H, n_q, L)
    mask = kwargs.get("attention_mask")
    if mask is None:  # SDPA's is_causal path: plain causal, no padding
        allowed = torch.arange(L, device=h.device)[None, None, :] <= rows[..., None]  # (B, n_q, L)
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    else:
        if mask.ndim != 4:
            raise NotImplementedError(f"guide layer received a {mask.ndim}-D attention mask; 4-D expected")
        mask = mask[..., :L].expand(B, -1, -1, -1)
        mask = mask.gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, L))  # (B, 1|H, n_q, L)
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    return logits.softmax(dim=-1)


@contextmanager
def _capture(model: nn.Module, guide_layer: int, queries: Queries) -> Iterator[dict]:
    """Hooks filling the yielded dict with ``"targets"`` (a :class:`GuideTargets`) on a forward."""
    adapter = get_adapter(model)
    base, llm = adapter.locate(model)
    layers = _decoder_layers(llm)
    if not 0 <= guide_layer < len(layers):
        raise ValueError(f"guide_layer {guide_layer} is outside the LLM's {len(layers)} decoder layers "
                         f"(0..{len(layers) - 1})")
    token_ids = torch.tensor(adapter.vision_token_ids(model.config))
    state: dict = {}

    def read_ids(module, args, kwargs):
        state["input_ids"] = kwargs.get("input_ids", args[0] if args else None)

    def before_llm(module, args, kwargs):
        embeds, ids = kwargs.get("inputs_embeds"), state.get("input_ids")
        if embeds is None or ids is None:
            raise ValueError("guide targets need the LVLM called with `input_ids` (and pixel values)")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise NotImplementedError("guide targets need a 2-D attention mask (batch, sequence)")
        real = mask.bool() if mask is not None else torch.ones(embeds.shape[:2], dtype=torch.bool,
                                                                  device=embeds.device)
        vision = torch.isin(ids, token_ids.to(ids.device)) & real
        state["ctx"] = build_context(embeds, real, vision, ids, model)
        state["queries"] = query_rows(real, vision, queries)

    def at_guide(module, args, kwargs):
        ctx, is_query = state["ctx"], state["queries"]
        n_q = is_query.sum(dim=1)  # (B,)
        rows = torch.argsort((~is_query).int(), dim=1, stable=True)[:, :int(n_q.max())]  # (B, n_q)
        valid = torch.arange(rows.shape[1], device=rows.device)[None] < n_q[:, None]  # (B, n_q)
        probs = rows_attention(module, args, kwargs, rows).sum(dim=1)  # (B, n_q, L): summed over heads
        probs = probs.gather(2, ctx.vision_index[:, None, :].expand(-1, rows.shape[1], -1))  # (B, n_q, n_v)
        probs = torch.where(valid[..., None], probs, 0.0)  # padded rows may be NaN (fully masked)
        target = probs.sum(dim=1) / n_q.clamp_min(1)[:, None]
        state["targets"] = GuideTargets(ctx, target.masked_fill(~ctx.vision_mask, 0.0))
        raise _Stop

    handles = [base.register_forward_pre_hook(read_ids, with_kwargs=True),
               llm.register_forward_pre_hook(before_llm, with_kwargs=True),
               layers[guide_layer].self_attn.register_forward_pre_hook(at_guide, with_kwargs=True)]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def guide_targets(model: nn.Module, inputs: dict, guide_layer: int, queries: Queries = "after_image") -> GuideTargets:
    """PPM inputs and guide-layer attention targets for one batch of prompts.

    Parameters
    ----------
    model : nn.Module
        A frozen LVLM of a family in :data:`covipal.pruning.ADAPTERS`.
    inputs : dict
        Its forward keyword inputs (``input_ids``, ``attention_mask``, pixel values...).
    guide_layer : int
        0-based decoder layer whose attention is read.
    queries : {"after_image", "last", "all"}
        Query tokens averaged over (module docstring).
    """
    if model.training:
        raise ValueError("guide targets come from the frozen LVLM in eval mode; call model.eval() first")
    with _capture(model, guide_layer, queries) as state:
        try:
            model(**inputs, use_cache=False)
        except _Stop:
            pass
    if "targets" not in state:
        raise RuntimeError(f"decoder layer {guide_layer} was not reached; is `model` an LVLM with its LLM inside?")
    return state["targets"]


# --- shards ------------------------------------------------------------------------------


def _pad(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Stack 1-D or 2-D tensors along a new batch dim, zero-padding dim 0 to ``width``."""
    out = rows[0].new_zeros((len(rows), width, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _complete(out_dir: Path, i: int, settings: dict) -> bool:
    """Whether shard ``i`` was written completely with ``settings``; mismatched settings are an error."""
    manifest, data = out_dir / f"{_shard_name(i)}.json", out_dir / f"{_shard_name(i)}.safetensors"
    if not manifest.is_file():
        return False
    info = json.loads(manifest.read_text())
    if info.get("settings") != settings:
        raise ValueError(f"{manifest} was written with settings {info.get('settings')}, not {settings}; "
                         f"remove {out_dir} (or choose another folder) to rebuild the targets")
    return data.is_file() and data.stat().st_size == info["bytes"]


def write_target_shards(model: nn.Module, processor_fn: Callable[[list[dict]], dict], dataset: Sequence[dict],
                        out_dir: str | Path, shard_size: int = 512, *, guide_layer: int,
                        queries: Queries = "after_image", batch_size: int = 16,
                        dtype: torch.dtype = torch.float16, progress: bool = True, rank: int = 0,
                        world: int = 1) -> dict:
    """Stream ``dataset`` through ``model`` and write PPM inputs plus targets as shards.

    Shard ``i`` holds rows ``[i * shard_size, (i + 1) * shard_size)`` as
    ``shard-0000i.safetensors`` (padded to the shard's longest sample) with tensors
    ``vision`` (N, n_v, d) and ``text`` (N, n_t, d) in ``dtype``, ``vision_mask``
    (N, n_v) and ``text_mask`` (N, n_t) bool, ``target`` (N, n_v) float32, ``row``
    (N,) int64 (index into ``dataset``), and a manifest ``shard-0000i.json`` written
    after it. Each file is written atomically, so an interrupted run resumes by skipping
    the shards whose manifest and data are complete. Only one shard is in memory at a time.

    Parameters
    ----------
    model : nn.Module
        The frozen LVLM (eval mode, on its device).
    processor_fn : callable
        ``rows -> inputs``: prompt inputs (no answers) of a list of data-set rows.
    dataset : sequence of dict
        Indexable rows (e.g. a ``datasets.Dataset`` split).
    shard_size, batch_size : int
        Rows per shard and per forward pass.
    guide_layer, queries
        See :func:`guide_targets`.
    dtype : torch.dtype
        Storage dtype of ``vision``/``text`` (float16 halves the disk; targets stay float32).
    rank, world : int
        Split across ``world`` processes: this one writes shards ``rank, rank + world, ...``
        (shards are independent files, so the union is what one process would write).

    Returns
    -------
    dict
        Summary (with one process also written to ``targets.json``; see
        :func:`merge_summaries` for several): settings, shards written and skipped,
        rows, ``n_vision`` and mean ``n_v`` of the rows written by this call.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be positive")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1} (world size {world})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    settings = {"guide_layer": guide_layer, "queries": queries, "shard_size": shard_size,
                "dtype": str(dtype).removeprefix("torch."), "rows": n}
    n_shards = (n + shard_size - 1) // shard_size
    device = next(model.parameters()).device
    n_vision, written, rows_written = 0, 0, 0
    mine = range(rank, n_shards, world)
    for i in tqdm(mine, desc="target shards", disable=not progress):
        start, end = i * shard_size, min(n, (i + 1) * shard_size)
        if _complete(out_dir, i, settings):
            continue
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("vision", "text", "target", "row")}
        for b0 in range(start, end, batch_size):
            idx = list(range(b0, min(end, b0 + batch_size)))
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                      for k, v in processor_fn([dataset[j] for j in idx]).items()}
            got = guide_targets(model, inputs, guide_layer, queries)
            ctx = got.context
            for b, j in enumerate(idx):
                nv, nt = int(ctx.vision_mask[b].sum()), int(ctx.text_mask[b].sum())
                parts["vision"].append(ctx.vision[b, :nv].to("cpu", dtype))
                parts["text"].append(ctx.text[b, :nt].to("cpu", dtype))
                parts["target"].append(got.target[b, :nv].float().cpu())
                parts["row"].append(torch.tensor(j))
        lens_v = torch.tensor([len(v) for v in parts["vision"]])
        lens_t = torch.tensor([len(t) for t in parts["text"]])
        nv_max, nt_max = max(int(lens_v.max()), 1), max(int(lens_t.max()), 1)
        tensors = {"vision": _pad(parts["vision"], nv_max), "text": _pad(parts["text"], nt_max),
                   "target": _pad(parts["target"], nv_max),
                   "vision_mask": torch.arange(nv_max)[None] < lens_v[:, None],
                   "text_mask": torch.arange(nt_max)[None] < lens_t[:, None],
                   "row": torch.stack(parts["row"]).long()}
        data = out_dir / f"{_shard_name(i)}.safetensors"
        with atomic_output(data) as tmp:
            save_file(tensors, str(tmp), metadata={"format": SHARD_FORMAT})
        write_json(out_dir / f"{_shard_name(i)}.json",
                   {"format": SHARD_FORMAT, "shard": i, "rows": [start, end], "n": end - start,
                    "bytes": data.stat().st_size, "settings": settings})
        n_vision, written, rows_written = n_vision + int(lens_v.sum()), written + 1, rows_written + end - start
    summary = {"settings": settings, "shards": n_shards, "written": written, "skipped": len(mine) - written,
               "rows": n, "rows_written": rows_written, "n_vision": n_vision,
               "mean_vision_tokens": n_vision / rows_written if rows_written else None}
    if world == 1:
        write_json(out_dir / SUMMARY_NAME, summary)
    return summary


def merge_summaries(summaries: list[dict], out_dir: str | Path) -> dict:
    """One summary of the per-process summaries of :func:`write_target_shards`, written to ``targets.json``."""
    rows_written = sum(s["rows_written"] for s in summaries)
    n_vision = sum(s["n_vision"] for s in summaries)
    summary = {**summaries[0], "written": sum(s["written"] for s in summaries),
               "skipped": sum(s["skipped"] for s in summaries), "rows_written": rows_written, "n_vision": n_vision,
               "mean_vision_tokens": n_vision / rows_written if rows_written else None}
    write_json(Path(out_dir) / SUMMARY_NAME, summary)
    return summary


class TargetShards:
    """Read shards written by :func:`write_target_shards`, one shard in memory at a time.

    >>> shards = TargetShards("data/targets/train")
    >>> for batch in shards.batches(32, seed=0, epoch=3):  # shuffled by (seed, epoch)
    ...     batch["vision"]  # (b, n_v, d), trimmed to the batch's longest sample
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifests = sorted(self.folder.glob("shard-*.json"))
        if not manifests:
            raise FileNotFoundError(f"no target shards in {self.folder}; write them with write_target_shards")
        self.manifests = [json.loads(m.read_text()) for m in manifests]
        for m in self.manifests:
            if m.get("format") != SHARD_FORMAT:
                raise ValueError(f"{self.folder} holds a manifest that is not a covipal target shard")
        self.settings = self.manifests[0]["settings"]

    def __len__(self) -> int:
        return sum(m["n"] for m in self.manifests)

    @property
    def d_model(self) -> int:
        """Width of ``H_v``/``H_t``: the host LLM's hidden size (``PPMConfig.d_model``)."""
        from safetensors import safe_open

        path = self.folder / f"{_shard_name(self.manifests[0]['shard'])}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice("vision").get_shape()[-1])

    def load(self, i: int) -> dict[str, torch.Tensor]:
        """All tensors of shard ``i`` (see :func:`write_target_shards`)."""
        from safetensors.torch import load_file

        return load_file(str(self.folder / f"{_shard_name(self.manifests[i]['shard'])}.safetensors"))

    def n_batches(self, batch_size: int) -> int:
        """Batches per epoch: batches never straddle shards, so each shard ends in a short one."""
        return sum((m["n"] + batch_size - 1) // batch_size for m in self.manifests)

    def epoch(self, batch_size: int, seed: int, epoch: int) -> "_Epoch":
        """The batches of one training epoch, with a ``len`` (see :meth:`batches`)."""
        return _Epoch(self, batch_size, seed, epoch)

    def batches(self, batch_size: int, seed: int | None = None, epoch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yield dict batches; order is fixed (``seed=None``) or a function of ``(seed, epoch)`` only."""
        gen = epoch_generator(seed, epoch) if seed is not None else None
        order = torch.randperm(len(self.manifests), generator=gen) if gen else torch.arange(len(self.manifests))
        for i in order.tolist():
            shard = self.load(i)
            n = len(shard["row"])
            rows = torch.randperm(n, generator=gen) if gen else torch.arange(n)
            for s in range(0, n, batch_size):
                pick = rows[s:s + batch_size]
                nv = max(int(shard["vision_mask"][pick].sum(dim=1).max()), 1)
                nt = max(int(shard["text_mask"][pick].sum(dim=1).max()), 1)
                yield {"vision": shard["vision"][pick, :nv], "vision_mask": shard["vision_mask"][pick, :nv],
                       "text": shard["text"][pick, :nt], "text_mask": shard["text_mask"][pick, :nt],
                       "target": shard["target"][pick, :nv], "row": shard["row"][pick]}


@dataclass
class _Epoch:
    shards: TargetShards
    batch_size: int
    seed: int
    epoch: int

    def __len__(self) -> int:
        return self.shards.n_batches(self.batch_size)

    def __iter__(self):
        return self.shards.batches(self.batch_size, self.seed, self.epoch)
