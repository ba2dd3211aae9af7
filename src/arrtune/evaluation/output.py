"""An evaluation's result for people and files: the plain-text table (:func:`format_table`), the one-sentence
warning when behaviour is not protected (:func:`behaviour_note`), and ``eval.json`` (:func:`write_eval_json`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from arrtune.atomic import write_atomic


def _fmt(key: str, value: Any, stderr: Any = None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:+d}" if signed else str(value)
    sign = "+" if signed else ""
    digits = 2 if key.startswith("ppl/") else 4 if key.startswith(("drift/", "bpb/", "task/loss")) else 3
    text = f"{value:{sign}.{digits}f}"
    if stderr is not None and not (isinstance(stderr, float) and math.isnan(stderr)):
        text += f" ± {stderr:.{digits}f}"
    return text


#: a bleed above this share of general answers, beyond one standard error, is behaviour not protected
BLEED_LIMIT = 0.05


def behaviour_note(result: dict[str, Any], run_config: dict[str, Any] | None = None) -> str | None:
    """One sentence when a pair evaluation shows behaviour not protected beyond noise (bleed over
    :data:`BLEED_LIMIT` by more than its standard error, or instruction following down by more than one paired
    standard error), naming the setting that fixes it (from the run's ``config.yaml`` mapping, when given:
    a run that already replays its own answers is told to replay more); None otherwise."""
    adapted, delta = result.get("adapted") or {}, result.get("delta") or {}
    problems = []
    bleed, bleed_se = adapted.get("bleed"), adapted.get("bleed_stderr") or 0.0
    if isinstance(bleed, (int, float)) and bleed - bleed_se > BLEED_LIMIT:
        problems.append(f"{bleed:.0%} of its answers to unrelated questions take the task's form (bleed)")
    change, change_se = delta.get("ifeval/prompt_strict"), delta.get("ifeval/prompt_strict_stderr") or 0.0
    if isinstance(change, (int, float)) and change + change_se < 0:
        problems.append(f"it follows instructions less ({change * 100:+.1f} ± {change_se * 100:.1f} points, "
                        "IFEval prompt strict)")  # fmt: skip
    if not problems:
        return None
    config = run_config or {}
    ratio = float(config.get("replay_ratio") or 0)
    mix = 1.0 if config.get("replay") == "self" else float(config.get("replay_mix") or 0)
    if ratio > 0 and mix >= 0.5:
        fix = (
            f"this run already replays the base model's own answers (replay_mix {mix:g}); more of them "
            f"(`replay_ratio` above {ratio:g}, or `replay_mix: 1`) may protect it further (docs/study.md)."
        )
    else:
        fix = (
            "replaying the base model's own answers protects answering behaviour (`method: arr`, whose "
            "default `replay_mix: 0.5` does; docs/study.md)."
        )
    return "Behaviour not protected: " + " and ".join(problems) + "; " + fix


def format_table(result: dict[str, Any]) -> str:
    """A plain-text (markdown) table of a result, with example answers and throughput below it."""
    columns = ["base", "adapted", "delta"] if result.get("mode") == "pair" else ["model"]
    keys: list[str] = []
    for c in columns:
        for key in result.get(c, {}):
            if not key.endswith(("_stderr", "/n")) and key not in keys:
                keys.append(key)
    cells = [["metric", *columns]]
    for key in keys:
        row = [key]
        for c in columns:
            col = result.get(c, {})
            row.append(_fmt(key, col.get(key), col.get(f"{key}_stderr"), signed=c == "delta"))
        cells.append(row)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out = "\n".join(lines)

    timing = result.get("timing", {})
    speeds = []
    for c in columns:
        for key, value in timing.get(c, {}).items():
            if key.endswith("/items_per_s"):
                speeds.append(f"{key.split('/')[0]} {value:.1f}" + (f" ({c})" if len(columns) > 1 else ""))
    if speeds:
        out += "\n\nitems/s: " + ", ".join(speeds)
    if timing.get("parts_s"):
        out += "\nseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timing["parts_s"].items())
    for ex in result.get("examples", []):
        leaked = f"  [leaked: {', '.join(ex['leaked'])}]" if ex.get("leaked") else ""
        leaked += "  [task form]" if ex.get("bleeds") else ""
        out += f"\n\nQ: {ex['question']}\n  base:    {_one_line(ex['base'])}\n  adapted: {_one_line(ex['adapted'])}{leaked}"
    return out


def _one_line(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def jsonable(value: Any) -> Any:
    """``value`` as JSON holds it: non-finite floats become None, tuples lists and dict keys strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_eval_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as JSON atomically (temporary file in the same directory, then ``os.replace``);
    non-finite numbers become ``null``."""
    text = json.dumps(jsonable(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return write_atomic(path, text)
