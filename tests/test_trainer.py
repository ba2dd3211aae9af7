"""ARRTrainer: plain SFT equivalence, the reference really is the base model, end-to-end runs per preset."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from arrtune.config import TrainConfig
from arrtune.config_files import build_config, load_config
from arrtune.data.replay import ReplayStream
from arrtune.data.sft import collate_sft, load_sft_examples
from arrtune.errors import ArrtuneError
from arrtune.lm import InitialModel, base_model, output_head
from arrtune.losses import arr_loss
from arrtune.recipe import train
from arrtune.testing import randomize_lora_b
from arrtune.trainer import ARRTrainer


def lora_model(model_dir: Path, seed: int = 0, randomize_b: bool = False):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    return randomize_lora_b(peft_model, 0.5) if randomize_b else peft_model


def arr_config(tmp_path: Path | None = None, **loss: Any) -> TrainConfig:
    """A one-step training config with these loss settings (no KL, no replay, KL on both kinds of rows unless
    given)."""
    values = {
        "kl_coef": 0.0,
        "replay_ratio": 0.0,
        "kl_on": "both",
        "max_steps": 1,
        "precision": "fp32",
        **loss,
    }
    values["output_dir"] = str((tmp_path or Path("/tmp/arrtune-test")) / "ck")
    return build_config(values, "test")


def make_trainer(model_dir: Path, tokenizer, tmp_path: Path, loss: dict[str, Any], replay=None) -> ARRTrainer:
    return ARRTrainer(model=lora_model(model_dir, randomize_b=True), args=arr_config(tmp_path, **loss),
                      processing_class=tokenizer, replay=replay)  # fmt: skip


def sft_batch(tokenizer, n: int = 4):
    examples, _ = load_sft_examples("builtin:vornish", tokenizer, max_length=128)
    return collate_sft(examples[:n], tokenizer.pad_token_id)


def test_no_kl_no_replay_is_exactly_plain_sft_loss(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, dict(kl_coef=0.0, replay_ratio=0.0))
    batch = sft_batch(tiny_tokenizer)
    ours = trainer.compute_loss(trainer.model, batch)
    plain = trainer.model(**batch).loss  # transformers' own shifted, masked causal-LM loss
    assert abs(float(ours) - float(plain)) < 1e-5  # same value up to float32 summation order
    assert trainer._terms.keys() == {"sft_loss"}


def test_kl_and_replay_terms_add_to_the_loss(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    replay = ReplayStream("builtin", tiny_tokenizer)
    settings = dict(kl_coef=0.5, replay_ratio=1.0, replay_weight=0.3)
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, settings, replay)
    batch = sft_batch(tiny_tokenizer)
    loss = trainer.compute_loss(trainer.model, batch)
    t = trainer._terms
    assert t["kl"] > 0 and t["replay_loss"] > 0
    assert float(loss) == pytest.approx(t["sft_loss"] + 0.3 * t["replay_loss"] + 0.5 * t["kl"], rel=1e-5)
    # replay consumed exactly as many tokens as the SFT batch holds (ratio 1)
    fresh = ReplayStream("builtin", tiny_tokenizer)
    fresh.take(int(batch["attention_mask"].sum()))
    assert replay.take(20) == fresh.take(20)


def test_reference_forward_is_the_base_model(tiny_model_dir, tiny_tokenizer) -> None:
    peft_model = lora_model(tiny_model_dir, randomize_b=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = sft_batch(tiny_tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    with torch.no_grad():
        reference = InitialModel(peft_model)
        ref_logits = reference.head()(reference.hidden(ids, mask))
        base_logits = base(input_ids=ids, attention_mask=mask).logits
        policy_logits = peft_model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(ref_logits[valid], base_logits[valid], atol=1e-5)
    assert (
        policy_logits[valid] - base_logits[valid]
    ).abs().max() > 1e-2  # the adapter is really on otherwise
    # only one copy of the weights: the reference shares every base parameter with the policy
    assert sum(p.numel() for p in peft_model.parameters()) < 2 * sum(p.numel() for p in base.parameters())


def test_reference_switches_an_adapted_output_layer(tiny_model_dir, tiny_tokenizer) -> None:
    """With the output layer trained too (``modules_to_save``), the reference's head is the initial one; with
    a LoRA-only adapter the head is left alone (nothing in it to switch)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    want = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_output_embeddings()
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    trained_head = base_model(peft_model).get_output_embeddings()
    with torch.no_grad():
        for p in trained_head.parameters():
            if p.requires_grad:
                p.add_(0.5)  # the trained copy of the output layer moved
    hidden = torch.randn(3, want.weight.shape[1])
    reference = InitialModel(peft_model)
    assert reference.head_layers == [trained_head]
    torch.testing.assert_close(reference.head()(hidden), want(hidden).detach())
    assert not torch.allclose(output_head(peft_model)(hidden), want(hidden))  # the policy's head moved
    assert InitialModel(lora_model(tiny_model_dir)).head_layers == []


