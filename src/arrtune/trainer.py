"""``ARRTrainer``: a ``transformers.Trainer`` whose loss step is the ARR objective.

The training loop, optimizer, schedule, gradient accumulation, mixed precision, distributed launch and
checkpointing are the Trainer's. This class only:

* draws a replay batch sized by ``replay_ratio`` x the SFT tokens of the micro-batch, packed to the SFT
  batch's width, and runs policy SFT + replay in **one** forward (one DDP forward per micro-batch);
* runs the reference (the same network with the LoRA adapter disabled, no gradient) on the rows that carry
  the KL, keeping only its final hidden states;
* combines the three terms with :func:`arrtune.losses.arr_loss` and logs each one (averaged over ranks);
* stops at the first non-finite loss, on every rank, and never checkpoints the diverged model;
* saves the replay stream position of every rank with each checkpoint, and writes checkpoints atomically.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from arrtune.data.replay import ReplayStream
from arrtune.errors import ArrtuneError
from arrtune.losses import IGNORE_INDEX, arr_loss, masked_mean, token_cross_entropy, token_kl

REPLAY_STATE = "replay_state_rank{rank}.json"
#: the logged loss terms, in the order they are reduced across ranks
TERMS = ("sft_loss", "replay_loss", "kl")


@dataclass
class ARRSettings:
    """The loss settings ``ARRTrainer`` reads (resolved from :class:`arrtune.config.TrainConfig`)."""

    kl_coef: float = 0.0
    kl_direction: str = "reverse"
    kl_on: str = "both"
    kl_mask_target: bool = False
    kl_topk: int = 0
    kl_chunk_rows: int = 1024
    kl_every: int = 1
    replay_ratio: float = 0.0
    replay_weight: float = 1.0


@contextmanager
def adapter_disabled(peft_model: Any):
    """Run the wrapped network as the initial model (PEFT adapter off); a no-op for plain models."""
    if hasattr(peft_model, "disable_adapter"):
        with peft_model.disable_adapter():
            yield
    else:
        yield


def _base_model(peft_model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (the model itself when it is not wrapped)."""
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def reference_hidden(peft_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states of the initial model (adapter disabled, no gradient): ``(B, T, H)``."""
    with torch.no_grad(), adapter_disabled(peft_model):
        return (
            _base_model(peft_model)
            .get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
            .last_hidden_state
        )


def reference_head(peft_model: Any):
    """The initial model's output layer as a function ``hidden -> logits``."""
    head = _base_model(peft_model).get_output_embeddings()

    def apply(hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), adapter_disabled(peft_model):
            return head(hidden)

    return apply


class ARRTrainer(Trainer):
    """``transformers.Trainer`` with the ARR loss: SFT CE + replay_weight x replay CE + kl_coef x KL."""

    def __init__(
        self, *args: Any, arr: ARRSettings, replay: ReplayStream | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.arr = arr
        self.replay = replay
        if arr.replay_ratio > 0 and replay is None:
            raise ValueError("replay_ratio > 0 needs a replay stream")
        self.model_accepts_loss_kwargs = False  # our loss is a per-micro-batch mean; Trainer scales for GA
        self._terms: dict[str, float] = {}
        self._term_counts: dict[str, int] = {}
        self._sft_tokens = 0
        self._last_log_time = time.perf_counter()
        self._last_logged_step = 0
        #: the optimizer step (1-based) whose loss was NaN or inf, once training stopped because of it
        self.nonfinite_step: int | None = None

    # -- the loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        arr = self.arr
        sft_ids, sft_labels, sft_mask = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
        n_sft_rows, width = sft_ids.shape
        n_sft_tokens = int(sft_mask.sum())
        ids, labels, attention = sft_ids, sft_labels, sft_mask
        if arr.replay_ratio > 0 and self.replay is not None:
            n_replay = max(1, round(arr.replay_ratio * n_sft_tokens))
            rb = self.replay.batch(n_replay, width, self.processing_class.pad_token_id)
            ids = torch.cat([ids, rb["input_ids"].to(ids.device)])
            labels = torch.cat([labels, rb["labels"].to(ids.device)])
            attention = torch.cat([attention, rb["attention_mask"].to(ids.device)])

        outputs = model(input_ids=ids, attention_mask=attention, use_cache=False)
        logits = outputs.logits[:, :-1]
        targets = labels[:, 1:]
        sft_loss = token_cross_entropy(logits[:n_sft_rows], targets[:n_sft_rows])
        replay_loss = (
            token_cross_entropy(logits[n_sft_rows:], targets[n_sft_rows:]) if len(ids) > n_sft_rows else None
        )

        kl = None
        # kl_every = n: the KL on one optimizer step in n, weighted n x (same expected penalty, 1/n the cost)
        kl_coef = arr.kl_coef * arr.kl_every if self.state.global_step % arr.kl_every == 0 else 0.0
        if kl_coef > 0:
            rows = {"sft": slice(0, n_sft_rows), "replay": slice(n_sft_rows, None), "both": slice(None)}[
                arr.kl_on
            ]
            kl_mask = targets[rows] != IGNORE_INDEX
            if kl_mask.any():
                peft_model = self.accelerator.unwrap_model(model)
                hidden = reference_hidden(peft_model, ids[rows], attention[rows])[:, :-1]
                mask_targets = None
                if arr.kl_mask_target:  # only SFT rows drop their target; they come first among the KL rows
                    mask_targets = targets[rows].clone()
                    mask_targets[0 if arr.kl_on == "replay" else n_sft_rows :] = IGNORE_INDEX
                kl_tok = token_kl(
                    logits[rows], hidden, reference_head(peft_model), kl_mask,
                    direction=arr.kl_direction, topk=arr.kl_topk, targets=mask_targets, chunk_rows=arr.kl_chunk_rows,
                )  # fmt: skip
                kl = masked_mean(kl_tok, kl_mask)

        loss = arr_loss(sft_loss, replay_loss, kl, arr.replay_weight, kl_coef)
        self._record(sft_loss=sft_loss, replay_loss=replay_loss, kl=kl)
        self._sft_tokens += n_sft_tokens
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        """One micro-batch; a NaN/inf loss on any rank stops training on every rank before the next save."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss).all()) else 1.0], device=loss.device)
        if self.args.world_size > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if float(bad[0]) > 0 and self.nonfinite_step is None:
            self.nonfinite_step = self.state.global_step + 1
            self.control.should_training_stop = True
        return loss

    # -- logging -------------------------------------------------------------------------------------
    def _record(self, **terms: torch.Tensor | None) -> None:
        for name, value in terms.items():
            if value is not None:
                self._terms[name] = self._terms.get(name, 0.0) + float(value.detach())
                self._term_counts[name] = self._term_counts.get(name, 0) + 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # type: ignore[override]
        if "loss" in logs:
            # sums and counts of every rank's micro-batch means (the Trainer calls log on all ranks)
            totals = torch.tensor(
                [[self._terms.get(n, 0.0), float(self._term_counts.get(n, 0))] for n in TERMS]
                + [[float(self._sft_tokens), 0.0]],
                dtype=torch.float64,
                device=self.args.device,
            )
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            totals = totals.cpu().tolist()
            for name, (total, count) in zip(TERMS, totals):
                if count > 0:
                    logs[name] = total / count
            now = time.perf_counter()
            elapsed = max(now - self._last_log_time, 1e-9)
            if "learning_rate" in logs:
                logs["lr"] = logs["learning_rate"]
            logs["sft_tokens_per_s"] = totals[-1][0] / elapsed
            logs["step_time_s"] = elapsed / max(self.state.global_step - self._last_logged_step, 1)
            self._last_logged_step = self.state.global_step
            self._terms, self._term_counts, self._sft_tokens = {}, {}, 0
            self._last_log_time = now
            if self.nonfinite_step is None and not all(
                math.isfinite(logs[k]) for k in ("loss", *TERMS) if k in logs
            ):  # the same values on every rank, so every rank stops
                self.control.should_training_stop = True
                self.nonfinite_step = self.state.global_step
        super().log(logs, start_time)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:  # type: ignore[override]
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:  # type: ignore[override]
        """Write the checkpoint in a staging directory, add the replay position, then rename it into place."""
        if self.nonfinite_step is not None:
            return  # never checkpoint a diverged model
        root = self.args.output_dir
        staging = os.path.join(root, ".staging")
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save and os.path.exists(os.path.join(staging, name)):
            shutil.rmtree(os.path.join(staging, name))
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        if self.replay is not None:  # every rank's position, written by the main process
            states = gather_object([self.replay.state_dict()])
            if self.args.should_save:
                for state in states:
                    path = Path(staging, name, REPLAY_STATE.format(rank=state["rank"]))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(state))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(root, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            rotate_checkpoints(output_dir=root, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def load_replay_state(self, checkpoint: str) -> None:
        """Restore this rank's replay stream position (and the step bookkeeping) from a checkpoint directory."""
        step = Path(checkpoint).name.rsplit("-", 1)[-1]
        self._last_logged_step = int(step) if step.isdigit() else 0
        if self.replay is None:
            return
        path = Path(checkpoint, REPLAY_STATE.format(rank=self.args.process_index))
        if not path.is_file():
            raise ArrtuneError(
                f"{checkpoint}: no replay position for rank {self.args.process_index} "
                "(saved with a different number of processes?)"
            )
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArrtuneError(f"{path}: unreadable replay position ({exc})") from exc
        self.replay.load_state_dict(state)


class MetricsJsonl(TrainerCallback):
    """Append every log record (with its step) to ``metrics.jsonl`` on the main process."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[override]
        if state.is_world_process_zero and logs:
            record = {
                "step": state.global_step,
                **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
            }
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
