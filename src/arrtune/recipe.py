"""The ``arrtune train`` recipe: config -> run directory, as six stages read top to bottom.

1. :func:`plan` the run directory (reading only: fresh, resume, or already complete);
2. :func:`load_inputs`: tokenizer, SFT examples, replay corpus, self-replay prompts;
3. :func:`load_base_model`: the base weights (``model_dtype``, or 4-bit NF4 with ``load_in_4bit``), the
   self-replay answers it generates, then the LoRA adapter;
4. :func:`build_trainer`: the first write to the run directory, then :class:`arrtune.trainer.ARRTrainer`;
5. :func:`run_training`: train, resume, or finish from the last checkpoint;
6. :func:`write_outputs`: the adapter and ``train_summary.json``.

Every input is read before anything is written, so bad input leaves an existing run directory as it was.
Running the same config into the same directory again resumes from the last complete checkpoint (the
result matches an uninterrupted run) or does nothing when the run already finished; a different config is
refused unless ``overwrite`` is set. A NaN or inf loss stops training at that step, keeps the checkpoints
saved before it and writes no adapter. What is in a run directory: :mod:`arrtune.rundir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from arrtune.atomic import write_atomic
from arrtune.config import TrainConfig, activation_checkpointing
from arrtune.errors import ArrtuneError
from arrtune.locks import release_lock
from arrtune.rundir import (
    LOCK_NAME,
    RunPlan,
    check_writable,
    checkpoint_step,
    final_step,
    last_complete_checkpoint,
    plan_run,
    save_adapter,
    start_run,
)

log = logging.getLogger("arrtune")


def train(cfg: TrainConfig, overwrite: bool = False) -> Path:
    """Train one LoRA adapter with the ARR loss; returns the run directory. The run directory's lock is
    released when training ends, however it ends."""
    try:
        return _train(cfg, overwrite)
    finally:
        release_lock(Path(cfg.output_dir) / LOCK_NAME)


def _train(cfg: TrainConfig, overwrite: bool) -> Path:
    from accelerate import PartialState

    cfg.validate()
    # cpu=True on a machine without CUDA: otherwise ranks started by torchrun would not see each other until
    # TrainingArguments is built, and every rank would read the whole replay stream
    state = PartialState(cpu=not torch.cuda.is_available())
    run = plan(cfg, overwrite, state)
    if run.complete:
        log.info(
            "%s: this run is already complete (same config); pass --overwrite to train it again", run.run_dir
        )
        return run.run_dir
    args = training_arguments(cfg, run.run_dir)
    check_inputs(cfg)
    inputs = load_inputs(cfg, state)
    model, replay, self_replay_info = load_base_model(cfg, inputs, state)
    trainer = build_trainer(cfg, args, run, model, inputs, replay, state)
    wall = run_training(trainer, run)
    write_outputs(cfg, trainer, run, inputs, wall, self_replay_info, state)
    return run.run_dir


# -- 1. plan ---------------------------------------------------------------------------------------------
def plan(cfg: TrainConfig, overwrite: bool, state: Any) -> RunPlan:
    """The main process plans (reading only) and tells the others, so every rank agrees or fails alike; it
    also checks that the run and cache directories are writable before anything is loaded."""
    from accelerate.utils import broadcast_object_list

    from arrtune.models import cache_dir

    outcome: list[Any] = [None]
    if state.is_main_process:
        try:
            outcome = [plan_run(cfg, overwrite)]
            if not outcome[0].complete:
                check_writable(outcome[0].run_dir)
                check_writable(cache_dir())
        except ArrtuneError as exc:
            outcome = [str(exc)]
    if state.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    if isinstance(outcome[0], str):
        raise ArrtuneError(outcome[0])
    return outcome[0]


def training_arguments(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """What the Trainer receives: the config itself, with its checkpoints in ``run_dir/checkpoints`` (built
    before anything is read or written, so that a value transformers refuses fails first, as one line)."""
    from arrtune.config_files import build_config

    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    values["output_dir"] = str(run_dir / "checkpoints")
    return build_config(values, "config")


def check_inputs(cfg: TrainConfig) -> None:
    """What can be checked before the model is loaded and anything is written, beyond the config's own
    values: the ``task_eval`` file (exists, parses, every row has a response to score), and transformers' own
    ``Trainer`` checks of the training arguments (trackers, evaluation strategy, ...), run by building a
    ``Trainer`` around a stand-in model in a temporary directory. Raises ``ArrtuneError``."""
    import tempfile

    from transformers import Trainer
    from transformers.trainer_utils import IntervalStrategy

    from arrtune.data.sft import read_held_out

    if cfg.task_eval:
        read_held_out(cfg.task_eval, "task_eval")
    held_out = bool(cfg.task_eval) or cfg.data.startswith("builtin:")
    if cfg.eval_strategy != "no" and not held_out:
        raise ArrtuneError(
            f"config: eval_strategy={IntervalStrategy(cfg.eval_strategy).value} evaluates on held-out examples "
            "of the task: set task_eval=FILE (or train a built-in task)"
        )
    with tempfile.TemporaryDirectory(prefix="arrtune-check-") as tmp:
        args = dataclasses.replace(cfg, output_dir=tmp, push_to_hub=False)
        try:
            Trainer(model=_StandIn(), args=args, train_dataset=[{}], eval_dataset=[{}] if held_out else None)
        except ArrtuneError:
            raise
        except Exception as exc:  # noqa: BLE001 (the Trainer raises ValueError, RuntimeError, ImportError, ...)
            raise ArrtuneError(f"config: {' '.join(str(exc).split()) or type(exc).__name__}") from exc


class _StandIn(torch.nn.Module):
    """The smallest model a ``transformers.Trainer`` accepts (for :func:`check_inputs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))


# -- 2. inputs -------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """Everything read from disk (or the Hub) before the model is loaded."""

    tokenizer: Any
    examples: list[dict[str, list[int]]]
    stats: Any  # arrtune.data.sft.LoadStats: what was kept and dropped
    corpus: Any = None  # arrtune.data.replay.ReplayStream over the replay corpus (None: no corpus replay)
    prompts: list[str] = field(default_factory=list)  # self-replay prompts (empty: no self-replay)
    #: held-out task examples that ``eval_strategy`` evaluates on (empty: no evaluation during training)
    eval_examples: list[dict[str, list[int]]] = field(default_factory=list)


def load_inputs(cfg: TrainConfig, state: Any) -> Inputs:
    """Tokenizer, SFT examples, the replay corpus stream (sharded per rank) and the self-replay prompts."""
    from arrtune.data.replay import corpus_stream
    from arrtune.data.self_replay import check_chat_template, load_prompts
    from arrtune.data.sft import load_sft_examples
    from arrtune.models import load_tokenizer

    with state.main_process_first():  # a GGUF model is converted once, by the main process
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, stats = load_sft_examples(cfg.data, tokenizer, cfg.max_length, cfg.data_split,
                                        cfg.prompt_completion_as_chat)  # fmt: skip
    if stats.n_too_long or stats.n_empty_response:
        log.warning(
            "data: dropped %d of %d examples (%d longer than max_length=%d, %d with an empty response); first: %s",
            stats.n_in - stats.n_kept, stats.n_in, stats.n_too_long, cfg.max_length, stats.n_empty_response,
            stats.dropped_lines[:3],
        )  # fmt: skip
    replay_on = cfg.resolved_replay_ratio() > 0
    self_share = cfg.resolved_replay_mix() if replay_on else 0.0
    inputs = Inputs(tokenizer, examples, stats)
    if replay_on and self_share < 1:
        inputs.corpus = corpus_stream(
            cfg, tokenizer, state
        )  # read now: a bad corpus fails before the model loads
    if self_share > 0:
        check_chat_template(cfg, tokenizer)
        inputs.prompts = load_prompts(cfg.replay_prompts)
    if cfg.eval_strategy != "no":  # the task's held-out examples: task_eval, or a built-in task's test split
        source, split = (cfg.task_eval, "train") if cfg.task_eval else (cfg.data, "test")
        inputs.eval_examples = load_sft_examples(source, tokenizer, cfg.max_length, split,
                                                 cfg.prompt_completion_as_chat)[0]  # fmt: skip
    return inputs


# -- 3. model --------------------------------------------------------------------------------------------
def load_base_model(cfg: TrainConfig, inputs: Inputs, state: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The base model with a fresh LoRA adapter, the replay stream (corpus, self-replay generated by the
    base model before the adapter exists, or both mixed) and the self-replay generation record."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from arrtune.data.replay import build_replay
    from arrtune.models import load_model

    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, cfg.trust_remote_code, getattr(torch, cfg.resolved_model_dtype()),
                       load_in_4bit=cfg.load_in_4bit)  # fmt: skip
    # the base model answers the self-replay prompts before it has an adapter
    model_key = f"{cfg.model}|{getattr(model.config, '_name_or_path', '')}|{model.num_parameters()}"
    replay, info = build_replay(cfg, inputs.tokenizer, inputs.examples, model, state, inputs.corpus,
                                inputs.prompts or None, model_key)  # fmt: skip
    model.config.use_cache = False
    if (
        cfg.load_in_4bit
    ):  # PEFT's k-bit preparation: norms/embeddings in float32, input grads for checkpointing
        checkpointing, checkpointing_kwargs = activation_checkpointing(cfg)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing_kwargs)  # fmt: skip
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ArrtuneError(f"config: target_modules={cfg.target_modules!r}: {exc}") from exc
    return model, replay, info


# -- 4. trainer ------------------------------------------------------------------------------------------
def build_trainer(cfg: TrainConfig, args: TrainConfig, run: RunPlan, model: Any, inputs: Inputs, replay: Any,
                  state: Any) -> Any:  # fmt: skip
    """The first write (lock the run directory; a fresh run clears it and records its config), then the
    trainer."""
    from arrtune.trainer import ARRTrainer
    from arrtune.trainer_callbacks import MetricsJsonl

    if state.is_main_process:
        start_run(run, cfg)
    state.wait_for_everyone()
    # logging_dir reaches transformers' TensorBoard callback, which reads it when the Trainer builds it
    with environment(
        "TENSORBOARD_LOGGING_DIR", str(Path(cfg.logging_dir).expanduser()) if cfg.logging_dir else None
    ):
        return ARRTrainer(
            model=model,
            args=args,
            train_dataset=inputs.examples,
            eval_dataset=inputs.eval_examples or None,
            processing_class=inputs.tokenizer,  # the trainer pads its batches with this tokenizer's pad id
            callbacks=[
                MetricsJsonl(run.run_dir / "metrics.jsonl", after_resume=checkpoint_step(run.resume_from))
            ],
            replay=replay,
        )


@contextmanager
def environment(name: str, value: str | None) -> Iterator[None]:
    """Within the block, environment variable ``name`` is ``value`` (unchanged when None); then as before, so
    that one run's setting does not reach the next run in this process. Only ``name`` is restored: what the
    block sets besides it stays (``unittest.mock.patch.dict(os.environ)`` would undo that too)."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# -- 5. train --------------------------------------------------------------------------------------------
def run_training(trainer: Any, run: RunPlan) -> float:
    """Train (or resume); returns the wall time. A run stopped after its last checkpoint but before its
    adapter takes the checkpoint as its result (the Trainer would run one step too many when resuming at
    max_steps in the middle of an epoch). Raises ``ArrtuneError`` when the loss became NaN or inf."""
    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    done_step = final_step(run.resume_from)
    if done_step is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        log.info("%s holds the last step (%d): writing the adapter from it", run.resume_from, done_step)
        set_peft_model_state_dict(
            trainer.model, load_file(Path(run.resume_from) / "adapter_model.safetensors")
        )
        trainer.state.global_step = done_step
    elif run.resume_from:
        log.info("resuming from %s", run.resume_from)
        trainer.load_replay_state(run.resume_from)
        trainer.train(resume_from_checkpoint=run.resume_from)
    else:
        trainer.train()
    if trainer.nonfinite_step is not None:
        good = last_complete_checkpoint(run.run_dir / "checkpoints", trainer.replay is not None)
        kept = f"the last good checkpoint is kept: {good}" if good else "no checkpoint was saved before it"
        raise ArrtuneError(
            f"training stopped: non-finite loss (NaN or inf) at step {trainer.nonfinite_step}; {kept}; "
            "no adapter was written; try a lower learning_rate"
        )
    return time.perf_counter() - started


# -- 6. outputs ------------------------------------------------------------------------------------------
def write_outputs(cfg: TrainConfig, trainer: Any, run: RunPlan, inputs: Inputs, wall: float,
                  self_replay_info: dict[str, Any], state: Any) -> None:  # fmt: skip
    """The adapter (naming the upstream Hub id of a built-in base) and ``train_summary.json``."""
    from arrtune.models import shareable_base_id

    if state.is_main_process:
        save_adapter(trainer.model, run.run_dir / "adapter", shareable_base_id(cfg.model))
        stats = inputs.stats
        summary = {
            "steps": trainer.state.global_step,
            "wall_s": wall,
            "examples": stats.n_kept,
            "dropped_too_long": stats.n_too_long,
            "dropped_empty_response": stats.n_empty_response,
            "kl_coef": trainer.kl_coef,
            "replay_ratio": trainer.replay_ratio,
            "bf16": trainer.args.bf16,
            "load_in_4bit": cfg.load_in_4bit,
            "peak_memory_bytes": _peak_memory(),
            "resumed_from": run.resume_from,
            **self_replay_info,
        }
        write_atomic(run.run_dir / "train_summary.json", json.dumps(summary, indent=2))
    state.wait_for_everyone()


def _peak_memory() -> int:
    """Peak memory in bytes: CUDA max allocated on GPU, peak RSS of this process on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
