"""Plot the DVC experiments of the PPM recipe: guide layer, stage 1 alone vs both, data size.

Reads ``dvc exp show --json`` (the workspace baseline and every experiment run from it with
``dvc exp run -S ...``), writes ``docs/experiments.csv`` (one row per run) and
``docs/figures/experiments.png`` (CoViPAL's test accuracy at each reserve ratio, stage 2
and stage 1 alone, per run)::

    python scripts/plot_experiments.py
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KNOBS = ("targets.guide_layer", "targets.rows.train", "stage2.rows.train")


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def runs() -> list[dict]:
    """One dict per run: its name, the knobs above, and covipal / covipal_stage1 accuracy per modality and ratio."""
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=ROOT, check=True,
                                      capture_output=True, text=True).stdout)
    out = []
    for commit in shown:
        if commit.get("rev") == "workspace":  # uncommitted state: the committed baseline and the experiments count
            continue
        for exp in [commit] + [e for x in commit.get("experiments") or [] for e in x.get("revs", [])]:
            data = exp.get("data") or {}
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            evaluate = ((data.get("metrics") or {}).get("metrics/evaluate.json") or {}).get("data")
            if not evaluate:
                continue
            row = {"name": "baseline" if exp is commit else exp.get("name") or exp.get("rev", "")[:7]}
            row.update({k: _get(params, k) for k in KNOBS})
            for method in ("covipal", "covipal_stage1"):
                for rk, by_mod in (_get(evaluate, f"methods.{method}") or {}).items():
                    for modality, m in by_mod.items():
                        row[f"{method} {rk} {modality}"] = m.get("accuracy")
            out.append(row)
    return out


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = runs()
    if not table:
        raise SystemExit("no run with metrics/evaluate.json: run `dvc repro` and `dvc exp run -S ...` first")
    fields = sorted({k for r in table for k in r}, key=lambda k: (k not in ("name", *KNOBS), k))
    with open(ROOT / "docs" / "experiments.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)
    ratios = sorted({float(k.split()[1][1:]) for r in table for k in r if k.startswith("covipal ")})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, modality in zip(axes, ("image", "video")):
        for r in table:
            label = f"{r['name']} (guide {r['targets.guide_layer']}, {r['targets.rows.train']} target rows)"
            for method, style in (("covipal", "-o"), ("covipal_stage1", ":x")):
                ys = [r.get(f"{method} r{x:g} {modality}") for x in ratios]
                if any(y is not None for y in ys):
                    ax.plot(ratios, ys, style, label=label + ("" if method == "covipal" else ", stage 1 only"))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("reserve ratio r")
        ax.set_title(f"CoViPAL test accuracy, {modality}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "figures" / "experiments.png", dpi=120)
    print(f"{len(table)} runs -> docs/experiments.csv, docs/figures/experiments.png")


if __name__ == "__main__":
    main()
