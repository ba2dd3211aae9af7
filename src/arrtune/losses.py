"""The ARR objective, twice: :func:`arr_loss`, the plain specification from full logits, and
:func:`chunked_arr_loss`, the same signature and meaning from final hidden states and output heads, computed
in chunks with no ``B x T x V`` logits block (what training runs; ``tests/test_losses.py`` holds the two
equal in value and gradient over every option). Both weigh tokens as :func:`token_weights` says.

Nothing here knows about trainers, files or configs. Shapes: ``B`` rows, ``T`` positions, ``V`` vocabulary,
``H`` hidden size. ``hidden[:, t]`` predicts ``labels[:, t]``: callers pass already-shifted tensors
(``hidden[:, :-1]`` with ``labels[:, 1:]``).

:func:`head_losses` turns the policy's final hidden states into logits ``chunk_rows`` token rows at a time,
only at the positions that carry a loss (label tokens and KL tokens), and for each chunk computes

* the cross-entropy of the label, with its closed-form gradient ``softmax - onehot``;
* the KL to the reference (whose logits come from its own final hidden states and output head, the same
  chunk of rows), with its closed-form gradient, sharing the policy's softmax with the cross-entropy;

then back-propagates the combined logit gradient through the output head for that chunk alone. What is
kept for the backward pass is one ``B x T x H`` gradient buffer; the transient memory is a few
``chunk_rows x V`` float32 blocks (see :func:`default_chunk_rows`). This is the "fused linear
cross-entropy" idea (as in Liger-Kernel) extended to the KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
KLDirection = Literal["forward", "reverse"]
Head = Callable[[torch.Tensor], torch.Tensor]

#: float32 logits per chunk in the automatic rule: 2**23 values = 32 MiB per ``chunk_rows x V`` block
CHUNK_LOGITS = 2**23


def arr_loss(
    sft_logits: torch.Tensor,
    sft_labels: torch.Tensor,
    ref_sft_logits: torch.Tensor,
    replay_logits: torch.Tensor | None = None,
    replay_labels: torch.Tensor | None = None,
    ref_replay_logits: torch.Tensor | None = None,
    *,
    replay_weight: float = 1.0,
    kl_coef: float = 0.0,
    kl_on: str = "replay",
    kl_direction: KLDirection = "reverse",
    kl_mask_target: bool = False,
    kl_fraction: float = 1.0,
) -> torch.Tensor:
    """The ARR objective of one micro-batch, written plainly from full logits (the specification)::

        L = mean_{SFT label tokens} CE + replay_weight * mean_{replay label tokens} CE
            + kl_coef * mean_{KL tokens} KL(policy, reference)

    Logits are ``(B, T, V)`` with ``logits[:, t]`` predicting ``labels[:, t]`` (already shifted); the
    reference's are those of the initial model on the same rows. KL tokens are the label tokens of the parts
    named by ``kl_on`` (``sft``, ``replay`` or ``both``), in the first ``ceil(kl_fraction x rows)`` rows of
    each part. ``kl_direction``: ``reverse`` = KL(policy || reference), ``forward`` = KL(reference || policy).
    ``kl_mask_target``: on SFT tokens, the label is dropped from both distributions, renormalised.
    """
    parts = [("sft", sft_logits, sft_labels, ref_sft_logits, 1.0)]
    if replay_logits is not None:
        parts.append(("replay", replay_logits, replay_labels, ref_replay_logits, replay_weight))
    loss = sft_logits.new_zeros((), dtype=torch.float32)
    kl_terms = []
    for name, logits, labels, ref_logits, weight in parts:
        has = labels != IGNORE_INDEX
        logp = logits.float().log_softmax(-1)
        ce = -logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        loss = loss + weight * ce[has].mean()
        if kl_coef == 0 or kl_on not in (name, "both"):
            continue
        logq = ref_logits.float().log_softmax(-1)
        if kl_mask_target and name == "sft":
            drop = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, labels.clamp_min(0)[..., None], True)
            drop &= has[..., None]
            logp = logp.masked_fill(drop, float("-inf")).log_softmax(-1)
            logq = logq.masked_fill(drop, float("-inf")).log_softmax(-1)
        p, q = logp.exp(), logq.exp()
        diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
        kl = (p * diff).sum(-1) if kl_direction == "reverse" else (q * -diff).sum(-1)
        rows = math.ceil(kl_fraction * len(labels))
        kl_terms.append(kl[:rows][has[:rows]])
    if kl_terms:
        loss = loss + kl_coef * torch.cat(kl_terms).mean()
    return loss


@dataclass
class PartWeights:
    """The weight of each token's terms in one part (SFT or replay rows) of a micro-batch: the part adds
    ``sum(ce_weight * CE) + sum(kl_weight * KL)`` to the loss."""

    #: ``(B, T)``: 1 / n label tokens of the part (``replay_weight`` / n for replay) at label tokens, else 0
    ce_weight: torch.Tensor
    #: ``(B, T)``: ``kl_coef`` / n KL tokens of the micro-batch at this part's KL tokens, else 0
    kl_weight: torch.Tensor
    #: label tokens of the part (the denominator of its cross-entropy)
    n_targets: int
    #: KL tokens of the part (its share of the KL's denominator)
    n_kl_targets: int


def token_weights(
    labels: dict[str, torch.Tensor],
    *,
    replay_weight: float = 1.0,
    kl_coef: float = 0.0,
    kl_on: str = "replay",
    kl_fraction: float = 1.0,
) -> dict[str, PartWeights]:
    """Per-token weights of the ARR objective for the parts of one micro-batch (``labels``: ``"sft"`` and
    optionally ``"replay"`` to ``(B, T)`` shifted labels), as :func:`arr_loss` defines them: each part's CE is
    a mean over its label tokens; the KL is one mean over the KL tokens of every part named by ``kl_on``
    (``sft``, ``replay`` or ``both``), which are the label tokens of its first ``ceil(kl_fraction x rows)``
    rows."""
    weights = {}
    kl_tokens = {}
    for name, part_labels in labels.items():
        has = part_labels != IGNORE_INDEX
        if kl_coef > 0 and kl_on in (name, "both"):
            rows = max(1, math.ceil(kl_fraction * len(part_labels)))
            kl_tokens[name] = has & (torch.arange(len(part_labels), device=has.device) < rows)[:, None]
        n = int(has.sum())
        ce = has * ((1.0 if name == "sft" else replay_weight) / max(n, 1))
        weights[name] = PartWeights(ce.float(), torch.zeros_like(ce, dtype=torch.float32), n, 0)
    n_kl = sum(int(t.sum()) for t in kl_tokens.values())
    for name, tokens in kl_tokens.items():
        weights[name].kl_weight = tokens * (kl_coef / max(n_kl, 1))
        weights[name].n_kl_targets = int(tokens.sum())
    return weights


def chunked_arr_loss(
    sft_hidden: torch.Tensor,
    sft_labels: torch.Tensor,
    ref_sft_hidden: torch.Tensor | None,
    replay_hidden: torch.Tensor | None = None,
    replay_labels: torch.Tensor | None = None,
    ref_replay_hidden: torch.Tensor | None = None,
    *,
    head: Head,
    ref_head: Head | None = None,
    replay_weight: float = 1.0,
    kl_coef: float = 0.0,
    kl_on: str = "replay",
    kl_direction: KLDirection = "reverse",
    kl_mask_target: bool = False,
    kl_fraction: float = 1.0,
    head_params: Sequence[torch.Tensor] = (),
    chunk_rows: int = 0,
) -> torch.Tensor:
    """:func:`arr_loss` from final hidden states ``(B, T, H)`` instead of logits: ``head`` (the policy's output
    layer) and ``ref_head`` (the reference's; default ``head``) turn them into logits a chunk of token rows at
    a time (:func:`head_losses`). Same arguments and meaning otherwise; ``head_params`` are trainable
    parameters inside ``head``, ``chunk_rows`` as :func:`head_losses`.

    Training runs the SFT and the replay rows as two forward/backward passes, so it calls
    :func:`token_weights` once and :func:`part_loss` per pass; this function is the two together."""
    parts = {"sft": (sft_hidden, sft_labels, ref_sft_hidden)}
    if replay_hidden is not None:
        parts["replay"] = (replay_hidden, replay_labels, ref_replay_hidden)
    weights = token_weights({k: v[1] for k, v in parts.items()}, replay_weight=replay_weight, kl_coef=kl_coef,
                            kl_on=kl_on, kl_fraction=kl_fraction)  # fmt: skip
    total = sft_hidden.new_zeros((), dtype=torch.float32)
    for name, (hidden, labels, ref_hidden) in parts.items():
        drop = labels if kl_mask_target and name == "sft" else None
        loss, _, _ = part_loss(hidden, labels, weights[name], head, ref_hidden, ref_head or head, kl_direction,
                               drop, head_params, chunk_rows)  # fmt: skip
        total = total + loss
    return total


def part_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weights: PartWeights,
    head: Head,
    ref_hidden: torch.Tensor | None = None,
    ref_head: Head | None = None,
    kl_direction: KLDirection = "reverse",
    drop_labels: torch.Tensor | None = None,
    head_params: Sequence[torch.Tensor] = (),
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One part's weighted terms (:func:`head_losses`'s ``(loss, ce, kl)``) with the weights of
    :func:`token_weights`; ``ref_hidden`` is needed only where the part carries a KL. ``drop_labels``: the
    ``(B, T)`` token ids cut out of both distributions before the KL (the labels, for ``kl_mask_target`` on
    SFT rows; ``IGNORE_INDEX`` where nothing is cut)."""
    kl = None
    if bool((weights.kl_weight != 0).any()):
        if ref_hidden is None:
            raise ValueError("this part carries a KL: pass the reference's hidden states")
        if drop_labels is not None and not bool((drop_labels != IGNORE_INDEX).any()):
            drop_labels = None
        kl = KLTerm(ref_hidden, ref_head or head, weights.kl_weight, kl_direction, drop_labels)
    return head_losses(hidden, head, labels, weights.ce_weight, kl, head_params, chunk_rows)


def default_chunk_rows(vocab_size: int) -> int:
    """Token rows per chunk: as many as keep one float32 ``rows x V`` block at 32 MiB (at least 16).

    SmolLM2 (V = 49,152) gets 170 rows, Qwen2.5 (V = 151,936) 55. A chunk holds about five such blocks at
    once (policy and reference logits, log-softmaxes, the gradient), so the transient peak is ~160 MiB.
    """
    return max(16, CHUNK_LOGITS // max(vocab_size, 1))


@dataclass
class KLTerm:
    """The KL to the reference on some positions of the batch given to :func:`head_losses`."""

    #: ``(B, T, H)`` final hidden states of the reference model (no gradient), aligned with the policy's
    ref_hidden: torch.Tensor
    #: the reference's output layer, ``(N, H) -> (N, V)`` logits (called under ``no_grad``)
    ref_head: Head
    #: ``(B, T)`` weight of each position's KL in the loss (0 where there is no KL), e.g. kl_coef / n tokens
    weight: torch.Tensor
    #: ``"forward"`` = KL(ref || policy), ``"reverse"`` = KL(policy || ref)
    direction: KLDirection = "reverse"
    #: ``(B, T)`` token ids removed from both distributions (then renormalised) before the KL, e.g. the
    #: SFT label ("mask the target"); ``IGNORE_INDEX`` where nothing is removed; None: nothing anywhere
    drop_labels: torch.Tensor | None = None


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
    target: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row KL of 2-D ``(N, V)`` float32 logits, differentiable by autograd (masked targets)."""
    if target is not None:
        policy_logits, ref_logits, _ = _drop_target(policy_logits, ref_logits, target)
    logp = policy_logits.log_softmax(-1)
    logq = ref_logits.log_softmax(-1)
    a, b = (logq, logp) if direction == "forward" else (logp, logq)
    # 0 * log 0 = 0: the masked target contributes nothing. Replace -inf before the arithmetic, so that
    # no NaN is formed even in the branch torch.where discards (its gradient would still be NaN).
    finite = torch.isfinite(a) & torch.isfinite(b)
    a = torch.where(finite, a, torch.zeros_like(a))
    b = torch.where(finite, b, torch.zeros_like(b))
    return torch.where(finite, a.exp() * (a - b), torch.zeros_like(a)).sum(-1)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` for ``(N, V)`` tensors without an ``N x V`` temporary (in their dtype, not autocast's)."""
    with torch.autocast(a.device.type, enabled=False):
        return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def _kl_and_grad_shared(
    logp: torch.Tensor, p: torch.Tensor, ref_logits: torch.Tensor, direction: KLDirection
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact KL per row and its gradient w.r.t. the policy logits, in closed form, from the policy's own
    ``log_softmax`` and ``softmax`` (left unchanged; ``ref_logits`` is consumed).

    forward  KL(q || p): value sum q (log q - log p), gradient p - q.
    reverse  KL(p || q): value sum p (log p - log q), gradient p * (log p - log q - KL).
    """
    logq = ref_logits.log_softmax(-1)
    del ref_logits
    if direction == "reverse":
        d = logq.neg_().add_(logp)  # log p - log q, in the buffer of log q
        kl = _rowdot(p, d)
        return kl, d.sub_(kl[:, None]).mul_(p)
    if direction == "forward":
        q = logq.exp()
        kl = _rowdot(q, logq.sub_(logp))
        return kl, q.neg_().add_(p)
    raise ValueError(f"kl direction must be 'forward' or 'reverse', got {direction!r}")


def _kl_and_grad_general(
    z: torch.Tensor, ref_logits: torch.Tensor, kl: KLTerm, target: torch.Tensor | None, needs_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KL per row and its logit gradient with masked targets (autograd on one chunk)."""
    if not needs_grad:
        return _kl_rows(z, ref_logits, kl.direction, target), None
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        values = _kl_rows(z, ref_logits, kl.direction, target)
        (grad,) = torch.autograd.grad(values.sum(), z)
    return values.detach(), grad


class _HeadLosses(torch.autograd.Function):
    """Weighted CE + KL from hidden states; the gradients are computed in the forward pass, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, labels, ce_weight, kl, head, chunk_rows, needs_grad, *head_params):  # type: ignore[override]
        B, T, H = hidden.shape
        flat_hidden = hidden.detach().reshape(B * T, H)
        flat_labels = labels.reshape(-1)
        flat_ce_w = ce_weight.reshape(-1).float() * (flat_labels != IGNORE_INDEX)
        flat_kl_w = kl.weight.reshape(-1).float() if kl is not None else torch.zeros_like(flat_ce_w)
        positions = ((flat_labels != IGNORE_INDEX) | (flat_kl_w != 0)).nonzero().view(-1)
        ce_tok = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
        kl_tok = torch.zeros_like(ce_tok)
        grad_hidden = torch.zeros_like(flat_hidden) if needs_grad else None
        grad_params = [torch.zeros_like(p) for p in head_params] if needs_grad else []
        ref_flat = kl.ref_hidden.reshape(B * T, -1) if kl is not None else None
        drop_flat = kl.drop_labels.reshape(-1) if kl is not None and kl.drop_labels is not None else None
        for start in range(0, len(positions), chunk_rows):
            pos = positions[start : start + chunk_rows]
            lab, ce_w, kl_w = flat_labels[pos], flat_ce_w[pos], flat_kl_w[pos]
            with torch.set_grad_enabled(needs_grad):
                h = flat_hidden[pos].requires_grad_(needs_grad)
                z = head(h)
            zf = z.detach().float()
            logp = zf.log_softmax(-1)
            has_label = lab != IGNORE_INDEX
            ce = -logp.gather(1, lab.clamp_min(0)[:, None]).view(-1) * has_label
            ce_tok[pos] = ce
            p = logp.exp()
            grad = None
            if kl is not None and bool((kl_w != 0).any()):
                with torch.no_grad():
                    q = kl.ref_head(ref_flat[pos]).float()
                if drop_flat is None:
                    values, grad = _kl_and_grad_shared(logp, p, q, kl.direction)
                else:
                    target = drop_flat[pos] if drop_flat is not None else None
                    values, grad = _kl_and_grad_general(zf, q, kl, target, needs_grad)
                del q
                kl_tok[pos] = values * (kl_w != 0)
                if grad is not None:
                    grad.mul_(kl_w[:, None])
            del logp
            if not needs_grad:
                continue
            # the CE's logit gradient, weighted: ce_w * (softmax - onehot(label))
            grad = grad.addcmul_(p, ce_w[:, None]) if grad is not None else p.mul_(ce_w[:, None])
            grad.scatter_add_(1, lab.clamp_min(0)[:, None], -ce_w[:, None])
            del p
            grads = torch.autograd.grad(z, [h, *head_params], grad.to(z.dtype))
            grad_hidden[pos] = grads[0].to(grad_hidden.dtype)
            for total, g in zip(grad_params, grads[1:]):
                total.add_(g)
        loss = (ce_tok * flat_ce_w).sum() + (kl_tok * flat_kl_w).sum()
        ctx.grads = (grad_hidden.view(B, T, H) if needs_grad else None, grad_params)
        ce_tok, kl_tok = ce_tok.view(B, T), kl_tok.view(B, T)
        ctx.mark_non_differentiable(ce_tok, kl_tok)
        return loss, ce_tok, kl_tok

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):  # type: ignore[override]
        grad_hidden, grad_params = ctx.grads
        ctx.grads = None  # single use: a second backward through this graph is not supported
        if grad_hidden is None:
            raise RuntimeError("head_losses was called without gradient tracking")
        scale = grad_loss.to(grad_hidden.dtype)
        return (
            grad_hidden.mul_(scale), None, None, None, None, None, None,
            *(g.mul_(grad_loss.to(g.dtype)) for g in grad_params),
        )  # fmt: skip


def head_losses(
    hidden: torch.Tensor,
    head: Head,
    labels: torch.Tensor,
    ce_weight: torch.Tensor | float,
    kl: KLTerm | None = None,
    head_params: Sequence[torch.Tensor] = (),
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weighted token losses of one batch, from the policy's final hidden states.

    Returns ``(loss, ce, kl)``: ``loss = sum(ce_weight * ce) + sum(kl.weight * kl)``, a float32 scalar that
    back-propagates into ``hidden`` and ``head_params``; ``ce`` and ``kl`` are the per-token values ``(B, T)``
    (0 where absent), without gradient, for logging.

    Args:
        hidden: ``(B, T, H)`` policy final hidden states (after the last norm).
        head: the policy's output layer, ``(N, H) -> (N, V)`` logits (with any logit soft-capping).
        labels: ``(B, T)`` target ids; ``IGNORE_INDEX`` where there is no cross-entropy.
        ce_weight: weight of each label token's cross-entropy, a float or a ``(B, T)`` tensor.
        kl: the KL to the reference, or None.
        head_params: trainable parameters inside ``head`` (empty for the usual frozen output layer).
        chunk_rows: token rows per chunk; 0 picks :func:`default_chunk_rows`.
    """
    if not torch.is_tensor(ce_weight):
        ce_weight = torch.full(labels.shape, float(ce_weight), device=labels.device)
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head_params)
    )
    if chunk_rows <= 0:
        chunk_rows = default_chunk_rows(_vocab_size(head, hidden))
    return _HeadLosses.apply(hidden, labels, ce_weight, kl, head, chunk_rows, needs_grad, *head_params)


def _vocab_size(head: Head, hidden: torch.Tensor) -> int:
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.shape[0]
    with torch.no_grad():
        return head(hidden.reshape(-1, hidden.shape[-1])[:1]).shape[-1]
