"""The ``arrtune train`` recipe: config -> model + data -> ARRTrainer -> run directory.

A run directory holds ``config.yaml`` (resolved), ``adapter/`` (a standard PEFT adapter), ``metrics.jsonl``
(one record per logged step), ``train_summary.json`` and, while training, ``checkpoints/``. Running the same
config into the same directory again resumes from the last complete checkpoint (model, optimizer, schedule,
RNG states, data order and replay position, so the result matches an uninterrupted run), or does nothing
when the run already finished; a different config is refused unless ``overwrite`` is set.

Every input (model, tokenizer, SFT data, replay corpus) is read before anything is written, so bad input
leaves an existing run directory as it was. A NaN or inf loss stops training at that step, keeps the
checkpoints saved before it and writes no adapter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from arrtune.atomic import write_atomic
from arrtune.checkpoint import (
    LOCK_NAME,
    hold_lock,
    last_complete_checkpoint,
    release_lock,
)
from arrtune.config import TrainConfig, dump_yaml_atomic
from arrtune.errors import ArrtuneError

log = logging.getLogger("arrtune")


#: config keys that do not change what is trained: a run may be resumed with another value
COSMETIC_KEYS = ("disable_tqdm", "local_rank", "logging_dir", "use_cpu")


def _config_diff(previous: Any, resolved: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a saved config and this one (cosmetic keys ignored)."""
    previous = previous if isinstance(previous, dict) else {}
    keys = (set(previous) | set(resolved)) - set(COSMETIC_KEYS)
    return sorted(str(k) for k in keys if previous.get(k) != resolved.get(k))


def _plan_run_dir(cfg: TrainConfig, overwrite: bool) -> tuple[Path, str | None, bool]:
    """Decide what to do with the run directory, writing nothing.

    Returns the directory, the checkpoint to resume from (or None) and whether the same run already finished.
    Raises ``ArrtuneError`` when the directory holds something else and ``overwrite`` is off.
    """
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ArrtuneError(f"{run_dir}: output_dir exists and is not a directory")
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            previous = yaml.safe_load(saved.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            previous = None
        diff = _config_diff(previous, cfg.resolved().to_dict())
        if overwrite:
            return run_dir, None, False
        if diff:
            raise ArrtuneError(
                f"{run_dir}: holds another run (config differs in: {', '.join(diff)}); "
                "choose another output_dir or pass --overwrite"
            )
        finished = run_dir / "train_summary.json", run_dir / "adapter" / "adapter_config.json"
        if all(p.is_file() for p in finished):
            return run_dir, None, True
        last = last_complete_checkpoint(run_dir / "checkpoints", cfg.resolved_replay_ratio() > 0)
        return run_dir, last, False
    if run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()) and not overwrite:
        raise ArrtuneError(
            f"{run_dir}: exists and is not an arrtune run directory; pass --overwrite to reuse it"
        )
    return run_dir, None, False


def _init_run_dir(run_dir: Path, cfg: TrainConfig, resume_from: str | None) -> None:
    """On the main process: a fresh run clears earlier outputs and records its config; a resume changes
    nothing here (the metrics logged after its checkpoint are dropped once the checkpoint has loaded)."""
    if resume_from:
        return
    for name in ("adapter", "checkpoints", "metrics.jsonl", "train_summary.json", "eval.json"):
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml_atomic(cfg.resolved().to_dict(), run_dir / "config.yaml")


