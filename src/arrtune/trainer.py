"""``ARRTrainer``: a ``transformers.Trainer`` whose loss step is the ARR objective.

The training loop, optimizer, schedule, gradient accumulation, mixed precision, distributed launch and
checkpointing are the Trainer's. This class only:

* draws a replay batch sized by ``replay_ratio`` x the SFT tokens of the micro-batch, packed to the SFT
  batch's width (or, when it fills less than one such row, into one row of its own length), and runs the
  SFT rows and the replay rows as **two forward/backward passes** (the first under ``no_sync``, so DDP still reduces gradients once per micro-batch): activations of only one of them
  are alive at a time, so replay does not raise peak memory;
* runs the reference (the same network with the LoRA adapter disabled, no gradient) on the rows that carry
  the KL, keeping only its final hidden states;
* weighs every token as the specification does (:func:`arrtune.losses.token_weights`, once per micro-batch)
  and computes each pass's CE and KL from the final hidden states in chunks
  (:func:`arrtune.losses.part_loss`, the pass-by-pass form of :func:`arrtune.losses.chunked_arr_loss`), so
  no ``B x T x V`` logits block is built, and logs each term (averaged over ranks);
* with a ``drift_budget``, adapts ``kl_coef`` after every optimizer step (:mod:`arrtune.budget`) from the
  drift on a few set-aside replay documents or from the loss's own KL;
* stops at the first non-finite loss, on every rank, and never checkpoints the diverged model;
* saves the replay stream position of every rank with each checkpoint (written atomically by
  :class:`arrtune.rundir.StagedCheckpoints`).

The objective per micro-batch: ``mean CE(SFT label tokens) + replay_weight * mean CE(replay tokens)
+ kl_coef * mean KL(KL tokens)``, the means over all tokens of the micro-batch whatever pass they are in.
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import Trainer

from arrtune.budget import DriftProbe, KLController
from arrtune.config import ARRConfig
from arrtune.data.replay import MixedReplay, ReplayStream, build_replay
from arrtune.errors import ArrtuneError
from arrtune.lm import InitialModel, base_model, check_reference, output_head
from arrtune.losses import IGNORE_INDEX, PartWeights, default_chunk_rows, part_loss, token_weights
from arrtune.rundir import StagedCheckpoints
from arrtune.trainer_callbacks import ControllerStep
from arrtune.trainer_inputs import sft_collator, tokenized_dataset
from arrtune.trainer_state import read_controller, read_replay_state, write_rank_states

#: the logged loss terms, in the order they are reduced across ranks
TERMS = ("sft_loss", "replay_loss", "kl")


@dataclass
class _Part:
    """SFT or replay rows of one micro-batch, with the weights of their tokens' loss terms."""

    name: str
    ids: torch.Tensor
    labels: torch.Tensor
    attention: torch.Tensor
    weights: PartWeights  # per-token CE and KL weights of the shifted labels (losses.token_weights)
    mask_target: bool = False  # kl_mask_target on these rows


