"""Cost vs. retention of ARR settings, and the default chosen from it.

Reads every evaluated run of an ``arrtune compare`` directory (``runs/<name>-seed=<s>/{config.yaml,eval.json}``),
groups the seeds of each setting, and puts each setting's retention (drift on held-out books and wiki text, KL
on chat answers) and task exact match against its **step cost in SFT steps**, computed from FLOPs rather than
noisy wall time: policy forward + backward (4 FLOPs per parameter and position) over the SFT rows and the
replay rows (``replay_ratio`` x the SFT tokens, packed to the SFT batch's width), the output layer only where a
loss needs it, and the reference's no-grad forward (2 FLOPs per parameter and position) over the rows that
carry the KL, the same accounting as ``benchmarks/overhead.py``'s FLOP floor, on the grid's own data and
batch size. ``kl_coef`` does not change the cost.

The rule: among the ARR settings with corpus replay and at least two seeds, the cheapest one whose task exact
match is within one paired standard error (seeds x items, same seeds) of plain SFT's (when no setting's is, of
the setting with the highest exact match), and whose retention (books drift and chat KL) is within one
standard error of the best retention among the settings that pass that exact-match test (or, with
``--reference NAME``, of that setting's). Of settings with the same cost (``kl_coef`` costs nothing), the one with the smaller ``kl_coef``
comes first. Standard errors of retention come from the spread over seeds: ``sqrt(sd_a^2 / n_a + sd_b^2 /
n_b)``. Both choices are printed when ``--reference`` is given.

    python benchmarks/frontier.py runs/study runs/study_vornish runs/study_frontier --reference arr-corpus \
        --plot docs/study/evidence_vornish/frontier.png --json docs/study/evidence_vornish/frontier.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from pathlib import Path

import yaml

RETENTION = ("drift/books", "drift/chat")
SHOWN = ("task/exact_match", "drift/books", "drift/wiki", "drift/chat", "leak", "bleed", "mc/mean_acc")


#: what makes two runs the same setting (whatever their names in the grids)
SETTING_KEYS = ("method", "replay_ratio", "kl_coef", "kl_on", "kl_fraction", "kl_every", "replay", "replay_mix",
                "drift_budget", "learning_rate", "max_steps")  # fmt: skip


def load_groups(directories: list[Path]) -> dict[str, dict]:
    """Setting name -> {"config": resolved config of its first seed, "runs": {seed: eval.json}, "dirs": {seed: run
    directory}}, over one or more
    compare directories. Runs of the same setting (``SETTING_KEYS``) form one group under the first name seen,
    wherever they come from; a name already taken by another setting gets its replay_ratio and kl_coef appended."""
    groups: dict[str, dict] = {}
    by_setting: dict[tuple, str] = {}
    for directory in directories:
        for path in sorted(directory.glob("runs/*/eval.json")):
            config = yaml.safe_load((path.parent / "config.yaml").read_text())
            setting = tuple(str(config.get(k)) for k in SETTING_KEYS)
            name = by_setting.get(setting) or re.sub(r"-seed=\d+$", "", path.parent.name)
            if name in groups and by_setting.get(setting) != name:
                name = f"{name} (rr {config.get('replay_ratio'):g}, kl {config.get('kl_coef'):g})"
            by_setting[setting] = name
            group = groups.setdefault(name, {"config": config, "runs": {}, "dirs": {}})
            seed = int(config.get("seed", 0))
            group["runs"][seed], group["dirs"][seed] = json.loads(path.read_text()), path.parent
    return groups


def token_stats(config: dict, n_batches: int = 200) -> dict[str, float]:
    """Mean per micro-batch of the SFT data: padded positions, label positions, real tokens, width."""
    from arrtune.data.sft import load_sft_examples
    from arrtune.models import load_tokenizer

    tokenizer = load_tokenizer(config["model"])
    examples, _ = load_sft_examples(
        config["data"], tokenizer, config["max_length"], config.get("data_split", "train")
    )
    size, rng = config["per_device_train_batch_size"], random.Random(0)
    totals = {"positions": 0.0, "labels": 0.0, "tokens": 0.0, "width": 0.0}
    for _ in range(n_batches):
        batch = rng.sample(examples, size)
        width = max(len(e["input_ids"]) for e in batch)
        totals["positions"] += size * width
        totals["labels"] += sum(sum(1 for x in e["labels"][1:] if x != -100) for e in batch)
        totals["tokens"] += sum(len(e["input_ids"]) for e in batch)
        totals["width"] += width
    return {k: v / n_batches for k, v in totals.items()}


def parameter_counts(config: dict) -> tuple[int, int]:
    """(matmul parameters of the body, of the output head) of the grid's model."""
    from arrtune.models import load_model

    model = load_model(config["model"])
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    if not model.config.tie_word_embeddings:
        body -= head
    return body, head


