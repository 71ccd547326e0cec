"""GPU benchmark in one command: 7B shapes in bf16, prefill speedup at r = 0.25 and the frames that fit under 24 GB.

    python scripts/bench_gpu.py --out results/gpu          # on an H100/H200: about 3-5 minutes
    python scripts/bench_gpu.py --out /tmp/gpu --tiny      # the same code path on tiny shapes, on the CPU

For each shape (``llava-1.5-7b``, then ``qwen2-vl-7b``; ``--shapes`` picks), the model is built
with random weights directly on the GPU in bf16 (nothing is downloaded), with a PPM of random
weights of its width. It measures the unpruned prefill against ``covipal`` and ``random`` at
r = 0.25 on three inputs, one 576-token image, an 8-frame video and a batch of 16 images, each
prompt with 64 text tokens (CUDA events, warm-up, repetitions), and, for
LLaVA, the longest video (one 576-token image per frame) whose prefill and decoding fit under a
24 GB cap (``torch.cuda.set_per_process_memory_fraction``), unpruned and pruned; a run out of
memory is recorded as not fitting. It writes ``bench_gpu.json``, ``bench_gpu.md``, figures and
a torch profiler trace to ``--out`` and prints the must-show checks: speedup >= 2.5x at
r = 0.25 on the 8-frame video and on the batch of 16 images (the single image is reported
as INFO), and 64 frames fit pruned while they do not fit unpruned; it exits 0 when all of
them hold.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RATIO, MIN_SPEEDUP, FRAMES = 0.25, 2.5, 64
# (pictures per prompt, prompts per batch, checked): one 576-token image, reported only: alone, its
# 33 ms prefill is bound by kernel launches and weight reads, which pruning does not remove
# (docs/profiling.md); 8 frames (LLaVA: 576 tokens each); a batch of 16 one-image prompts, as a
# server batches prefills
PROMPTS = {"image": (1, 1, False), "video8": (8, 1, True), "image_batch16": (1, 16, True)}


def bench_shape(name: str, args, device, dtype, out: Path, log) -> dict:
    import torch

    from covipal.ppm import PPM, PPMConfig
    from covipal.profiling.bench import Case, frames_that_fit, profile_methods, trace_prefill
    from covipal.profiling.report import markdown, plot_frames, plot_speedup
    from covipal.profiling.shapes import build_shape, n_parameters
    from covipal.profiling.stage import device_name, memory_cap

    t0 = time.time()
    subject = build_shape(name, device=device, dtype=dtype)
    torch.manual_seed(0)
    ppm = PPM(PPMConfig(d_model=subject.config.text_config.hidden_size)).to(device, dtype).eval()
    built = time.time() - t0
    log(f"{name}: {n_parameters(subject.model) / 1e9:.2f}B parameters built on {device} in {built:.1f} s")
    entry = {"shape": name, "parameters": n_parameters(subject.model), "build_s": built, "profile": {}}
    cases = [Case("covipal", RATIO), Case("random", RATIO)]
    sections = []
    for prompt, (pictures, batch, _) in PROMPTS.items():
        log(f"{name}, {prompt}:")
        result = profile_methods(subject, cases, pictures=pictures, n_text=64, warmup=args.warmup,
                                 repeats=args.repeats, decode_tokens=args.decode_tokens, device=device, dtype=dtype,
                                 ppm=ppm, batch=batch, log=log)
        result.update(device=device.type, device_name=device_name(device), shape=f"{name}, {prompt}",
                      dtype=str(dtype), parameters=entry["parameters"], threads=torch.get_num_threads(),
                      ppm="random weights")
        entry["profile"][prompt] = result
        plot_speedup(result, out / f"{name}_{prompt}_speedup.png")
        sections.append(markdown(result))
    top_ops = trace_prefill(subject, cases[0], out / f"{name}_trace.json", device=device, dtype=dtype, ppm=ppm)
    frames = None
    if subject.config.model_type == "llava" and not args.skip_frames:
        weights = sum(p.numel() * p.element_size() for p in subject.model.parameters())
        cap, rule = memory_cap(args.cap_gb, device, weights, subject.kv_bytes_per_token())
        log(f"{name}: frames that fit under {cap / 1e9:.2f} GB ({rule})")
        frames = frames_that_fit(subject, [Case(), Case("covipal", RATIO), Case("random", RATIO)], args.frames, cap,
                                 n_text=64, decode_tokens=4, device=device, dtype=dtype, ppm=ppm,
                                 also_try=(FRAMES,), log=log)
        frames["cap_rule"] = rule
        plot_frames(frames, device.type, out / f"{name}_frames.png")
    entry["frames"] = frames
    entry["markdown"] = "\n".join(sections[:-1]) + "\n" + markdown(result, frames, top_ops)
    del subject, ppm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def checks(entries: dict) -> list[tuple[bool | None, str]]:
    """The must-show checks on the LLaVA shape: ``(passed, text)``, ``passed`` None for a
    prompt that is reported but not checked."""
    llava = next((e for e in entries.values() if "llava" in e["shape"] and "profile" in e), None)
    if llava is None:
        return [(False, "no LLaVA result (see the errors above)")]
    out = []
    for prompt, result in llava["profile"].items():
        case = next(c for c in result["cases"] if c["label"] == f"covipal@{RATIO:g}")
        checked = PROMPTS.get(prompt, (0, 0, True))[2]
        out.append((case["speedup"] >= MIN_SPEEDUP if checked else None,
                    f"{llava['shape']}, {prompt} ({result['prompt']['prompt_tokens']} tokens), covipal r={RATIO:g}: "
                    f"prefill speedup {case['speedup']:.2f}x (limit {case['limit']:.2f}x, "
                    f"{case['fraction_of_limit']:.2f} of it); need >= {MIN_SPEEDUP}x"))
    frames = llava.get("frames")
    if frames is None:
        return out + [(False, "frames test not run")]
    fit = {c["label"]: c["largest_fitting_frames"] for c in frames["cases"]}
    at = {c["label"]: next((p["fits"] for p in c["points"] if p["frames"] == FRAMES), False) for c in frames["cases"]}
    pruned, unpruned = fit.get(f"covipal@{RATIO:g}", 0), fit.get("none", 0)
    ok = at.get(f"covipal@{RATIO:g}", False) and not at.get("none", True)
    out.append((ok, f"{llava['shape']} under {frames['cap_bytes'] / 1e9:.3g} GB, {FRAMES} frames: "
                    f"{'fit' if at.get(f'covipal@{RATIO:g}') else 'do not fit'} with covipal r={RATIO:g} "
                    f"(largest {pruned}), {'fit' if at.get('none') else 'do not fit'} unpruned (largest {unpruned})"))
    return out


def _verdict(ok: bool | None) -> str:
    return "INFO" if ok is None else "PASS" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for bench_gpu.json, bench_gpu.md, figures and traces")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (runs on the CPU): tests the code path")
    parser.add_argument("--shapes", nargs="+", help="default: llava-1.5-7b qwen2-vl-7b (tiny: tiny-llava tiny-qwen2-vl)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--frames", nargs="+", type=int, default=[8, 16, 24, 32, 48, 64, 96, 128])
    parser.add_argument("--cap-gb", type=float, help="memory cap in GB (default: 24 on a GPU, scaled on the CPU)")
    parser.add_argument("--skip-frames", action="store_true")
    args = parser.parse_args()

    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("no GPU: the 7B shapes need one; run with --tiny to check the code path on the CPU", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = args.shapes or (["tiny-llava", "tiny-qwen2-vl"] if args.tiny else ["llava-1.5-7b", "qwen2-vl-7b"])
    log_lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    start = time.time()
    entries = {}
    for name in shapes:
        try:
            entries[name] = bench_shape(name, args, device, dtype, out, log)
        except Exception:  # one shape failing (out of memory while building...) must not lose the others
            log(f"{name} failed:\n{traceback.format_exc()}")
            entries[name] = {"shape": name, "error": traceback.format_exc()}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results = checks(entries)
    summary = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
               "torch": torch.__version__, "seconds": time.time() - start,
               "checks": [{"pass": ok, "text": text} for ok, text in results],
               "shapes": {k: {kk: vv for kk, vv in v.items() if kk != "markdown"} for k, v in entries.items()}}
    (out / "bench_gpu.json").write_text(json.dumps(summary, indent=2, default=str))
    md = [f"# GPU benchmark on {summary['device']} ({summary['seconds']:.0f} s)", ""]
    md += [f"- {_verdict(ok)}: {text}" for ok, text in results]
    for entry in entries.values():
        md += ["", entry.get("markdown") or f"## {entry['shape']}: failed\n\n```\n{entry.get('error')}\n```"]
    (out / "bench_gpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(f"{_verdict(ok)}  {text}" for ok, text in results))
    print(f"wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.md'} in {summary['seconds']:.0f} s")
    return 0 if all(ok is not False for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
