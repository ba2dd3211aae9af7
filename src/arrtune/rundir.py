"""The run directory: planning a run into it, its checkpoints, and its lock.

A run directory holds ``config.yaml`` (resolved), ``adapter/`` (a standard PEFT adapter), ``metrics.jsonl``
(one record per logged step), ``train_summary.json`` and, while training, ``checkpoints/``.

* **Planning.** :func:`plan_run` decides, reading only, whether a run starts fresh, resumes from its last
  complete checkpoint, or is already complete (same config), and refuses a directory that holds another
  run; :func:`start_run` then makes the first write.

* **Manifest.** Every checkpoint holds ``manifest.json``: the size and SHA-256 of each of its files, written
  last, inside the staging directory, before the atomic rename into place. A checkpoint is *complete* only
  when every file a resume reads is present and matches the manifest; :func:`last_complete_checkpoint`
  skips (and names) any other one and falls back to the previous complete checkpoint.
* **Lock.** :func:`start_run` locks the run directory (``.arrtune.lock``, :func:`arrtune.locks.hold_lock`) for
  the life of the process: a second ``arrtune train`` on the same ``output_dir`` gets one error line naming
  the first process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from arrtune.atomic import write_atomic
from arrtune.errors import ArrtuneError
from arrtune.locks import hold_lock

if TYPE_CHECKING:
    from arrtune.config import TrainConfig

log = logging.getLogger("arrtune")

#: files every resumable checkpoint holds (plus ``rng_state*.pth``, and the replay position when replay is on)
CHECKPOINT_FILES = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
                    "scheduler.pt")  # fmt: skip
MANIFEST = "manifest.json"
LOCK_NAME = ".arrtune.lock"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: str | os.PathLike) -> None:
    """Record the size and SHA-256 of every file of ``checkpoint`` in its ``manifest.json``."""
    root = Path(checkpoint)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    write_atomic(root / MANIFEST, json.dumps({"files": entries}, indent=1))


def checkpoint_problems(checkpoint: str | os.PathLike, needs_replay: bool) -> list[str]:
    """What keeps ``checkpoint`` from being resumed: missing files, or files that differ from the manifest."""
    path = Path(checkpoint)
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if not any(path.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if needs_replay and not (path / "replay_state_rank0.json").is_file():
        missing.append("replay_state_rank0.json")
    if not (path / MANIFEST).is_file():
        missing.append(MANIFEST)
    if missing:
        return [f"missing {', '.join(missing)}"]
    try:
        entries = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        items = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in entries.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"unreadable {MANIFEST}"]
    problems = []
    for name, size, sha in items:
        file = path / name
        if not file.is_file():
            problems.append(f"missing {name}")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, its manifest says {size}")
        elif _sha256(file) != sha:
            problems.append(f"{name} differs from its manifest (sha256)")
    return problems


def last_complete_checkpoint(root: str | os.PathLike, needs_replay: bool) -> str | None:
    """The newest ``checkpoint-N`` under ``root`` that :func:`checkpoint_problems` finds nothing wrong with;
    newer ones are skipped with a warning naming what is wrong."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(p.name.split("-")[1]), p) for p in root.iterdir()
             if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]  # fmt: skip
    for _, path in sorted(found, reverse=True):
        problems = checkpoint_problems(path, needs_replay)
        if not problems:
            return str(path)
        log.warning("ignoring incomplete checkpoint %s (%s)", path, "; ".join(problems))
    return None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be logged again), and a last line
    cut short by a killed process."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


@dataclass
class RunPlan:
    """What a run does with its directory: start fresh, resume from a checkpoint, or nothing (complete)."""

    run_dir: Path
    resume_from: str | None = None
    complete: bool = False


#: config keys that do not change what is trained: a run may be resumed with another value
COSMETIC_KEYS = ("disable_tqdm", "local_rank", "logging_dir", "use_cpu")


def config_diff(previous: Any, resolved: dict[str, Any]) -> list[str]:
    """Keys whose values differ between a saved config and this resolved one (cosmetic keys ignored).

    A key the saved config lacks, a setting added to arrtune or transformers after that run was trained,
    differs only if this config moves it from its default: at its default it does what the earlier run did."""
    from arrtune.config import TrainConfig

    previous = previous if isinstance(previous, dict) else {}
    absent = object()
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    keys = (set(previous) | set(resolved)) - set(COSMETIC_KEYS)
    return sorted(str(k) for k in keys if previous.get(k, defaults.get(k, absent)) != resolved.get(k, absent))


