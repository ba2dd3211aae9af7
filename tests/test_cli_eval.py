"""``arrtune eval`` from the command line: eval.json and a printed table, single model and base + adapter."""

from __future__ import annotations

import json
import subprocess
import sys

SMALL = ["benchmarks=[arc_easy]", "n_per_benchmark=4", "n_text=2", "max_text_tokens=32", "n_questions=2",
         "max_new_tokens=4", "n_task=4", "batch_size=4", "--no-progress"]  # fmt: skip


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "arrtune", *args], capture_output=True, text=True, timeout=300
    )


def test_eval_single_and_pair(tiny_model_dir, tmp_path) -> None:
    train = run("train", f"model={tiny_model_dir}", f"output_dir={tmp_path / 'r'}", "max_steps=2", "warmup_steps=0",
                "learning_rate=0.01", "disable_tqdm=true")  # fmt: skip
    assert train.returncode == 0, train.stderr

    single = run("eval", "--model", str(tiny_model_dir), "--output", str(tmp_path / "single.json"), *SMALL)
    assert single.returncode == 0, single.stderr
    result = json.loads((tmp_path / "single.json").read_text())
    assert result["mode"] == "single" and "arc_easy/acc" in result["model"]
    assert "arc_easy/acc" in single.stdout

    pair = run("eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "r" / "adapter"), *SMALL)
    assert pair.returncode == 0, pair.stderr
    result = json.loads((tmp_path / "r" / "eval.json").read_text())  # default: next to the adapter
    assert result["mode"] == "pair" and {"base", "adapted", "delta"} <= set(result)
    assert result["adapted"]["drift/books"] > 0  # the trained adapter moved the model
    assert "drift/books" in pair.stdout

    bad = run("eval", "--model", str(tiny_model_dir), "--config", str(tmp_path / "missing.yaml"), *SMALL)
    assert bad.returncode == 2 and "missing.yaml: eval config file not found" in bad.stderr


def test_eval_help_lists_every_setting_with_its_default() -> None:
    from dataclasses import fields

    from arrtune.evaluation import EvalConfig

    done = run("eval", "--help")
    assert done.returncode == 0, done.stderr
    for f in fields(EvalConfig):
        assert f"\n  {f.name}=" in done.stdout, f.name
    for line in ("batch_size=16: ", "model_dtype='float32': ", "load_in_4bit='auto': "):
        assert line in done.stdout


def test_eval_scores_instruction_following_from_ifeval_format_data(tiny_model_dir, tmp_path) -> None:
    """n_instructions with instruction_prompts = a file in google/IFEval's format: eval.json carries IFEval's
    four accuracies over those prompts; a file without IFEval's columns is one line, and nothing is written."""
    import pytest

    pytest.importorskip("lm_eval.tasks.ifeval", reason="needs arrtune[ifeval]")
    rows = [{"key": 1, "prompt": "Say hi in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
             "kwargs": [{}]},
            {"key": 2, "prompt": "Name a fruit without commas.", "instruction_id_list": ["punctuation:no_comma"],
             "kwargs": [{}]}]  # fmt: skip
    data = tmp_path / "ifeval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "single.json"
    args = ["benchmarks=[]", "n_text=0", "n_questions=0", "n_task=0", "n_instructions=5", "instruction_tokens=6",
            f"instruction_prompts={data}", "--no-progress"]  # fmt: skip
    done = run("eval", "--model", str(tiny_model_dir), "--output", str(out), *args)
    assert done.returncode == 0, done.stderr
    model = json.loads(out.read_text())["model"]
    assert model["ifeval/n"] == 2
    assert {"ifeval/prompt_strict", "ifeval/prompt_loose", "ifeval/instruction_strict"} <= set(model)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    bad = run("eval", "--model", str(tiny_model_dir), "--output", str(tmp_path / "bad.json"),
              *args[:-2], f"instruction_prompts={tmp_path / 'bad.jsonl'}", "--no-progress")  # fmt: skip
    assert bad.returncode == 2 and not (tmp_path / "bad.json").exists()
    assert bad.stderr.strip().count("\n") == 0 and "no column instruction_id_list, kwargs" in bad.stderr
