"""Apply the rule that chooses ``method: arr``'s replay source and ratio (docs/study.md, "Choosing the default")
to the two grids of ``configs/default_study_*.yaml``.

A candidate passes on a task when, over its seeds,

1. bleed (share of answers to unrelated questions in the task's form) <= 0.05;
2. IFEval prompt-level strict accuracy minus the base's >= -1 paired standard error (seeds x prompts);
3. KL on books <= ``arr-corpus``'s + 2 standard errors of the difference of the seed means
   (``sqrt(sd_a^2 / n_a + sd_b^2 / n_b)``);
4. task exact match minus plain SFT's >= -1 paired standard error (seeds x items, same seeds).

The default is the cheapest candidate that passes on every task given. Cost, in SFT steps: the training
step's FLOPs (``benchmarks/frontier.py``'s accounting: LoRA's forward + backward is 4 FLOPs per frozen
parameter and position, the reference's forward 2) plus the self-replay generation amortised over the run.
Generation is a forward pass, 2 FLOPs per parameter and token, over the tokens the self-replay set holds:
``1.1 x replay_ratio x replay_mix x`` the SFT tokens of a step, per step (the 10% margin of
:func:`arrtune.data.self_replay.token_budget`), so it adds ``2 (body + head) x 1.1 x rr x mix x tokens``
FLOPs per step, about ``0.55 x rr x mix`` SFT steps.

    python benchmarks/default_rule.py runs/default_study_keywords runs/default_study_vornish \
        --json docs/study/default/rule.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from frontier import load_groups, parameter_counts, step_flops, summarize, token_stats  # noqa: E402

from arrtune.report import paired_differences  # noqa: E402

BLEED_LIMIT = 0.05
REFERENCE, SFT = "arr-corpus", "sft"


def self_share(config: dict) -> float:
    """Share of the replay tokens that are self-replay."""
    return 1.0 if config.get("replay") == "self" else float(config.get("replay_mix") or 0)


def generation_flops(config: dict, stats: dict[str, float], body: int, head: int) -> float:
    """Self-replay generation FLOPs per training step (the module docstring's formula)."""
    ratio = float(config.get("replay_ratio") or 0)
    return 2 * (body + head) * 1.1 * ratio * self_share(config) * stats["tokens"]


def _mean_sd(values: list[float]) -> str:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{m:.2f} ± {sd:.2f}"


def table(groups: dict[str, dict], rows: dict[str, dict], vs_sft: dict, vs_base: dict) -> str:
    """A markdown table of every setting: seed means ± sd, and the paired changes the rule reads."""
    head = (
        "| setting | seeds | cost × sft | task EM | EM − sft | bleed | IF prompt strict | IF − base | "
        "IF instr. strict − base | KL books | KL chat |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in sorted(groups, key=lambda n: rows[n]["cost"]):
        runs = list(groups[name]["runs"].values())
        row, s, b = rows[name], vs_sft.get(name, {}), vs_base.get(name, {})

        def paired(d: dict, key: str) -> str:
            return f"{d[key]:+.3f} ± {d[key + '_stderr']:.3f}" if key in d else "–"

        lines.append(
            f"| {name} | {row['n']} | {row['cost']:.2f} | {_mean_sd([r['adapted']['task/exact_match'] for r in runs])} "
            f"| {paired(s, 'task/exact_match')} | {_mean_sd([r['adapted']['bleed'] for r in runs])} "
            f"| {_mean_sd([r['adapted']['ifeval/prompt_strict'] for r in runs])} | {paired(b, 'ifeval/prompt_strict')} "
            f"| {_mean_sd([r['delta']['ifeval/instruction_strict'] for r in runs])} "
            f"| {row['drift/books']:.3f} ± {row['drift/books_sd']:.3f} | {row['drift/chat']:.3f} ± {row['drift/chat_sd']:.3f} |"
        )
    return "\n".join(lines)


def judge(directory: Path) -> tuple[dict[str, dict], list[str]]:
    """Per candidate of one grid: its cost, the four tests' values and verdicts; and the lines printed."""
    groups = load_groups([directory])
    first = next(iter(groups.values()))["config"]
    stats = token_stats(first)
    body, head = parameter_counts(first)
    sft_flops = step_flops({"replay_ratio": 0, "kl_coef": 0}, stats, body, head)
    cost = {n: step_flops(g["config"], stats, body, head) / sft_flops for n, g in groups.items()}
    gen = {n: generation_flops(g["config"], stats, body, head) / sft_flops for n, g in groups.items()}
    rows = summarize(groups, {n: cost[n] + gen[n] for n in groups})
    names = sorted(p.name for p in directory.glob("runs/*") if (p / "eval.json").is_file())
    vs_sft = {r["run"]: r for r in paired_differences(directory, names, SFT)}
    vs_base = {r["run"]: r for r in paired_differences(directory, names, None)}
    out, lines = {}, [f"## {directory}", "", table(groups, rows, vs_sft, vs_base), ""]
    for name in sorted((n for n in groups if n != SFT), key=lambda n: rows[n]["cost"]):
        row = rows[name]
        ref = rows[REFERENCE]
        books_se = math.sqrt(row["drift/books_sd"] ** 2 / row["n"] + ref["drift/books_sd"] ** 2 / ref["n"])
        if_diff = vs_base[name].get("ifeval/prompt_strict", float("nan"))
        if_se = vs_base[name].get("ifeval/prompt_strict_stderr", float("nan"))
        em_diff = vs_sft[name].get("task/exact_match", float("nan"))
        em_se = vs_sft[name].get("task/exact_match_stderr", float("nan"))
        tests = {
            "bleed": (row["bleed"] <= BLEED_LIMIT, f"bleed {row['bleed']:.3f} (limit {BLEED_LIMIT})"),
            "instructions": (if_diff >= -if_se, f"IF prompt strict - base {if_diff:+.3f} ± {if_se:.3f}"),
            "books": (
                row["drift/books"] <= ref["drift/books"] + 2 * books_se,
                f"KL books {row['drift/books']:.3f} vs {REFERENCE} {ref['drift/books']:.3f} + 2 × {books_se:.3f}",
            ),
            "task": (em_diff >= -em_se, f"EM - sft {em_diff:+.3f} ± {em_se:.3f}"),
        }
        passed = all(ok for ok, _ in tests.values())
        out[name] = {
            "cost": row["cost"], "step_cost": cost[name], "generation_cost": gen[name], "seeds": row["seeds"],
            "passed": passed, **{k: {"pass": ok, "detail": d} for k, (ok, d) in tests.items()},
        }  # fmt: skip
        lines.append(
            f"{name} (cost {row['cost']:.3f} × sft = step {cost[name]:.3f} + generation {gen[name]:.3f}; "
            f"seeds {row['seeds']}): "
            + "; ".join(f"{d}: {'pass' if ok else 'FAIL'}" for ok, d in tests.values())
            + (" -> passes" if passed else "")
        )
    return out, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="+", help="arrtune compare output directories, one per task")
    parser.add_argument("--json", help="write every verdict here")
    args = parser.parse_args()
    verdicts = {}
    for directory in args.directory:
        verdicts[directory], lines = judge(Path(directory))
        print("\n".join(lines) + "\n")
    candidates = set.intersection(*(set(v) for v in verdicts.values()))
    passing = [n for n in candidates if all(v[n]["passed"] for v in verdicts.values())]
    mean_cost = {n: sum(v[n]["cost"] for v in verdicts.values()) / len(verdicts) for n in candidates}
    chosen = min(passing, key=lambda n: mean_cost[n]) if passing else None
    print(f"chosen: {chosen}" + ("" if passing else " (no candidate passes every test on every task)"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"verdicts": verdicts, "chosen": chosen}, indent=2) + "\n")


if __name__ == "__main__":
    main()
