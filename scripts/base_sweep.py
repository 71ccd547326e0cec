"""Train variants of the reference LVLM's recipe side by side (docs/reference_model.md).

    python scripts/base_sweep.py variants.txt --out /tmp/sweep --parallel 7 --threads 2

Each line of the variants file is a name and a JSON mapping merged into ``params.yaml``, e.g.
``S0 {"base": {"seed": 0, "deep_supervision": 0.5}, "model": {"reference": {"rope_theta": 1e9}}}``.
Every variant runs the ``base`` stage's own training (:func:`covipal.base_model.build_base`) on
the prepared ``data/world`` (a variant that changes ``data`` prepares a world of its own first)
in a process of its own (``--parallel`` at a time, ``--threads``
torch threads each), on the GPU when there is one. It writes ``NAME.json`` (test accuracy per
question type, validation history, seconds) and ``NAME.log`` into ``--out``, and prints one
line per variant. The models themselves are not kept. Several small models share one GPU
well: the sweep in docs/reference_model.md (14 variants, one CPU thread each, through the same
``build_base`` path from an earlier, ad-hoc form of this script) took 5.5 minutes on one H200.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def merge(into: dict, over: dict) -> dict:
    """``into`` with ``over`` merged in, nested mappings key by key."""
    for k, v in over.items():
        into[k] = merge(dict(into.get(k) or {}), v) if isinstance(v, dict) and isinstance(into.get(k), dict) else v
    return into


def variant_params(over: dict):
    """``params.yaml`` with ``over`` merged in, checked (a bad key fails here, before any training)."""
    import yaml

    from covipal.config import parse_params

    return parse_params(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), over), ROOT)


def run_one(name: str, over: dict, out: Path) -> None:
    """Train one variant in this process and write ``out/NAME.json``."""
    import tempfile

    import torch

    from covipal.base_model import build_base

    torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "1")))
    params = variant_params(over)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        world = ROOT / "data" / "world"
        if "data" in over:  # a data variant trains on a world of its own
            from covipal.world.dataset import prepare

            world = Path(tmp) / "world"
            prepare(params.data, world, root=ROOT)
        result = build_base(params, world, Path(tmp) / "model", log=lambda m: print(name, m))
    result.update(name=name, over=over, seconds=time.time() - t0)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", type=Path, help="lines of: NAME {json merged into params.yaml}")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    ap.add_argument("--one", nargs=2, metavar=("NAME", "JSON"), help=argparse.SUPPRESS)  # a worker
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        return run_one(args.one[0], json.loads(args.one[1]), args.out)
    variants = [line.split(maxsplit=1) for line in args.variants.read_text().splitlines() if line.strip()]
    for name, over in variants:
        variant_params(json.loads(over))  # a malformed line or a bad key fails before any training

    def launch(variant: list[str]) -> str:
        name, over = variant
        env = {**os.environ, "SWEEP_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        with open(args.out / f"{name}.log", "w") as log:
            rc = subprocess.run([sys.executable, __file__, str(args.variants), "--out", str(args.out), "--one", name,
                                 over], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc:
            return f"{name}: failed (exit {rc}), see {args.out / (name + '.log')}"
        r = json.loads((args.out / f"{name}.json").read_text())
        return f"{name}: " + " | ".join(f"{m} " + " ".join(f"{k} {v:.3f}" for k, v in t.items())
                                        for m, t in r["test"].items()) + f" | {r['seconds']:.0f} s"

    with ThreadPoolExecutor(args.parallel) as pool:
        for line in pool.map(launch, variants):
            print(line, flush=True)


if __name__ == "__main__":
    main()