def test_reference_has_no_dropout_while_the_model_trains(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    """A base model configured with dropout: in train mode the reference (adapter off) still equals the
    base model's eval-mode forward, every call; the policy forward keeps its dropout."""
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.attention_dropout = 0.5
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config)
    model.save_pretrained(tmp_path / "dropout")
    peft_model = lora_model(tmp_path / "dropout", randomize_b=True)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "dropout").eval()
    batch = sft_batch(tiny_tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    peft_model.train()
    reference = InitialModel(peft_model)
    with torch.no_grad():
        refs = [reference.head()(reference.hidden(ids, mask)) for _ in range(2)]
        want = base(input_ids=ids, attention_mask=mask).logits
        policies = [peft_model(input_ids=ids, attention_mask=mask).logits for _ in range(2)]
    valid = mask.bool()
    assert all(torch.allclose(r[valid], want[valid], atol=1e-5) for r in refs)
    assert all(module.training for module in peft_model.modules())  # every module's train flag is restored
    assert not torch.allclose(policies[0][valid], policies[1][valid])  # dropout is on in the policy


@pytest.mark.parametrize("method", ["sft", "kl", "replay", "arr"])
def test_train_end_to_end_per_preset(method: str, tiny_model_dir, tmp_path) -> None:
    cfg = load_config(None, [f"model={tiny_model_dir}", f"output_dir={tmp_path / method}", f"method={method}",
                             "max_steps=3", "warmup_steps=0", "learning_rate=0.01", "per_device_train_batch_size=4",
                             "disable_tqdm=true"])  # fmt: skip
    run_dir = train(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "sft_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all("lr" in r and "sft_tokens_per_s" in r for r in steps)
    assert all(("kl" in r) == (method in ("kl", "arr")) for r in steps)
    assert all(("replay_loss" in r) == (method in ("replay", "arr")) for r in steps)

    saved = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    assert saved["method"] == method and saved["kl_coef"] is not None

    # a standard PEFT adapter: loads with plain peft; base weights untouched, LoRA weights trained
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter")
    after = adapted.get_base_model().state_dict()
    for key, value in before.items():
        assert torch.equal(
            after[key.replace(".weight", ".base_layer.weight")]
            if key.replace(".weight", ".base_layer.weight") in after
            else after[key],
            value,
        )
    lora_b = {
        k: v for k, v in load_file(run_dir / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k
    }
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: training moved it


def test_cli_train_runs_and_reports_bad_keys(tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "arrtune", "train", f"model={tiny_model_dir}", f"output_dir={out}", "max_steps=2",
           "disable_tqdm=true"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    bad = subprocess.run(cmd[:-1] + ["kl_cof=0.1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "unknown config key 'kl_cof' (did you mean 'kl_coef'?)" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_kl_every_skips_the_reference_on_off_steps_and_reweights_on_steps(
    tiny_model_dir, tiny_tokenizer, tmp_path
) -> None:
    settings = dict(kl_coef=0.5, replay_ratio=0.0, kl_every=3)
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, settings)
    batch = sft_batch(tiny_tokenizer)
    trainer.state.global_step = 1  # an off step: no reference forward, no KL term
    off = trainer.compute_loss(trainer.model, batch)
    assert "kl" not in trainer._terms and float(off) == pytest.approx(trainer._terms["sft_loss"], rel=1e-6)
    trainer._terms, trainer._term_counts = {}, {}
    trainer.state.global_step = 3  # an on step: weight kl_coef x kl_every
    on = trainer.compute_loss(trainer.model, batch)
    assert float(on) == pytest.approx(trainer._terms["sft_loss"] + 1.5 * trainer._terms["kl"], rel=1e-5)


def plain_arr_loss(peft_model, base, sft, replay, loss: dict[str, Any]) -> torch.Tensor:
    """The package's plain objective (:func:`arrtune.losses.arr_loss`, full logits) with a separate frozen
    copy of the model as the reference."""

    def logits(model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]

    settings = arr_config(**loss)
    with torch.no_grad():
        ref_sft, ref_replay = logits(base, sft), logits(base, replay)
    return arr_loss(
        logits(peft_model, sft), sft["labels"][:, 1:], ref_sft,
        logits(peft_model, replay), replay["labels"][:, 1:], ref_replay,
        replay_weight=settings.replay_weight, kl_coef=settings.kl_coef, kl_on=settings.kl_on,
        kl_direction=settings.kl_direction, kl_mask_target=settings.kl_mask_target,
        kl_fraction=settings.kl_fraction,
    )  # fmt: skip


@pytest.mark.parametrize(
    "settings, joint",
    [
        (dict(kl_coef=0.5, replay_ratio=1.0, replay_weight=0.7, kl_on="both"), False),
        (dict(kl_coef=0.5, replay_ratio=0.5, kl_on="replay", kl_direction="forward"), False),
        (
            dict(kl_coef=0.3, replay_ratio=1.0, kl_on="sft", kl_mask_target=True, loss_chunk_rows=7),
            False,
        ),
        (dict(kl_coef=0.5, replay_ratio=1.0, kl_on="both"), True),
        (dict(kl_coef=0.5, replay_ratio=1.0, kl_on="both", kl_fraction=0.5), False),
        # replay shorter than one SFT row: one row of its own length, the same as the padded row
        (dict(kl_coef=0.5, replay_ratio=0.05, kl_on="both"), False),
        (dict(kl_coef=0.5, replay_ratio=0.05, kl_on="both"), True),
    ],
)
def test_training_step_gradients_equal_the_plain_full_logits_objective(
    settings: dict[str, Any], joint: bool, tiny_model_dir, tiny_tokenizer, tmp_path
) -> None:
    """Two passes (SFT, then replay), chunked losses from hidden states, the adapter-off reference: the LoRA
    gradients equal those of the textbook loss with full logits and a separate reference model."""
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, settings,
                           ReplayStream("builtin", tiny_tokenizer))  # fmt: skip
    trainer.joint_passes = joint
    model = trainer.model
    batch = sft_batch(tiny_tokenizer)
    n_replay = round(settings["replay_ratio"] * int(batch["attention_mask"].sum()))
    replay = ReplayStream("builtin", tiny_tokenizer).batch(n_replay, batch["input_ids"].shape[1],
                                                            tiny_tokenizer.pad_token_id)  # fmt: skip
    loss = trainer.training_step(model, batch)
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = plain_arr_loss(model, base, batch, replay, settings)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(ours[name], p.grad, rtol=1e-4, atol=1e-6), name
    assert sum(float(g.abs().sum()) for g in ours.values()) > 0
    if n_replay < batch["input_ids"].shape[1]:  # the step's replay row: of its own length, unless stacked
        assert trainer._parts(batch)[1].ids.shape == (1, batch["input_ids"].shape[1] if joint else n_replay)


def _tiny(config_cls, model_cls, tokenizer, **extra):
    torch.manual_seed(0)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        pad_token_id=tokenizer.pad_token_id, **extra)  # fmt: skip
    return model_cls(config)


def _trainer_for(model, tokenizer, tmp_path, settings: dict[str, Any], replay=None) -> ARRTrainer:
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))  # fmt: skip
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return ARRTrainer(model=peft_model, args=arr_config(tmp_path, **settings), processing_class=tokenizer,
                      replay=replay)  # fmt: skip


