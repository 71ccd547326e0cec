"""The ``profile`` stage: measure every method and ratio, find the frames that fit, write metrics, plots and report."""

from __future__ import annotations

import csv
import platform
from pathlib import Path

import torch

from covipal.config import Params
from covipal.io import atomic_output

GPU_CAP_BYTES = 24 * 10 ** 9
LLAVA_7B_BF16_BYTES = 7_063_427_072 * 2  # weights of the llava-1.5-7b shape in bf16: what a 24 GB cap is set against


def device_of(choice: str) -> torch.device:
    """``auto``: the GPU when there is one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("profile.device is cuda but torch sees no GPU; set profile.device: auto or cpu")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU"


def memory_cap(configured_gb: float | None, device: torch.device, weights: int) -> tuple[int, str]:
    """``(cap in bytes, how it was set)``: the configured cap; else 24 GB on a GPU, and on the CPU 24 GB
    scaled by the model's weights over LLaVA-1.5-7B's bf16 weights."""
    if configured_gb is not None:
        return int(configured_gb * 10 ** 9), f"profile.memory_cap_gb = {configured_gb:g}"
    if device.type == "cuda":
        return GPU_CAP_BYTES, "24 GB, set with torch.cuda.set_per_process_memory_fraction"
    scale = weights / LLAVA_7B_BF16_BYTES
    return int(GPU_CAP_BYTES * scale), f"24 GB x this model's weights / LLaVA-1.5-7B's bf16 weights ({scale:.2e})"


def _subject(params: Params, base_dir: Path, device, dtype):
    from covipal.profiling.shapes import build_shape, load_subject

    if params.profile.model == "base":
        subject = load_subject(base_dir)
        subject.model.to(device, dtype)
        return subject
    return build_shape(params.profile.model, device=device, dtype=dtype)


def _ppm(params: Params, ppm_dir: Path, d_model: int, device, dtype, trained: bool):
    """The trained PPM for the base model; a PPM of random weights (shape ``stage1.ppm``) otherwise."""
    from covipal.ppm import PPM

    if trained and (ppm_dir / "model.safetensors").exists():
        return PPM.from_pretrained(ppm_dir).to(device, dtype), str(ppm_dir)
    torch.manual_seed(0)
    return PPM(params.stage1.ppm.build(d_model)).to(device, dtype).eval(), "random weights (stage1.ppm shape)"


def run_profile(params: Params, base_dir: Path, ppm_dir: Path, out_dir: Path, plots_dir: Path, log=print) -> dict:
    """Profile ``params.profile``; write the figures, report and trace into ``out_dir`` and the plot CSVs into
    ``plots_dir``. Returns ``{"metrics": ..., "report": str}``."""
    from covipal.profiling.bench import Case, frames_that_fit, profile_methods, trace_prefill
    from covipal.profiling.report import markdown, plot_frames, plot_speedup
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
    d_model = subject.config.text_config.hidden_size
    ppm, ppm_source = _ppm(params, ppm_dir, d_model, device, dtype, trained=p.model == "base")
    log(f"profiling {subject.name} ({n_parameters(subject.model) / 1e6:.1f}M parameters) on {device_name(device)}; "
        f"PPM: {ppm_source}")
    cases = [Case(m, r) for m in p.methods for r in sorted(p.ratios, reverse=True)]
    result = profile_methods(subject, cases, pictures=p.pictures, n_text=p.text_tokens, warmup=p.warmup,
                             repeats=p.repeats, decode_tokens=p.decode_tokens, device=device, dtype=dtype,
                             ppm=ppm, log=log)
    result.update(device=device.type, device_name=device_name(device), shape=subject.name, dtype=str(dtype),
                  parameters=n_parameters(subject.model), threads=torch.get_num_threads(), ppm=ppm_source)
    cap, rule = memory_cap(p.memory_cap_gb, device, weight_bytes(subject.model))
    log(f"frames that fit under {cap / 2**20:.0f} MiB ({rule})")
    pruned = Case(params.pruning.method, params.pruning.reserve_ratio)
    frames = frames_that_fit(subject, [Case(), pruned], p.frames, cap, n_text=p.text_tokens, decode_tokens=2,
                             device=device, dtype=dtype, ppm=ppm, log=log)
    frames["cap_rule"] = rule

    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        top_ops = None
        if p.trace:
            top_ops = trace_prefill(subject, pruned, tmp / "trace.json", pictures=p.pictures, n_text=p.text_tokens,
                                    device=device, dtype=dtype, ppm=ppm)
        plot_speedup(result, tmp / "speedup.png")
        plot_frames(frames, result["device"], tmp / "frames.png")
        report = markdown(result, frames, top_ops)
        (tmp / "report.md").write_text(report)
    _write_csvs(result, frames, params.pruning.method, plots_dir)
    return {"metrics": metrics(result, frames), "report": report}


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
    return {"device": result["device"], "device_name": result["device_name"], "model": result["shape"],
            "parameters": result["parameters"], "threads": result["threads"], "prompt": result["prompt"],
            "cases": cases,
            "frames": {"cap_bytes": frames["cap_bytes"],
                       **{_key(c): {"largest_fitting_frames": c["largest_fitting_frames"]} for c in frames["cases"]}}}


def _write_csvs(result: dict, frames: dict, method: str, plots_dir: Path) -> None:
    """``profile_speedup.csv`` (``method``'s speedup and limit by ratio) and ``profile_frames.csv`` (MiB by frames)."""
    rows = sorted((c for c in result["cases"] if c["method"] == method), key=lambda c: c["reserve_ratio"])
    _csv(plots_dir / "profile_speedup.csv", ["reserve_ratio", "speedup", "limit"],
         [[c["reserve_ratio"], c["speedup"], c["limit"]] for c in rows])
    unpruned, pruned = frames["cases"]
    lengths = sorted({pt["frames"] for c in frames["cases"] for pt in c["points"]})
    peak = {(i, pt["frames"]): pt["peak_bytes"] for i, c in enumerate(frames["cases"]) for pt in c["points"]}

    def mib(i, n):
        value = peak.get((i, n))
        return "" if value is None else value / 2 ** 20

    _csv(plots_dir / "profile_frames.csv", ["frames", "unpruned_mib", "pruned_mib", "cap_mib"],
         [[n, mib(0, n), mib(1, n), frames["cap_bytes"] / 2 ** 20] for n in lengths])


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
