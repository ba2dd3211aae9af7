"""arrtune: LoRA fine-tuning with approximate regularized replay (ARR) that keeps what the model knows."""

__version__ = "0.1.0"
