"""CPU benchmark: prefill speedup against the analytic limit, PPM overhead and KV-cache bytes, one run.

    python scripts/bench_prefill.py                      # llava-0.5b, 576 vision + 64 text tokens, r = 0.25
    python scripts/bench_prefill.py --threads 2 --repeats 7 --ratios 0.5 0.25 --json out.json
    python scripts/bench_prefill.py --stat paired    # on a shared machine: median of per-round ratios

Builds the shape with random weights (nothing is downloaded) and a PPM with random weights
of the LLM's width, then measures every case in interleaved rounds (see
``covipal.profiling.bench``) and prints one table of side-by-side ratios, followed by the
must-show checks: speedup at r = 0.25 >= 0.9 of the limit, PPM time <= 3% of the unpruned
prefill, KV-cache bytes within 1% of the kept-token share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-0.5b", help="model shape (covipal.profiling.shapes.SHAPES)")
    parser.add_argument("--methods", nargs="+", default=["covipal", "random"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25])
    parser.add_argument("--pictures", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--d-ppm", type=int, default=128, help="PPM width (PPMConfig.d_ppm)")
    parser.add_argument("--stat", choices=["median", "min", "paired"], default="median",
                        help="speedup checked: ratio of the medians, of the fastest rounds (min), or the median "
                             "of each round's own ratio (paired)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import torch

    from covipal.ppm import PPM, PPMConfig
    from covipal.profiling.bench import Case, profile_methods
    from covipal.profiling.report import case_table, must_show
    from covipal.profiling.shapes import build_shape, n_parameters

    torch.set_num_threads(args.threads)
    t0 = time.time()
    subject = build_shape(args.shape)
    ppm = PPM(PPMConfig(d_model=subject.config.text_config.hidden_size, d_ppm=args.d_ppm)).eval().requires_grad_(False)
    print(f"{args.shape}: {n_parameters(subject.model) / 1e9:.3f}B parameters, built in {time.time() - t0:.0f} s; "
          f"{torch.get_num_threads()} threads, SDPA attention, inference_mode")
    cases = [Case(m, r) for m in args.methods for r in args.ratios]
    result = profile_methods(subject, cases, pictures=args.pictures, n_text=args.text_tokens, warmup=args.warmup,
                             repeats=args.repeats, decode_tokens=args.decode_tokens, ppm=ppm)
    result.update(device="cpu", threads=torch.get_num_threads(), shape=args.shape,
                  parameters=n_parameters(subject.model))
    print()
    print(case_table(result))
    checks = must_show(result, stat=args.stat)
    print()
    for line in checks["lines"]:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "checks": checks}, indent=2))
    return 0 if checks["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
