"""Stage-1 targets as shards: the guide layer's attention to each vision token, with the PPM's inputs.

The targets themselves (:func:`covipal.pruning.guide.guide_targets`: which query tokens, how
the attention is recomputed at the one guide layer) belong to the pruning core, which the
in-LLM methods share. :func:`write_target_shards` streams a data set through it and writes
shards of PPM inputs plus targets; :class:`TargetShards` reads them back for training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from covipal.io import atomic_output, write_json
from covipal.pruning.guide import Queries, guide_targets
from covipal.training.data import epoch_generator

SHARD_FORMAT = "covipal-targets"
SUMMARY_NAME = "targets.json"


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