def step_flops(config: dict, stats: dict[str, float], body: int, head: int) -> float:
    """Matmul FLOPs of one micro-batch step of a resolved config (see the module docstring)."""
    ratio, kl = float(config.get("replay_ratio") or 0), float(config.get("kl_coef") or 0) > 0
    replay_positions = math.ceil(ratio * stats["tokens"] / stats["width"]) * stats["width"] if ratio else 0.0
    flops = 4 * body * (stats["positions"] + replay_positions) + 4 * head * (
        stats["labels"] + replay_positions
    )
    if kl:
        kl_on = config.get("kl_on", "auto")
        rows = {"sft": (stats["positions"], stats["labels"]), "replay": (replay_positions, replay_positions)}
        used = (
            [rows["replay"]]
            if kl_on == "replay"
            else [rows["sft"]]
            if kl_on == "sft"
            else list(rows.values())
        )
        flops += sum(2 * body * p + 2 * head * h for p, h in used)
    return flops


def summarize(groups: dict[str, dict], cost: dict[str, float]) -> dict[str, dict]:
    """Per setting: mean and sd over seeds of each shown metric, the seeds, and the cost."""
    out = {}
    for name, group in groups.items():
        row: dict = {"cost": cost[name], "n": len(group["runs"]), "seeds": sorted(group["runs"])}
        for key in SHOWN:
            values = [r["adapted"][key] for r in group["runs"].values() if key in r.get("adapted", {})]
            if key == "mc/mean_acc":
                values = [
                    r["adapted"][key] - r["base"][key] for r in group["runs"].values() if key in r["adapted"]
                ]
            if values:
                m = sum(values) / len(values)
                sd = (
                    math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
                    if len(values) > 1
                    else 0.0
                )
                row[key], row[key + "_sd"] = m, sd
        out[name] = row
    return out


def paired_em_se(groups: dict[str, dict], a: str, b: str) -> tuple[float, float]:
    """Mean and standard error of EM(b) - EM(a), paired over the seeds both have and the task items."""
    diffs = []
    for seed in set(groups[a]["runs"]) & set(groups[b]["runs"]):
        ea = groups[a]["runs"][seed]["per_item"]["adapted"]["task/exact_match"]
        eb = groups[b]["runs"][seed]["per_item"]["adapted"]["task/exact_match"]
        diffs += [y - x for x, y in zip(ea, eb)]
    if len(diffs) < 2:
        return float("nan"), float("nan")
    m = sum(diffs) / len(diffs)
    return m, math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


