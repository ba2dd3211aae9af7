"""Does the drift budget hold, and does it trade drift for task accuracy as well as a fixed ``kl_coef``?

Reads the evaluated runs of ``arrtune compare`` directories per task (``task=dir1,dir2``), groups the seeds of
each setting (as ``benchmarks/frontier.py`` does), and prints, per task:

- each budget's drift as the controller measured it at the last step (the drift probe's reading, or the smoothed
  KL of the training batches' KL tokens with ``drift_probe: 0``), and its drift after training on held-out
  Wikipedia paragraphs (the same kind of text as the replay corpus, whose set-aside documents the probe
  measures) and on held-out book passages (another domain), mean and
  standard deviation over seeds, and the ratio of the mean to the budget (the target: within ±25%);
- the drift-vs-exact-match frontier: each budget setting's exact match minus the fixed-``kl_coef`` sweep's,
  interpolated linearly between the sweep's two settings whose mean drift brackets the budget run's.

    python benchmarks/budget.py vornish=runs/budget,runs/study keywords=runs/budget_keywords,runs/study_keywords \\
        --out docs/study/budget
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from frontier import load_groups  # noqa: E402

TOLERANCE = 0.25
DRIFT = "drift/wiki"


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def controller_kl(run_dir: Path) -> float | None:
    """The controller's reading at the run's last step (``kl_smoothed``: the probe's drift, or the smoothed KL of
    the training batches' KL tokens without a probe)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if "kl_smoothed" in line]
    return records[-1]["kl_smoothed"] if records else None


def summarize(groups: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(budget settings, fixed-coefficient settings at the same replay ratio), each a list of summaries."""
    budgets, sweep = [], []
    for name, group in groups.items():
        config, runs = group["config"], group["runs"]
        if config.get("method") == "sft" or not config.get("replay_ratio"):
            continue
        row = {"name": name, "seeds": sorted(runs), "kl_coef": config.get("kl_coef"),
               "drift_budget": config.get("drift_budget")}  # fmt: skip
        for key in ("drift/wiki", "drift/books", "task/exact_match"):
            values = [r["adapted"][key] for r in runs.values()]
            row[key], row[f"{key}_sd"] = _mean_sd(values)
            row[f"{key}_seeds"] = values
        if row["drift_budget"]:
            ends = [controller_kl(group["dirs"][seed]) for seed in row["seeds"]]
            row["controller_kl"] = statistics.fmean(ends) if None not in ends else float("nan")
        (budgets if row["drift_budget"] else sweep).append(row)
    budgets.sort(key=lambda r: r["drift_budget"])
    sweep.sort(key=lambda r: r[DRIFT])
    for row in budgets:
        row["ratio_controller"] = row["controller_kl"] / row["drift_budget"]
        row["ratio_wiki"] = row["drift/wiki"] / row["drift_budget"]
        row["ratio_books"] = row["drift/books"] / row["drift_budget"]
        row["held"] = abs(row["ratio_wiki"] - 1) <= TOLERANCE
        row.update(_versus_sweep(row, sweep))
    return budgets, sweep


def _versus_sweep(row: dict, sweep: list[dict]) -> dict:
    """The sweep's exact match at this row's mean drift (linear between the bracketing settings)."""
    for lo, hi in zip(sweep, sweep[1:]):
        if lo[DRIFT] <= row[DRIFT] <= hi[DRIFT]:
            w = (row[DRIFT] - lo[DRIFT]) / (hi[DRIFT] - lo[DRIFT])
            em = (1 - w) * lo["task/exact_match"] + w * hi["task/exact_match"]
            se = math.hypot(
                (1 - w) * lo["task/exact_match_sd"] / math.sqrt(len(lo["seeds"])),
                w * hi["task/exact_match_sd"] / math.sqrt(len(hi["seeds"])),
                row["task/exact_match_sd"] / math.sqrt(len(row["seeds"])),
            )
            return {"sweep_em": em, "em_vs_sweep": row["task/exact_match"] - em, "em_vs_sweep_se": se,
                    "bracket": f"kl_coef {lo['kl_coef']:g}-{hi['kl_coef']:g}"}  # fmt: skip
    return {"sweep_em": None, "em_vs_sweep": None, "em_vs_sweep_se": None, "bracket": "outside the sweep"}


def table(task: str, budgets: list[dict], sweep: list[dict]) -> str:
    lines = [f"### {task}", "",
             "| setting | seeds | controller's reading at the end | drift wiki | ÷ budget | drift books | ÷ budget | task EM |"
             " EM − sweep at same drift |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in budgets:
        if r["em_vs_sweep"] is None:
            vs = r["bracket"]
        elif math.isnan(r["em_vs_sweep_se"]):  # a one-seed reference has no spread
            vs = f"{r['em_vs_sweep']:+.2f} ({r['bracket']}, one seed: no SE)"
        else:
            vs = f"{r['em_vs_sweep']:+.2f} ± {r['em_vs_sweep_se']:.2f} ({r['bracket']})"
        lines.append(
            f"| budget {r['drift_budget']:g} | {len(r['seeds'])} | {r['controller_kl']:.3f} (÷ budget"
            f" {r['ratio_controller']:.2f}) | {r['drift/wiki']:.3f} ± {r['drift/wiki_sd']:.3f}"
            f" | **{r['ratio_wiki']:.2f}**{' ✓' if r['held'] else ''} | {r['drift/books']:.3f} ± {r['drift/books_sd']:.3f}"
            f" | {r['ratio_books']:.2f} | {r['task/exact_match']:.2f} ± {r['task/exact_match_sd']:.2f} | {vs} |"
        )
    for r in sweep:
        sd = {
            k: "" if math.isnan(r[f"{k}_sd"]) else f" ± {r[f'{k}_sd']:.3f}"
            for k in ("drift/wiki", "drift/books")
        }
        em_sd = "" if math.isnan(r["task/exact_match_sd"]) else f" ± {r['task/exact_match_sd']:.2f}"
        lines.append(
            f"| kl_coef {r['kl_coef']:g} | {len(r['seeds'])} | – | {r['drift/wiki']:.3f}{sd['drift/wiki']} | – |"
            f" {r['drift/books']:.3f}{sd['drift/books']} | – | {r['task/exact_match']:.2f}{em_sd} | – |"
        )
    return "\n".join(lines)


def plot(results: dict[str, tuple[list[dict], list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (task, (budgets, sweep)) in zip(axes[0], results.items()):
        xs = [r[DRIFT] for r in sweep]
        ax.plot(xs, [r["task/exact_match"] for r in sweep], "o-", color="tab:gray", label="fixed kl_coef")
        for r in sweep:
            ax.scatter(r[f"{DRIFT}_seeds"], r["task/exact_match_seeds"], color="tab:gray", s=10, alpha=0.5)
            ax.annotate(f"kl {r['kl_coef']:g}", (r[DRIFT], r["task/exact_match"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)  # fmt: skip
        for i, r in enumerate(budgets):
            color = f"C{i}"
            ax.errorbar(r[DRIFT], r["task/exact_match"], xerr=r[f"{DRIFT}_sd"], yerr=r["task/exact_match_sd"],
                        fmt="s", color=color, capsize=3, label=f"budget {r['drift_budget']:g}")  # fmt: skip
            ax.scatter(r[f"{DRIFT}_seeds"], r["task/exact_match_seeds"], color=color, s=10, alpha=0.6)
            ax.axvline(r["drift_budget"], color=color, linestyle="--", linewidth=1)
        ax.set_xlabel("drift on held-out Wikipedia (KL nats/token)")
        ax.set_ylabel("task exact match")
        ax.set_title(f"{task}: budget (dashed) vs. fixed kl_coef")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tasks", nargs="+", help="task=compare_dir[,compare_dir...]")
    parser.add_argument("--out", type=Path, help="directory for budget.json and budget.png")
    args = parser.parse_args()
    results = {}
    for spec in args.tasks:
        task, _, dirs = spec.partition("=")
        if not dirs:
            parser.error(f"{spec}: expected task=dir[,dir...]")
        results[task] = summarize(load_groups([Path(d) for d in dirs.split(",")]))
        print(table(task, *results[task]) + "\n")
    cells = [r for budgets, _ in results.values() for r in budgets]
    books = sum(abs(r["ratio_books"] - 1) <= TOLERANCE for r in cells)
    own = sum(abs(r["ratio_controller"] - 1) <= TOLERANCE for r in cells)
    print(f"budget held (mean drift on held-out wiki within ±{TOLERANCE:.0%}): "
          f"{sum(r['held'] for r in cells)} of {len(cells)} task x budget cells; on held-out books {books} of"
          f" {len(cells)}; the controller's own reading at the last step {own} of {len(cells)}")  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "budget.json").write_text(json.dumps(results, indent=1))
        plot(results, args.out / "budget.png")


if __name__ == "__main__":
    main()
