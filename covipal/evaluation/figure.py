"""The accuracy figure of the ``evaluate`` stage: accuracy against reserve ratio, one line per method.

    python -m covipal.evaluation.figure plots/evaluate_accuracy.csv docs/figures/evaluate_accuracy.png

One panel per modality, the 95% bootstrap interval as a band, and a hollow marker where a method
spent more vision tokens (averaged over layers) than the budget, so that point is not at an equal
budget. The stage writes it to ``plots/evaluate/accuracy.png``; the command redraws it from the CSV.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from covipal.evaluation.summary import over_budget


YLABEL = {"vqa": "test VQA accuracy (generated answers)", "first_token": "test accuracy (first answer token)"}


def _num(x) -> float | None:
    return None if x in (None, "") else float(x)


def plot_accuracy(records: list[dict], path: Path) -> dict[str, list[str]]:
    """Draw ``records`` (rows of ``plots/evaluate_accuracy.csv``, as dicts of numbers or strings) to
    ``path``; returns the methods drawn per modality panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["question_type"] == "all"]
    drawn: dict[str, list[str]] = {}
    modalities = sorted({r["modality"] for r in rows}, key=lambda m: m != "image")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(modalities), figsize=(5.5 * len(modalities), 4.2), squeeze=False)
    for ax, modality in zip(axes[0], modalities):
        for i, method in enumerate(methods):
            pts = sorted((r for r in rows if r["modality"] == modality and r["method"] == method),
                         key=lambda r: -float(r["ratio"]))
            if not pts:
                continue
            drawn.setdefault(modality, []).append(method)
            x = [float(r["ratio"]) for r in pts]
            y = [float(r["accuracy"]) for r in pts]
            colour = f"C{i % 10}"
            style = "-" if method.startswith("covipal") else "--"
            ax.plot(x, y, style, color=colour, label=method, lw=2.2 if method == "covipal" else 1.2)
            lo, hi = [_num(r["ci_low"]) for r in pts], [_num(r["ci_high"]) for r in pts]
            if all(v is not None for v in lo + hi):
                ax.fill_between(x, lo, hi, color=colour, alpha=0.12, lw=0)
            over = [over_budget({k: float(r[k]) for k in ("tokens_layer_average", "tokens_target")}) for r in pts]
            for xi, yi, o in zip(x, y, over):
                ax.plot(xi, yi, "o", color=colour, ms=4, mfc="white" if o else colour)
        ratios = sorted({float(r["ratio"]) for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.invert_xaxis()
        ax.set_xlabel("reserve ratio r (hollow: over the budget)")
        ax.set_ylabel(YLABEL.get(pts[0].get("metric"), "test accuracy"))
        ax.set_title(f"{modality} ({pts[0]['rows']} rows)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")  # the stage writes to a temporary name
    plt.close(fig)
    return drawn


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m covipal.evaluation.figure ACCURACY_CSV OUT_PNG")
    source = Path(argv[0])
    if not source.exists():
        sys.exit(f"error: {source} does not exist; run `dvc repro evaluate` first")
    with open(source, newline="") as f:
        plot_accuracy(list(csv.DictReader(f)), Path(argv[1]))
    print(f"wrote {argv[1]}")


if __name__ == "__main__":
    main(sys.argv[1:])
