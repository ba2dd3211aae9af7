"""The ``arrtune train`` recipe: config -> model + data -> ARRTrainer -> run directory.

A run directory holds ``config.yaml`` (resolved), ``adapter/`` (a standard PEFT adapter), ``metrics.jsonl``
(one record per logged step), ``train_summary.json`` and, while training, ``checkpoints/``. Running the same
config into the same directory again resumes from the last complete checkpoint; a different config is
refused unless ``overwrite`` is set.
"""

from __future__ import annotations

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

from arrtune.config import TrainConfig, dump_yaml_atomic
from arrtune.errors import ArrtuneError

log = logging.getLogger("arrtune")


def _use_bf16(precision: str) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _prepare_run_dir(cfg: TrainConfig, overwrite: bool, is_main: bool) -> tuple[Path, str | None]:
    """Create or reuse the run directory; returns it and the checkpoint to resume from (or None)."""
    from transformers.trainer_utils import get_last_checkpoint

    run_dir = Path(cfg.output_dir)
    saved = run_dir / "config.yaml"
    resolved = cfg.resolved().to_dict()
    if saved.is_file():
        previous = yaml.safe_load(saved.read_text(encoding="utf-8"))
        if previous != resolved and not overwrite:
            diff = sorted(
                k for k in set(previous or {}) | set(resolved) if (previous or {}).get(k) != resolved.get(k)
            )
            raise ArrtuneError(
                f"{run_dir}: holds another run (config differs in: {', '.join(diff)}); "
                "choose another output_dir or pass --overwrite"
            )
        if previous == resolved and not overwrite:
            ckpt_root = run_dir / "checkpoints"
            last = get_last_checkpoint(str(ckpt_root)) if ckpt_root.is_dir() else None
            return run_dir, last
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ArrtuneError(
            f"{run_dir}: exists and is not an arrtune run directory; pass --overwrite to reuse it"
        )
    if is_main:
        for name in ("adapter", "checkpoints", "metrics.jsonl", "train_summary.json"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml_atomic(resolved, saved)
    return run_dir, None


def _save_adapter_atomic(model: Any, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="adapter.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def train(cfg: TrainConfig, overwrite: bool = False) -> Path:
    """Train one LoRA adapter with the ARR loss; returns the run directory."""
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from arrtune.data.replay import ReplayStream
    from arrtune.data.sft import collate_sft, load_sft_examples
    from arrtune.models import load_model, load_tokenizer
    from arrtune.trainer import ARRSettings, ARRTrainer, MetricsJsonl

    cfg.validate()
    state = PartialState()
    run_dir, resume_from = _prepare_run_dir(cfg, overwrite, state.is_main_process)
    state.wait_for_everyone()

    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, stats = load_sft_examples(cfg.data, tokenizer, cfg.max_length, cfg.data_split)
    if stats.n_too_long or stats.n_empty_response:
        log.warning(
            "data: dropped %d of %d examples (%d longer than max_length=%d, %d with an empty response); first: %s",
            stats.n_in - stats.n_kept, stats.n_in, stats.n_too_long, cfg.max_length, stats.n_empty_response,
            stats.dropped_lines[:3],
        )  # fmt: skip
    kl_coef, replay_ratio = cfg.resolved_kl_coef(), cfg.resolved_replay_ratio()
    replay = None
    if replay_ratio > 0:
        replay = ReplayStream(
            cfg.replay, tokenizer, cfg.replay_text_field, rank=state.process_index, world_size=state.num_processes,
            seed=cfg.seed, hf_config=cfg.replay_config, hf_split=cfg.replay_split,
        )  # fmt: skip

    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, cfg.trust_remote_code)
    model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, lora)

    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=_use_bf16(cfg.precision),
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=cfg.save_total_limit,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=not cfg.progress_bar,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )
    settings = ARRSettings(
        kl_coef=kl_coef, kl_direction=cfg.kl_direction, kl_on=cfg.kl_on, kl_mask_target=cfg.kl_mask_target,
        kl_topk=cfg.kl_topk, kl_chunk_rows=cfg.kl_chunk_rows, replay_ratio=replay_ratio, replay_weight=cfg.replay_weight,
    )  # fmt: skip
    trainer = ARRTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=lambda batch: collate_sft(batch, tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[MetricsJsonl(run_dir / "metrics.jsonl")],
        arr=settings,
        replay=replay,
    )
    if resume_from:
        log.info("resuming from %s", resume_from)
        trainer.load_replay_state(resume_from)
        _truncate_metrics(
            run_dir / "metrics.jsonl", int(resume_from.rsplit("-", 1)[1]), state.is_main_process
        )
    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - started

    bad_step = getattr(trainer, "nonfinite_step", None)
    if bad_step is not None:
        raise ArrtuneError(
            f"training stopped: non-finite loss at step {bad_step}; the last good checkpoint (if any) is kept in "
            f"{run_dir / 'checkpoints'}; try a lower learning_rate"
        )
    if state.is_main_process:
        _save_adapter_atomic(trainer.model, run_dir / "adapter")
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
        }
        tmp = run_dir / "train_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, run_dir / "train_summary.json")
    state.wait_for_everyone()
    return run_dir


def _truncate_metrics(path: Path, step: int, is_main: bool) -> None:
    """Drop records logged after the checkpoint we resume from (they will be logged again)."""
    if not is_main or not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def _peak_memory() -> int:
    """Peak memory in bytes: CUDA max allocated on GPU, peak RSS of this process on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
