"""Tables, checks, figures and the Markdown report of a profile."""

from __future__ import annotations

from pathlib import Path

MIB = 2 ** 20


def count(n: int) -> str:
    """A parameter count in words a reader takes in at a glance: 7.06B, 1.4M, 95,040."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def case_table(result: dict) -> str:
    """Markdown table, one row per case: times, speedup next to the limit, scorer share, KV bytes, memory."""
    rows = ["| case | prefill median (s) | spread p25–p75 (s) | speedup (medians) | limit | of limit "
            "| of limit (min / paired) | scorer (ms) | scorer / unpruned prefill | decode (ms/token) | KV cache (MiB) "
            "| KV / kept share | peak (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        t, d = c["prefill_s"], c["decode_s_per_token"]
        rows.append(
            f"| {c['label']} | {t['median']:.4f} | {t['p25']:.4f}–{t['p75']:.4f} | {c['speedup']:.3f}x "
            f"| {c['limit']:.3f}x | {c['fraction_of_limit']:.3f} "
            f"| {c['fraction_of_limit_min']:.3f} / {c['fraction_of_limit_paired']:.3f} "
            f"| {1000 * c['scorer_s']:.2f} "
            f"| {100 * c['scorer_share_of_unpruned_prefill']:.2f}% | {1000 * d['median']:.2f} "
            f"| {c['kv_cache_bytes'] / MIB:.2f} | {c['kv_ratio']:.4f} / {c['kept_token_share']:.4f} "
            f"| {c['peak_bytes'] / MIB:.1f} |")
    return "\n".join(rows)


def must_show(result: dict, ratio: float = 0.25, method: str = "covipal", min_fraction: float = 0.9,
              max_scorer: float = 0.03, max_kv_error: float = 0.01, stat: str = "median") -> dict:
    """The issue's CPU checks on ``method`` at ``ratio``: speedup >= ``min_fraction`` of the limit, scorer time
    <= ``max_scorer`` of the unpruned prefill, KV bytes within ``max_kv_error`` of the kept-token share.
    ``stat``: compare the prefills' medians, their fastest rounds (``min``) or take the median of each
    round's ratio (``paired``)."""
    found = [c for c in result["cases"] if c["method"] == method and abs(c["reserve_ratio"] - ratio) < 1e-9]
    if not found:
        raise ValueError(f"no {method} case at reserve ratio {ratio} in the results; measure it first")
    c = found[0]
    suffix = "" if stat == "median" else f"_{stat}"
    speedup, fraction = c["speedup" + suffix], c["fraction_of_limit" + suffix]
    checks = {
        "fraction_of_limit": (fraction >= min_fraction,
                              f"speedup ({stat}s) {speedup:.3f}x = {fraction:.3f} of the limit "
                              f"{c['limit']:.3f}x (need >= {min_fraction})"),
        "scorer_overhead": (c["scorer_share_of_unpruned_prefill"] <= max_scorer,
                            f"PPM {1000 * c['scorer_s']:.1f} ms = {100 * c['scorer_share_of_unpruned_prefill']:.2f}% "
                            f"of the unpruned prefill (need <= {100 * max_scorer:g}%)"),
        "kv_bytes": (abs(c["kv_vs_kept_error"]) <= max_kv_error,
                     f"KV bytes {c['kv_ratio']:.4f} of unpruned vs kept-token share {c['kept_token_share']:.4f}: "
                     f"error {100 * c['kv_vs_kept_error']:+.2f}% (need within {100 * max_kv_error:g}%)"),
    }
    lines = [f"{'PASS' if ok else 'FAIL'}  {method} r={ratio:g}: {text}" for ok, text in checks.values()]
    return {"all_pass": all(ok for ok, _ in checks.values()), "lines": lines,
            **{k: ok for k, (ok, _) in checks.items()}}