class ARRTrainer(StagedCheckpoints, Trainer):
    """``transformers.Trainer`` with the ARR loss: SFT CE + replay_weight x replay CE + kl_coef x KL.

    Used as TRL's ``SFTTrainer`` is: ``ARRTrainer(model=..., args=ARRConfig(...), train_dataset=ds,
    processing_class=tokenizer, peft_config=LoraConfig(...))``. Rows in TRL's formats (``messages``;
    ``prompt``/``completion`` as strings or messages; ``text``; or already tokenized) are tokenized here
    (:func:`arrtune.data.sft.tokenize_row`); unless ``replay`` is given, the replay stream is built from
    ``args`` (:func:`arrtune.data.replay.build_replay`: the ``replay`` corpus, the model's own answers with
    its adapter off, or both by ``replay_mix``). The KL's reference is the model with its adapter switched off, so a KL needs a PEFT model (or
    ``peft_config``) whose initialisation leaves the base weights as loaded."""

    args: ARRConfig

    def __init__(
        self,
        model: Any = None,
        args: ARRConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *rest: Any,
        replay: ReplayStream | MixedReplay | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, ARRConfig):
            raise TypeError("ARRTrainer reads its loss settings from args: pass an arrtune.ARRConfig")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if args.resolved_kl_coef() > 0:
            check_reference(model)
        if processing_class is not None:
            train_dataset = tokenized_dataset(train_dataset, processing_class, args, "train_dataset")
            eval_dataset = tokenized_dataset(eval_dataset, processing_class, args, "eval_dataset")
            if data_collator is None:
                data_collator = sft_collator(processing_class)
        #: the self-replay generation record (answers, tokens, seconds, cache file); empty without self-replay
        self.self_replay_info: dict[str, Any] = {}
        if processing_class is not None and replay is None and args.resolved_replay_ratio() > 0:
            from accelerate import PartialState

            replay, self.self_replay_info = build_replay(args, processing_class, train_dataset, model,
                                                         PartialState())  # fmt: skip
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, *rest,
                         **kwargs)  # fmt: skip
        self._init_loss_state(replay)
        self._init_drift_budget()

    def _init_loss_state(self, replay: ReplayStream | MixedReplay | None) -> None:
        """The loss step's settings and bookkeeping, once the Trainer is built (``self.args``, the accelerator)."""
        #: the method's coefficients, resolved from the config (a preset's or the user's)
        self.kl_coef = self.args.resolved_kl_coef()
        self.replay_ratio = self.args.resolved_replay_ratio()
        self.kl_on = self.args.resolved_kl_on()
        self.replay = replay
        if self.replay_ratio > 0 and replay is None:
            raise ArrtuneError("replay_ratio > 0 needs a replay stream: pass processing_class (the stream is built "
                               "from args.replay) or replay=")  # fmt: skip
        self.model_accepts_loss_kwargs = False  # our loss is a per-micro-batch mean; Trainer scales for GA
        #: SFT and replay rows in one forward/backward instead of two (DeepSpeed steps inside backward)
        self.joint_passes = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        base = base_model(self.accelerator.unwrap_model(self.model))
        self._keep_one_logit = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._head_checked = False
        #: the KL's reference, built at the first step (the model's structure is final by then)
        self.reference: InitialModel | None = None
        self._terms: dict[str, float] = {}
        self._term_counts: dict[str, int] = {}
        self._sft_tokens = 0
        self._last_log_time = time.perf_counter()
        self._last_logged_step = 0
        #: the optimizer step (1-based) whose loss was NaN or inf, once training stopped because of it
        self.nonfinite_step: int | None = None

    def _init_drift_budget(self) -> None:
        """With a ``drift_budget`` (and a KL): the controller that adapts ``kl_coef``, its probe passages, and
        the callback that updates it after every optimizer step."""
        #: the drift-budget controller (None: kl_coef is fixed) and the passages it measures drift on (None:
        #: it reads the KL of the loss's KL tokens)
        self.controller: KLController | None = None
        self.probe: DriftProbe | None = None
        if self.args.drift_budget and self.kl_coef > 0:
            texts = self._probe_texts()
            if texts:
                self.probe = DriftProbe(self.processing_class, texts)
                # a clean measurement every drift_probe_every steps: no smoothing, the forecast as many steps ahead
                horizon = KLController.horizon / self.args.drift_probe_every
                self.controller = KLController(self.kl_coef, self.args.drift_budget, ema=1.0, horizon=horizon)
            else:
                self.controller = KLController(self.kl_coef, self.args.drift_budget)
        self.probe_kl: float | None = None  # the probe's latest measurement
        self._step_kl: list[float] = []  # KL of this optimizer step's micro-batches, for the controller
        if self.controller is not None:
            self.add_callback(ControllerStep(self))

    def _probe_texts(self) -> list[str]:
        """The drift probe's passages: ``drift_probe`` documents of the replay corpus (none without a corpus,
        and none where the model's weights are sharded, as the probe runs the unwrapped model)."""
        sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if self.args.drift_probe == 0 or self.replay is None or sharded:
            return []
        return self.replay.probe_texts(self.args.drift_probe)

    # -- the loss ------------------------------------------------------------------------------------
    def _parts(self, inputs: dict[str, torch.Tensor]) -> list[_Part]:
        """The SFT rows and (if replay is on) a replay batch (:meth:`replay_shape`), with their token weights."""
        cfg = self.args
        ids, labels, attention = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
        n_sft_tokens = int(attention.sum())
        self._sft_tokens += n_sft_tokens
        rows = {"sft": (ids, labels, attention)}
        if self.replay_ratio > 0 and self.replay is not None:
            n_replay, width = self.replay_shape(n_sft_tokens, ids.shape[1])
            rb = self.replay.batch(n_replay, width, self.processing_class.pad_token_id)
            rows["replay"] = tuple(rb[k].to(ids.device) for k in ("input_ids", "labels", "attention_mask"))
        # kl_every = n: the KL on one optimizer step in n, weighted n x (same expected penalty, 1/n the cost)
        coef = self.controller.coef if self.controller is not None else self.kl_coef
        kl_coef = coef * cfg.kl_every if self.state.global_step % cfg.kl_every == 0 else 0.0
        weights = token_weights({name: r[1][:, 1:] for name, r in rows.items()}, replay_weight=cfg.replay_weight,
                                kl_coef=kl_coef, kl_on=self.kl_on, kl_fraction=cfg.kl_fraction)  # fmt: skip
        return [
            _Part(name, *r, weights[name], cfg.kl_mask_target and name == "sft") for name, r in rows.items()
        ]

    def replay_shape(self, n_sft_tokens: int, sft_width: int) -> tuple[int, int]:
        """(replay tokens, width of the replay rows) for a micro-batch of ``n_sft_tokens`` SFT tokens in rows of
        ``sft_width``: ``replay_ratio`` x the SFT tokens, in rows as wide as the SFT rows. Replay that fills
        less than one row gets a row of its own length: the same outputs (right padding is never attended
        to) without paying for a whole row, which at one SFT row per micro-batch would make ``replay_ratio``
        0.25 cost what 1 does. Not when both run in one pass: their rows are stacked."""
        n_replay = max(1, round(self.replay_ratio * n_sft_tokens))
        return n_replay, sft_width if self.joint_passes else min(sft_width, n_replay)

    def _policy_hidden(self, model: Any, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(B, T, H)`` of the policy, through the (DDP-)wrapped model's own forward.

        The decoder's output is captured by a hook; the model computes logits for the last position only.
        On the first call those logits are compared with the output head applied here, so an architecture
        that transforms its logits in a way :func:`output_head` does not know fails loudly.
        """
        decoder = base_model(self.accelerator.unwrap_model(model)).get_decoder()
        captured: list[torch.Tensor] = []

        def keep(_module: Any, _args: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = decoder.register_forward_hook(keep)
        try:
            extra = {"logits_to_keep": 1} if self._keep_one_logit else {}
            outputs = model(input_ids=ids, attention_mask=attention, use_cache=False, **extra)
        finally:
            handle.remove()
        hidden = captured[-1]
        if not self._head_checked:
            with torch.no_grad():
                ours = output_head(self.accelerator.unwrap_model(model))(hidden[:, -1].detach()).float()
                theirs = outputs.logits[:, -1].detach().float()
            if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max()) + 1e-5):
                raise ArrtuneError(
                    f"{type(base_model(model)).__name__}: its logits are not output_layer(final hidden "
                    "states) (max diff "
                    f"{float((ours - theirs).abs().max()):.3g}); arrtune does not support this architecture yet"
                )
            self._head_checked = True
        return hidden

    def _pass_loss(self, model: Any, parts: list[_Part]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward over the rows of ``parts``: their weighted loss (:func:`arrtune.losses.part_loss`), and
        each part's CE and KL sums (for logging)."""
        ids = torch.cat([p.ids for p in parts])
        attention = torch.cat([p.attention for p in parts])
        targets = torch.cat([p.labels for p in parts])[:, 1:]
        weights = PartWeights(
            torch.cat([p.weights.ce_weight for p in parts]), torch.cat([p.weights.kl_weight for p in parts]),
            sum(p.weights.n_targets for p in parts), sum(p.weights.n_kl_targets for p in parts),
        )  # fmt: skip
        rows = torch.cat([torch.full((len(p.ids),), i, device=ids.device) for i, p in enumerate(parts)])
        peft_model = self.accelerator.unwrap_model(model)
        head = output_head(peft_model)
        ref_hidden, ref_head, drop = None, None, None
        kl_rows = (weights.kl_weight != 0).any(1).nonzero().view(-1)
        if len(kl_rows):  # the reference runs on the rows that carry the KL only
            if self.reference is None:
                self.reference = InitialModel(peft_model)
            ref = self.reference.hidden(ids[kl_rows], attention[kl_rows])
            ref_hidden = ref.new_zeros(*ids.shape, ref.shape[-1])
            ref_hidden[kl_rows] = ref
            ref_hidden, ref_head = ref_hidden[:, :-1], self.reference.head(head)
            masked = torch.cat([torch.full((len(p.ids),), p.mask_target, device=ids.device) for p in parts])
            drop = torch.where(masked[:, None], targets, IGNORE_INDEX)
        hidden = self._policy_hidden(model, ids, attention)
        out_layer = base_model(peft_model).get_output_embeddings()
        head_params = [p for p in out_layer.parameters() if p.requires_grad]
        chunk_rows = self.args.loss_chunk_rows or default_chunk_rows(out_layer.weight.shape[0])
        loss, ce_tok, kl_tok = part_loss(hidden[:, :-1], targets, weights, head, ref_hidden, ref_head,
                                         self.args.kl_direction, drop, head_params, chunk_rows)  # fmt: skip
        sums = {}
        for i, part in enumerate(parts):
            sums[f"{part.name}_ce"] = ce_tok[rows == i].sum()
            sums[f"{part.name}_kl"] = kl_tok[rows == i].sum()
        return loss, sums

    def _pass_groups(self, parts: list[_Part]) -> list[list[_Part]]:
        """The rows of each forward/backward pass: SFT, then replay (one pass for both under DeepSpeed)."""
        return [parts] if self.joint_passes else [[p] for p in parts]

    def _record_parts(self, parts: list[_Part], sums: dict[str, torch.Tensor]) -> None:
        terms: dict[str, torch.Tensor | None] = {
            f"{p.name}_loss": sums[f"{p.name}_ce"] / max(p.weights.n_targets, 1) for p in parts
        }
        kl_parts = [p for p in parts if p.weights.n_kl_targets > 0]
        if kl_parts:
            n_kl = sum(p.weights.n_kl_targets for p in kl_parts)
            terms["kl"] = sum(sums[f"{p.name}_kl"] for p in kl_parts) / max(n_kl, 1)
            self._step_kl.append(float(terms["kl"].detach()))
        self._record(**terms)

    def _run_passes(
        self, model: Any, inputs: dict[str, torch.Tensor], backward_scale: float | None
    ) -> torch.Tensor:
        """The summed loss of every pass of one micro-batch. With ``backward_scale``, each pass is
        back-propagated (scaled) before the next runs, and gradients are reduced across ranks once, in the
        backward of the last pass; the returned loss is then detached."""
        parts = self._parts(inputs)
        passes = self._pass_groups(parts)
        total, sums = None, {}
        for i, group in enumerate(passes):
            last = i == len(passes) - 1
            sync = nullcontext() if backward_scale is None or last else self.accelerator.no_sync(model)
            with sync:
                # autocast covers the reference and the output layer too, not only model.forward
                with self.compute_loss_context_manager(), self.accelerator.autocast():
                    loss, part_sums = self._pass_loss(model, group)
                if backward_scale is not None:
                    self.accelerator.backward(loss * backward_scale)
                    loss = loss.detach()
            total = loss if total is None else total + loss
            sums.update(part_sums)
        self._record_parts(parts, sums)
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        """The ARR loss of one micro-batch, all passes summed (it draws replay as a training step does; training
        uses :meth:`training_step`, which back-propagates each pass before running the next, and evaluation
        :meth:`prediction_step`)."""
        total = self._run_passes(model, inputs, None)
        return (total, None) if return_outputs else total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # type: ignore[override]
        """Evaluation (``Trainer.evaluate``, ``eval_strategy``): the mean cross-entropy of the response tokens
        of a held-out SFT batch, as ``eval_loss``. It draws no replay, logs no training term and leaves the
        drift-budget controller alone, so evaluating does not change training."""
        inputs = self._prepare_inputs(inputs)
        ids, labels, attention = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
        part = _Part("sft", ids, labels, attention, token_weights({"sft": labels[:, 1:]})["sft"])
        with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
            loss, _ = self._pass_loss(model, [part])
        return loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
        """One micro-batch, one forward/backward per pass; a NaN/inf loss on any rank stops training on
        every rank before the next save."""
        model.train()
        scale = 1.0 / getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        loss = self._run_passes(model, self._prepare_inputs(inputs), scale) * scale
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss).all()) else 1.0], device=loss.device)
        if self.args.world_size > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if float(bad[0]) > 0 and self.nonfinite_step is None:
            self.nonfinite_step = self.state.global_step + 1
            self.control.should_training_stop = True
        return loss

    def controller_step(self) -> None:
        """After an optimizer step: the controller's update with the probe's drift (every
        ``drift_probe_every`` steps) or, without a probe, this step's KL; averaged over ranks (every rank gets
        the same value, so every rank holds the same coefficient). Steps without a measurement (kl_every, or
        between two probes) leave it as it is."""
        values = self._step_kl
        if self.probe is not None:
            due = self.state.global_step % self.args.drift_probe_every == 0
            with self.accelerator.autocast():  # the training precision, as the loss's reference runs
                values = [self.probe.measure(self.accelerator.unwrap_model(self.model))] if due else []
        measured = torch.tensor(
            [sum(values), float(len(values))], dtype=torch.float64, device=self.args.device
        )
        self._step_kl = []
        if self.args.world_size > 1:
            measured = self.accelerator.reduce(measured, reduction="sum")
        if self.controller is not None and float(measured[1]) > 0:
            kl = float(measured[0] / measured[1])
            if self.probe is not None:
                self.probe_kl = kl
            self.controller.update(kl)

    # -- logging -------------------------------------------------------------------------------------
    def _record(self, **terms: torch.Tensor | None) -> None:
        for name, value in terms.items():
            if value is not None:
                self._terms[name] = self._terms.get(name, 0.0) + float(value.detach())
                self._term_counts[name] = self._term_counts.get(name, 0) + 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # type: ignore[override]
        """The Trainer's record plus each loss term (averaged over ranks), throughput, step time and the
        controller's state; a non-finite term stops training on every rank."""
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
            if self.controller is not None:
                logs["kl_coef"] = self.controller.coef
                logs["drift_budget"] = self.controller.budget
                if self.controller.smoothed is not None:
                    logs["kl_smoothed"] = self.controller.smoothed
                    logs["kl_forecast"] = self.controller.forecast
                if self.probe_kl is not None:
                    logs["drift_probe"] = self.probe_kl
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

    # -- what a checkpoint adds to the Trainer's (staging and renaming: rundir.StagedCheckpoints) ----------
    def may_checkpoint(self) -> bool:
        """False once the loss was NaN or inf: a diverged model is never checkpointed."""
        return self.nonfinite_step is None

    def write_checkpoint_state(self, directory: Path) -> None:
        """Every rank's replay position and drift-budget controller (the same on all ranks), written by the
        main process (:func:`arrtune.trainer_state.write_rank_states`)."""
        write_rank_states(directory, self.replay, self.controller, self.args.should_save)

    def load_replay_state(self, checkpoint: str) -> None:
        """Restore this rank's replay stream position (and the step bookkeeping) from a checkpoint directory."""
        step = Path(checkpoint).name.rsplit("-", 1)[-1]
        self._last_logged_step = int(step) if step.isdigit() else 0
        if self.controller is not None:
            self.controller = read_controller(checkpoint, self.args.process_index)
        if self.replay is not None:
            self.replay.load_state_dict(read_replay_state(checkpoint, self.args.process_index))
