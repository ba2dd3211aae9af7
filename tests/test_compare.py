"""The comparison grid on the tiny model: report files and columns, resume, Pareto front."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from arrtune.config_files import build_config
from arrtune.errors import ArrtuneError
from arrtune.experiments import expand_runs, load_grid, run_grid
from arrtune.report import pareto_front
from arrtune.rundir import config_diff

EVAL = {"benchmarks": ["arc_easy"], "n_per_benchmark": 4, "n_text": 2, "max_text_tokens": 32, "n_questions": 2,
        "max_new_tokens": 4, "n_task": 4, "batch_size": 4}  # fmt: skip


def write_grid(tmp_path: Path, model_dir: Path, runs: list[dict]) -> Path:
    grid = {
        "output_dir": str(tmp_path / "cmp"),
        "base": {
            "model": str(model_dir),
            "max_steps": 2,
            "warmup_steps": 0,
            "per_device_train_batch_size": 2,
            "disable_tqdm": True,
        },  # fmt: skip
        "runs": runs,
        "eval": EVAL,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_pareto_front_on_hand_made_points() -> None:
    points = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.2), (0.9, 0.1)]
    # (0.4, 0.4) and (0.5, 0.2) are dominated by (0.5, 0.5); the two equal points do not dominate each other
    assert pareto_front(points) == [0, 1, 3, 5]
    assert pareto_front([]) == []


def test_sweeps_expand_with_distinct_names(tmp_path: Path) -> None:
    grid = load_grid(
        write_grid(
            tmp_path,
            tmp_path,
            [{"method": "sft"}, {"method": "arr", "kl_coef": [0.1, 0.3], "kl_on": ["sft", "both"]}],
        )
    )
    names = [s.name for s in expand_runs(grid)]
    assert names[0] == "sft" and len(names) == 5 and len(set(names)) == 5
    assert "arr-kl_coef=0.3-kl_on=sft" in names
    fixed = load_grid(write_grid(tmp_path, tmp_path, [{"method": "arr"}, {"method": "arr", "kl_every": 4}]))
    assert [s.name for s in expand_runs(fixed)] == ["arr", "arr-kl_every=4"]
    swept_method = load_grid(
        write_grid(tmp_path, tmp_path, [{"method": ["sft", "arr"], "precision": "fp32"}])
    )
    assert [s.name for s in expand_runs(swept_method)] == ["sft-precision=fp32", "arr-precision=fp32"]
    own_seeds = load_grid(write_grid(tmp_path, tmp_path, [{"method": "sft"}, {"method": "arr", "seeds": [3]}]),
                          ["seeds=[0, 1]"])  # fmt: skip
    assert [s.name for s in expand_runs(own_seeds)] == ["sft-seed=0", "sft-seed=1", "arr-seed=3"]
    assert [s.config.seed for s in expand_runs(own_seeds)] == [0, 1, 3]
    with pytest.raises(ArrtuneError, match=r"runs\[0\]: seeds"):
        expand_runs(load_grid(write_grid(tmp_path, tmp_path, [{"method": "arr", "seeds": []}])))
    bad = load_grid(write_grid(tmp_path, tmp_path, [{"method": "arr", "kl_cof": 0.1}]))
    with pytest.raises(ArrtuneError, match="did you mean 'kl_coef'"):
        expand_runs(bad)


def test_a_setting_added_after_a_run_was_saved_matches_at_its_default(tmp_path: Path) -> None:
    """A run saved before ``kl_every`` existed is the same run while the grid leaves it at its default (so
    compare skips it), and another run once the grid moves it."""
    values = {"output_dir": str(tmp_path), "model": "m", "method": "arr"}
    saved = build_config(values, "test").resolved().to_dict()
    del saved["kl_every"]
    assert config_diff(saved, build_config(values, "test").resolved().to_dict()) == []
    assert config_diff(saved, build_config({**values, "kl_every": 4}, "test").resolved().to_dict()) == [
        "kl_every"
    ]
    assert config_diff(saved, build_config({**values, "kl_coef": 0.5}, "test").resolved().to_dict()) == [
        "kl_coef"
    ]


def test_grid_writes_report_and_resumes(tiny_model_dir: Path, tmp_path: Path, capfd) -> None:
    path = write_grid(tmp_path, tiny_model_dir, [{"method": "sft"}, {"method": "arr"}])
    bars_on = ["disable_tqdm=false"]  # the runs' own setting: progress=False must still hide their bars
    out = run_grid(load_grid(path, bars_on), progress=False)
    assert "it/s]" not in capfd.readouterr().err  # no progress bars, in the training processes either
    for name in (
        "report.md",
        "results.csv",
        "results.json",
        "retention_vs_plasticity.png",
        "loss_curves.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["run"] for r in rows] == ["base", "sft", "arr"]
    for column in ("task/exact_match", "task/loss", "arc_easy/acc", "arc_easy/acc_stderr", "ppl/wiki", "ppl/books",
                   "drift/books", "leak", "step_time_s", "sft_tokens_per_s", "peak_memory_gb",
                   "step_time_s_vs_sft", "peak_memory_gb_vs_sft"):  # fmt: skip
        assert column in rows[0], column
    arr = rows[2]
    assert float(arr["step_time_s"]) > 0 and arr["drift/books"] != ""
    assert float(rows[1]["step_time_s_vs_sft"]) == 1.0
    report = (out / "report.md").read_text()
    assert "| arr |" in report and "retention_vs_plasticity.png" in report

    # resume: both runs are finished -> nothing is trained or evaluated again
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    capfd.readouterr()
    run_grid(load_grid(path, bars_on), progress=False)
    printed = capfd.readouterr().out
    assert "sft: trained earlier" in printed and "arr: trained earlier" in printed
    assert "evaluating" not in printed
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())

    # an interrupted grid: drop one run's evaluation -> only that run is evaluated again
    (out / "runs" / "arr" / "eval.json").unlink()
    run_grid(load_grid(path, bars_on), progress=False)
    printed = capfd.readouterr().out
    assert "arr: evaluating" in printed and "sft: evaluating" not in printed
    assert json.loads((out / "runs" / "arr" / "eval.json").read_text())["mode"] == "pair"


def test_grid_with_seeds_on_user_data_scores_the_users_task(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [{"prompt": f"Double {i}", "completion": f"{2 * i} exactly"} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    path = write_grid(tmp_path, tiny_model_dir, [{"method": "sft"}, {"method": "arr"}])
    grid = load_grid(path, [f"data={tmp_path / 'train.jsonl'}", f"task_eval={tmp_path / 'held.jsonl'}",
                            "seeds=[0, 1]", "eval.n_task=3"])  # fmt: skip
    assert grid.eval["n_task"] == 3 and grid.seeds == [0, 1]
    names = [s.name for s in expand_runs(grid)]
    assert names == ["sft-seed=0", "sft-seed=1", "arr-seed=0", "arr-seed=1"]
    assert [s.config.seed for s in expand_runs(grid)] == [0, 1, 0, 1]
    out = run_grid(grid, progress=False)

    result = json.loads((out / "runs" / "arr-seed=1" / "eval.json").read_text())
    assert result["config"]["task"] == str(tmp_path / "held.jsonl")  # not the built-in Vornish task
    assert {e["prompt"] for e in result["task_examples"]} <= {f"Double {i}" for i in range(8, 12)}
    assert len(result["per_item"]["adapted"]["task/exact_match"]) == 3
    assert len(result["per_item"]["base"]["arc_easy/acc"]) == 4

    report = (out / "report.md").read_text()
    assert "Across seeds" in report and "Paired difference vs. sft" in report
    groups = {r["run"]: r for r in json.loads((out / "results_by_seed_group.json").read_text())}
    assert groups["arr"]["n_seeds"] == 2 and "ppl/books_sd" in groups["arr"]
    per_seed = [json.loads((out / "runs" / f"arr-seed={s}" / "eval.json").read_text()) for s in (0, 1)]
    expected = (per_seed[0]["adapted"]["ppl/books"] + per_seed[1]["adapted"]["ppl/books"]) / 2
    assert groups["arr"]["ppl/books"] == pytest.approx(expected)

    bad = write_grid(tmp_path, tiny_model_dir, [{"method": "sft"}])
    with pytest.raises(ArrtuneError, match="seeds"):
        expand_runs(load_grid(bad, ["seeds=[1, 1]"]))


def test_paired_differences_pool_seeds_and_items(tmp_path: Path) -> None:
    from arrtune.report import aggregate_rows, paired_differences

    outcomes = {"sft-seed=0": [1, 1, 0, 0], "sft-seed=1": [1, 0, 1, 0],
                "arr-seed=0": [1, 1, 1, 0], "arr-seed=1": [1, 1, 1, 1]}  # fmt: skip
    for name, items in outcomes.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        per_item = {
            "adapted": {"task/exact_match": items, "bleed": items},
            "base": {"task/exact_match": [0] * 4},
        }
        (tmp_path / "runs" / name / "eval.json").write_text(json.dumps({"per_item": per_item}))
    vs_sft = paired_differences(tmp_path, list(outcomes))
    assert [r["run"] for r in vs_sft] == ["arr"]
    diffs = [0, 0, 1, 0, 0, 1, 0, 1]  # arr - sft of the same seed, item by item
    mean = sum(diffs) / 8
    se = (sum((d - mean) ** 2 for d in diffs) / 7) ** 0.5 / 8**0.5
    assert vs_sft[0]["task/exact_match"] == pytest.approx(mean) and vs_sft[0][
        "task/exact_match_stderr"
    ] == pytest.approx(se)
    vs_base = {r["run"]: r for r in paired_differences(tmp_path, list(outcomes), reference=None)}
    assert vs_base["arr"]["task/exact_match"] == pytest.approx(7 / 8)
    assert vs_base["arr"]["bleed"] == pytest.approx(7 / 8)  # bleed of the base is 0 by definition
    rows = aggregate_rows([{"run": "arr-seed=0", "leak": 0.2}, {"run": "arr-seed=1", "leak": 0.4}])
    assert rows[0]["run"] == "arr" and rows[0]["leak"] == pytest.approx(0.3) and rows[0]["n_seeds"] == 2
    assert rows[0]["leak_sd"] == pytest.approx(0.1414, abs=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_same_threads_gives_the_same_run(precision: str, tiny_model_dir: Path, tmp_path: Path,
                                                   monkeypatch) -> None:  # fmt: skip
    """What the docs claim about determinism: on one machine with the same thread count, a seed fixes the
    run bit for bit (data order, LoRA init, replay stream, dropout), and another seed changes it."""
    from safetensors.torch import load_file

    from arrtune.config_files import load_config
    from arrtune.recipe import train

    monkeypatch.setenv("ARRTUNE_CACHE", str(tmp_path / "cache"))

    def run(name: str, seed: int) -> dict:
        cfg = load_config(None, [f"model={tiny_model_dir}", f"output_dir={tmp_path / name}", "method=arr",
                                 "max_steps=3", "warmup_steps=0", "per_device_train_batch_size=2",
                                 "lora_dropout=0.1", f"seed={seed}", f"precision={precision}",
                                 "disable_tqdm=true"])  # fmt: skip
        return load_file(train(cfg) / "adapter" / "adapter_model.safetensors")

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
