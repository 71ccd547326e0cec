"""Profile a model's prefill and decoding, unpruned and with each pruning method, against the analytic limit.

:func:`profile_methods` measures, for each method and reserve ratio (and unpruned):

- **prefill time**: one forward of the whole prompt (vision encoder, projector, PPM or
  other scorer, LLM) with ``use_cache=True, logits_to_keep=1``, as ``generate`` runs it;
  warm-up calls first, then ``repeats`` rounds that time every case once each, in turn (the
  order rotating from round to round),
  so that a load on the machine falls on all cases alike; the speedup is the ratio of the
  medians, and also of the fastest rounds (``speedup_min``) and the median of each round's
  own ratio (``speedup_paired``), both steadier on a shared machine;
- **the scorer's share**: the time of the pruner's ``score`` call inside those prefills
  (the PPM for ``covipal``);
- **time per decoded token**: the gaps between consecutive tokens of a greedy
  ``generate`` (the first token, which comes with the prefill, excluded);
- **peak memory** of a ``generate`` (prefill and decoding), see :mod:`.measure`;
- **KV-cache bytes** of the cache the prefill returns, against the share of tokens kept;
- **the limit**: :func:`covipal.profiling.flops.prefill_flops` of the unpruned and the
  pruned prefill, and the measured speedup as a fraction of their ratio.

:func:`frames_that_fit` finds the longest video whose ``generate`` fits under a memory cap.

A method that cannot prune the model's family (:meth:`covipal.pruning.Pruner.supports`, e.g.
VisionZip without a CLIP-style tower) is not measured: both functions list it under
``skipped`` with the reason.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from covipal.profiling.flops import speedup_limit
from covipal.profiling.measure import Clock, kv_cache_bytes, peak_memory, summary, tensor_bytes
from covipal.profiling.shapes import Subject, weight_bytes

UNPRUNED = "none"


@dataclass(frozen=True)
class Case:
    """One configuration to measure: a method at a reserve ratio, or ``none`` (unpruned)."""

    method: str = UNPRUNED
    ratio: float = 1.0

    @property
    def label(self) -> str:
        return UNPRUNED if self.method == UNPRUNED else f"{self.method}@{self.ratio:g}"


def make_pruner(case: Case, ppm=None):
    """The pruner of ``case`` (None when unpruned); ``covipal`` gets ``ppm``."""
    if case.method == UNPRUNED:
        return None
    from covipal.pruning import get_method

    extra = {"ppm": ppm} if case.method == "covipal" else {}
    return get_method(case.method, reserve_ratio=case.ratio, **extra)


def runnable(cases: list[Case], model, ppm=None, log=print) -> tuple[list[Case], list[dict]]:
    """``(the cases whose method can prune model, [{"label", "method", "reserve_ratio", "reason"}] for the rest)``."""
    keep, skipped = [], []
    for case in cases:
        pruner = make_pruner(case, ppm)
        reason = None if pruner is None else pruner.supports(model)
        if reason is None:
            keep.append(case)
        else:
            skipped.append({"label": case.label, "method": case.method, "reserve_ratio": case.ratio,
                            "reason": reason})
            log(f"  {case.label}: skipped ({reason})")
    return keep, skipped


@contextmanager
def timed_scores(pruner, clock: Clock):
    """Time every ``pruner.score`` call in the block; yields the list the seconds go to."""
    times: list[float] = []
    if pruner is None:
        yield times
        return
    original = pruner.score

    @functools.wraps(original)
    def score(ctx):
        out, seconds = clock.time(lambda: original(ctx))
        times.append(seconds)
        return out

    pruner.score = score  # this instance only; the class is untouched
    try:
        yield times
    finally:
        del pruner.score


def prefill(model, inputs: dict):
    """One prefill as ``generate`` runs it: the cache filled, the last token's logits only."""
    return model(**inputs, use_cache=True, logits_to_keep=1)


def _resident(model, inputs: dict, ppm=None) -> int:
    """Bytes alive before a measured block: weights (the PPM's too) and inputs."""
    return weight_bytes(model) + (weight_bytes(ppm) if ppm is not None else 0) + tensor_bytes(inputs)


def _cache(output):
    """The cache a forward returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class _TokenClock:
    """A ``generate`` stopping criterion that only records when each new token arrives."""

    def __init__(self, clock: Clock):
        self.clock, self.stamps = clock, []

    def __call__(self, input_ids, scores, **kwargs):
        if self.clock.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate(model, inputs: dict, new_tokens: int, stopping=None):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (end-of-sequence suppressed)."""
    from transformers import StoppingCriteriaList

    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          stopping_criteria=StoppingCriteriaList([stopping] if stopping else []))


