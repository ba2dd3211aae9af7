"""The callbacks around :class:`arrtune.trainer.ARRTrainer`'s loss step.

* :class:`MetricsJsonl` appends every log record to a run's ``metrics.jsonl`` (``arrtune train`` adds it);
* :class:`ControllerStep` runs the drift-budget controller after every optimizer step (the trainer adds it
  when ``drift_budget`` is set).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from arrtune.rundir import truncate_metrics


class ControllerStep(TrainerCallback):
    """Runs the drift-budget controller after every optimizer step."""

    def __init__(self, trainer: Any) -> None:
        #: the :class:`arrtune.trainer.ARRTrainer` whose ``controller_step`` runs
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
        """After an optimizer step: :meth:`arrtune.trainer.ARRTrainer.controller_step`."""
        self.trainer.controller_step()


class MetricsJsonl(TrainerCallback):
    """Append every log record (with its step) to ``metrics.jsonl`` on the main process. When resuming
    (``after_resume`` = the checkpoint's step), the records logged after that step are dropped once the
    checkpoint has loaded (they will be logged again), not before."""

    def __init__(self, path: str | os.PathLike, after_resume: int | None = None) -> None:
        self.path = Path(path)
        self.after_resume = after_resume

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[override]
        """When resuming: drop the records logged after the checkpoint's step."""
        if self.after_resume is not None and state.is_world_process_zero:
            truncate_metrics(self.path, self.after_resume)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[override]
        """Append the record's numbers and its step as one JSON line."""
        if state.is_world_process_zero and logs:
            record = {
                "step": state.global_step,
                **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
            }
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
