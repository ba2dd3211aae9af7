"""The Python API: the README's example runs verbatim, TRL's dataset formats, and the KL's reference guards."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import arrtune
from arrtune import ARRConfig, ARRTrainer
from arrtune.errors import ArrtuneError
from arrtune.losses import IGNORE_INDEX
from arrtune.testing import randomize_lora_b

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_example() -> str:
    section = README.read_text().split("## Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_verbatim(tiny_model_dir: Path, tmp_path: Path) -> None:
    code = readme_python_example()
    assert len(code.strip().splitlines()) <= 15
    model_id = re.search(r'model_id = "([^"]+)"', code).group(1)
    shutil.copytree(tiny_model_dir, tmp_path / model_id)  # a local directory of that name: no Hub needed
    (tmp_path / "example.py").write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = tmp_path / "runs" / "python" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()


def test_public_names() -> None:
    assert set(arrtune.__all__) >= {"ARRConfig", "ARRTrainer", "arr_loss", "evaluate"}
    assert callable(arrtune.arr_loss) and callable(arrtune.evaluate)


def _model(model_dir: Path, **lora):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir)


def _args(tmp_path: Path, **kw) -> ARRConfig:
    return ARRConfig(**{"output_dir": str(tmp_path / "out"), "max_steps": 1, "report_to": "none", "use_cpu": True,
                        **kw})  # fmt: skip


TRL_ROWS = {
    "messages": {
        "messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    },
    "prompt/completion": {"prompt": "The capital of France is", "completion": " Paris."},
    "conversational prompt/completion": {
        "prompt": [{"role": "user", "content": "hi there"}],
        "completion": [{"role": "assistant", "content": "hello"}],
    },
    "text": {"text": "plain text for language modelling"},
}


@pytest.mark.parametrize("completion_only_loss", [None, False])
@pytest.mark.parametrize("form", TRL_ROWS)
def test_rows_become_the_batches_trl_makes_of_them(form, completion_only_loss, tiny_model_dir, tiny_tokenizer,
                                                     tmp_path) -> None:  # fmt: skip
    """Each of TRL's dataset formats: ARRTrainer's batch (ids, labels, attention) equals the one TRL's
    SFTTrainer tokenizes and collates from the same row, at TRL's defaults."""
    trl = pytest.importorskip("trl")
    rows = [TRL_ROWS[form]] * 2
    common = {
        "completion_only_loss": completion_only_loss,
        "report_to": "none",
        "use_cpu": True,
        "max_steps": 1,
    }
    theirs = trl.SFTTrainer(model=_model(tiny_model_dir), args=trl.SFTConfig(output_dir=str(tmp_path / "trl"), **common),
                            train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)  # fmt: skip
    ours = ARRTrainer(model=_model(tiny_model_dir), args=_args(tmp_path, method="sft", **common),
                      train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer,
                      peft_config=LoraConfig(r=2, task_type="CAUSAL_LM"))  # fmt: skip
    want = theirs.data_collator([theirs.train_dataset[0]])
    got = ours.data_collator([ours.train_dataset[0]])
    for key in ("input_ids", "labels", "attention_mask"):
        assert got[key].tolist() == want[key].tolist(), key
    assert (got["labels"] == IGNORE_INDEX).any() == (form != "text" and completion_only_loss is None and
                                                      "prompt" in TRL_ROWS[form])  # fmt: skip


def test_arrtune_train_defaults_put_string_prompts_through_the_chat_template(tiny_model_dir, tiny_tokenizer,
                                                                              tmp_path) -> None:  # fmt: skip
    """prompt_completion_as_chat and assistant_only_loss (arrtune train's defaults): every conversational form
    becomes the same chat, loss on the response only."""
    chat = TRL_ROWS["messages"]["messages"]
    rows = [{"messages": chat}, {"prompt": chat[0]["content"], "completion": chat[1]["content"]},
            {"prompt": chat[:1], "completion": chat[1:]}]  # fmt: skip
    args = _args(tmp_path, method="sft", assistant_only_loss=True, prompt_completion_as_chat=True)
    trainer = ARRTrainer(model=_model(tiny_model_dir), args=args, train_dataset=rows,
                         processing_class=tiny_tokenizer, peft_config=LoraConfig(r=2, task_type="CAUSAL_LM"))  # fmt: skip
    messages, prompt_completion, conversational = trainer.train_dataset
    assert messages == prompt_completion == conversational
    masked = [i for i, lab in enumerate(messages["labels"]) if lab == IGNORE_INDEX]
    assert masked and len(masked) < len(messages["labels"])


def test_packing_is_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(ArrtuneError, match="packing"):
        _args(tmp_path, packing=True)


