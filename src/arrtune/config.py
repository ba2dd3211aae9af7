"""The configuration of one run: ``TrainConfig``, a ``transformers.TrainingArguments`` with arrtune's fields.

As TRL's ``SFTConfig`` does, ``TrainConfig`` subclasses ``TrainingArguments``: every Hugging Face training
argument (``activation_checkpointing``, ``optim``, ``report_to``, ``lr_scheduler_kwargs``, ``torch_compile``,
``push_to_hub``, ...) is set in the same YAML file or ``key=value`` override as arrtune's own fields, and the
Trainer receives this object itself. Hugging Face's fields are documented in transformers'
``TrainingArguments`` reference; arrtune's fields (and the HF fields whose defaults arrtune changes) carry
their ``help`` here. A method preset (``method``) fills in ``kl_coef`` and ``replay_ratio`` when they are not
set explicitly. Every value is checked when the config is built, before anything is written; reading YAML
files and overrides (an unknown key gets a "did you mean" error) is :mod:`arrtune.config_files`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from arrtune.errors import ArrtuneError


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo)."""
    import re

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def use_bf16(precision: str) -> bool:
    """Whether to train under bf16 autocast. ``auto``: on a CUDA GPU that supports bf16, and on a CPU with
    native bf16 matmul (measured to train as well as fp32 and 1.07-1.23x faster, docs/performance)."""
    import torch

    if precision in ("bf16", "fp32"):
        return precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


#: method -> (kl_coef, replay_ratio); explicit values in the config override these. ``arr``'s pair is chosen
#: from the cost/retention frontier (docs/choosing_settings.md); its KL sits on the replay tokens
#: (``kl_on: auto``), where a strong coefficient does not slow learning the task. ``kl``'s sits on the SFT
#: responses, where it does.
PRESETS: dict[str, tuple[float, float]] = {
    "sft": (0.0, 0.0),
    "kl": (0.1, 0.0),
    "replay": (0.0, 0.25),
    "arr": (1.0, 0.25),
}
#: share of the replay tokens that are the base model's own answers (self-replay) unless ``replay_mix`` is
#: set: corpus replay alone keeps the model's text but not its answering behaviour (a format fine-tune still
#: takes over unrelated answers); half each keeps both (docs/study.md, "Choosing the default"). It applies to
#: ``replay`` and ``arr`` alike, so that the two differ only by the KL.
DEFAULT_REPLAY_MIX = 0.5


