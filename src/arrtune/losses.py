"""Pure loss functions for ARR: response cross-entropy and a memory-bounded token KL to the reference.

Nothing here knows about trainers, files or configs. Shapes: ``B`` rows, ``T`` positions, ``V`` vocabulary,
``H`` hidden size. Logits at position ``t`` predict the token at ``t + 1``; callers pass already-shifted
tensors (``logits[:, :-1]`` with ``labels[:, 1:]``).

The KL never builds the full ``B x T x V`` reference logits. The reference is given as its final hidden
states plus the output head, and is turned into logits ``chunk_tokens`` rows at a time. The gradient with
respect to the policy logits is computed chunk by chunk in the forward pass and kept in one float32
``B x T x V`` buffer (the only extra block of that size), so backward is a multiply. With ``topk > 0`` only
the reference's top-k tokens plus one "rest" bucket are compared (a lower bound on the exact KL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
KLDirection = Literal["forward", "reverse"]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not ``IGNORE_INDEX`` (0 if there are none).

    ``logits``: ``(B, T, V)`` already aligned with ``labels`` ``(B, T)``.
    """
    mask = labels != IGNORE_INDEX
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), labels[mask])


def _drop_target(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both logits with the label token set to -inf (rows whose target is ``IGNORE_INDEX`` untouched), and
    the ``(N, V)`` bool mask of the dropped entries."""
    drop = F.one_hot(target.clamp_min(0), policy_logits.shape[-1]).bool() & (target >= 0)[:, None]
    return policy_logits.masked_fill(drop, float("-inf")), ref_logits.masked_fill(drop, float("-inf")), drop


def _kl_rows(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    direction: KLDirection,
    topk: int,
    target: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row KL for 2-D ``(N, V)`` float32 logits; ``target`` (N,) masks the label token (or None)."""
    if target is not None:
        policy_logits, ref_logits, _ = _drop_target(policy_logits, ref_logits, target)
    logp = policy_logits.log_softmax(-1)
    logq = ref_logits.log_softmax(-1)
    if topk > 0:
        logq_k, idx = logq.topk(min(topk, logq.shape[-1]), dim=-1)
        logp_k = logp.gather(-1, idx)
        # the rest bucket: 1 - sum(top-k), in log space, clamped away from log(0)
        rest_q = torch.log1p(-logq_k.exp().sum(-1).clamp(max=1 - 1e-6))
        rest_p = torch.log1p(-logp_k.exp().sum(-1).clamp(max=1 - 1e-6))
        logp = torch.cat([logp_k, rest_p[:, None]], -1)
        logq = torch.cat([logq_k, rest_q[:, None]], -1)
    if direction == "forward":  # KL(ref || policy)
        a, b = logq, logp
    elif direction == "reverse":  # KL(policy || ref)
        a, b = logp, logq
    else:
        raise ValueError(f"kl direction must be 'forward' or 'reverse', got {direction!r}")
    # 0 * log 0 = 0: the masked target contributes nothing. Replace -inf before the arithmetic, so that
    # no NaN is formed even in the branch torch.where discards (its gradient would still be NaN).
    finite = torch.isfinite(a) & torch.isfinite(b)
    a = torch.where(finite, a, torch.zeros_like(a))
    b = torch.where(finite, b, torch.zeros_like(b))
    terms = torch.where(finite, a.exp() * (a - b), torch.zeros_like(a))
    return terms.sum(-1)


def _kl_rows_and_grad(
    z: torch.Tensor, ref_logits: torch.Tensor, direction: KLDirection, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact full-vocabulary KL per row and its gradient w.r.t. the policy logits ``z``, in closed form.

    forward  KL(q || p): value sum q (log q - log p), gradient p - q.
    reverse  KL(p || q): value sum p (log p - log q), gradient p * (log p - log q - KL).
    With ``target`` (N,), the label token is removed from both distributions first (its gradient is 0).
    """
    drop = None
    if target is not None:
        z, ref_logits, drop = _drop_target(z, ref_logits, target)
    logp = z.log_softmax(-1)
    logq = ref_logits.log_softmax(-1)
    p = logp.exp()
    if direction not in ("forward", "reverse"):
        raise ValueError(f"kl direction must be 'forward' or 'reverse', got {direction!r}")
    d = logp.sub_(logq)  # log p - log q, in place of log p
    if drop is not None:
        d.masked_fill_(drop, 0.0)  # -inf - -inf at the dropped label: that token is not part of either
    if direction == "forward":
        q = logq.exp_()
        kl = -(q * d).sum(-1)
        return kl, p.sub_(q)
    kl = (p * d).sum(-1)
    return kl, d.sub_(kl[:, None]).mul_(p)


class _ChunkedKL(torch.autograd.Function):
    """Per-token KL with the policy gradient computed in the forward pass, chunk by chunk."""

    @staticmethod
    def forward(ctx, policy_logits, ref_hidden, ref_head, mask, targets, direction, topk, chunk_rows):  # type: ignore[override]
        B, T, V = policy_logits.shape
        needs_grad = policy_logits.requires_grad
        # the gradient buffer has the logits' dtype (bf16 under autocast, like the CE's own logit gradient)
        grad = (
            torch.zeros(B, T, V, dtype=policy_logits.dtype, device=policy_logits.device)
            if needs_grad
            else None
        )
        out = torch.zeros(B, T, dtype=torch.float32, device=policy_logits.device)
        step = max(1, chunk_rows // max(B, 1))
        for s in range(0, T, step):
            m = mask[:, s : s + step]
            if not m.any():
                continue
            with torch.no_grad():
                q = ref_head(ref_hidden[:, s : s + step][m]).float()
            z = policy_logits[:, s : s + step][m].detach().float()
            tgt = targets[:, s : s + step][m] if targets is not None else None
            if needs_grad and topk == 0:
                kl, g = _kl_rows_and_grad(z, q, direction, tgt)
            elif needs_grad:  # top-k: let autograd derive the gradient, chunk by chunk
                with torch.enable_grad():
                    z.requires_grad_(True)
                    kl = _kl_rows(z, q, direction, topk, tgt)
                    (g,) = torch.autograd.grad(kl.sum(), z)
            else:
                kl, g = _kl_rows(z, q, direction, topk, tgt), None
            if g is not None:
                grad[:, s : s + step][m] = g.to(grad.dtype)
            out[:, s : s + step][m] = kl.detach()
        ctx.grad = grad  # not save_for_backward: backward scales it in place (no second B x T x V block)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None  # single use: a second backward through this graph is not supported
        return grad.mul_(grad_out[..., None].to(grad.dtype)), None, None, None, None, None, None, None


def token_kl(
    policy_logits: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_head: Callable[[torch.Tensor], torch.Tensor],
    mask: torch.Tensor,
    direction: KLDirection = "reverse",
    topk: int = 0,
    targets: torch.Tensor | None = None,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Per-token KL between the policy and the reference, ``(B, T)`` float32, zero where ``mask`` is False.

    Args:
        policy_logits: ``(B, T, V)`` policy logits (gradient flows into them).
        ref_hidden: ``(B, T, H)`` final hidden states of the reference model (no gradient).
        ref_head: maps hidden states ``(N, H)`` to reference logits ``(N, V)`` (the frozen output layer).
        mask: ``(B, T)`` bool, positions that carry the KL.
        direction: ``"forward"`` = KL(ref || policy), ``"reverse"`` = KL(policy || ref).
        topk: 0 for the exact KL; k > 0 compares only the reference's top-k tokens plus a rest bucket.
        targets: ``(B, T)`` label ids; when given, the label token is removed from both distributions and
            the rest renormalised before the KL ("mask the target"); ``IGNORE_INDEX`` rows are left as is.
        chunk_rows: token rows turned into reference logits at once; the transient memory is about
            ``chunk_rows x V x 4`` bytes times a few intermediates.
    """
    return _ChunkedKL.apply(policy_logits, ref_hidden, ref_head, mask, targets, direction, topk, chunk_rows)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0 when the mask is empty)."""
    n = mask.sum()
    return (values * mask).sum() / n.clamp_min(1)


def arr_loss(
    sft_loss: torch.Tensor,
    replay_loss: torch.Tensor | None,
    kl: torch.Tensor | None,
    replay_weight: float,
    kl_coef: float,
) -> torch.Tensor:
    """The ARR objective: ``CE(SFT) + replay_weight * CE(replay) + kl_coef * KL``; absent terms count 0."""
    loss = sft_loss
    if replay_loss is not None and replay_weight:
        loss = loss + replay_weight * replay_loss
    if kl is not None and kl_coef:
        loss = loss + kl_coef * kl
    return loss
