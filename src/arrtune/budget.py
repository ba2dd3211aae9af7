"""The drift budget: ``kl_coef`` adapted after every optimizer step to hold the model's drift at a budget.

* :class:`KLController` turns a measured drift into the next coefficient (a PID-style Lagrange multiplier on
  a forecast a few steps ahead);
* :class:`DriftProbe` measures the drift as ``arrtune eval`` does on held-out text, on a few documents of the
  replay corpus set aside for it.

:class:`arrtune.trainer.ARRTrainer` owns one of each when ``drift_budget`` is set, calls the probe after each
optimizer step and feeds the controller (averaged over ranks). How it was built and measured:
docs/drift_budget.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from arrtune.lm import adapter_disabled

PROBE_TOKENS = 256  # tokens per drift-probe passage: arrtune eval's default for held-out text
PROBE_BATCH = 1  # drift-probe passages per forward pass (no padding)


@dataclass
class KLController:
    """Holds the KL at a budget by adapting its coefficient (a Lagrange multiplier, by dual ascent).

    After every optimizer step whose KL was measured, with ``kl`` the step's KL averaged over its micro-batches
    and all ranks (the same value on every rank):

        smoothed  <- (1 - ema) * smoothed + ema * kl                 (the first nonzero measurement: kl)
        growth    <- (1 - ema) * growth + ema * clip(log(smoothed / previous smoothed), -log 2, log 2)
        forecast  <- smoothed * exp(horizon * growth)               (the KL ``horizon`` steps ahead)
        error     <- clip(log(forecast / budget), -2, 2); 0 if < 0 while the KL grows (or growth unknown)
        log(integral) <- log(integral) + rate * error         (starts at the starting coefficient)
        log(coef) <- log(integral) + gain * error

    Steps are multiplicative and symmetric in log space. The integral is PPO's adaptive-KL rule (Ziegler et
    al. 2019) in log space, at most x e^(2 rate) = 1.8 per step; the coefficient adds a proportional term (up
    to e^(2 gain) = 7.4x the integral at once) and a derivative one, the forecast: a PID Lagrangian (Stooke et
    al. 2020). Built for short runs, where the drift has momentum (Adam's moments, the drift already
    accumulated) and is slow to undo: it acts on the KL forecast ``horizon`` steps ahead from its smoothed
    growth rate (so it raises the coefficient while a fast-rising KL is still below the budget), and it never
    lowers the coefficient while the KL is growing (anti-windup: at the start of a run the adapter is zero and
    the KL is near 0 whatever the coefficient, which says nothing about the coefficient the budget needs).
    The coefficient is kept within 1e-4..1e4 x its starting value (docs/drift_budget.md).
    """

    coef: float
    budget: float
    rate: float = 0.3
    gain: float = 1.0
    ema: float = 0.25
    horizon: float = 4.0
    integral: float | None = None
    smoothed: float | None = None
    growth: float | None = None
    forecast: float | None = None
    start: float | None = None

    def update(self, kl: float) -> None:
        """One step of the controller with the step's measured (global) KL."""
        self.start = self.coef if self.start is None else self.start
        previous = self.smoothed
        if previous is None and kl <= 0:
            return  # the adapter has not moved yet (LoRA starts at zero): no information
        self.smoothed = kl if previous is None else (1 - self.ema) * previous + self.ema * kl
        if previous is not None and previous > 0 and self.smoothed > 0:
            step = max(-math.log(2), min(math.log(2), math.log(self.smoothed / previous)))
            self.growth = step if self.growth is None else (1 - self.ema) * self.growth + self.ema * step
        growth = self.growth or 0.0
        self.forecast = self.smoothed * math.exp(self.horizon * growth)
        error = max(-2.0, min(2.0, math.log(max(self.forecast, 1e-12) / self.budget)))
        if error < 0 and (self.growth is None or growth > 0):
            error = 0.0  # below the budget but rising (or not known yet): do not relax the constraint
        low, high = self.start * 1e-4, self.start * 1e4
        self.integral = min(max((self.integral or self.start) * math.exp(self.rate * error), low), high)
        self.coef = min(max(self.integral * math.exp(self.gain * error), low), high)


class DriftProbe:
    """Drift on fixed passages, measured as ``arrtune eval`` measures drift on held-out text: the mean over
    tokens of KL(initial || policy) on each passage's first :data:`PROBE_TOKENS` tokens after BOS, full
    vocabulary, no dropout, no gradient. The initial model's hidden states are computed on the first
    measurement and kept, so each later one is one forward pass of the policy."""

    def __init__(self, tokenizer: Any, texts: list[str]) -> None:
        from arrtune.evaluation.text import encode_passages

        self.tokenizer = tokenizer
        self.sequences, _ = encode_passages(tokenizer, texts, PROBE_TOKENS)
        self.base_hidden: list[torch.Tensor] = []

    def measure(self, peft_model: Any) -> float:
        """The drift of ``peft_model`` (adapter on) from itself with the adapter off, in nats per token."""
        from arrtune.evaluation.text import score_sequences

        stats = score_sequences(
            peft_model, self.tokenizer, self.sequences, [1] * len(self.sequences), PROBE_BATCH,
            base_context=lambda: adapter_disabled(peft_model), base_hidden=self.base_hidden,
        )  # fmt: skip
        return stats.mean_kl()