def _field(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ARRConfig(TrainingArguments):
    """The ARR objective's settings on top of ``transformers.TrainingArguments``, as TRL's ``SFTConfig`` adds
    SFT's: what :class:`arrtune.ARRTrainer` reads. Every Hugging Face field keeps its meaning and default,
    except the three below that the ARR step needs. The TRL ``SFTConfig`` fields users set are accepted with
    their meanings (``max_length``, ``completion_only_loss``, ``assistant_only_loss``, ``dataset_text_field``),
    or refused in one line (``packing``: not supported)."""

    # -- Hugging Face fields the ARR step needs set --------------------------------------------------------
    remove_unused_columns: bool = _field(False, "Kept False: arrtune's collator builds the batches.")
    label_names: list[str] | None = _field(["labels"], "Kept ['labels'].")
    ddp_find_unused_parameters: bool | None = _field(False, "False: every LoRA parameter gets a gradient.")

    # -- the method -----------------------------------------------------------------------------------
    method: str = _field(
        "arr",
        "Preset for kl_coef and replay_ratio: sft (0, 0), kl (0.1, 0), replay (0, 0.25), arr (1, 0.25).",
    )
    kl_coef: float | None = _field(
        None, "Weight of the token-mean KL to the initial model (0 = off). Default: from method."
    )
    kl_direction: str = _field(
        "reverse", "'reverse' = KL(policy || initial), 'forward' = KL(initial || policy)."
    )
    kl_on: str = _field(
        "auto",
        "Tokens carrying the KL: 'sft' (response tokens), 'replay' (replay tokens), 'both', or 'auto' = "
        "'replay' when replay is on, else 'sft' (measured: same task accuracy and retention as 'both', cheaper).",
    )
    kl_mask_target: bool = _field(
        False, "On SFT tokens, drop the label token from both distributions and renormalise."
    )
    kl_every: int = _field(
        1, "Compute the KL on one optimizer step in n only, weighted n x kl_coef (1 = every step)."
    )
    kl_fraction: float = _field(
        1.0,
        "Share of the KL-carrying rows (sequences) of each micro-batch that get the KL: the first "
        "ceil(f x rows). The reference forward shrinks to that share; the KL stays a token mean (1 = all).",
    )
    loss_chunk_rows: int = _field(
        0,
        "Token rows turned into logits at once for the CE and KL (bounds transient memory); 0 = automatic: "
        "32 MiB of float32 logits per chunk, i.e. 2**23 // vocab_size rows.",
    )
    replay_ratio: float | None = _field(
        None, "Replay tokens per SFT token in each step (0 = no replay). Default: from method."
    )
    replay_weight: float = _field(1.0, "Weight of the replay cross-entropy in the loss.")
    drift_budget: float | None = _field(
        None,
        "Nats per token the model may drift on general text (off by default). When set, kl_coef is only the "
        "starting value of a multiplier adapted during training to hold the measured drift at this budget "
        "(docs/drift_budget.md): the drift of drift_probe replay passages (as arrtune eval measures drift on "
        "held-out text), or, with drift_probe 0, the KL of the loss's own KL tokens.",
    )
    drift_probe: int = _field(
        4,
        "With drift_budget: replay-corpus passages set aside as the budget's probe; every drift_probe_every "
        "steps their drift KL(initial || policy) per token over the first 256 tokens is measured (one "
        "no-gradient forward of the policy; the initial model's side is computed once). 0: the controller "
        "reads the KL of the loss's own KL tokens instead (no extra work, but on short, mid-document replay "
        "rows that KL reads higher than the drift on whole passages: docs/drift_budget.md).",
    )
    drift_probe_every: int = _field(
        1,
        "With drift_budget and drift_probe > 0: optimizer steps per probe measurement (and controller update).",
    )

    # -- the replay corpus ---------------------------------------------------------------------------
    replay: str = _field(
        "builtin",
        "Replay source: 'builtin' (general text shipped with the installed packages), a .txt/.jsonl/.parquet "
        "file, a HF dataset id (streamed), or, with arrtune train, 'self': the base model's own answers to "
        "general prompts (generated once before training, cached; see replay_prompts and replay_mix).",
    )
    replay_config: str | None = _field(
        None, "Config name of a HF replay dataset (e.g. 'sample-10BT' for fineweb-edu)."
    )
    replay_split: str = _field("train", "Split of a HF replay dataset.")
    replay_text_field: str = _field(
        "text", "Field/column holding the text in JSONL, parquet and HF replay data."
    )

    replay_mix: float = _field(
        DEFAULT_REPLAY_MIX,
        "Share of the replay tokens that are self-replay (the base model's own answers to general prompts, "
        "generated once before training and cached), the rest coming from the 'replay' corpus: 0 = corpus "
        "only, 0.5 = half each (the default: corpus replay alone keeps text, not answering behaviour; "
        "docs/study.md), 1 = self only ('replay: self' means 1). Needs a chat template.",
    )
    replay_prompts: str | None = _field(
        None,
        "Prompts the base model answers for self-replay: a .txt (one per line) or .jsonl (field prompt, "
        "question or text) file, or a HF dataset id; default: built-in Natural Questions, disjoint from every "
        "evaluation prompt.",
    )
    replay_temperature: float = _field(0.7, "Sampling temperature of the self-replay answers (0 = greedy).")
    replay_top_p: float = _field(0.9, "Nucleus (top-p) sampling threshold of the self-replay answers.")
    replay_max_new_tokens: int = _field(96, "Longest self-replay answer, in tokens.")

    # -- SFT data (TRL SFTConfig's names) ----------------------------------------------------------------
    max_length: int = _field(256, "Longest SFT example in tokens; longer ones are dropped and counted.")
    completion_only_loss: bool | None = _field(
        None,
        "prompt/completion rows: loss on the completion only (None or True) or on every token (False), as "
        "in TRL.",
    )
    assistant_only_loss: bool = _field(
        False,
        "messages rows: loss on the assistant turns only (True) or on every token (False, TRL's default).",
    )
    dataset_text_field: str = _field("text", "Column holding the text of language-modelling rows.")
    prompt_completion_as_chat: bool = _field(
        False,
        "prompt/completion rows with string values: plain text, prompt + completion + EOS, as TRL's standard "
        "format (False), or a user turn and an assistant turn through the chat template (True, arrtune train's "
        "default). Lists of messages always go through the chat template.",
    )
    packing: bool = _field(False, "Not supported by ARRTrainer (rows are padded); True is refused.")

    def __post_init__(self) -> None:
        self.validate_arr()  # arrtune's rules first: they name the key
        super().__post_init__()

    def resolved_kl_coef(self) -> float:
        """kl_coef, or the method preset's value when unset."""
        return PRESETS[self.method][0] if self.kl_coef is None else float(self.kl_coef)

    def resolved_replay_ratio(self) -> float:
        """replay_ratio, or the method preset's value when unset."""
        return PRESETS[self.method][1] if self.replay_ratio is None else float(self.replay_ratio)

    def resolved_replay_mix(self) -> float:
        """Share of replay tokens from self-replay: 1 for ``replay: self``, else ``replay_mix``."""
        return 1.0 if self.replay == "self" else float(self.replay_mix)

    def resolved_kl_on(self) -> str:
        """kl_on, with 'auto' turned into 'replay' (replay on) or 'sft' (replay off)."""
        if self.kl_on != "auto":
            return self.kl_on
        return "replay" if self.resolved_replay_ratio() > 0 else "sft"

    def validate_arr(self) -> ARRConfig:
        """Check the ARR fields; raise ``ArrtuneError`` naming the key. Returns self."""
        choices = {
            "method": PRESETS,
            "kl_direction": ("forward", "reverse"),
            "kl_on": ("sft", "replay", "both", "auto"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ArrtuneError(f"config: {key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ArrtuneError(f"config: {f.name}={value!r} must be a finite number")
        checks = [
            ("kl_coef", self.kl_coef is None or self.kl_coef >= 0, ">= 0"),
            ("replay_ratio", self.replay_ratio is None or self.replay_ratio >= 0, ">= 0"),
            ("replay_weight", self.replay_weight >= 0, ">= 0"),
            ("loss_chunk_rows", self.loss_chunk_rows >= 0, ">= 0"),
            ("kl_every", self.kl_every >= 1, ">= 1"),
            ("kl_fraction", 0 < self.kl_fraction <= 1, "in (0, 1]"),
            ("drift_budget", self.drift_budget is None or self.drift_budget > 0, "> 0 (or unset)"),
            ("drift_probe", self.drift_probe >= 0, ">= 0"),
            ("drift_probe_every", self.drift_probe_every >= 1, ">= 1"),
            (
                "drift_budget",
                self.drift_budget is None or self.resolved_kl_coef() > 0,
                "used with a KL: kl_coef > 0 (its starting value), e.g. method arr",
            ),
            ("replay_mix", 0 <= self.replay_mix <= 1, "in [0, 1]"),
            ("replay_temperature", self.replay_temperature >= 0, ">= 0"),
            ("replay_top_p", 0 < self.replay_top_p <= 1, "in (0, 1]"),
            ("replay_max_new_tokens", self.replay_max_new_tokens > 0, "> 0"),
            ("max_length", self.max_length > 1, "> 1"),
            ("packing", not self.packing, "false: ARRTrainer pads its rows (packing is not supported)"),
        ]
        for key in ("replay", "replay_split", "replay_text_field", "dataset_text_field"):
            if not str(getattr(self, key)).strip():
                checks.append((key, False, "a non-empty string"))
        for key, ok, rule in checks:
            if not ok:
                raise ArrtuneError(f"config: {key}={getattr(self, key)!r} must be {rule}")
        return self


@dataclass
class TrainConfig(ARRConfig):
    """Configuration of one ``arrtune train`` run (all fields optional; defaults train the demo setup).

    ``output_dir`` is the run directory (``config.yaml``, ``adapter/``, ``metrics.jsonl``); the Trainer's
    checkpoints go to its ``checkpoints/`` sub-directory."""

    # -- Hugging Face fields whose defaults arrtune changes ----------------------------------------------
    output_dir: str = _field(
        "runs/arr", "Directory of this run: config.yaml, adapter/, metrics.jsonl, checkpoints/."
    )
    learning_rate: float = _field(1e-3, "Peak learning rate (AdamW).")
    lr_scheduler_type: str = _field(
        "constant_with_warmup", "transformers scheduler name (linear, cosine, constant, ...)."
    )
    warmup_steps: float = _field(5, "Linear warm-up, in optimizer steps.")
    max_steps: int = _field(60, "Optimizer steps to train; <= 0 means use num_train_epochs.")
    num_train_epochs: float = _field(1.0, "Epochs over the SFT data when max_steps <= 0.")
    seed: int = _field(0, "Seed for LoRA init, data order, the replay stream and dropout.")
    logging_steps: float = _field(1, "Log the loss terms every this many optimizer steps.")
    save_steps: float = _field(
        0, "Save a resumable checkpoint every this many steps (0 = only the final adapter, no checkpoints)."
    )
    save_total_limit: int | None = _field(2, "Checkpoints kept on disk.")
    report_to: None | str | list[str] = _field(
        "none",
        "Experiment trackers: none, tensorboard, wandb, trackio, mlflow, ... (every loss term is logged).",
    )
    logging_dir: str | None = _field(
        None,
        "Where report_to: tensorboard writes its event files (default: $TENSORBOARD_LOGGING_DIR, else "
        "<output_dir>/checkpoints/runs/<time>_<host>). transformers 5 dropped this TrainingArguments field; "
        "arrtune keeps it and passes it on as TENSORBOARD_LOGGING_DIR.",
    )

    # -- model and data --------------------------------------------------------------------------------
    model: str = _field(
        "smollm2-135m-instruct", "Model spec: built-in alias, .gguf file, local HF directory or Hub id."
    )
    model_dtype: str = _field(
        "auto",
        "Precision the base weights are loaded in: bfloat16, float16, float32, or auto = bfloat16 when training "
        "in bf16 (see precision), else float32. LoRA weights stay float32; the KL reference is this same base.",
    )
    load_in_4bit: bool = _field(
        False,
        "QLoRA: load the base weights 4-bit (bitsandbytes NF4, double quantization, computing in the training "
        "precision) with PEFT's k-bit preparation; the KL reference is this quantized base with the adapter "
        "off. Needs bitsandbytes (pip install 'arrtune[qlora]').",
    )
    trust_remote_code: bool = _field(
        False, "Allow model code from the Hub (off by default; only for models you trust)."
    )
    data: str = _field(
        "builtin:vornish",
        "SFT data: builtin:vornish or builtin:keywords (built-in tasks), a .jsonl/.json/.parquet file, or a HF "
        "dataset id.",
    )
    data_split: str = _field("train", "Split of a HF dataset (or of the built-in task) used for training.")
    task_eval: str | None = _field(
        None,
        "Held-out examples of your task (a .jsonl file, same row formats as data) that eval and compare score "
        "for exact match and response loss; built-in tasks use their own held-out split. Unset with your own "
        "data: no task score.",
    )
    # -- LoRA -----------------------------------------------------------------------------------------
    lora_r: int = _field(16, "LoRA rank.")
    lora_alpha: float = _field(32.0, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _field(0.0, "Dropout on the LoRA input (probability).")
    target_modules: list[str] | str = _field(
        "all-linear", "Modules that get adapters: 'all-linear' or a list of names."
    )

    # -- optimisation ---------------------------------------------------------------------------------
    assistant_only_loss: bool = _field(
        True, "messages rows: loss on the assistant turns only (arrtune train's default), or on every token."
    )
    prompt_completion_as_chat: bool = _field(
        True,
        "prompt/completion rows with string values: a user turn and an assistant turn through the chat "
        "template (True, for instruct models), or plain text, prompt + completion + EOS (False, TRL's standard "
        "format). arrtune eval asks the task's prompts through the chat template either way.",
    )
    precision: str = _field(
        "auto",
        "'fp32', 'bf16' (autocast), or 'auto': bf16 on a CUDA GPU that supports it and on a CPU with native "
        "bf16 matmul (AVX512-BF16 / AMX), else fp32.",
    )

    # ------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        """arrtune's meanings of HF fields, then ``TrainingArguments``' own checks: ``save_steps: 0`` turns
        checkpointing off, ``precision`` sets ``bf16`` (unless ``fp16`` is asked for)."""
        if self.precision in ("fp32", "bf16", "auto"):
            if self.precision == "fp32" and self.bf16:
                raise ValueError("bf16=True contradicts precision=fp32")
            if not self.fp16:
                self.bf16 = self.bf16 or use_bf16(self.precision)
        if isinstance(self.save_steps, (int, float)) and self.save_steps <= 0:
            self.save_strategy = "no"
        import torch

        if not torch.cuda.is_available():
            self.use_cpu = True  # what the Trainer would do, said explicitly (its bf16 check asks for it)
        self.validate()  # arrtune's rules first: they name the key
        TrainingArguments.__post_init__(self)

    def resolved_model_dtype(self) -> str:
        """model_dtype, with 'auto' turned into 'bfloat16' (bf16 training) or 'float32'."""
        if self.model_dtype != "auto":
            return self.model_dtype
        return "bfloat16" if self.bf16 else "float32"

    def resolved(self) -> TrainConfig:
        """A copy with the preset's coefficients and kl_on written in (what a run's ``config.yaml`` records)."""
        return dataclasses.replace(
            self,
            kl_coef=self.resolved_kl_coef(),
            replay_ratio=self.resolved_replay_ratio(),
            kl_on=self.resolved_kl_on(),
            model_dtype=self.resolved_model_dtype(),
        )

    def validate(self) -> TrainConfig:
        """Check every value (the ARR fields', then the recipe's); raise ``ArrtuneError`` naming the key.
        Returns self."""
        from transformers.trainer_utils import SchedulerType

        self.validate_arr()
        choices = {
            "precision": ("fp32", "bf16", "auto"),
            "model_dtype": ("auto", "bfloat16", "float16", "float32"),
            "lr_scheduler_type": tuple(s.value for s in SchedulerType),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ArrtuneError(f"config: {key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        checks = [
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("lora_r", self.lora_r > 0, "> 0"),
            ("lora_alpha", self.lora_alpha > 0, "> 0"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("per_device_train_batch_size", self.per_device_train_batch_size > 0, "> 0"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps > 0, "> 0"),
            ("num_train_epochs", self.max_steps > 0 or self.num_train_epochs > 0, "> 0 when max_steps <= 0"),
            ("logging_steps", self.logging_steps > 0, "> 0"),
            ("save_steps", self.save_steps >= 0, ">= 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0"),
            ("seed", 0 <= self.seed < 2**32, "in [0, 2**32)"),
            ("save_total_limit", self.save_total_limit >= 1, ">= 1"),
            ("num_train_epochs", self.num_train_epochs >= 0, ">= 0"),
            ("max_steps", self.max_steps < 2**31, "< 2**31"),
            ("lora_r", self.lora_r < 2**16, "< 65536"),
        ]
        for key in ("model", "data", "data_split", "output_dir"):
            if not str(getattr(self, key)).strip():
                checks.append((key, False, "a non-empty string"))
        targets = self.target_modules
        if not targets or (isinstance(targets, list) and not all(isinstance(t, str) and t for t in targets)):
            checks.append(("target_modules", False, "'all-linear' or a non-empty list of module names"))
        for key, ok, rule in checks:
            if not ok:
                raise ArrtuneError(f"config: {key}={getattr(self, key)!r} must be {rule}")
        if self.load_in_4bit:
            require_bitsandbytes("config: load_in_4bit")
        return self


def activation_checkpointing(cfg: TrainingArguments) -> tuple[bool, dict[str, Any] | None]:
    """(on, kwargs) of activation checkpointing, under either name of the fields."""
    on = getattr(cfg, "activation_checkpointing", None)
    if on is None:
        return bool(cfg.gradient_checkpointing), cfg.gradient_checkpointing_kwargs
    return bool(on), getattr(cfg, "activation_checkpointing_kwargs", None)


def require_bitsandbytes(where: str) -> None:
    """Raise ``ArrtuneError`` (naming ``where``) unless bitsandbytes can be imported."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ArrtuneError(f"{where}: 4-bit weights need bitsandbytes: pip install 'arrtune[qlora]'")