def _save_adapter_atomic(model: Any, target: Path, base_id: str | None = None) -> None:
    """Save the PEFT adapter into ``target`` atomically (0755, like a plain ``save_pretrained``), naming
    ``base_id`` as its base model when given."""
    tmp = Path(tempfile.mkdtemp(prefix="adapter.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        if base_id:
            from arrtune.models import name_base_model

            name_base_model(model, base_id)
        model.save_pretrained(tmp, safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def training_arguments(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """What the Trainer receives: the config itself, with its checkpoints in ``run_dir/checkpoints`` (built
    before anything is read or written, so that a value transformers refuses fails first, as one line)."""
    from arrtune.config import build_config

    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    values["output_dir"] = str(run_dir / "checkpoints")
    return build_config(values, "config")


def check_writable(directory: Path) -> None:
    """Raise ``ArrtuneError`` unless ``directory`` is, or can be created as, a writable directory (checked
    before the model is loaded: a read-only file system, a file in the path, no permission)."""
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ArrtuneError(f"{directory}: cannot be created, {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(probe) else "no permission to write"
        raise ArrtuneError(f"{directory}: cannot write there ({probe}: {reason})")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def train(cfg: TrainConfig, overwrite: bool = False) -> Path:
    """Train one LoRA adapter with the ARR loss; returns the run directory. The run directory's lock is
    released when training ends, however it ends."""
    try:
        return _train(cfg, overwrite)
    finally:
        release_lock(Path(cfg.output_dir) / LOCK_NAME)


def _train(cfg: TrainConfig, overwrite: bool) -> Path:
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from peft import LoraConfig, get_peft_model

    from arrtune.data.replay import MixedReplay, ReplayStream
    from arrtune.data.self_replay import load_prompts
    from arrtune.data.sft import collate_sft, load_sft_examples
    from arrtune.models import load_model, load_tokenizer
    from arrtune.trainer import ARRTrainer, MetricsJsonl

    cfg.validate()
    # cpu=True on a machine without CUDA: otherwise ranks started by torchrun would not see each other until
    # TrainingArguments is built, and every rank would read the whole replay stream
    state = PartialState(cpu=not torch.cuda.is_available())
    # the main process decides (reading only) and tells the others, so that every rank agrees or fails alike
    outcome: list[Any] = [None]
    if state.is_main_process:
        try:
            outcome = [_plan_run_dir(cfg, overwrite)]
        except ArrtuneError as exc:
            outcome = [str(exc)]
    if state.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    if isinstance(outcome[0], str):
        raise ArrtuneError(outcome[0])
    run_dir, resume_from, complete = outcome[0]
    run_dir = Path(run_dir)
    if complete:
        log.info(
            "%s: this run is already complete (same config); pass --overwrite to train it again", run_dir
        )
        return run_dir

    args = training_arguments(cfg, run_dir)
    if state.is_main_process:
        check_writable(run_dir)
        from arrtune.models import cache_dir

        check_writable(cache_dir())
    # read every input before writing anything, so that bad input leaves the run directory as it was
    with state.main_process_first():  # a GGUF model is converted once, by the main process
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, stats = load_sft_examples(cfg.data, tokenizer, cfg.max_length, cfg.data_split)
    if stats.n_too_long or stats.n_empty_response:
        log.warning(
            "data: dropped %d of %d examples (%d longer than max_length=%d, %d with an empty response); first: %s",
            stats.n_in - stats.n_kept, stats.n_in, stats.n_too_long, cfg.max_length, stats.n_empty_response,
            stats.dropped_lines[:3],
        )  # fmt: skip
    kl_coef, replay_ratio = cfg.resolved_kl_coef(), cfg.resolved_replay_ratio()
    self_share = cfg.resolved_replay_mix() if replay_ratio > 0 else 0.0
    replay: ReplayStream | MixedReplay | None = None
    if replay_ratio > 0 and self_share < 1:
        replay = ReplayStream(
            cfg.replay, tokenizer, cfg.replay_text_field, rank=state.process_index, world_size=state.num_processes,
            seed=cfg.seed, hf_config=cfg.replay_config, hf_split=cfg.replay_split,
        )  # fmt: skip
    prompts = load_prompts(cfg.replay_prompts) if self_share > 0 else []

    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, cfg.trust_remote_code, getattr(torch, cfg.resolved_model_dtype()))
    self_replay_info: dict[str, Any] = {}
    if self_share > 0:
        own = _self_replay_stream(
            cfg, model, tokenizer, prompts, examples, self_share, state, self_replay_info
        )
        replay = own if replay is None else MixedReplay(own, replay, self_share)
    model.config.use_cache = False
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ArrtuneError(f"config: target_modules={cfg.target_modules!r}: {exc}") from exc

    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        hold_lock(run_dir / LOCK_NAME, f"{run_dir}: this run directory")  # until this process ends
        _init_run_dir(run_dir, cfg, resume_from)
    state.wait_for_everyone()
    trainer = ARRTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=lambda batch: collate_sft(batch, tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[MetricsJsonl(run_dir / "metrics.jsonl", after_resume=_checkpoint_step(resume_from))],
        replay=replay,
    )
    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    done_step = _final_step(resume_from)
    if done_step is not None:
        # stopped after the last checkpoint but before the adapter: the checkpoint is the result (the Trainer
        # would run one step too many when resuming at max_steps in the middle of an epoch)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        log.info("%s holds the last step (%d): writing the adapter from it", resume_from, done_step)
        set_peft_model_state_dict(model, load_file(Path(resume_from) / "adapter_model.safetensors"))
        trainer.state.global_step = done_step
    elif resume_from:
        log.info("resuming from %s", resume_from)
        trainer.load_replay_state(resume_from)
        trainer.train(resume_from_checkpoint=resume_from)
    else:
        trainer.train()
    wall = time.perf_counter() - started

    if trainer.nonfinite_step is not None:
        good = last_complete_checkpoint(run_dir / "checkpoints", replay is not None)
        kept = f"the last good checkpoint is kept: {good}" if good else "no checkpoint was saved before it"
        raise ArrtuneError(
            f"training stopped: non-finite loss (NaN or inf) at step {trainer.nonfinite_step}; {kept}; "
            "no adapter was written; try a lower learning_rate"
        )
    if state.is_main_process:
        from arrtune.models import shareable_base_id

        _save_adapter_atomic(trainer.model, run_dir / "adapter", shareable_base_id(cfg.model))
        summary = {
            "steps": trainer.state.global_step,
            "wall_s": wall,
            "examples": stats.n_kept,
            "dropped_too_long": stats.n_too_long,
            "dropped_empty_response": stats.n_empty_response,
            "kl_coef": kl_coef,
            "replay_ratio": replay_ratio,
            "bf16": args.bf16,
            "peak_memory_bytes": _peak_memory(),
            "resumed_from": resume_from,
            **self_replay_info,
        }
        write_atomic(run_dir / "train_summary.json", json.dumps(summary, indent=2))
    state.wait_for_everyone()
    return run_dir


def _self_replay_stream(cfg: TrainConfig, model: Any, tokenizer: Any, prompts: list[str],
                        examples: list[dict[str, list[int]]], self_share: float, state: Any,
                        info: dict[str, Any]) -> Any:  # fmt: skip
    """The base model's answers to the self-replay prompts as a replay stream (generated once, cached; the
    main process generates first, the other ranks read its cache). ``info`` receives the generation cost."""
    import math

    from arrtune.data.replay import ReplayStream
    from arrtune.data.self_replay import (
        GenerationSettings,
        cache_path,
        conversations,
        generate_answers,
        token_budget,
    )
    from arrtune.models import cache_dir

    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * state.num_processes
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * len(examples) / per_step)
    mean_tokens = sum(len(e["input_ids"]) for e in examples) / len(examples)
    budget = token_budget(mean_tokens, per_step, steps, cfg.resolved_replay_ratio(), self_share)
    settings = GenerationSettings(cfg.replay_temperature, cfg.replay_top_p, cfg.replay_max_new_tokens)
    model_key = f"{cfg.model}|{getattr(model.config, '_name_or_path', '')}|{model.num_parameters()}"
    path = cache_path(cache_dir(), model_key, prompts, settings)
    with state.main_process_first():
        rows, seconds = generate_answers(
            model, tokenizer, prompts, budget, settings, path, not cfg.disable_tqdm
        )
    docs = conversations(tokenizer, rows)
    if len(docs) < state.num_processes:
        raise ArrtuneError("replay: the base model gave no usable self-replay answers (all empty)")
    info.update({"self_replay_answers": len(docs), "self_replay_tokens": sum(len(d[0]) for d in docs),
                 "self_replay_generation_s": seconds, "self_replay_cache": str(path)})  # fmt: skip
    log.info("self-replay: %d answers, %d tokens (%s, %.0f s generating)", len(docs),
             info["self_replay_tokens"], path, seconds)  # fmt: skip
    return ReplayStream("self", tokenizer, rank=state.process_index, world_size=state.num_processes,
                        seed=cfg.seed, documents=docs)  # fmt: skip


def _final_step(checkpoint: str | None) -> int | None:
    """The checkpoint's step when it is the run's last one (``global_step >= max_steps``), else None."""
    if checkpoint is None:
        return None
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        step, last = int(state["global_step"]), int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArrtuneError(f"{checkpoint}: unreadable trainer_state.json ({exc})") from exc
    return step if last > 0 and step >= last else None


def _checkpoint_step(checkpoint: str | None) -> int | None:
    return None if checkpoint is None else int(Path(checkpoint).name.rsplit("-", 1)[1])


def _peak_memory() -> int:
    """Peak memory in bytes: CUDA max allocated on GPU, peak RSS of this process on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