def test_soft_capped_logits_gemma2_match_the_plain_objective(tiny_tokenizer, tmp_path) -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = _tiny(Gemma2Config, Gemma2ForCausalLM, tiny_tokenizer, final_logit_softcapping=2.0)
    base = copy.deepcopy(model)
    settings = dict(kl_coef=0.5, replay_ratio=1.0, kl_on="both")
    trainer = _trainer_for(model, tiny_tokenizer, tmp_path, settings, ReplayStream("builtin", tiny_tokenizer))
    batch = sft_batch(tiny_tokenizer)
    n_replay = int(batch["attention_mask"].sum())
    replay = ReplayStream("builtin", tiny_tokenizer).batch(n_replay, batch["input_ids"].shape[1],
                                                            tiny_tokenizer.pad_token_id)  # fmt: skip
    loss = trainer.training_step(trainer.model, batch)
    ours = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad(set_to_none=True)
    expected = plain_arr_loss(trainer.model, base, batch, replay, settings)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(ours[name], p.grad, rtol=1e-4, atol=1e-6), name


def test_an_architecture_with_unknown_logit_scaling_is_refused(tiny_tokenizer, tmp_path) -> None:
    from transformers import GraniteConfig, GraniteForCausalLM

    model = _tiny(GraniteConfig, GraniteForCausalLM, tiny_tokenizer, logits_scaling=4.0)
    trainer = _trainer_for(model, tiny_tokenizer, tmp_path, {})
    with pytest.raises(ArrtuneError, match="GraniteForCausalLM: its logits are not output_layer"):
        trainer.training_step(trainer.model, sft_batch(tiny_tokenizer))


