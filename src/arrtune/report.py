"""Comparison report: tables (Markdown, CSV, JSON) and plots (PNG) from a ``compare`` directory.

Reads ``base_eval.json`` and, for each run, ``runs/<name>/{config.yaml, eval.json, metrics.jsonl,
train_summary.json}``. Writes ``report.md``, ``results.csv``, ``results.json``,
``retention_vs_plasticity.png`` (one point per run, Pareto front marked) and ``loss_curves.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from arrtune.atomic import write_atomic

SETTINGS = (
    "method",
    "kl_coef",
    "replay_ratio",
    "kl_on",
    "kl_direction",
    "kl_mask_target",
    "kl_every",
    "kl_fraction",
    "precision",
)
COST = ("step_time_s", "sft_tokens_per_s", "peak_memory_gb")
#: (metric key, column title, higher is better)
HEADLINE = (
    ("task/exact_match", "task EM", True),
    ("task/loss", "task loss", False),
    ("mc/mean_acc", "MC mean acc", True),
    ("ppl/wiki", "ppl wiki", False),
    ("ppl/books", "ppl books", False),
    ("drift/books", "KL books", False),
    ("drift/chat", "KL chat", False),
    ("leak", "leak", False),
    ("bleed", "bleed", False),
    ("ifeval/prompt_strict", "IF prompt strict", True),
    ("ifeval/instruction_loose", "IF instr. loose", True),
)
#: per-item outcomes compared run against run (paired over seeds x items): (key in per_item, title)
PAIRED = (("task/exact_match", "task EM"), ("mc", "MC acc (all items)"), ("leak", "leak"), ("bleed", "bleed"),
          ("ifeval/prompt_strict", "IF prompt strict"))  # fmt: skip
_SEED = re.compile(r"-seed=\d+")
RETENTION_KEY, PLASTICITY_KEY = "mc/mean_acc", "task/exact_match"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (both coordinates: higher is better)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def collect_rows(compare_dir: str | os.PathLike, names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run (plus ``base`` first): settings, every metric, cost and cost ratios to ``sft``."""
    root = Path(compare_dir)
    rows: list[dict[str, Any]] = []
    base = _read_json(root / "base_eval.json")
    if base is not None:
        rows.append({"run": "base", "method": "base", **base.get("model", {})})
    for name in names:
        run = root / "runs" / name
        cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        result = _read_json(run / "eval.json") or {}
        summary = _read_json(run / "train_summary.json") or {}
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if (
            run / "metrics.jsonl"
        ).is_file() else []  # fmt: skip
        steps = [r for r in records if "step_time_s" in r][1:]  # the first step includes warm-up
        row: dict[str, Any] = {"run": name, **{k: cfg.get(k) for k in SETTINGS if k in cfg}}
        row.update(result.get("adapted", {}))
        row["step_time_s"] = _median([r["step_time_s"] for r in steps])
        row["sft_tokens_per_s"] = _median([r["sft_tokens_per_s"] for r in steps])
        peak = summary.get("peak_memory_bytes")
        row["peak_memory_gb"] = peak / 2**30 if peak else None
        row["train_wall_s"] = summary.get("wall_s")
        rows.append(row)
    reference = next((r for r in rows if r.get("method") == "sft" and r["run"] != "base"), None)
    for row in rows:
        for key in COST:
            if reference and row.get(key) is not None and reference.get(key):
                row[f"{key}_vs_sft"] = row[key] / reference[key]
    return rows


def group_name(run: str) -> str:
    """The run's name without its ``-seed=N`` part: runs that differ only in seed share it."""
    return _SEED.sub("", run)


