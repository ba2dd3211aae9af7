"""QLoRA (``load_in_4bit``): a 4-bit NF4 base (bitsandbytes, which runs NF4 layers on CPU), a float32
adapter, and the KL reference = the quantized base with the adapter off."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import PartialState

from arrtune.config_files import load_config
from arrtune.lm import InitialModel, adapter_disabled, base_model
from arrtune.models import load_model
from arrtune.recipe import load_base_model, load_inputs, train

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama of hidden size 64 (NF4's CPU kernels refuse rows shorter than their 64-value block)."""
    from arrtune.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("q4") / "model", hidden_size=64)


def _config(model: Path, out: Path, **extra: object):
    values = {"model": model, "output_dir": out, "method": "arr", "max_steps": 2, "warmup_steps": 0,
              "per_device_train_batch_size": 2, "precision": "fp32", "disable_tqdm": True, "load_in_4bit": True,
              **extra}  # fmt: skip
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def test_the_base_is_4bit_and_the_reference_is_that_quantized_base(model_dir: Path, tmp_path: Path) -> None:
    cfg = _config(model_dir, tmp_path / "run")
    state = PartialState(cpu=True)
    model, replay, _ = load_base_model(cfg, load_inputs(cfg, state), state)
    layer = base_model(model).model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert layer.base_layer.weight.quant_state.quant_type == "nf4"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # an adapter that changes the outputs
    ids = torch.randint(3, 500, (2, 12))
    mask = torch.ones_like(ids)
    ref = InitialModel(model).hidden(ids, mask)
    with torch.no_grad(), adapter_disabled(model):
        quantized_base = base_model(model).get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        adapted = base_model(model).get_decoder()
    full = load_model(str(model_dir)).get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ref, quantized_base)
    assert not torch.allclose(ref, full, atol=1e-3)  # not the float32 weights: the 4-bit base the user loaded
    with torch.no_grad():
        on = adapted(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(ref, on, atol=1e-3)


def test_4bit_weights_take_a_fraction_of_the_memory(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    full = load_model(str(tmp_path / "m")).get_memory_footprint()
    four = load_model(str(tmp_path / "m"), load_in_4bit=True).get_memory_footprint()
    assert four < 0.25 * full, (four, full)  # NF4: ~0.5 byte per weight + block scales, vs 4 in float32


def test_qlora_run_trains_and_writes_an_adapter(model_dir: Path, tmp_path: Path) -> None:
    run = train(_config(model_dir, tmp_path / "run"))
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["load_in_4bit"] and summary["steps"] == 2
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl"] >= 0 and r["replay_loss"] > 0 for r in records if "loss" in r)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    # ``arrtune eval`` scores the adapter on the 4-bit base it was trained on, unless told otherwise
    small = ["benchmarks=[]", "n_text=2", "max_text_tokens=16", "n_questions=0", "n_task=0", "--no-progress"]
    scores = {}
    for setting in ([], ["load_in_4bit=false"]):
        out = tmp_path / f"eval{len(setting)}.json"
        done = subprocess.run([sys.executable, "-m", "arrtune", "eval", "--adapter", str(run / "adapter"),
                               "--output", str(out), *small, *setting], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = json.loads(out.read_text())
        assert result["config"]["load_in_4bit"] is not bool(setting)
        assert ("load_in_4bit: true (the run trained on a 4-bit base" in done.stderr) is not bool(setting)
        scores[bool(setting)] = result["base"]["ppl/books"]
    assert scores[False] != scores[True]  # the 4-bit base is another model than the float32 one


def test_the_reference_forward_leaves_4bit_training_forwards_intact(tmp_path: Path) -> None:
    """On CPU, bitsandbytes repacks 4-bit weights for inference on an evaluation-mode forward, after which a
    training forward fails (or is wrong): the reference forward must not trigger that. A model with biased
    projections (Qwen2) under bf16 autocast: the same gradients before and after a reference forward."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    model = prepare_model_for_kbit_training(
        load_model(str(tmp_path / "qwen"), dtype=torch.bfloat16, load_in_4bit=True)
    )
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(0, 256, (2, 16))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids).logits.float().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        InitialModel(model).hidden(ids, torch.ones_like(ids))
    after = grads()
    assert model.training
    for name in before:
        torch.testing.assert_close(after[name], before[name])