def test_precision_auto_is_bf16_on_cpus_with_native_bf16_matmul() -> None:
    from arrtune.config import cpu_has_native_bf16, use_bf16

    assert cpu_has_native_bf16("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16")
    assert cpu_has_native_bf16("flags\t\t: fpu amx_bf16 amx_tile")
    assert not cpu_has_native_bf16("flags\t\t: fpu avx2 avx512f avx512_vnni")
    assert not cpu_has_native_bf16("flags\t\t: fpu avx512_bf16x")
    assert use_bf16("bf16") and not use_bf16("fp32")


def test_every_training_argument_is_settable_and_tensorboard_logs_every_term(
    tiny_model_dir, tmp_path, monkeypatch
) -> None:
    """TrainConfig is a TrainingArguments: HF fields come from YAML / key=value like arrtune's, reach the
    Trainer, and report_to: tensorboard writes every loss term arrtune logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainingArguments

    from arrtune.config import TrainConfig

    assert issubclass(TrainConfig, TrainingArguments)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    with pytest.raises(ArrtuneError, match="did you mean 'gradient_checkpointing'"):
        load_config(None, ["gradient_checkpoint=true"])
    cfg = load_config(None, [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "method=arr", "max_steps=3",
                             "warmup_steps=0", "per_device_train_batch_size=2", "disable_tqdm=true",
                             "report_to=tensorboard", "optim=adamw_torch",
                             "lr_scheduler_type=cosine", "lr_scheduler_kwargs={num_cycles: 0.5}",
                             "adam_beta2=0.95", f"logging_dir={tmp_path / 'tb'}"])  # fmt: skip
    assert cfg.adam_beta2 == 0.95 and cfg.lr_scheduler_kwargs == {"num_cycles": 0.5}
    run_dir = train(cfg)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["adam_beta2"] == 0.95 and saved["optim"] == "adamw_torch"
    # logging_dir (gone from transformers 5's TrainingArguments) still says where the event files go
    assert not list(run_dir.rglob("events.out.tfevents.*"))
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # one run's logging_dir does not reach the next
    events = EventAccumulator(str(next((tmp_path / "tb").glob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for term in ("sft_loss", "replay_loss", "kl", "lr", "grad_norm", "sft_tokens_per_s", "step_time_s"):
        assert f"train/{term}" in tags, sorted(tags)
    assert len(events.Scalars("train/kl")) == 3


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """gradient_checkpointing (a TrainingArguments field) with the two-pass step: the same adapter as
    without it; the reference forward (no_grad) is unaffected."""
    import torch.utils.checkpoint
    from safetensors.torch import load_file

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)

    def run(name: str, checkpointing: bool) -> dict:
        cfg = load_config(None, [f"model={tiny_model_dir}", f"output_dir={tmp_path / name}", "method=arr",
                                 "max_steps=3", "warmup_steps=0", "per_device_train_batch_size=2",
                                 "precision=fp32", "disable_tqdm=true",
                                 f"gradient_checkpointing={str(checkpointing).lower()}"])  # fmt: skip
        assert cfg.gradient_checkpointing is checkpointing
        return load_file(train(cfg) / "adapter" / "adapter_model.safetensors")

    plain = run("plain", False)
    assert not calls
    checkpointed = run("ckpt", True)
    assert calls  # the decoder layers really ran checkpointed
    assert max(float((plain[k] - checkpointed[k]).abs().max()) for k in plain) < 1e-5
    assert max(float(v.abs().max()) for k, v in plain.items() if "lora_B" in k) > 0  # it trained


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_base_weights_load_in_the_training_precision(
    precision, dtype, tiny_model_dir, tmp_path, monkeypatch
) -> None:
    """model_dtype auto: bf16 base weights when training in bf16 (LoRA weights stay float32), float32 else."""
    import arrtune.trainer

    seen = {}
    real = arrtune.trainer.InitialModel.hidden

    def spy(reference, ids, mask):
        params = dict(reference.model.named_parameters())
        seen["base"] = {p.dtype for n, p in params.items() if "lora_" not in n}
        seen["lora"] = {p.dtype for n, p in params.items() if "lora_" in n}
        return real(reference, ids, mask)

    monkeypatch.setattr(arrtune.trainer.InitialModel, "hidden", spy)
    cfg = load_config(None, [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "method=arr", "max_steps=2",
                             "warmup_steps=0", "per_device_train_batch_size=2", f"precision={precision}",
                             "disable_tqdm=true"])  # fmt: skip
    run_dir = train(cfg)
    assert seen["base"] == {dtype} and seen["lora"] == {torch.float32}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model_dtype"] == str(dtype).split(".")[1]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in steps if "loss" in r)


def test_evaluate_scores_the_sft_loss_and_leaves_training_state_alone(tiny_model_dir, tiny_tokenizer,
                                                                      tmp_path) -> None:  # fmt: skip
    """Trainer.evaluate(): eval_loss is the response-token CE of the held-out batch (transformers' own loss),
    and evaluating draws no replay, logs no training term and does not move the drift-budget controller."""
    examples, _ = load_sft_examples("builtin:vornish", tiny_tokenizer, max_length=128, split="test")
    held_out = examples[:4]
    replay = ReplayStream("builtin", tiny_tokenizer)
    args = arr_config(tmp_path, kl_coef=1.0, replay_ratio=0.5, kl_on="replay", drift_budget=0.05,
                      per_device_eval_batch_size=4, report_to="none")  # fmt: skip
    trainer = ARRTrainer(model=lora_model(tiny_model_dir, randomize_b=True), args=args, processing_class=tiny_tokenizer,
                         replay=replay, eval_dataset=held_out,
                         data_collator=lambda b: collate_sft(b, tiny_tokenizer.pad_token_id))  # fmt: skip
    position, coef = json.dumps(replay.state_dict()), trainer.controller.coef
    metrics = trainer.evaluate()
    batch = collate_sft(held_out, tiny_tokenizer.pad_token_id)
    trainer.model.eval()
    with torch.no_grad():
        expected = float(trainer.model(**batch).loss)
    assert metrics["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert json.dumps(replay.state_dict()) == position and trainer.controller.coef == coef
    assert trainer._terms == {} and trainer._sft_tokens == 0


def test_eval_strategy_evaluates_task_eval_during_training(tiny_model_dir, tmp_path) -> None:
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(
        "".join(json.dumps({"prompt": f"Say {i}", "completion": f"{i}"}) + "\n" for i in range(3))
    )
    run = train(load_config(None, [f"model={tiny_model_dir}", "method=arr", "max_steps=4", "eval_strategy=steps",
                                   "eval_steps=2", f"task_eval={held_out}", "disable_tqdm=true", "precision=fp32",
                                   f"output_dir={tmp_path / 'run'}"]))  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(math.isfinite(r["eval_loss"]) for r in evals)
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]