def aggregate_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group of seeds: every numeric metric's mean, its standard deviation across seeds
    (``<key>_sd``, ddof 1) and ``n_seeds``; settings are taken from the group's first run."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(group_name(row["run"]), []).append(row)
    out = []
    for name, members in groups.items():
        agg: dict[str, Any] = {"run": name, "n_seeds": len(members)}
        for key in dict.fromkeys(k for m in members for k in m):
            values = [m.get(key) for m in members]
            numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if key in ("run", "seed") or key.endswith("_stderr"):
                continue
            if len(numbers) == len(members) and all(math.isfinite(v) for v in numbers):
                agg[key] = statistics.fmean(numbers)
                agg[f"{key}_sd"] = statistics.stdev(numbers) if len(numbers) > 1 else None
            elif key not in agg:
                agg[key] = values[0]
        out.append(agg)
    return out


def _item_outcomes(result: dict[str, Any], column: str, key: str) -> list[float] | None:
    """0/1 outcomes of one column of an ``eval.json``: a per-item key, or ``mc`` = every benchmark's items."""
    items = (result.get("per_item") or {}).get(column) or {}
    if key == "mc":
        keys = sorted(k for k in items if k.endswith("/acc"))
        return [v for k in keys for v in items[k]] if keys else None
    return items.get(key)


def paired_differences(
    compare_dir: str | os.PathLike, names: Sequence[str], reference: str | None = "sft"
) -> list[dict[str, Any]]:
    """Per group: the mean difference of each :data:`PAIRED` outcome vs. the reference group's run of the
    same seed (``reference=None``: vs. the base model, same items), with its standard error over all
    seeds x items, ``std(d) / sqrt(n)``."""
    root = Path(compare_dir)
    results = {n: _read_json(root / "runs" / n / "eval.json") or {} for n in names}
    seed_of = {n: (m.group(0) if (m := _SEED.search(n)) else "") for n in names}
    by_group: dict[str, list[str]] = {}
    for n in names:
        by_group.setdefault(group_name(n), []).append(n)
    if reference is not None and reference not in by_group:
        return []
    out = []
    for group, members in by_group.items():
        if group == reference:
            continue
        row: dict[str, Any] = {"run": group}
        for key, _ in PAIRED:
            diffs: list[float] = []
            for n in members:
                if reference is None:
                    mine = _item_outcomes(results[n], "adapted", key)
                    other = _item_outcomes(results[n], "base", key)
                    if other is None and key in ("leak", "bleed") and mine is not None:
                        other = [0] * len(mine)  # the base model defines the reference answers
                else:
                    partner = next((m for m in by_group[reference] if seed_of[m] == seed_of[n]), None)
                    mine = _item_outcomes(results[n], "adapted", key)
                    other = None if partner is None else _item_outcomes(results[partner], "adapted", key)
                if mine is not None and other is not None and len(mine) == len(other):
                    diffs += [a - b for a, b in zip(mine, other)]
            if len(diffs) > 1:
                m = statistics.fmean(diffs)
                row[key] = m
                row[f"{key}_stderr"] = statistics.stdev(diffs) / math.sqrt(len(diffs))
                row[f"{key}_n"] = len(diffs)
        out.append(row)
    return out


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, (bool, str, int)):
        return str(value)
    se = row.get(f"{key}_stderr", row.get(f"{key}_sd"))
    text = f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return f"{text} ± {se:.3f}" if isinstance(se, (int, float)) else text


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r, key) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def seed_tables(
    aggregated: list[dict[str, Any]], vs_sft: list[dict[str, Any]], vs_base: list[dict[str, Any]]
) -> str:
    """Tables of a grid with seeds: means ± standard deviation across seeds, and paired differences."""
    paired = [("run", "run")] + [(k, t) for k, t in PAIRED]
    parts = [
        "### Across seeds (mean ± standard deviation over seeds)\n",
        _table(aggregated, [("run", "run"), ("n_seeds", "seeds")] + [(k, t) for k, t, _ in HEADLINE]),
    ]
    if vs_base:
        parts += ["\n\n### Paired difference vs. base (± standard error over seeds × items)\n",
                  _table(vs_base, paired)]  # fmt: skip
    if vs_sft:
        parts += ["\n\n### Paired difference vs. sft, same seed (± standard error over seeds × items)\n",
                  _table(vs_sft, paired)]  # fmt: skip
    return "".join(parts) + "\n"


