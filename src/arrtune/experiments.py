"""``arrtune compare``: train and evaluate a grid of runs on one model + task + replay corpus.

A grid file (YAML)::

    output_dir: runs/compare          # one sub-directory per run under runs/, plus the report
    base:                             # TrainConfig fields shared by every run
      max_steps: 40
    runs:                             # one entry per run; a list value sweeps that field
      - {method: sft}
      - {method: arr, kl_coef: [0.03, 0.1], kl_on: [replay, both]}
    eval:                             # EvalConfig fields (see arrtune.evaluation.config)
      n_per_benchmark: 100
    seeds: [0, 1, 2]                  # optional: every run once per seed (named <run>-seed=<s>)

Every run trains in its own process (so its peak memory is its own), then is evaluated against the base
model, whose results are computed once and cached. The evaluation's task is the runs' own (``task: auto``,
see :func:`arrtune.evaluation.task_of_run`). With ``seeds`` (or a ``seed: [...]`` sweep) the report
aggregates each run's seeds: mean and standard deviation of every metric, paired differences vs. ``sft``. A run
trained with the same config is not trained again, and one whose ``eval.json`` holds the same eval settings is
not evaluated again, so an interrupted grid resumes where it stopped (a run interrupted mid-training resumes
from its last checkpoint) and changed eval settings re-score every run without retraining it.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from arrtune.config import TrainConfig
from arrtune.config_files import _check_key, _coerce, build_config, dump_yaml_atomic, read_yaml_mapping
from arrtune.errors import ArrtuneError
from arrtune.rundir import config_diff

if TYPE_CHECKING:
    from arrtune.evaluation import EvalConfig


@dataclass
class RunSpec:
    """One run of a grid: its name and its full TrainConfig."""

    name: str
    config: TrainConfig


@dataclass
class GridConfig:
    """A comparison grid: shared settings, the runs, and the evaluation settings."""

    output_dir: str = "runs/compare"
    base: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(
        default_factory=lambda: [{"method": m} for m in ("sft", "kl", "replay", "arr")]
    )
    eval: dict[str, Any] = field(default_factory=dict)
    #: train every run once per seed (overrides ``seed``); None = each run's own ``seed``
    seeds: list[int] | None = None


def _fmt_value(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def _check_seeds(seeds: Any, where: str) -> list[int] | None:
    """``seeds`` when it is None or a non-empty list of distinct integers >= 0; else ``ArrtuneError``."""
    if seeds is not None and (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ArrtuneError(f"{where}: seeds={seeds!r} must be a list of distinct integers >= 0")
    return seeds


def expand_runs(grid: GridConfig) -> list[RunSpec]:
    """Turn the grid's run entries into named runs (list values expand into their cartesian product; a run
    entry's own ``seeds`` replaces the grid's for that entry)."""
    specs: list[RunSpec] = []
    _check_seeds(grid.seeds, "grid")
    for i, entry in enumerate(grid.runs):
        if not isinstance(entry, dict):
            raise ArrtuneError(f"grid: runs[{i}] must be a mapping of config keys")
        entry = dict(entry)
        name = entry.pop("name", None)
        seeds = _check_seeds(entry.pop("seeds"), f"grid: runs[{i}]") if "seeds" in entry else grid.seeds
        swept = {k: v for k, v in entry.items() if isinstance(v, list) and k != "target_modules"}
        fixed = {k: v for k, v in entry.items() if k not in swept}
        for combo in itertools.product(*swept.values()) if swept else [()]:
            values = {**grid.base, **fixed, **dict(zip(swept, combo))}
            for key in values:
                _check_key(key, f"grid: runs[{i}]")
            values = {k: _coerce(k, v, f"grid: runs[{i}]") for k, v in values.items()}
            # default name: the method, then every other setting this entry gives (fixed ones, then swept ones)
            own = {k: v for k, v in {**fixed, **dict(zip(swept, combo))}.items() if k != "method"}
            parts = [f"{k}={_fmt_value(v)}" for k, v in own.items()]
            if name:
                swept_parts = [f"{k}={_fmt_value(v)}" for k, v in zip(swept, combo)]
                run_name = "-".join([name, *swept_parts])
            else:
                run_name = "-".join([str(values.get("method", "arr")), *parts])
            for seed in seeds if seeds is not None else [None]:
                name_s = run_name if seed is None else f"{run_name}-seed={seed}"
                values_s = values if seed is None else {**values, "seed": seed}
                values_s["output_dir"] = str(Path(grid.output_dir) / "runs" / name_s)
                specs.append(RunSpec(name_s, build_config(values_s, f"grid: runs[{i}]")))
    if not specs:
        raise ArrtuneError(
            "grid: no runs to train ('runs' is empty); give at least one run, e.g. runs: [{method: arr}]"
        )
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ArrtuneError(f"grid: run names repeat: {', '.join(duplicates)}; give the runs distinct 'name's")
    models = {s.config.model for s in specs}
    if len(models) > 1:
        raise ArrtuneError(f"grid: all runs must use one model, got {sorted(models)}")
    return specs


def load_grid(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> GridConfig:
    """Read a grid YAML; ``key=value`` overrides go into ``base`` (or ``output_dir``)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        data = read_yaml_mapping(p, "grid", "a mapping with keys output_dir, base, runs, eval")
        unknown = set(data) - {"output_dir", "base", "runs", "eval", "seeds"}
        if unknown:
            raise ArrtuneError(
                f"{p}: unknown grid keys {sorted(unknown)} (known: output_dir, base, runs, eval, seeds)"
            )
        for key in ("base", "eval"):
            if key in data and not isinstance(data[key], dict):
                raise ArrtuneError(f"{p}: '{key}' must be a mapping")
        if "runs" in data and not isinstance(data["runs"], list):
            raise ArrtuneError(f"{p}: 'runs' must be a list of mappings")
    grid = GridConfig(**data)
    grid.base, grid.eval = dict(grid.base or {}), dict(grid.eval or {})
    from arrtune.config_files import parse_override

    for item in overrides:
        key, value = parse_override(item)
        if key == "output_dir":
            grid.output_dir = str(value)
        elif key == "seeds":
            grid.seeds = value
        elif key.startswith("eval."):
            grid.eval[key[len("eval.") :]] = value
        else:
            grid.base[key] = value
    return grid