def test_a_model_without_an_adapter_is_refused_when_there_is_a_kl(
    tiny_model_dir, tiny_tokenizer, tmp_path
) -> None:
    rows = [{"prompt": "a", "completion": "b"}] * 2
    with pytest.raises(ArrtuneError, match="no PEFT adapter"):
        ARRTrainer(model=_model(tiny_model_dir), args=_args(tmp_path, method="kl"), train_dataset=rows,
                   processing_class=tiny_tokenizer)  # fmt: skip
    # without a KL there is no reference: plain SFT of the whole model is allowed
    ARRTrainer(model=_model(tiny_model_dir), args=_args(tmp_path, method="sft"), train_dataset=rows,
               processing_class=tiny_tokenizer)  # fmt: skip


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_init_that_rewrites_the_base_is_refused(init, tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    base = _model(tiny_model_dir)
    before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=2, init_lora_weights=init, target_modules=["q_proj"],
                                            task_type="CAUSAL_LM"))  # fmt: skip
    with model.disable_adapter():  # the reason for the refusal: adapter off is no longer the loaded model
        after = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert not torch.allclose(before, after)
    with pytest.raises(ArrtuneError, match="rewrites the base weights"):
        ARRTrainer(model=model, args=_args(tmp_path, method="kl"), train_dataset=[{"prompt": "a", "completion": "b"}],
                   processing_class=tiny_tokenizer)  # fmt: skip


