"""Model plumbing shared by training and evaluation: one place that knows how a causal LM is put together.

* :func:`base_model` unwraps PEFT; :func:`adapter_disabled` runs the network as the initial model;
* :func:`output_head` is the output layer as ``hidden -> logits``, with final-logit soft-capping (Gemma);
* :class:`InitialModel` gives the initial model's final hidden states and head (adapter off, no gradient, no
  dropout): the KL's reference; :func:`check_reference` refuses a model whose adapter-off network is not it;
* :class:`LMParts` runs a model as decoder, then head, so evaluation applies the head only where it needs
  log-probabilities;
* :func:`chat_template_ids` is the chat template as token ids (training and evaluation tokenize alike).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

import torch

from arrtune.errors import ArrtuneError

#: config attributes that make the output head more than ``lm_head(hidden)`` beyond soft-capping: models
#: with one of them set are run through their own forward in evaluation, and refused in training (where the
#: first step compares the model's logits with :func:`output_head`'s)
OTHER_HEAD_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def base_model(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@contextmanager
def adapter_disabled(model: Any) -> Iterator[None]:
    """Run the wrapped network as the initial model (PEFT adapter off); a no-op for plain models.

    For LoRA-style adapters this switches off the adapter layers that ``PeftModel.disable_adapter()`` switches,
    without that context's model-status scan over every parameter (see :class:`InitialModel`)."""
    layers = _adapter_layers(model)
    if layers is None:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            yield
        return
    with _switched(layers, []):
        yield


def _adapter_layers(model: Any, within: torch.nn.Module | None = None) -> list[Any] | None:
    """The layers ``PeftModel.disable_adapter()`` switches for a LoRA-style adapter (those inside ``within``
    only, if given); None for anything else (plain models, prompt-learning adapters)."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    if config is None or config.is_prompt_learning or config.is_adaption_prompt:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = (model if within is None else within).modules()
    return [m for m in layers if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextmanager
def _switched(adapter_layers: Sequence[Any], modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """``adapter_layers`` off and ``modules`` in evaluation mode, then each back as it was.

    Both are set as the flags their forwards read: PEFT layers' ``_disable_adapters`` (``enable_adapters``
    would also flip ``requires_grad`` on every adapter weight, irrelevant without gradient and 6 ms per call on
    SmolLM2) and each module's own ``training`` (``Module.eval()`` recurses through ``__setattr__``: 15 ms)."""
    adapters_off = [layer._disable_adapters for layer in adapter_layers]
    training = [module.training for module in modules]
    for layer in adapter_layers:
        layer._disable_adapters = True
    for module in modules:
        vars(module)["training"] = False
    try:
        yield
    finally:
        for layer, off in zip(adapter_layers, adapters_off):
            layer._disable_adapters = off
        for module, mode in zip(modules, training):
            vars(module)["training"] = mode


class InitialModel:
    """The KL's reference inside the model under training: the same network with its adapter off, without
    dropout (every module in evaluation mode, except bitsandbytes layers: see :func:`_mode_modules`) and
    without gradient.

    It lists the adapter layers and modules it switches once, so each use costs well under a millisecond,
    where PEFT's ``disable_adapter()`` plus ``eval()``/``train()`` take ~45 ms on SmolLM2's 2,500 modules; the
    output layer is switched only if it holds adapter layers itself (``modules_to_save``, trainable tokens),
    since the loss calls it once per chunk. Build it once the model's structure is final (after
    ``get_peft_model``); a plain model, or a prompt-learning adapter, is switched with its own context."""

    def __init__(self, model: Any):
        self.model = model
        inner = base_model(model)
        self.decoder = inner.get_decoder()
        #: the LoRA-style adapter layers to switch off; None: another kind of adapter, or none
        self.adapter_layers = _adapter_layers(model)
        #: the modules to put in evaluation mode
        self.modules = _mode_modules(self.decoder)
        #: the adapter layers inside the output layer (usually none)
        self.head_layers = _adapter_layers(model, within=inner.get_output_embeddings()) or []

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The initial model's final hidden states: ``(B, T, H)``."""
        other_adapter = adapter_disabled(self.model) if self.adapter_layers is None else nullcontext()
        with torch.no_grad(), other_adapter, _switched(self.adapter_layers or [], self.modules):
            return self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def head(
        self, head: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The initial model's output layer as ``hidden -> logits`` (``head``: the policy's
        :func:`output_head`, to share its cast weight)."""
        head = head or output_head(self.model)

        def apply(hidden: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), _switched(self.head_layers, []):
                return head(hidden)

        return apply


#: PEFT initialisations that rewrite the base weights (W becomes W - BA): with the adapter off, the model is
#: no longer the one loaded, so it cannot be the KL's reference
REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva")


def check_reference(model: Any) -> None:
    """Raise ``ArrtuneError`` unless the model with its adapter off is the model as loaded: the KL needs a PEFT
    adapter (without one the "initial model" would be the policy itself and the KL 0), and an adapter whose
    initialisation left the base weights alone (pissa, olora, corda, loftq and eva rewrite them)."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        raise ArrtuneError(
            "ARRTrainer: the KL's reference is the model with its adapter off, and this model has no PEFT "
            "adapter; pass peft_config=LoraConfig(...) (or a PeftModel), or set kl_coef=0"
        )
    for name, config in peft_config.items():
        init = str(getattr(config, "init_lora_weights", True)).lower()
        if any(init.startswith(kind) for kind in REWRITING_INITS):
            raise ArrtuneError(
                f"ARRTrainer: adapter '{name}' uses init_lora_weights={config.init_lora_weights!r}, "
                "which rewrites the base weights, so the model with the adapter off is not the initial model; "
                "use init_lora_weights=True (or 'gaussian'), or set kl_coef=0"
            )


