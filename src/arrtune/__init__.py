"""arrtune: LoRA fine-tuning with approximate regularized replay (ARR) that keeps what the model knows.

The Python API (imported on first use, so ``import arrtune`` stays light)::

    from arrtune import ARRConfig, ARRTrainer      # TRL-style: SFTConfig -> ARRConfig, SFTTrainer -> ARRTrainer
    from arrtune import arr_loss                   # the objective on one screen, from logits
    from arrtune import evaluate                   # retention and plasticity of a model (+ adapter)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ARRConfig", "ARRTrainer", "arr_loss", "evaluate", "__version__"]

_WHERE = {
    "ARRConfig": "arrtune.config",
    "ARRTrainer": "arrtune.trainer",
    "arr_loss": "arrtune.losses",
    "evaluate": "arrtune.evaluation.run",
}

if TYPE_CHECKING:
    from arrtune.config import ARRConfig
    from arrtune.evaluation.run import evaluate
    from arrtune.losses import arr_loss
    from arrtune.trainer import ARRTrainer


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'arrtune' has no attribute {name!r}")
