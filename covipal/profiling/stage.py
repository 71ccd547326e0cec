"""The ``profile`` stage: measure every method and ratio, find the frames that fit, write metrics, plots and report."""

from __future__ import annotations

import csv
import platform
from pathlib import Path

import torch

from covipal.config import Params
from covipal.io import atomic_output

GPU_CAP_BYTES = 24 * 10 ** 9
LLAVA_7B_BF16_BYTES = 7_063_427_072 * 2  # weights of the llava-1.5-7b shape in bf16
LLAVA_7B_KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2  # keys and values of its 32 layers of width 4096, bf16
# prompt tokens whose KV cache fits beside LLaVA-1.5-7B's weights on a 24 GB GPU (about 18,832)
HEADROOM_TOKENS = (GPU_CAP_BYTES - LLAVA_7B_BF16_BYTES) / LLAVA_7B_KV_BYTES_PER_TOKEN


def device_of(choice: str) -> torch.device:
    """``auto``: the GPU when there is one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("profile.device is cuda but torch sees no GPU; set profile.device: auto or cpu")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU"


def memory_cap(configured_gb: float | None, device: torch.device, weights: int,
               kv_per_token: int | None = None) -> tuple[int, str]:
    """``(cap in bytes, how it was chosen, in words)`` for the frames test (the rule of
    :class:`covipal.config.ProfileConfig`).

    ``configured_gb`` (``profile.memory_cap_gb``) is the cap itself, in GB of 10^9 bytes. When it
    is None the cap is scaled to the model profiled: its ``weights`` (bytes) plus the KV cache
    of :data:`HEADROOM_TOKENS` prompt tokens at ``kv_per_token`` bytes each, the room a 24 GB GPU
    leaves LLaVA-1.5-7B in bf16 (so that model gets exactly 24 GB); on a GPU it is at most the
    GPU's memory.
    """
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    if configured_gb is not None:
        cap = int(configured_gb * 10 ** 9)
        if total is not None and cap > total:
            raise ValueError(f"profile.memory_cap_gb = {configured_gb:g} is more than the GPU's "
                             f"{total / 10 ** 9:.1f} GB; set it to at most that, or null to scale it to the model")
        return cap, f"set by profile.memory_cap_gb = {configured_gb:g} GB"
    if kv_per_token is None:
        raise TypeError("memory_cap needs kv_per_token (Subject.kv_bytes_per_token()) to scale the cap to the "
                        "model, or a configured cap")
    cap = int(weights + HEADROOM_TOKENS * kv_per_token)
    scaled = (f"scaled to this model: its weights ({weights / 2 ** 20:,.1f} MiB) plus the KV cache of "
              f"{HEADROOM_TOKENS:,.0f} prompt tokens ({kv_per_token:,} bytes each), the room a 24 GB GPU leaves "
              "LLaVA-1.5-7B in bf16")
    own = "; set profile.memory_cap_gb for a cap of your own"
    if total is not None and cap > total:
        return total, (f"the GPU's whole memory (the cap {scaled} would be {cap / 10 ** 9:.1f} GB, more than it "
                       f"has){own}")
    return cap, scaled + own


def fits_means(device: torch.device, decode_tokens: int) -> str:
    """What "fits" means in the frames test on ``device``, in words."""
    run = f"`generate` of the video prompt and {decode_tokens} new tokens"
    if device.type == "cuda":
        return (f"{run} ran with PyTorch limited to the cap (torch.cuda.set_per_process_memory_fraction) without "
                "running out of memory; the peak shown is torch.cuda.max_memory_allocated")
    return (f"the peak of the tensors alive at once during {run} (weights, PPM and inputs included) is at most the "
            "cap; on the CPU nothing enforces the cap, the measured peak is compared with it")


def _subject(params: Params, base_dir: Path, device, dtype):
    from covipal.profiling.shapes import build_shape, load_subject

    if params.profile.model == "base":
        subject = load_subject(base_dir)
        subject.model.to(device, dtype)
        return subject
    return build_shape(params.profile.model, device=device, dtype=dtype)


def _ppm(params: Params, ppm_dir: Path, d_model: int, device, dtype, trained: bool):
    """The trained PPM for the base model; a PPM of random weights (shape ``stage1.ppm``) otherwise."""
    from dataclasses import asdict

    from covipal.ppm import PPM, PPMConfig

    if trained and (ppm_dir / "model.safetensors").exists():
        ppm = PPM.from_pretrained(ppm_dir)
        if ppm.config.d_model != d_model:
            raise ValueError(f"the PPM in {ppm_dir} reads hidden states of width {ppm.config.d_model}, the base "
                             f"model's are {d_model}; rerun stage1 and stage2 on this base model")
        return ppm.to(device, dtype), str(ppm_dir)
    torch.manual_seed(0)
    shape = PPMConfig(d_model=d_model, **asdict(params.stage1.ppm))
    return PPM(shape).to(device, dtype).eval(), "random weights (stage1.ppm shape)"


def _check_prompts(subject, p) -> None:
    """Fail before any measurement if a prompt of ``profile.pictures`` or of a ``profile.frames`` length cannot
    be built for this model's family."""
    from covipal.profiling.shapes import check_pictures

    check_pictures(subject.config, p.pictures)
    for n in p.frames:
        check_pictures(subject.config, subject.pictures(n))


