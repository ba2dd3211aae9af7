"""``arrtune export``: a merged model that loads without arrtune and PEFT, scaled adapters, the model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from arrtune.cli import main

IDS = [[5, 17, 42, 99, 7, 3, 250, 11]]
#: loads the export with transformers alone: arrtune and peft cannot be imported in this process
LOAD_WITHOUT_ARRTUNE = """
import json, sys
sys.modules["arrtune"] = None
sys.modules["peft"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
AutoTokenizer.from_pretrained(sys.argv[1])
with torch.no_grad():
    print(json.dumps(model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits[0].tolist()))
"""


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", f"model={tiny_model_dir}", f"output_dir={out}", "method=sft", "max_steps=3",
                 "learning_rate=0.05", "warmup_steps=0", "disable_tqdm=true"]) == 0  # fmt: skip
    return out


def peft_logits(tiny_model_dir: Path, run_dir: Path, scale: float = 1.0) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from arrtune.export import scale_lora

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter"
    )
    scale_lora(model, scale)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(IDS)).logits[0]


def test_merged_export_loads_without_arrtune_and_peft(
    run_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--out", str(out), "--dtype", "float32", "--no-eval"]) == 0
    assert not (run_dir / "eval.json").exists()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_ARRTUNE, str(out), json.dumps(IDS)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    exported = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    want = peft_logits(tiny_model_dir, run_dir)
    assert torch.allclose(exported, want, atol=1e-4)
    base = peft_logits(tiny_model_dir, run_dir, scale=0.0)
    assert (exported - base).abs().max() > 1e-3  # the fine-tune is really in the merged weights

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "arrtune" in front["tags"]
    assert front["base_model"] == str(tiny_model_dir)
    assert "| method | sft |" in card and "Not evaluated" in card


def test_scaled_adapter_export_and_card_with_evaluation(
    run_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    small = ["benchmarks=[arc_easy]", "n_per_benchmark=4", "n_text=2", "max_text_tokens=16", "n_questions=3",
             "max_new_tokens=4", "n_task=3", "--no-progress"]  # fmt: skip
    assert main(["eval", "--adapter", str(run_dir / "adapter"), *small]) == 0
    out = tmp_path / "half"
    assert main(["export", str(run_dir), "--out", str(out), "--adapter-only", "--scale", "0.5"]) == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    with torch.no_grad():
        got = model.eval()(input_ids=torch.tensor(IDS)).logits[0]
    assert torch.allclose(got, peft_logits(tiny_model_dir, run_dir, scale=0.5), atol=1e-5)
    assert not torch.allclose(got, peft_logits(tiny_model_dir, run_dir, scale=1.0), atol=1e-4)
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "peft"
    assert "scaled by **0.5**" in card and "task/exact_match" in card and "drift/books" in card
    assert "Answers to general questions, before and after" in card

    # refusals: an occupied --out, a scale outside [0, 1], not a run
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--scale", "1.5"]) == 2
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


SMALL_EVAL = ["benchmarks=[arc_easy]", "n_per_benchmark=4", "n_text=2", "max_text_tokens=16", "n_questions=3",
              "max_new_tokens=6", "n_task=8"]  # fmt: skip


def test_scale_auto_follows_its_rule_and_an_unevaluated_run_is_evaluated_first(
    run_dir: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from safetensors.torch import load_file

    from arrtune.testing import copy_run

    run = copy_run(run_dir, tmp_path / "run")
    (run / "eval.json").unlink(missing_ok=True)
    out = tmp_path / "auto"
    assert main(["export", str(run), "--out", str(out), "--adapter-only", "--scale", "auto", "--no-progress",
                 *SMALL_EVAL]) == 0  # fmt: skip
    assert (
        json.loads((run / "eval.json").read_text())["config"]["n_task"] == 8
    )  # evaluated, with these settings
    printed = capsys.readouterr().out
    rows = [
        line.split("|")[1:-1]
        for line in printed.splitlines()
        if line.startswith("| 0.") or line.startswith("| 1")
    ]
    scales = [float(r[0].split()[0]) for r in rows]
    chosen = next(float(r[0].split()[0]) for r in rows if "chosen" in r[0])
    # the rule: going down from s = 1, the smallest scale before the first whose EM difference to s = 1 is
    # below minus its paired standard error; the search stops at that first failing scale
    passed = {float(r[0].split()[0]): d >= -se for r in rows for d, se in [map(float, r[2].split("±"))]}
    expected, measured = 1.0, [1.0]
    for s in (0.75, 0.5, 0.25):
        measured.append(s)
        if not passed[s]:
            break
        expected = s
    assert chosen == expected and scales == sorted(measured)
    assert "measured on 8 held-out task items" in printed
    # the drift at the kept and the full scale
    assert all((r[3].strip() != "–") == (s in (chosen, 1.0)) for r, s in zip(rows, scales))
    card = (out / "README.md").read_text()
    assert f"scaled by **{chosen:g}**" in card and "## Adapter scale" in card
    # an evaluated run: without settings, --scale auto uses the run's own (n_task=8, not the default), and
    # when it keeps the full adapter, the drift in the table is the evaluation's
    assert main(["export", str(run), "--out", str(tmp_path / "again"), "--adapter-only", "--scale", "auto",
                 "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "measured on 8 held-out task items" in printed
    if chosen == 1.0:
        adapted = json.loads((run / "eval.json").read_text())["adapted"]
        full_row = next(line for line in printed.splitlines() if line.startswith("| 1 (chosen)"))
        assert f"{adapted['drift/books']:.4f} | {adapted['drift/wiki']:.4f}" in full_row
    got, want = (
        load_file(out / "adapter_model.safetensors"),
        load_file(run / "adapter" / "adapter_model.safetensors"),
    )
    for name, tensor in want.items():
        factor = chosen if "lora_B" in name else 1.0
        torch.testing.assert_close(got[name], tensor * factor)


def test_scale_auto_needs_a_task(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("model: x\ndata: mine.jsonl\n")
    assert main(["export", str(run), "--out", str(tmp_path / "o"), "--scale", "auto"]) == 2
    assert not (tmp_path / "o").exists()


def test_teacher_forced_greedy_match_is_greedy_decoding(tiny_model_dir: Path, tiny_tokenizer) -> None:
    """``--scale auto`` scores exact match from one forward pass: a continuation has no argmax miss exactly when
    greedy decoding writes it. Checked against ``generate`` on prompts of different lengths (batched, padded)."""
    from arrtune.evaluation.text import score_sequences
    from arrtune.generation import generate
    from arrtune.models import load_model

    model = load_model(str(tiny_model_dir), dtype=torch.float32)
    prompts = [[5, 17, 42], [9, 8, 7, 6, 5, 4], [300, 12]]
    greedy = generate(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=2)
    altered = [g[:-1] + [(g[-1] + 1) % 400] for g in greedy]  # the last token is no longer the argmax
    stats = score_sequences(model, tiny_tokenizer, [p + g for p, g in zip(prompts * 2, greedy + altered)],
                            [len(p) for p in prompts * 2], batch_size=4)  # fmt: skip
    assert stats.argmax_misses[:3] == [0, 0, 0]
    assert stats.argmax_misses[3:] == [1, 1, 1]


def test_lora_scale_goes_back_up_to_the_trained_update(tiny_model_dir: Path, run_dir: Path) -> None:
    """``--scale auto`` measures 1, 0.75, 0.5, 0.25 and then keeps any of them, 1 included: setting a larger
    scale after a smaller one must restore the trained update exactly (a relative rescale would need s > 1)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from arrtune.evaluation.scale import LoraScale

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter"
    )
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    lora_scale = LoraScale(model)
    for s in (1.0, 0.75, 0.5, 0.25, 1.0, 0.5):
        lora_scale.set(s)
    for name, param in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, trained[name] * (0.5 if "lora_B" in name else 1.0))
    with torch.no_grad():
        got = model.eval()(input_ids=torch.tensor(IDS)).logits[0]
    torch.testing.assert_close(got, peft_logits(tiny_model_dir, run_dir, scale=0.5))
    lora_scale.set(1.0)
    for name, param in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, trained[name])


def test_scale_auto_reuses_the_runs_drift_when_it_keeps_the_full_adapter(
    run_dir: Path, tiny_model_dir: Path, tiny_tokenizer
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from arrtune.evaluation import EvalConfig, resolve_from_run
    from arrtune.evaluation.scale import choose_scale

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg = resolve_from_run(EvalConfig.from_dict({"n_task": 4, "max_text_tokens": 16}, "test"), config)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter"
    )
    chosen, rows = choose_scale(model, tiny_tokenizer, cfg, scales=(1.0,), full_drift={"drift/wiki": 0.5})
    assert chosen == 1.0 and rows[0]["drift/wiki"] == 0.5 and "drift/books" not in rows[0]
    chosen, rows = choose_scale(model, tiny_tokenizer, cfg, scales=(1.0,))  # no evaluation: measured
    assert chosen == 1.0 and rows[0]["drift/wiki"] != 0.5 and "drift/books" in rows[0]
