"""The KL and CE functions against float64 references written independently here."""

from __future__ import annotations

import pytest
import torch

from arrtune.losses import IGNORE_INDEX, arr_loss, masked_mean, token_cross_entropy, token_kl


def reference_kl(
    policy: torch.Tensor, ref: torch.Tensor, direction: str, drop: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain float64 KL per row, optionally without the token ``drop`` (renormalised)."""
    p = policy.double().softmax(-1)
    q = ref.double().softmax(-1)
    if drop is not None:
        keep = torch.ones_like(p)
        keep.scatter_(-1, drop[:, None], 0.0)
        p, q = p * keep, q * keep
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    a, b = (q, p) if direction == "forward" else (p, q)
    terms = torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a))
    return terms.sum(-1)


def make_inputs(seed: int = 0, B: int = 3, T: int = 7, H: int = 5, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(B, T, V, generator=g) * 2
    hidden = torch.randn(B, T, H, generator=g)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    mask = torch.rand(B, T, generator=g) > 0.3
    return policy, hidden, head, mask


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_token_kl_matches_float64_reference_value_and_gradient(direction: str, chunk_rows: int) -> None:
    policy, hidden, head, mask = make_inputs()
    weights = torch.rand(mask.shape)  # an arbitrary downstream use of the per-token values

    z = policy.clone().requires_grad_(True)
    kl = token_kl(z, hidden, head, mask, direction=direction, chunk_rows=chunk_rows)
    (kl * weights).sum().backward()

    z64 = policy.double().clone().requires_grad_(True)
    ref_logits = head(hidden).detach().double()
    expected = torch.zeros(mask.shape, dtype=torch.float64)
    expected[mask] = reference_kl(z64[mask], ref_logits[mask], direction)
    (expected * weights.double()).sum().backward()

    assert torch.allclose(kl.double(), expected.detach(), atol=1e-5)
    assert (kl[~mask] == 0).all()
    assert torch.allclose(z.grad.double(), z64.grad, atol=1e-5)
    assert (z.grad[~mask] == 0).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_masked_target_kl_drops_the_label_and_renormalises(direction: str) -> None:
    policy, hidden, head, mask = make_inputs(seed=1)
    targets = torch.randint(0, policy.shape[-1], mask.shape)
    targets[0, 0] = IGNORE_INDEX  # rows without a target keep the plain KL
    mask[0, 0] = True
    z = policy.clone().requires_grad_(True)
    kl = token_kl(z, hidden, head, mask, direction=direction, targets=targets, chunk_rows=3)
    kl.sum().backward()
    assert torch.isfinite(z.grad).all()

    ref_logits = head(hidden).detach()
    for b, t in mask.nonzero().tolist():
        # reference: drop the label's column outright (no -inf anywhere), softmax over the rest, in float64
        keep = [j for j in range(policy.shape[-1]) if j != int(targets[b, t])]
        z64 = policy[b, t].double().clone().requires_grad_(True)
        want = reference_kl(z64[keep][None], ref_logits[b, t].double()[keep][None], direction)
        want.sum().backward()
        assert abs(float(kl[b, t]) - float(want)) < 1e-5
        assert torch.allclose(z.grad[b, t].double(), z64.grad, atol=1e-5)
        if targets[b, t] != IGNORE_INDEX:  # the label's own logit gets no gradient from this KL
            assert float(z.grad[b, t, int(targets[b, t])]) == 0.0


def test_topk_kl_is_a_lower_bound_that_becomes_exact_with_full_k() -> None:
    policy, hidden, head, mask = make_inputs(seed=2)
    V = policy.shape[-1]
    exact = token_kl(policy, hidden, head, mask, direction="forward")
    approx = token_kl(policy, hidden, head, mask, direction="forward", topk=3)
    full = token_kl(policy, hidden, head, mask, direction="forward", topk=V)
    assert (approx[mask] <= exact[mask] + 1e-6).all()
    assert (approx[mask] > 0).all()
    assert torch.allclose(full, exact, atol=1e-5)


def test_kl_is_zero_when_policy_equals_reference() -> None:
    _, hidden, head, mask = make_inputs(seed=3)
    logits = head(hidden).detach()
    for direction in ("forward", "reverse"):
        assert token_kl(logits, hidden, head, mask, direction=direction).abs().max() < 1e-6


def test_cross_entropy_ignores_masked_labels() -> None:
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[1, IGNORE_INDEX, 3, 0], [IGNORE_INDEX, IGNORE_INDEX, 5, 2]])
    keep = labels != IGNORE_INDEX
    expected = -logits.log_softmax(-1)[keep].gather(-1, labels[keep][:, None]).mean()
    assert torch.allclose(token_cross_entropy(logits, labels), expected)
    assert token_cross_entropy(logits, torch.full_like(labels, IGNORE_INDEX)) == 0


def test_arr_loss_combines_the_named_terms() -> None:
    sft, rep, kl = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    assert float(arr_loss(sft, rep, kl, replay_weight=0.5, kl_coef=0.1)) == pytest.approx(2 + 1.5 + 0.5)
    assert float(arr_loss(sft, None, None, replay_weight=1.0, kl_coef=1.0)) == 2.0
    assert float(masked_mean(torch.tensor([1.0, 3.0, 9.0]), torch.tensor([True, True, False]))) == 2.0


def test_bf16_logits_get_a_bf16_gradient_close_to_float32() -> None:
    policy, hidden, head, mask = make_inputs(seed=4)
    z32 = policy.clone().requires_grad_(True)
    token_kl(z32, hidden, head, mask).sum().backward()
    z16 = policy.to(torch.bfloat16).requires_grad_(True)
    kl16 = token_kl(z16, hidden, head, mask)
    kl16.sum().backward()
    assert z16.grad.dtype == torch.bfloat16 and kl16.dtype == torch.float32
    assert torch.allclose(z16.grad.float(), z32.grad, atol=2e-2)