def run_profile(params: Params, base_dir: Path, ppm_dir: Path, out_dir: Path, plots_dir: Path, log=print) -> dict:
    """Profile ``params.profile``; write the figures, report and trace into ``out_dir`` and the plot CSVs into
    ``plots_dir``. Returns ``{"metrics": ..., "report": str}``."""
    from covipal.profiling.bench import Case, frames_that_fit, make_pruner, profile_methods, trace_prefill
    from covipal.profiling.report import count, markdown, plot_frames, plot_speedup
    from covipal.profiling.shapes import n_parameters, weight_bytes
    from covipal.pruning import available_methods

    p = params.profile
    unknown = sorted(set(p.methods + [params.pruning.method]) - set(available_methods()))
    if unknown:
        raise ValueError(f"profile.methods / pruning.method name unknown pruning methods {unknown}; "
                         f"known: {available_methods()}")
    if p.threads is not None:
        torch.set_num_threads(p.threads)
    device = device_of(p.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    subject = _subject(params, base_dir, device, dtype)
    _check_prompts(subject, p)
    d_model = subject.config.text_config.hidden_size
    ppm, ppm_source = _ppm(params, ppm_dir, d_model, device, dtype, trained=p.model == "base")
    weights = weight_bytes(subject.model) + weight_bytes(ppm)
    cap, rule = memory_cap(p.memory_cap_gb, device, weights, subject.kv_bytes_per_token())
    log(f"profiling {subject.name} ({count(n_parameters(subject.model))} parameters) on {device_name(device)}; "
        f"PPM: {ppm_source}")
    cases = [Case(m, r) for m in p.methods for r in sorted(p.ratios, reverse=True)]
    result = profile_methods(subject, cases, pictures=p.pictures, n_text=p.text_tokens, warmup=p.warmup,
                             repeats=p.repeats, decode_tokens=p.decode_tokens, device=device, dtype=dtype,
                             ppm=ppm, log=log)
    result.update(device=device.type, device_name=device_name(device), shape=subject.name, dtype=str(dtype),
                  parameters=n_parameters(subject.model), threads=torch.get_num_threads(), ppm=ppm_source)
    log(f"frames that fit under {cap / 2**20:,.1f} MiB ({rule})")
    pruned = Case(params.pruning.method, params.pruning.reserve_ratio)
    decode = 2
    frames = frames_that_fit(subject, [Case(), pruned], p.frames, cap, n_text=p.text_tokens, decode_tokens=decode,
                             device=device, dtype=dtype, ppm=ppm, log=log)
    frames.update(cap_rule=rule, cap_source="profile.memory_cap_gb" if p.memory_cap_gb is not None else "scaled",
                  fits_means=fits_means(device, decode), device=device.type, device_name=device_name(device),
                  model=subject.name, text_tokens=p.text_tokens, decode_tokens=decode)

    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        top_ops = None
        if p.trace:
            traced = pruned if make_pruner(pruned, ppm).supports(subject.model) is None else Case()
            top_ops = trace_prefill(subject, traced, tmp / "trace.json", pictures=p.pictures, n_text=p.text_tokens,
                                    device=device, dtype=dtype, ppm=ppm)
        plot_speedup(result, tmp / "speedup.png")
        plot_frames(frames, result["device"], tmp / "frames.png")
        report = markdown(result, frames, top_ops)
        (tmp / "report.md").write_text(report)
    _write_csvs(result, frames, params.pruning.method, plots_dir)
    return {"metrics": metrics(result, frames), "report": report}


def _skipped(result: dict) -> dict:
    """``{label: reason}`` of the cases not measured."""
    return {s["label"]: s["reason"] for s in result.get("skipped", [])}


def _key(case: dict) -> str:
    return "none" if case["method"] == "none" else f"{case['method']}_r{case['reserve_ratio']:g}"


def metrics(result: dict, frames: dict) -> dict:
    """The numbers of ``metrics/profile.json`` (keys MLflow accepts as metric names)."""
    cases = {}
    for c in result["cases"]:
        cases[_key(c)] = {
            "prefill_median_s": c["prefill_s"]["median"], "prefill_p25_s": c["prefill_s"]["p25"],
            "prefill_p75_s": c["prefill_s"]["p75"], "prefill_min_s": c["prefill_s"]["min"],
            "speedup": c["speedup"], "limit": c["limit"], "fraction_of_limit": c["fraction_of_limit"],
            "speedup_min": c["speedup_min"], "fraction_of_limit_min": c["fraction_of_limit_min"],
            "speedup_paired": c["speedup_paired"], "fraction_of_limit_paired": c["fraction_of_limit_paired"],
            "decode_ms_per_token": 1000 * c["decode_s_per_token"]["median"],
            "scorer_ms": 1000 * c["scorer_s"], "scorer_share_of_prefill": c["scorer_share_of_prefill"],
            "scorer_share_of_unpruned_prefill": c["scorer_share_of_unpruned_prefill"],
            "kv_cache_bytes": c["kv_cache_bytes"], "kv_ratio": c["kv_ratio"], "kept_token_share": c["kept_token_share"],
            "peak_bytes": c["peak_bytes"], "flops": c["flops"]["total"],
        }
    skipped = {**_skipped(result), **_skipped(frames)}
    return {"device": result["device"], "device_name": result["device_name"], "model": result["shape"],
            "parameters": result["parameters"], "threads": result["threads"], "prompt": result["prompt"],
            "cases": cases, "skipped": {k.replace("@", "_r"): why for k, why in skipped.items()},
            "frames": {"cap_bytes": frames["cap_bytes"], "cap_source": frames["cap_source"],
                       "cap_rule": frames["cap_rule"],
                       **{_key(c): {"largest_fitting_frames": c["largest_fitting_frames"]} for c in frames["cases"]}}}


def _write_csvs(result: dict, frames: dict, method: str, plots_dir: Path) -> None:
    """``profile_speedup.csv`` (``method``'s speedup and limit by ratio) and ``profile_frames.csv``: per length, the
    peak MiB and whether it fits, unpruned and with ``method``, beside the cap, the rule that set it, the device
    and the model (a pruned column stays empty when the method cannot prune the model)."""
    rows = sorted((c for c in result["cases"] if c["method"] == method), key=lambda c: c["reserve_ratio"])
    _csv(plots_dir / "profile_speedup.csv", ["reserve_ratio", "speedup", "limit"],
         [[c["reserve_ratio"], c["speedup"], c["limit"]] for c in rows])
    by_kind = {"unpruned" if c["method"] == "none" else "pruned": c for c in frames["cases"]}
    pruned_case = by_kind["pruned"]["label"] if "pruned" in by_kind else \
        "; ".join(f"{s['label']} skipped: {s['reason']}" for s in frames.get("skipped", []))
    lengths = sorted({pt["frames"] for c in frames["cases"] for pt in c["points"]})

    def point(kind: str, n: int) -> list:
        pt = next((pt for pt in by_kind[kind]["points"] if pt["frames"] == n), None) if kind in by_kind else None
        if pt is None:
            return ["", ""]
        return ["" if pt["peak_bytes"] is None else pt["peak_bytes"] / 2 ** 20, pt["fits"]]

    header = ["frames", "unpruned_mib", "unpruned_fits", "pruned_mib", "pruned_fits", "cap_mib", "pruned_case",
              "device", "model", "cap_rule"]
    _csv(plots_dir / "profile_frames.csv", header,
         [[n, *point("unpruned", n), *point("pruned", n), frames["cap_bytes"] / 2 ** 20, pruned_case,
           frames["device_name"], frames["model"], frames["cap_rule"]] for n in lengths])


def _csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)


def attach_to_registered(register_json: Path, files: list[Path], metrics_: dict, tracking_uri: str) -> dict | None:
    """Attach ``files`` and headline numbers to the PPM version that ``stage2`` registered (``metrics/register.json``);
    None when there is no registration to attach to."""
    import json

    from covipal.registry import attach_files

    if not register_json.is_file():
        return None
    registered = json.loads(register_json.read_text())
    if not registered.get("version"):
        return None
    tags = {"profile.device": metrics_["device_name"], "profile.model": metrics_["model"]}
    for key, case in metrics_["cases"].items():
        if key != "none":
            tags[f"profile.{key}.speedup"] = f"{case['speedup']:.3f}"
            tags[f"profile.{key}.limit"] = f"{case['limit']:.3f}"
    for key, value in metrics_["frames"].items():
        if isinstance(value, dict):
            tags[f"profile.frames_fit.{key}"] = str(value["largest_fitting_frames"])
    uris = attach_files(registered["name"], str(registered["version"]), files, tags=tags, tracking_uri=tracking_uri)
    return {"name": registered["name"], "version": registered["version"], "artifacts": uris}
