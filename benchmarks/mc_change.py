"""Each run's change in mean multiple-choice accuracy against the base, with its paired standard error.

Reads the ``eval.json`` of every run of an ``arrtune compare`` directory. The change is the mean over benchmarks
of (adapted - base) accuracy on the same items; its standard error combines the per-benchmark paired variances.
Used to check that a study's benchmarks resolve a one-point change (docs/study.md).

    python benchmarks/mc_change.py runs/study_keywords
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from arrtune.evaluation._common import paired_stderr


def mc_change(eval_json: dict) -> tuple[float, float]:
    """(change, paired standard error) of the mean accuracy over the evaluation's benchmarks, in points."""
    changes, variance = [], 0.0
    benchmarks = eval_json["config"]["benchmarks"]
    for name in benchmarks:
        base = eval_json["per_item"]["base"][f"{name}/acc"]
        adapted = eval_json["per_item"]["adapted"][f"{name}/acc"]
        changes.append(sum(adapted) / len(adapted) - sum(base) / len(base))
        variance += paired_stderr(base, adapted) ** 2
    return 100 * sum(changes) / len(changes), 100 * math.sqrt(variance) / len(benchmarks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare_dir")
    args = parser.parse_args()
    for run in sorted(Path(args.compare_dir, "runs").iterdir()):
        if not (run / "eval.json").is_file():
            continue
        change, stderr = mc_change(json.loads((run / "eval.json").read_text()))
        print(f"{run.name}: {change:+.1f} ± {stderr:.1f} points")


if __name__ == "__main__":
    main()