def _finish(fig, ax, path: Path, xs: list, xlabel: str, ylabel: str, title: str) -> None:
    """Log-2 x axis ticked at ``xs``, labels, legend; write the figure to ``path`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speedup(result: dict, path: Path) -> None:
    """Measured prefill speedup against reserve ratio, one line per method, each with its analytic limit dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({c["method"] for c in result["cases"] if c["method"] != "none"})
    for i, method in enumerate(methods):
        rows = sorted((c for c in result["cases"] if c["method"] == method), key=lambda c: c["reserve_ratio"])
        x = [c["reserve_ratio"] for c in rows]
        colour = f"C{i}"
        ax.plot(x, [c["speedup"] for c in rows], "o-", color=colour, label=f"{method} measured")
        ax.plot(x, [c["limit"] for c in rows], "--", color=colour, label=f"{method} limit (FLOPs)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ratios = sorted({c["reserve_ratio"] for c in result["cases"] if c["method"] != "none"})
    _finish(fig, ax, path, ratios, "reserve ratio r", "prefill speedup over unpruned",
            f"Prefill speedup ({result['device']}, {result['shape']})")


def plot_frames(frames: dict, device: str, path: Path) -> None:
    """Peak memory against video frames for each case, with the cap; the title names the model and the device,
    the caption how the cap was chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, case in enumerate(frames["cases"]):
        measured = [p for p in case["points"] if p["peak_bytes"] is not None]
        ax.plot([p["frames"] for p in measured], [p["peak_bytes"] / MIB for p in measured], "o-", color=f"C{i}",
                label=f"{case['label']}: {case['largest_fitting_frames']} frames fit")
        oom = [p["frames"] for p in case["points"] if p["peak_bytes"] is None]
        if oom:
            ax.plot(oom, [frames["cap_bytes"] / MIB] * len(oom), "x", color=f"C{i}", markersize=10,
                    label=f"{case['label']}: out of memory")
    cap = frames["cap_bytes"] / MIB
    ax.axhline(cap, color="red", ls="--",
               label=f"memory cap {cap:,.1f} MiB" + (" (scaled to the model)" if frames.get("cap_source") == "scaled"
                                                      else ""))
    lengths = sorted({pt["frames"] for case in frames["cases"] for pt in case["points"]})
    where = f"{frames['model']} on {frames.get('device_name', device)}" if frames.get("model") else device
    fig.text(0.01, 0.01, "fits: peak memory at most the cap" + (" (enforced on the GPU)" if device == "cuda" else
                                                               " (measured peak compared, CPU)"),
             fontsize=7, color="grey")
    _finish(fig, ax, path, lengths, "video frames", "peak memory (MiB)", f"Memory against frames: {where}")


def _frames_sentence(case: dict, cap_mib: float) -> str:
    """One case's result in words."""
    points = case["points"]
    if not points:
        return f"- {case['label']}: no length was tried."
    if case["largest_fitting_frames"] == 0:
        first = points[0]
        need = "runs out of memory" if first["peak_bytes"] is None else f"needs {first['peak_bytes'] / MIB:,.1f} MiB"
        return (f"- {case['label']}: no length tried fits; the shortest, {first['frames']} frames, {need} "
                f"against a cap of {cap_mib:,.1f} MiB.")
    if all(p["fits"] for p in points):
        return (f"- {case['label']}: every length tried fits, up to {points[-1]['frames']} frames; add longer "
                "lengths to profile.frames to find where it stops.")
    over = next(p for p in points if not p["fits"])
    need = "runs out of memory" if over["peak_bytes"] is None else f"needs {over['peak_bytes'] / MIB:,.1f} MiB"
    return (f"- {case['label']}: up to {case['largest_fitting_frames']} frames fit; {over['frames']} frames {need}, "
            f"more than the cap.")


def frames_section(frames: dict) -> list[str]:
    """The report's lines on the frames that fit: what was run, the cap and how it was chosen, what "fits" means,
    each case in words and a table of every length measured."""
    cap = frames["cap_bytes"] / MIB
    lines = ["", "## Longest video that fits in memory", ""]
    if frames.get("model"):
        per = frames.get("frames_per_picture", 1)
        lines += [f"- What was run: {frames['model']} on {frames['device_name']}, one prompt holding a video of "
                  "N frames" + (f" ({per} frames packed into each picture)" if per > 1 else "")
                  + f" and {frames['text_tokens']} text tokens, then {frames['decode_tokens']} new tokens generated; "
                  "unpruned and with the pipeline's pruning method. Longer videos are tried while the shorter "
                  "ones fit."]
    lines.append(f"- Memory cap: {cap:,.1f} MiB ({frames['cap_bytes']:,} bytes), {frames['cap_rule']}.")
    if frames.get("fits_means"):
        lines.append(f"- A length fits when {frames['fits_means']}.")
    lines += ["", "Result:", ""] + [_frames_sentence(c, cap) for c in frames["cases"]]
    lines += [f"- {s['label']}: not measured, the method cannot prune this model ({s['reason']})."
              for s in frames.get("skipped", [])]
    lines += ["", "| case | frames that fit | vision tokens at that length | peak memory at each length (MiB) |",
              "|---|---|---|---|"]
    for case in frames["cases"]:
        best = next((pt for pt in case["points"] if pt["frames"] == case["largest_fitting_frames"]), None)
        tokens = best.get("vision_tokens", "") if best else ""
        points = ", ".join(f"{pt['frames']}: " + ("out of memory" if pt["peak_bytes"] is None
                                                 else f"{pt['peak_bytes'] / MIB:,.1f}")
                           + ("" if pt["fits"] else " (does not fit)") for pt in case["points"])
        lines.append(f"| {case['label']} | {case['largest_fitting_frames']} | {tokens} | {points} |")
    return lines


def markdown(result: dict, frames: dict | None = None, top_ops: str | None = None) -> str:
    """The report: which device and model produced it, the prompt, the case table, the methods not measured and
    the frames that fit."""
    p = result["prompt"]
    lines = [f"# Profile: {result['shape']} on {result['device_name']}", "",
             f"- device: **{result['device']}** ({result['device_name']})"
             + (f", {result['threads']} torch threads" if result["device"] == "cpu" else ""),
             f"- model: {result['shape']}, {count(result['parameters'])} parameters, {result['dtype']}"
             + (f"; PPM: {result['ppm']}" if result.get("ppm") else ""),
             f"- prompt: {p['pictures']} picture(s), {p['vision_tokens']} vision + {p['text_tokens']} text tokens"
             + (f", batch of {p['batch']}" if p.get("batch", 1) > 1 else "") + "; "
             f"{p['warmup']} warm-up + {p['repeats']} timed rounds, interleaved; {p['decode_tokens']} decoded tokens",
             "- prefill: reading the whole prompt once, before the first answer token. Speedup: the unpruned "
             "prefill's median time over the pruned one's. Limit: the most pruning could give, the ratio of their "
             "counted arithmetic (FLOPs, covipal/profiling/flops.py). Scorer: the time the method spends choosing "
             "tokens (the PPM for covipal)",
             "", case_table(result)]
    if result.get("skipped"):
        lines += ["", "## Methods not measured", ""]
        lines += [f"- {s['label']}: the method cannot prune this model ({s['reason']})." for s in result["skipped"]]
    if frames is not None:
        lines += frames_section(frames)
    if top_ops:
        lines += ["", "## Top operators of one pruned prefill (torch profiler)", "", "```", top_ops, "```"]
    return "\n".join(lines) + "\n"
