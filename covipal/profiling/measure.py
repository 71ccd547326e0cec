"""How time and memory are read, on a GPU and on the CPU.

- **Time.** On a GPU, CUDA events around the work and ``torch.cuda.synchronize`` before
  reading them; on the CPU, ``time.perf_counter``. Callers warm up first and repeat;
  :func:`summary` gives the median and the spread (quartiles, min, max).
- **Memory.** On a GPU, ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``: the peak of live tensors, weights included. On the CPU,
  the same quantity is read by :class:`LiveTensors`, which counts the storage of every
  tensor an op creates until it is freed (weights and inputs are added as a base), and
  the process's peak resident set size
  (``VmHWM``, reset through ``/proc/self/clear_refs``) is reported beside it.
- **KV cache.** The bytes of the keys and values held by the cache a prefill returns.
"""

from __future__ import annotations

import ctypes
import statistics
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode


class Clock:
    """Seconds taken by a callable on ``device`` (CUDA events there, ``perf_counter`` on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def time(self, fn):
        """``(fn(), seconds)``."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return out, start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0


def summary(seconds: list[float]) -> dict:
    """Median and spread of repeated timings."""
    if not seconds:
        raise ValueError("no timings to summarise; use at least one repetition")
    q = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else [seconds[0]] * 3
    return {"median": statistics.median(seconds), "p25": q[0], "p75": q[2], "min": min(seconds),
            "max": max(seconds), "n": len(seconds)}


def kv_cache_bytes(cache) -> int:
    """Bytes of the keys and values in a transformers cache (``DynamicCache`` or legacy tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)
                   if t is not None)
    return sum(t.numel() * t.element_size() for layer in cache for t in layer[:2])


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so a later RSS peak is not hidden by reuse."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class MemoryReading:
    """Peak memory of a block: ``peak_bytes`` (live tensors, weights included) and, on the CPU,
    ``peak_rss_bytes`` (the process's peak resident set, None where it cannot be reset)."""

    peak_bytes: int = 0
    peak_rss_bytes: int | None = None
    device: str = "cpu"


class LiveTensors(TorchDispatchMode):
    """Peak bytes of the tensor storages alive at once among those created inside the mode, plus ``base``.

    Each new storage is counted when an op returns it and uncounted when it is freed
    (a weak reference's callback); views share their storage and count once.
    """

    def __init__(self, base: int = 0):
        super().__init__()
        self.live = self.peak = base
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int, ref) -> None:
        if self._refs.get(key) is ref:
            del self._refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._refs:
                    self._refs[key] = weakref.ref(storage, lambda ref, k=key, n=nbytes: self._freed(k, n, ref))
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


@contextmanager
def peak_memory(device: torch.device, base_bytes: int = 0):
    """Measure the peak memory of the block; yields a :class:`MemoryReading` filled on exit.

    On the CPU, ``base_bytes`` (the weights and inputs, alive before the block) is added
    to the peak of the tensors the block creates; on a GPU every allocated tensor counts.
    """
    reading = MemoryReading(device=torch.device(device).type)
    if reading.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield reading
        torch.cuda.synchronize()
        reading.peak_bytes = torch.cuda.max_memory_allocated()
        return
    _trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        resettable = True
    except OSError:
        resettable = False
    with LiveTensors(base_bytes) as tracker:
        yield reading
    reading.peak_bytes = tracker.peak
    hwm = _status_kib("VmHWM")
    reading.peak_rss_bytes = hwm * 1024 if resettable and hwm is not None else None


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages of the tensors among ``tensors`` (any nesting)."""
    seen = {}
    for t in tree_leaves(tensors):
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
