"""What an :class:`arrtune.trainer.ARRTrainer` checkpoint adds to the Trainer's: every rank's replay stream
position (``replay_state_rank{rank}.json``) and drift-budget controller (``kl_controller_rank{rank}.json``).

Staging and renaming the checkpoint directory is :class:`arrtune.rundir.StagedCheckpoints`'s.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object

from arrtune.budget import KLController
from arrtune.errors import ArrtuneError

REPLAY_STATE = "replay_state_rank{rank}.json"
CONTROLLER_STATE = "kl_controller_rank{rank}.json"


def write_rank_states(
    directory: Path, replay: Any | None, controller: KLController | None, should_save: bool
) -> None:
    """Every rank's replay position and controller (the same on all ranks) into ``directory``. Call it on
    every rank (it gathers); the process with ``should_save`` writes."""
    if replay is not None:
        states = gather_object([replay.state_dict()])
        if should_save:
            for state in states:
                path = directory / REPLAY_STATE.format(rank=state["rank"])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(state))
    if controller is not None:
        states = gather_object([asdict(controller)])
        if should_save:
            for rank, state in enumerate(states):
                (directory / CONTROLLER_STATE.format(rank=rank)).write_text(json.dumps(state))


def read_controller(checkpoint: str | Path, rank: int) -> KLController:
    """Rank ``rank``'s drift-budget controller as saved in a checkpoint directory."""
    path = Path(checkpoint, CONTROLLER_STATE.format(rank=rank))
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return KLController(**saved)
    except (OSError, ValueError, TypeError) as exc:
        raise ArrtuneError(f"{path}: unreadable drift-budget controller state ({exc})") from exc


def read_replay_state(checkpoint: str | Path, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s replay stream position as saved in a checkpoint directory."""
    path = Path(checkpoint, REPLAY_STATE.format(rank=rank))
    if not path.is_file():
        raise ArrtuneError(
            f"{checkpoint}: no replay position for rank {rank} (saved with a different number of processes?)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArrtuneError(f"{path}: unreadable replay position ({exc})") from exc