def choose(groups: dict[str, dict], rows: dict[str, dict], sft: str = "sft",
           reference: str | None = None) -> tuple[str | None, list[str]]:  # fmt: skip
    """The default by the rule in the module docstring, and one line of reasoning per candidate; with
    ``reference`` (a setting's name), retention is compared with that setting's instead of the best's."""
    candidates = [n for n, g in groups.items() if g["config"].get("method") == "arr" and len(g["runs"]) > 1
                  and float(g["config"].get("replay_mix") or 0) == 0 and g["config"].get("replay") == "builtin"
                  and not g["config"].get("drift_budget")]  # fmt: skip

    def em_within(ref: str, name: str) -> tuple[bool, float, float]:
        """Is ``name``'s exact match within one paired standard error of ``ref``'s (or above it)?"""
        diff, se = paired_em_se(groups, ref, name) if name != ref else (0.0, 0.0)
        return diff >= -se, diff, se

    # plasticity: within one paired standard error of plain SFT's exact match; when no candidate is, of the
    # candidate with the highest exact match
    near_sft = [n for n in candidates if em_within(sft, n)[0]]
    em_ref = sft if near_sft else max(candidates, key=lambda n: rows[n]["task/exact_match"])

    # the best retention among the settings that keep plasticity: a setting that retains more by not
    # learning the task is not the bar
    plastic = [n for n in candidates if em_within(em_ref, n)[0]] or candidates
    best = {k: reference or min(plastic, key=lambda n: rows[n][k]) for k in RETENTION}
    label = "reference" if reference else "best"
    notes, eligible = (
        [] if near_sft else [f"no candidate within one SE of {sft}'s EM: EM compared with {em_ref}"],
        [],
    )

    def cost_then_kl(name: str) -> tuple[float, float]:  # equal cost: the smaller kl_coef first
        return rows[name]["cost"], float(groups[name]["config"].get("kl_coef") or 0)

    for name in sorted(candidates, key=cost_then_kl):
        ok, why = True, []
        for key in RETENTION:
            b = best[key]
            se = math.sqrt(
                rows[name][key + "_sd"] ** 2 / rows[name]["n"] + rows[b][key + "_sd"] ** 2 / rows[b]["n"]
            )
            within = rows[name][key] - rows[b][key] <= se
            ok &= within
            why.append(f"{key} {rows[name][key]:.3f} vs {label} {rows[b][key]:.3f} ({b}) ± {se:.3f}: "
                       f"{'within' if within else 'beyond'}")  # fmt: skip
        within, diff, se = em_within(em_ref, name)
        ok &= within
        why.append(f"EM − {em_ref} {diff:+.3f} ± {se:.3f}: {'within' if within else 'beyond'}")
        notes.append(
            f"{name} (cost {rows[name]['cost']:.2f}× sft): " + "; ".join(why) + (" -> eligible" if ok else "")
        )
        if ok:
            eligible.append(name)
    return (eligible[0] if eligible else None), notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "directory", nargs="+", help="arrtune compare output directories (same task and model)"
    )
    parser.add_argument("--plot", help="write the frontier plot here (PNG)")
    parser.add_argument("--json", help="write the per-setting summary here")
    parser.add_argument("--reference", help="compare retention with this setting (a name in the table) "
                        "instead of the best setting's")  # fmt: skip
    args = parser.parse_args()
    groups = load_groups([Path(d) for d in args.directory])
    first = next(iter(groups.values()))["config"]
    stats = token_stats(first)
    body, head = parameter_counts(first)
    sft_flops = step_flops({"replay_ratio": 0, "kl_coef": 0}, stats, body, head)
    cost = {n: step_flops(g["config"], stats, body, head) / sft_flops for n, g in groups.items()}
    rows = summarize(groups, cost)
    print(f"SFT micro-batch: {stats['positions']:.0f} positions, {stats['labels']:.0f} label tokens; "
          f"body {body / 1e6:.0f}M, head {head / 1e6:.0f}M matmul parameters")  # fmt: skip
    head_line = "| setting | seeds | cost × sft | " + " | ".join(SHOWN) + " |"
    print(head_line + "\n|" + "---|" * (head_line.count("|") - 1))
    for name, row in sorted(rows.items(), key=lambda kv: kv[1]["cost"]):
        cells = [f"{row[k]:.3f} ± {row[k + '_sd']:.3f}" if k in row else "" for k in SHOWN]
        print(f"| {name} | {row['n']} | {row['cost']:.2f} | " + " | ".join(cells) + " |")
    chosen, notes = choose(groups, rows)
    print("\nretention within one standard error of the best setting's:\n" + "\n".join(notes))
    print(f"chosen: {chosen}")
    summary = {"rows": rows, "chosen": chosen, "notes": notes}
    if args.reference:
        if args.reference not in rows:
            raise SystemExit(f"--reference: no setting named {args.reference!r}; settings: {', '.join(rows)}")
        chosen, notes = choose(groups, rows, reference=args.reference)
        print(f"\nretention within one standard error of {args.reference}'s:\n" + "\n".join(notes))
        print(f"chosen: {chosen}")
        summary.update(
            {"reference": args.reference, "chosen_vs_reference": chosen, "notes_vs_reference": notes}
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for ax, key in zip(axes, ("drift/books", "drift/chat", "task/exact_match")):
            for name, row in rows.items():
                if key not in row:
                    continue
                ax.errorbar(row["cost"], row[key], yerr=row[key + "_sd"], fmt="o", capsize=3)
                ax.annotate(name.replace("frontier-", "").replace("replay_ratio=", "rr ").replace("-kl_coef=", ", kl "),
                            (row["cost"], row[key]), fontsize=7, xytext=(4, 3), textcoords="offset points")  # fmt: skip
            ax.set_xlabel("step cost (× an SFT step, FLOPs)")
            ax.set_ylabel(
                key + (" (higher is better)" if key == "task/exact_match" else " (lower is better)")
            )
        fig.suptitle("Cost vs. retention and plasticity (mean ± sd over seeds)")
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
