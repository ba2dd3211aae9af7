"""Does the forgetting forecast predict forgetting? ``drift/task`` (the KL base || adapted on the adapted model's
own answers to the task's held-out prompts, which needs no general data) against the forgetting measured on
general data, over every evaluated run of one or more ``arrtune compare`` directories.

Prints, per measure of forgetting (drift on held-out wiki and book text, drift on chat answers, leak, bleed,
MC accuracy change), the Pearson and Spearman correlations with ``drift/task`` and the number of runs, and
writes a scatter plot (one panel per measure, one point per run, coloured by the run's method group).

    python benchmarks/forecast.py runs/study_vornish --plot docs/study/forecast.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

MEASURES = ("drift/wiki", "drift/books", "drift/chat", "leak", "bleed", "mc/mean_acc")


def load_points(directories: list[str]) -> list[dict]:
    """One record per evaluated run: its name, group (name without seed and sweep values) and metrics."""
    points = []
    for directory in directories:
        for path in sorted(Path(directory).glob("runs/*/eval.json")):
            result = json.loads(path.read_text())
            adapted, base = result.get("adapted", {}), result.get("base", {})
            if "drift/task" not in adapted:
                continue
            record = {"run": path.parent.name, "forecast": adapted["drift/task"]}
            record["group"] = re.sub(r"-seed=\d+$", "", record["run"]).split("-replay_ratio")[0]
            for key in MEASURES:
                if key == "mc/mean_acc" and adapted.get(key) is not None and base.get(key) is not None:
                    record[key] = adapted[key] - base[key]
                elif key != "mc/mean_acc" and adapted.get(key) is not None:  # not measured in every grid
                    record[key] = adapted[key]
            points.append(record)
    return points


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 3:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share their mean rank)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", help="arrtune compare output directories")
    parser.add_argument("--plot", help="write the scatter plot here (PNG)")
    args = parser.parse_args()
    points = load_points(args.directories)
    print(f"{len(points)} evaluated runs with drift/task")
    print("| forgetting measure | Pearson r | Spearman ρ | runs |\n|---|---|---|---|")
    for key in MEASURES:
        have = [p for p in points if key in p and math.isfinite(p[key])]
        x, y = [p["forecast"] for p in have], [p[key] for p in have]
        label = "MC accuracy − base" if key == "mc/mean_acc" else key
        print(f"| {label} | {pearson(x, y):+.2f} | {pearson(ranks(x), ranks(y)):+.2f} | {len(have)} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = sorted({p["group"] for p in points})
        colours = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
        fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
        for ax, key in zip(axes.flat, MEASURES):
            for g in groups:
                have = [p for p in points if p["group"] == g and key in p]
                ax.scatter(
                    [p["forecast"] for p in have], [p[key] for p in have], color=colours[g], label=g, s=22
                )
            ax.set_xlabel("drift/task (forecast, nats/token)")
            ax.set_ylabel("MC accuracy − base" if key == "mc/mean_acc" else key)
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