def _text_config(model: Any) -> Any:
    config = base_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def output_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's output layer as a function ``hidden -> logits``, with final logit soft-capping (Gemma).

    A frozen plain ``nn.Linear`` head is cast to the autocast dtype once per function, not once per chunk
    (autocast re-casts frozen weights on every call).
    """
    head = base_model(model).get_output_embeddings()
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    plain = type(head) is torch.nn.Linear and not head.weight.requires_grad
    cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        if plain and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            if dtype not in cast:
                cast[dtype] = (head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype))
            logits = torch.nn.functional.linear(hidden.to(dtype), *cast[dtype])
        else:
            logits = head(hidden)
        return torch.tanh(logits / cap) * cap if cap else logits

    return apply


def _mode_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """``module`` and its submodules whose mode evaluation switches: all but bitsandbytes layers, which have no
    dropout, and which on CPU bitsandbytes repacks in evaluation mode into an inference-only 4-bit layout that
    the training forwards that follow cannot use."""
    return [m for m in module.modules() if not type(m).__module__.startswith("bitsandbytes")]


@contextmanager
def without_dropout(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in evaluation mode (no dropout), then each submodule back in its own mode; bitsandbytes
    layers keep theirs (:func:`_mode_modules`)."""
    with _switched([], _mode_modules(module)):
        yield


class LMParts:
    """Run a causal LM as ``decoder -> hidden states`` and ``head -> logits`` so that the head is applied only
    where log-probabilities are needed (models with an output transform other than soft-capping run their
    full forward instead)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        inner = base_model(model)
        config = _text_config(model)
        self.full_forward = any(
            getattr(config, name, None) not in (None, 1, 1.0) for name in OTHER_HEAD_TRANSFORMS
        )
        self.decoder = None if self.full_forward else inner.get_decoder()
        self.head = None if self.full_forward else output_head(model)
        if self.decoder is None or self.decoder is inner:
            self.full_forward = True
        self.vocab_size = int(inner.get_output_embeddings().weight.shape[0])
        self.dtype = next(inner.parameters()).dtype
        self.device = next(inner.parameters()).device
        # transformers 5 names a forward pass's key/value cache ``cache``; earlier versions ``past_key_values``
        parameters = inspect.signature(inner.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        prefix: Any = None,
    ) -> torch.Tensor:
        """Last hidden states (B, T, H), or the logits (B, T, V) when the model needs its full forward.
        ``prefix``: keys and values of tokens that precede every row (:meth:`prefix_cache`, expanded to the
        batch); ``attention_mask`` then covers the prefix too."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": prefix is not None}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if prefix is not None:
            kwargs[self.cache_argument] = prefix
        if self.full_forward:
            return self.model(**kwargs).logits
        return self.decoder(**kwargs).last_hidden_state

    def prefix_cache(self, prefix_ids: Sequence[int]) -> Any:
        """Keys and values of one token prefix (a transformers ``Cache``), computed once to run many
        continuations from: pass ``expand_cache(cache, batch_size)`` as :meth:`hidden`'s ``prefix``."""
        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=self.device)
        module = self.model if self.full_forward else self.decoder
        out = module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        return getattr(out, "cache", None) or out.past_key_values

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of selected hidden states (N, H) -> (N, V)."""
        out = hidden if self.head is None else self.head(hidden)
        return out.float()


def expand_cache(cache: Any, batch_size: int) -> Any:
    """A copy of a one-row ``Cache`` repeated to ``batch_size`` rows (a forward pass extends the cache it is
    given, so each batch gets its own copy)."""
    copied = copy.deepcopy(cache)
    copied.batch_repeat_interleave(batch_size)
    return copied


def chat_template_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template (training and evaluation alike)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ArrtuneError("model: the tokenizer has no chat template; use an instruction-tuned model")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


T = TypeVar("T")


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def batched(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for s in chunks(len(items), max(1, size)):
        yield list(items[s])


@contextmanager
def eval_mode(model: torch.nn.Module):
    """No dropout (:func:`without_dropout`) + ``torch.inference_mode()``; restores the training
    flag afterwards."""
    with without_dropout(model), torch.inference_mode():
        yield


def prefix_token_id(tokenizer) -> int:
    """Token put before an empty context (lm-evaluation-harness: BOS, else EOS)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has no BOS, EOS or pad token to start a sequence with")


#: positions per output-head chunk in evaluation (512 x 49152 float32 logits = 100 MB)
HEAD_CHUNK = 512


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else :func:`prefix_token_id` (BOS, else EOS). Padded
    positions are never attended to nor scored, so any id works; this one exists in every vocabulary."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)


def is_hub_id(spec: str) -> bool:
    """True when ``spec`` reads as a Hugging Face Hub id (``org/name``) rather than a local path."""
    from pathlib import Path

    return (
        spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists()
    )