def test_the_reference_of_a_wrapped_peft_model_is_the_model_as_loaded(tiny_model_dir, tiny_tokenizer,
                                                                      tmp_path) -> None:  # fmt: skip
    loaded = _model(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        expected = loaded(input_ids=ids).logits
    model = get_peft_model(
        _model(tiny_model_dir), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    randomize_lora_b(model, 0.5)  # the adapter now changes the output
    trainer = ARRTrainer(model=model, args=_args(tmp_path, method="kl"), train_dataset=[{"prompt": "a", "completion": "b"}],
                         processing_class=tiny_tokenizer)  # fmt: skip
    from arrtune.lm import InitialModel, output_head

    reference = InitialModel(trainer.model)
    logits = reference.head(output_head(trainer.model))(reference.hidden(ids, torch.ones_like(ids)))
    assert torch.allclose(logits, expected, atol=1e-5)
    assert isinstance(trainer.model, PeftModel)
    with torch.no_grad():
        assert not torch.allclose(trainer.model(input_ids=ids).logits, expected, atol=1e-3)


def _chat_rows(tokenizer, n: int = 12) -> list[dict]:
    from arrtune.data.sft import tokenize_row

    chats = [[{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}]
             for i in range(n)]  # fmt: skip
    return [tokenize_row({"messages": c}, tokenizer, f"row {i}") for i, c in enumerate(chats)]


COMMON = dict(max_steps=5, learning_rate=1e-2, per_device_train_batch_size=3, logging_steps=1, seed=7,
              report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, lr_scheduler_type="linear",
              warmup_steps=1, save_strategy="no", disable_tqdm=True)  # fmt: skip


def _peft(model_dir: Path, moved: bool = False):
    """The tiny model with a fresh LoRA adapter (``moved``: its B matrices drawn at random, so the adapted
    model already differs from the initial one and the KL is not 0)."""
    torch.manual_seed(0)
    model = get_peft_model(_model(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         task_type="CAUSAL_LM"))  # fmt: skip
    return randomize_lora_b(model, 0.3) if moved else model


def _losses(trainer) -> list[float]:
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def test_plain_sft_is_trl_sfttrainer(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    """The same tokenized examples in the same order: TRL's SFTTrainer and ARRTrainer at kl_coef 0 without
    replay give the same per-step losses and the same adapter."""
    trl = pytest.importorskip("trl")
    rows = _chat_rows(tiny_tokenizer)
    theirs = trl.SFTTrainer(model=_peft(tiny_model_dir), args=trl.SFTConfig(output_dir=str(tmp_path / "trl"), **COMMON),
                            train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)  # fmt: skip
    theirs.train()
    ours = ARRTrainer(model=_peft(tiny_model_dir), args=ARRConfig(output_dir=str(tmp_path / "arr"), method="sft", **COMMON),
                      train_dataset=rows, processing_class=tiny_tokenizer)  # fmt: skip
    ours.train()
    assert len(_losses(ours)) == len(_losses(theirs)) == 5
    assert _losses(ours) == pytest.approx(_losses(theirs), abs=1e-5)
    a = {k: v for k, v in theirs.model.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in ours.model.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_arr_terms_add_exactly_to_the_trl_loss(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    """With KL and replay on, the first step's loss is TRL's SFT loss plus exactly replay_weight x replay CE
    plus kl_coef x KL (the terms ARRTrainer logs)."""
    trl = pytest.importorskip("trl")
    rows = _chat_rows(tiny_tokenizer)
    one = {**COMMON, "max_steps": 1}
    theirs = trl.SFTTrainer(model=_peft(tiny_model_dir, moved=True), args=trl.SFTConfig(output_dir=str(tmp_path / "trl"), **one),
                            train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)  # fmt: skip
    theirs.train()
    args = ARRConfig(output_dir=str(tmp_path / "arr"), kl_coef=0.5, replay_ratio=1.0, kl_on="both",
                     replay_weight=0.3, **one)  # fmt: skip
    ours = ARRTrainer(
        model=_peft(tiny_model_dir, moved=True),
        args=args,
        train_dataset=rows,
        processing_class=tiny_tokenizer,
    )
    ours.train()
    record = next(r for r in ours.state.log_history if "loss" in r)
    assert record["sft_loss"] == pytest.approx(_losses(theirs)[0], abs=1e-5)
    assert record["replay_loss"] > 0 and record["kl"] > 1e-3
    assert record["loss"] == pytest.approx(record["sft_loss"] + 0.3 * record["replay_loss"] + 0.5 * record["kl"],
                                           abs=1e-5)  # fmt: skip


def test_a_mixed_replay_replays_the_initial_models_own_answers(
    tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch
) -> None:
    """ARRTrainer with replay_mix mixes corpus replay with self-replay, and the self-replay answers are the
    initial model's: generated with the adapter off, even when the adapter already changes the outputs."""
    from arrtune.data.replay import MixedReplay
    from arrtune.data.self_replay import GenerationSettings, generate_answers, load_prompts
    from arrtune.generation import question_prompt_ids
    from arrtune.models import cache_dir

    monkeypatch.setenv("ARRTUNE_CACHE", str(tmp_path / "cache"))
    model = get_peft_model(_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora_b(model, 0.5)
    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]}
            for i in range(8)]  # fmt: skip
    args = _args(tmp_path, max_steps=4, per_device_train_batch_size=2, replay_mix=0.5)
    trainer = ARRTrainer(model, args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer)
    assert isinstance(trainer.replay, MixedReplay) and trainer.replay.first_share == 0.5
    info = trainer.self_replay_info
    assert info["self_replay_answers"] > 0
    got = [json.loads(line) for line in Path(info["self_replay_cache"]).read_text().splitlines()]
    settings = GenerationSettings(args.replay_temperature, args.replay_top_p, args.replay_max_new_tokens)
    n_tokens = sum(len(question_prompt_ids(tiny_tokenizer, r["prompt"])) + len(r["answer_ids"]) for r in got)
    plain = _model(tiny_model_dir)
    want, _ = generate_answers(plain, tiny_tokenizer, load_prompts(None), n_tokens, settings,
                               cache_dir() / "plain.jsonl", progress=False)  # fmt: skip
    assert [r["answer_ids"] for r in got] == [r["answer_ids"] for r in want[: len(got)]]
    with_adapter, _ = generate_answers(model, tiny_tokenizer, load_prompts(None), n_tokens, settings,
                                       cache_dir() / "adapted.jsonl", progress=False)  # fmt: skip
    assert [r["answer_ids"] for r in with_adapter] != [r["answer_ids"] for r in want[: len(with_adapter)]]
    trainer.train()  # and it trains


def test_self_replay_without_a_chat_template_is_one_line(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    rows = [{"text": f"plain text {i}"} for i in range(4)]
    model = get_peft_model(_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ArrtuneError, match=r"replay_mix=0.5: self-replay .* set replay_mix: 0"):
        ARRTrainer(model, _args(tmp_path, replay_mix=0.5), train_dataset=Dataset.from_list(rows),
                   processing_class=tokenizer)  # fmt: skip
    trainer = ARRTrainer(model, _args(tmp_path, replay_mix=0.0), train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)  # fmt: skip
    assert trainer.self_replay_info == {} and trainer.replay is not None


def test_a_script_parses_arrconfig_with_hfargumentparser(tmp_path) -> None:
    """Scripts parse TrainingArguments with HfArgumentParser; ARRConfig's fields come along, typed."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ARRConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--kl_coef", "0.5", "--replay_mix", "0.25", "--method", "replay",
         "--prompt_completion_as_chat", "true", "--use_cpu", "true", "--report_to", "none"],
        look_for_args_file=False,
    )  # fmt: skip
    assert isinstance(args, ARRConfig)
    assert (args.kl_coef, args.replay_mix, args.method, args.prompt_completion_as_chat) == (
        0.5,
        0.25,
        "replay",
        True,
    )
    assert args.resolved_replay_ratio() == 0.25