def markdown_tables(rows: list[dict[str, Any]]) -> str:
    """The report's tables: headline metrics, every benchmark, and cost."""
    bench = sorted(
        {k[: -len("/acc")] for r in rows for k in r if k.endswith("/acc") and not k.startswith("mc/")}
    )

    def table(columns: list[tuple[str, str]]) -> str:
        return _table(rows, columns)

    settings = [("run", "run")]
    parts = [
        "### Plasticity and retention (each run)\n",
        table(settings + [(k, t) for k, t, _ in HEADLINE]),
        "\n\n### Benchmarks (accuracy ± standard error)\n",
        table(settings + [(f"{b}/acc", b) for b in bench]),
        "\n\n### Cost (median over logged steps; ratio to sft)\n",
        table(
            settings
            + [
                ("step_time_s", "s/step"),
                ("step_time_s_vs_sft", "× sft"),
                ("sft_tokens_per_s", "SFT tok/s"),
                ("sft_tokens_per_s_vs_sft", "× sft"),
                ("peak_memory_gb", "peak GB"),
                ("peak_memory_gb_vs_sft", "× sft"),
            ]
        ),  # fmt: skip
    ]
    return "".join(parts) + "\n"


def plot_retention_vs_plasticity(rows: list[dict[str, Any]], path: Path) -> None:
    """Task exact match (x) vs. four retention measures, one point per run, Pareto front marked.

    Rows of several seeds (``n_seeds`` > 1, from :func:`aggregate_rows`) are drawn at their mean with error
    bars of one standard deviation across seeds; ``seed_points`` (the per-seed rows) are drawn faintly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    panels = [(RETENTION_KEY, "mean multiple-choice accuracy (higher = less forgetting)", 1),
              ("ppl/books", "perplexity on held-out books (lower = less forgetting)", -1),
              ("leak", "leak: share of general answers using task words (lower = better)", -1),
              ("bleed", "bleed: share of general answers in the task's form (lower = better)", -1)]  # fmt: skip
    points = [r for r in rows if not r.get("seed_point")]
    faint = [r for r in rows if r.get("seed_point")]
    base = next((r for r in points if r["run"] == "base"), None)
    for ax, (key, label, sign) in zip(axes.flat, panels):
        pts = [(r, r.get(PLASTICITY_KEY) or 0.0, r.get(key)) for r in points if r.get(key) is not None]
        if not pts:
            ax.set_visible(False)
            continue
        for r in faint:
            if r.get(key) is not None:
                color = "tab:red" if r.get("method") == "sft" else "tab:blue"
                ax.scatter([r.get(PLASTICITY_KEY) or 0.0], [r[key]], s=15, color=color, alpha=0.35, zorder=2)
        front = set(pareto_front([(x, sign * y) for _, x, y in pts]))
        for i, (r, x, y) in enumerate(pts):
            color = "black" if r["run"] == "base" else ("tab:red" if r.get("method") == "sft" else "tab:blue")
            if r.get(f"{key}_sd") is not None or r.get(f"{PLASTICITY_KEY}_sd") is not None:
                ax.errorbar([x], [y], xerr=r.get(f"{PLASTICITY_KEY}_sd") or 0, yerr=r.get(f"{key}_sd") or 0,
                            color=color, capsize=3, zorder=2)  # fmt: skip
            ax.scatter([x], [y], s=80 if i in front else 40, color=color, edgecolor="gold" if i in front else color,
                       linewidth=2, zorder=3)  # fmt: skip
            ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        line = sorted((pts[i][1], pts[i][2]) for i in front)
        ax.plot(
            [p[0] for p in line], [p[1] for p in line], "--", color="gold", zorder=2, label="Pareto front"
        )
        reference = 0.0 if key in ("leak", "bleed") else (base or {}).get(key)  # base answers define 0
        if base and reference is not None:
            ax.axhline(reference, color="gray", linestyle=":", label="base model")
        ax.set_xlabel("task exact match (higher = learned the new task)")
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    several = any((r.get("n_seeds") or 1) > 1 for r in points)
    fig.suptitle(
        "Retention vs. plasticity: each point is one fine-tuning run"
        + (" (mean ± sd over seeds; faint: single seeds)" if several else "")
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def plot_loss_curves(compare_dir: Path, names: Sequence[str], path: Path) -> None:
    """Each loss term over optimizer steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [
        ("sft_loss", "SFT loss (new task)"),
        ("replay_loss", "replay loss (general text)"),
        ("kl", "KL to initial model"),
    ]
    runs = {}
    for name in names:
        f = compare_dir / "runs" / name / "metrics.jsonl"
        if f.is_file():
            runs[name] = [json.loads(line) for line in f.read_text().splitlines()]
    budgeted = any("kl_coef" in r for records in runs.values() for r in records)
    if budgeted:  # drift budget: the multiplier, and the smoothed KL against its budget
        terms += [
            ("kl_coef", "kl_coef (drift-budget multiplier)"),
            ("kl_smoothed", "smoothed KL (dashed: budget)"),
        ]
    fig, axes = plt.subplots(1, len(terms), figsize=(5 * len(terms), 4.5))
    for name, records in runs.items():
        for ax, (key, _) in zip(axes, terms):
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)[0]
                budget = next((r["drift_budget"] for r in records if "drift_budget" in r), None)
                if key == "kl_smoothed" and budget:
                    ax.axhline(budget, color=line.get_color(), linestyle="--", linewidth=1)
    if budgeted:
        axes[3].set_yscale("log")
    for ax, (_, title) in zip(axes, terms):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("loss (nats/token)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def write_report(compare_dir: str | os.PathLike, names: Sequence[str]) -> Path:
    """Write report.md, results.csv, results.json and the two plots into ``compare_dir``; a run whose
    behaviour is not protected gets one sentence under the tables (:func:`behaviour_note`)."""
    from arrtune.evaluation import behaviour_note

    root = Path(compare_dir)
    rows = collect_rows(root, names)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(root / "results.csv", buf.getvalue())
    write_atomic(root / "results.json", json.dumps(rows, indent=2))
    aggregated = aggregate_rows(rows)
    several = any(r["n_seeds"] > 1 for r in aggregated)
    plotted = (
        aggregated + [{**r, "seed_point": True} for r in rows if r["run"] != "base"] if several else rows
    )
    plot_retention_vs_plasticity(plotted, root / "retention_vs_plasticity.png")
    plot_loss_curves(root, names, root / "loss_curves.png")
    md = [
        "# arrtune comparison report\n",
        "Base = the model before fine-tuning. Accuracies carry ± one binomial standard error. "
        "Lower is better for task loss, perplexity (ppl), KL to the base (drift), leak "
        "(share of answers to general questions that use the new task's words) and bleed (share of answers "
        "to general questions in the task's form and not the base's).\n",
    ]
    if several:
        write_atomic(root / "results_by_seed_group.json", json.dumps(aggregated, indent=2))
        md.append(
            seed_tables(aggregated, paired_differences(root, names), paired_differences(root, names, None))
        )
    notes = []
    for name in names:
        run_dir = root / "runs" / name
        config = (
            yaml.safe_load((run_dir / "config.yaml").read_text())
            if (run_dir / "config.yaml").is_file()
            else None
        )
        note = behaviour_note(_read_json(run_dir / "eval.json") or {}, config)
        if note:
            notes.append(f"- **{name}**: {note}")
    md += [
        markdown_tables(rows),
        *(["\n### Behaviour\n", "\n".join(notes)] if notes else []),
        "\n![retention vs plasticity](retention_vs_plasticity.png)\n\n![loss curves](loss_curves.png)\n",
    ]
    write_atomic(root / "report.md", "\n".join(md))
    return root / "report.md"