def _train_in_subprocess(spec: RunSpec, debug: bool, progress: bool = True) -> None:
    """Train one run in its own Python process (same seed, data order; its own peak memory). Without
    ``progress``, the process shows no progress bars (``TQDM_DISABLE``: the run's config, and so whether it
    counts as trained, stays the same)."""
    run_dir = Path(spec.config.output_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    fd, cfg_path = tempfile.mkstemp(prefix=f".{spec.name}.", suffix=".yaml", dir=run_dir.parent)
    os.close(fd)
    try:
        dump_yaml_atomic(spec.config.to_dict(), cfg_path)
        cmd = (
            [sys.executable, "-m", "arrtune"]
            + (["--debug"] if debug else [])
            + ["train", "--config", cfg_path]
        )
        env = None if progress else {**os.environ, "TQDM_DISABLE": "1"}
        done = subprocess.run(cmd, env=env)
        if done.returncode != 0:
            raise ArrtuneError(
                f"run '{spec.name}': training failed (exit {done.returncode}); see the output above"
            )
    finally:
        os.unlink(cfg_path)


def _same_config(spec: RunSpec) -> bool:
    saved = Path(spec.config.output_dir) / "config.yaml"
    return saved.is_file() and not config_diff(
        yaml.safe_load(saved.read_text()), spec.config.resolved().to_dict()
    )


def _is_trained(spec: RunSpec) -> bool:
    run_dir = Path(spec.config.output_dir)
    done = (run_dir / "train_summary.json").is_file() and (
        run_dir / "adapter" / "adapter_config.json"
    ).is_file()
    return done and _same_config(spec)


def _is_finished(spec: RunSpec, eval_config: dict[str, Any]) -> bool:
    """Trained with this config, and evaluated with these eval settings."""
    path = Path(spec.config.output_dir) / "eval.json"
    try:
        same_eval = json.loads(path.read_text(encoding="utf-8")).get("config") == eval_config
    except (OSError, ValueError, AttributeError):
        return False
    return same_eval and _is_trained(spec)


def run_grid(grid: GridConfig, progress: bool = True, debug: bool = False) -> Path:
    """Train and evaluate every run of the grid (skipping finished ones), then write the report. Without
    ``progress``, no progress bars: neither arrtune's nor transformers' (model loading), here or in the
    training processes."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return _run_grid(grid, progress, debug)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run_grid(grid: GridConfig, progress: bool, debug: bool) -> Path:
    from arrtune.evaluation import EvalConfig, check_eval_inputs, resolve_from_run, task_of_run
    from arrtune.locks import hold_lock
    from arrtune.recipe import check_inputs
    from arrtune.report import write_report
    from arrtune.rundir import LOCK_NAME

    specs = expand_runs(grid)
    out = Path(grid.output_dir)
    eval_cfg = EvalConfig.from_dict(grid.eval, "grid: eval")
    # one base model is scored for all runs: its ``auto`` settings must be the same for every run
    if eval_cfg.task == "auto" and len({task_of_run(s.config.to_dict()) for s in specs}) > 1:
        raise ArrtuneError(
            "grid: the runs train on different tasks; set eval.task to the one to score, or split the grid"
        )
    if eval_cfg.load_in_4bit == "auto" and len({s.config.load_in_4bit for s in specs}) > 1:
        raise ArrtuneError(
            "grid: some runs load the base 4-bit and some do not; set eval.load_in_4bit, or split the grid"
        )
    eval_cfg = resolve_from_run(eval_cfg, specs[0].config.to_dict())
    check_eval_inputs(eval_cfg)
    for spec in specs:  # every run's inputs, before the first one trains
        try:
            check_inputs(spec.config)
        except ArrtuneError as exc:
            raise ArrtuneError(f"grid: run {spec.name}: {exc}") from None
    if out.exists() and not out.is_dir():
        raise ArrtuneError(f"{out}: output_dir exists and is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    hold_lock(out / LOCK_NAME, f"{out}: this comparison")  # one compare per grid directory
    for spec in specs:
        if _is_trained(spec):
            print(f"[compare] {spec.name}: trained earlier, training skipped")
            continue
        print(f"[compare] {spec.name}: training")
        _train_in_subprocess(spec, debug, progress)

    _evaluate_grid(specs, out, eval_cfg, progress)
    write_report(out, [s.name for s in specs])
    return out


def _evaluate_grid(specs: list[RunSpec], out: Path, eval_cfg: EvalConfig, progress: bool) -> None:
    """Evaluate the base model once (``base_eval.json``, kept while it holds these eval settings), then every
    run against it that has no ``eval.json`` with these settings."""
    from arrtune.evaluation import evaluate_run
    from arrtune.models import load_tokenizer

    model_spec = specs[0].config.model
    tokenizer = load_tokenizer(model_spec)
    base_path = out / "base_eval.json"
    base_result = json.loads(base_path.read_text()) if base_path.is_file() else None
    wanted = json.loads(json.dumps(asdict(eval_cfg)))
    if base_result is None or base_result.get("config") != wanted or "base_cache" not in base_result:
        print("[compare] base model: evaluating")
        evaluate_run(model_spec, eval_cfg, output=base_path, tokenizer=tokenizer, progress=progress)
        base_result = json.loads(base_path.read_text())
    base_hidden: dict[tuple, list] = {}  # the base's hidden states on the held-out text, shared by the runs
    for spec in specs:
        run_dir = Path(spec.config.output_dir)
        if _is_finished(spec, wanted):
            continue
        print(f"[compare] {spec.name}: evaluating")
        evaluate_run(model_spec, eval_cfg, run_dir / "adapter", run_dir / "eval.json", tokenizer=tokenizer,
                     progress=progress, base_result=base_result, base_hidden=base_hidden)  # fmt: skip