def plan_run(cfg: TrainConfig, overwrite: bool) -> RunPlan:
    """Decide what to do with the run directory, writing nothing. Raises ``ArrtuneError`` when the directory holds something else and ``overwrite`` is off."""
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ArrtuneError(f"{run_dir}: output_dir exists and is not a directory")
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            previous = yaml.safe_load(saved.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            previous = None
        diff = config_diff(previous, cfg.resolved().to_dict())
        if overwrite:
            return RunPlan(run_dir)
        if diff:
            raise ArrtuneError(
                f"{run_dir}: holds another run (config differs in: {', '.join(diff)}); "
                "choose another output_dir or pass --overwrite"
            )
        finished = run_dir / "train_summary.json", run_dir / "adapter" / "adapter_config.json"
        if all(p.is_file() for p in finished):
            return RunPlan(run_dir, complete=True)
        last = last_complete_checkpoint(run_dir / "checkpoints", cfg.resolved_replay_ratio() > 0)
        return RunPlan(run_dir, resume_from=last)
    if run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()) and not overwrite:
        raise ArrtuneError(
            f"{run_dir}: exists and is not an arrtune run directory; pass --overwrite to reuse it"
        )
    return RunPlan(run_dir)


def start_run(plan: RunPlan, cfg: TrainConfig) -> None:
    """On the main process: lock the run directory; a fresh run clears earlier outputs and records its config; a resume changes
    nothing here (the metrics logged after its checkpoint are dropped once the checkpoint has loaded)."""
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    hold_lock(run_dir / LOCK_NAME, f"{run_dir}: this run directory")  # until this process ends
    if plan.resume_from:
        return
    for name in ("adapter", "checkpoints", "metrics.jsonl", "train_summary.json", "eval.json"):
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    from arrtune.config_files import dump_yaml_atomic

    dump_yaml_atomic(cfg.resolved().to_dict(), run_dir / "config.yaml")


def save_adapter(model: Any, target: Path, base_id: str | None = None) -> None:
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


def final_step(checkpoint: str | None) -> int | None:
    """The checkpoint's step when it is the run's last one (``global_step >= max_steps``), else None."""
    if checkpoint is None:
        return None
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        step, last = int(state["global_step"]), int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArrtuneError(f"{checkpoint}: unreadable trainer_state.json ({exc})") from exc
    return step if last > 0 and step >= last else None


def checkpoint_step(checkpoint: str | None) -> int | None:
    """The step of a ``checkpoint-N`` directory (None for no checkpoint)."""
    return None if checkpoint is None else int(Path(checkpoint).name.rsplit("-", 1)[1])


class StagedCheckpoints:
    """A ``transformers.Trainer`` mixin (``class T(StagedCheckpoints, Trainer)``): each checkpoint is written
    into ``<output_dir>/.staging/``, completed there by :meth:`write_checkpoint_state` (state the Trainer does
    not save; called on every rank) and a manifest, then renamed into place, so a process killed at any moment
    leaves only whole checkpoints behind. :meth:`may_checkpoint` false skips a save."""

    def may_checkpoint(self) -> bool:
        return True

    def write_checkpoint_state(self, directory: Path) -> None:
        """Add to the staged checkpoint ``directory``; called on every rank (collectives allowed)."""

    def _get_output_dir(self, trial: Any) -> str:
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        if not self.may_checkpoint():
            return
        trainer: Any = self
        root = trainer.args.output_dir
        staging = os.path.join(root, ".staging")
        name = f"checkpoint-{trainer.state.global_step}"
        if trainer.args.should_save and os.path.exists(os.path.join(staging, name)):
            shutil.rmtree(os.path.join(staging, name))
        trainer.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        finally:
            self._staging_dir = None
        self.write_checkpoint_state(Path(staging, name))
        if trainer.args.should_save:
            write_manifest(os.path.join(staging, name))  # last: a checkpoint with a valid manifest is whole
        trainer.accelerator.wait_for_everyone()
        if trainer.args.should_save:
            final = os.path.join(root, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            rotate_checkpoints(
                output_dir=root, save_total_limit=trainer.args.save_total_limit, use_mtime=False
            )
        trainer.accelerator.wait_for_everyone()