def _kept_share(case: Case, pruner, n_v: int, n_text: int, layers: int) -> float:
    """Tokens in the KV cache over those of the unpruned prompt, averaged over layers."""
    if pruner is None:
        return 1.0
    counts = [n_v] * layers
    for layer, count in sorted(pruner.schedule(n_v, layers)):
        counts[layer:] = [count] * (layers - layer)
    return sum(n_text + c for c in counts) / (layers * (n_text + n_v))


def profile_methods(subject: Subject, cases: list[Case], *, pictures: int = 1, n_text: int = 64,
                    warmup: int = 1, repeats: int = 5, decode_tokens: int = 8, device="cpu",
                    dtype=torch.float32, ppm=None, batch: int = 1, log=print) -> dict:
    """Measure ``cases`` (the unpruned one is added first) on one prompt of ``pictures`` pictures.

    ``batch`` copies of the prompt go through each forward (FLOPs, and so the limit's ratio,
    scale with it; KV-cache bytes are the whole batch's).

    Returns ``{"prompt": {...}, "cases": [one dict per case], "skipped": [...]}``; see the module docstring.
    """
    model, config = subject.model, subject.config
    device = torch.device(device)
    clock = Clock(device)
    cases, skipped = runnable([Case()] + [c for c in cases if c.method != UNPRUNED], model, ppm, log)
    pruners = {c: make_pruner(c, ppm) for c in cases}
    inputs = subject.inputs(pictures, n_text, device=device, dtype=dtype, batch=batch)
    n_v, layers = subject.vision_tokens(pictures), config.text_config.num_hidden_layers
    ppm_config = getattr(ppm, "config", None)
    flops = {c: subject.flops(pictures, n_text, schedule=None if p is None else p.schedule(n_v, layers),
                              ppm=ppm_config if c.method == "covipal" else None)
             for c, p in pruners.items()}
    times = {c: [] for c in cases}
    score_times = {c: [] for c in cases}
    kv = {}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            shift = round_ % len(cases)  # rotate the order, so no case always runs first
            for case in cases[shift:] + cases[:shift]:
                pruner = pruners[case]
                with (pruner(model) if pruner else nullcontext()), timed_scores(pruner, clock) as scored:
                    out, seconds = clock.time(lambda: prefill(model, inputs))
                if round_ >= warmup:
                    times[case].append(seconds)
                    score_times[case].append(sum(scored))
                kv[case] = kv_cache_bytes(_cache(out))
                del out
            log(f"  round {round_ + 1}/{warmup + repeats}"
                + (" (warm-up)" if round_ < warmup else "")
                + ": " + ", ".join(f"{c.label} {times[c][-1] if times[c] else float('nan'):.3f}s" for c in cases))
        results = []
        full = cases[0]
        for case in cases:
            pruner = pruners[case]
            token_clock = _TokenClock(clock)
            with pruner(model) if pruner else nullcontext():
                generate(model, inputs, decode_tokens + 1, token_clock)
                with peak_memory(device, _resident(model, inputs, ppm)) as memory:
                    generate(model, inputs, decode_tokens)
            gaps = [b - a for a, b in zip(token_clock.stamps, token_clock.stamps[1:])]
            t, t_full = summary(times[case]), summary(times[full])
            speedup = t_full["median"] / t["median"]
            paired = statistics.median(a / b for a, b in zip(times[full], times[case]))
            limit = speedup_limit(flops[full], flops[case])
            kept = _kept_share(case, pruner, n_v, n_text, layers)
            kv_ratio = kv[case] / kv[full]
            ppm_median = summary(score_times[case])["median"] if pruner else 0.0
            results.append({
                "method": case.method, "reserve_ratio": case.ratio, "label": case.label,
                "prefill_s": t, "speedup": speedup, "limit": limit, "fraction_of_limit": speedup / limit,
                # the fastest round of each: least disturbed by other work on a shared machine
                "speedup_min": t_full["min"] / t["min"], "fraction_of_limit_min": t_full["min"] / t["min"] / limit,
                # the median of each round's own ratio: the two prefills of a round ran seconds apart
                "speedup_paired": paired, "fraction_of_limit_paired": paired / limit,
                "flops": flops[case].as_dict(),
                "decode_s_per_token": summary(gaps) if gaps else None,
                "kv_cache_bytes": kv[case], "kv_ratio": kv_ratio, "kept_token_share": kept,
                "kv_vs_kept_error": kv_ratio / kept - 1,
                "scorer_s": ppm_median, "scorer_share_of_prefill": ppm_median / t["median"],
                "scorer_share_of_unpruned_prefill": ppm_median / t_full["median"],
                "peak_bytes": memory.peak_bytes, "peak_rss_bytes": memory.peak_rss_bytes,
            })
    prompt = {"pictures": pictures, "batch": batch, "vision_tokens": n_v, "text_tokens": n_text,
              "prompt_tokens": int(inputs["input_ids"].shape[1]), "decode_tokens": decode_tokens,
              "warmup": warmup, "repeats": repeats}
    return {"prompt": prompt, "cases": results, "skipped": skipped}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _index(device) -> int:
    """CUDA device index of ``device`` (``"cuda"`` alone means the current device)."""
    import torch

    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def frames_that_fit(subject: Subject, cases: list[Case], frames: list[int], cap_bytes: int, *, n_text: int = 64,
                    decode_tokens: int = 4, device="cpu", dtype=torch.float32, ppm=None, also_try: tuple = (),
                    log=print) -> dict:
    """The longest video (from ``frames``, tried in increasing order) whose ``generate`` fits under ``cap_bytes``.

    On a GPU the cap is enforced (``torch.cuda.set_per_process_memory_fraction``) and a
    run that runs out of memory does not fit; on the CPU each run's peak (live tensors,
    weights included) is compared with the cap: a length fits when its peak is at most the
    cap. A case stops at its first length that does not fit, except for the lengths in
    ``also_try``, which are always measured; its largest fitting length is the longest of
    the unbroken run of fitting lengths from the shortest (0 when the shortest does not fit).

    Returns ``{"cap_bytes", "frames_per_picture", "enforced" (True on a GPU), "skipped": [...],
    "cases": [{"label", "method", "reserve_ratio", "largest_fitting_frames", "points": [{"frames",
    "vision_tokens", "prompt_tokens", "peak_bytes" (None: out of memory), "fits"}]}]}``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if cap_bytes > total:
            raise ValueError(f"memory cap {cap_bytes / 2**30:.1f} GiB exceeds the GPU's {total / 2**30:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(cap_bytes / total, _index(device))
    cases, skipped = runnable(cases, subject.model, ppm, log)
    out = {"cap_bytes": cap_bytes, "frames_per_picture": subject.frames_per_picture,
           "enforced": device.type == "cuda", "skipped": skipped, "cases": []}
    try:
        for case in cases:
            pruner = make_pruner(case, ppm)
            points, best, missed = [], 0, False
            for n in sorted(set(frames) | set(also_try)):
                if missed and n not in also_try:
                    continue
                inputs = subject.inputs(subject.pictures(n), n_text, device=device, dtype=dtype)
                prompt_tokens = int(inputs["input_ids"].shape[1])
                peak, oom = None, False
                try:
                    with torch.inference_mode(), pruner(subject.model) if pruner else nullcontext():
                        with peak_memory(device, _resident(subject.model, inputs, ppm)) as memory:
                            generate(subject.model, inputs, decode_tokens)
                    peak = memory.peak_bytes
                except torch.OutOfMemoryError:
                    oom = True
                del inputs
                _free(device)
                fits = not oom and peak <= cap_bytes
                points.append({"frames": n, "vision_tokens": subject.vision_tokens(subject.pictures(n)),
                               "prompt_tokens": prompt_tokens, "peak_bytes": peak, "fits": fits})
                log(f"  {case.label}: {n} frames -> "
                    + ("out of memory" if oom else f"{peak / 2**20:.1f} MiB") + ("" if fits else " (does not fit)"))
                missed = missed or not fits
                if not missed:
                    best = n
            out["cases"].append({"label": case.label, "method": case.method, "reserve_ratio": case.ratio,
                                 "largest_fitting_frames": best, "points": points})
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, _index(device))
    return out


def trace_prefill(subject: Subject, case: Case, path, *, pictures: int = 1, n_text: int = 64, device="cpu",
                  dtype=torch.float32, ppm=None, rows: int = 15) -> str:
    """Write a torch profiler (Chrome) trace of one prefill of ``case`` to ``path``; return the top-ops table."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    inputs = subject.inputs(pictures, n_text, device=device, dtype=dtype)
    pruner = make_pruner(case, ppm)
    with torch.inference_mode(), pruner(subject.model) if pruner else nullcontext():
        prefill(subject.model, inputs)  # warm-up outside the trace
        with profile(activities=activities) as prof:
            prefill(subject.model, inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)
