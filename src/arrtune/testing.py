"""Tiny random-weight models for tests and benchmarks: built from a config in seconds, no downloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few built-in texts, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from arrtune.data.corpora import replay_texts
    from arrtune.data.task import make_examples

    train, _ = make_examples()
    texts = list(replay_texts()[:200]) + [e["prompt"] + " " + e["completion"] for e in train]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(
    path: str | Path, vocab_size: int = 512, hidden_size: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """Save a tiny random Llama + tokenizer to ``path`` (a normal HF model directory) and return it."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def copy_run(src: str | Path, dst: str | Path) -> Path:
    """A copy of a run directory whose ``config.yaml`` names its new place (so that it can be resumed there)."""
    import shutil

    import yaml

    dst = Path(dst)
    shutil.copytree(src, dst)
    saved = yaml.safe_load((dst / "config.yaml").read_text())
    saved["output_dir"] = str(dst)
    (dst / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return dst


def randomize_lora_b(model: Any, std: float) -> Any:
    """Draw the LoRA B matrices of ``model`` from N(0, std): a fresh adapter is zero, so without this the
    adapted model equals the initial one (and a KL to it is 0). Returns the model."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, std)
    return model
