"""The model plumbing shared by training and evaluation (arrtune.lm)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM

from arrtune.lm import InitialModel, LMParts, adapter_disabled, base_model, output_head


def _gemma(cap: float | None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          final_logit_softcapping=cap)  # fmt: skip
    return Gemma2ForCausalLM(config).eval()


def test_evaluation_and_training_apply_the_same_soft_capped_head() -> None:
    model = _gemma(cap=2.0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    parts = LMParts(peft_model)
    assert not parts.full_forward  # the decoder + head path, not the model's own forward
    from_eval = parts.logits(parts.hidden(ids, mask, None))
    from_training = output_head(peft_model)(
        base_model(peft_model).get_decoder()(input_ids=ids).last_hidden_state
    )
    assert float(expected.abs().max()) <= 2.0  # capped
    torch.testing.assert_close(from_eval, expected.float())
    torch.testing.assert_close(from_training, expected)


def test_reference_is_the_model_with_its_adapter_off() -> None:
    peft_model = get_peft_model(_gemma(cap=None), LoraConfig(r=2, target_modules=["q_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(0, 64, (1, 5))
    with adapter_disabled(peft_model):
        off = base_model(peft_model).get_decoder()(input_ids=ids).last_hidden_state
    on = base_model(peft_model).get_decoder()(input_ids=ids).last_hidden_state
    ref = InitialModel(peft_model).hidden(ids, torch.ones_like(ids))
    torch.testing.assert_close(ref, off)
    assert not torch.allclose(ref, on)
    with peft_model.disable_adapter():  # PEFT's own context gives the same initial model
        torch.testing.assert_close(base_model(peft_model).get_decoder()(input_ids=ids).last_hidden_state, off)
    # and after either context the adapter is on and trainable again
    torch.testing.assert_close(base_model(peft_model).get_decoder()(input_ids=ids).last_hidden_state, on)
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)
