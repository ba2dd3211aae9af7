"""``head_losses`` (chunked CE + KL from hidden states) against float64 references written independently here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arrtune.losses import IGNORE_INDEX, KLTerm, default_chunk_rows, head_losses


def reference_kl(
    policy: torch.Tensor, ref: torch.Tensor, direction: str, drop: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain float64 KL per row of logits; with ``drop`` (N,), that row's token is cut out of both logits
    outright (no -inf anywhere) and the rest renormalised by the softmax."""
    rows = []
    for i in range(len(policy)):
        keep = [j for j in range(policy.shape[-1]) if drop is None or j != int(drop[i])]
        logp = policy[i, keep].double().log_softmax(-1)
        logq = ref[i, keep].double().log_softmax(-1)
        a, b = (logq, logp) if direction == "forward" else (logp, logq)
        rows.append((a.exp() * (a - b)).sum())
    return torch.stack(rows)


def make_inputs(seed: int = 0, B: int = 3, T: int = 7, H: int = 5, V: int = 11):
    """Policy and reference hidden states, a frozen output layer, labels with gaps, per-token weights."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    ref_hidden = hidden + 0.5 * torch.randn(B, T, H, generator=g)
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = IGNORE_INDEX
    ce_w = torch.rand(B, T, generator=g)
    kl_w = torch.rand(B, T, generator=g) * (torch.rand(B, T, generator=g) > 0.3)
    labels[0, 0], kl_w[0, 0] = IGNORE_INDEX, 0.0  # one position without any loss
    return hidden, ref_hidden, head, labels, ce_w, kl_w


def reference_loss(hidden, ref_hidden, head, labels, ce_w, kl_w, direction, drop=None):
    """float64: sum(ce_w * CE) + sum(kl_w * KL) with full logits, and the per-token values."""
    z = hidden.double() @ head.weight.T.double()
    q = (ref_hidden.double() @ head.weight.T.double()).detach()
    has = labels != IGNORE_INDEX
    ce = -z.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * has
    flat_drop = drop.reshape(-1) if drop is not None else None
    kl = reference_kl(z.reshape(-1, z.shape[-1]), q.reshape(-1, q.shape[-1]), direction, flat_drop).view(
        labels.shape
    )
    kl = kl * (kl_w != 0)
    return (ce * ce_w.double() * has).sum() + (kl * kl_w.double()).sum(), ce, kl


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 1000])
def test_ce_and_kl_match_float64_reference_value_and_gradient(direction: str, chunk_rows: int) -> None:
    hidden, ref_hidden, head, labels, ce_w, kl_w = make_inputs()
    h = hidden.clone().requires_grad_(True)
    kl = KLTerm(ref_hidden, head, kl_w, direction)
    loss, ce_tok, kl_tok = head_losses(h, head, labels, ce_w, kl, chunk_rows=chunk_rows)
    loss.backward()

    h64 = hidden.double().clone().requires_grad_(True)
    want, want_ce, want_kl = reference_loss(h64, ref_hidden, head, labels, ce_w, kl_w, direction)
    want.backward()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert torch.allclose(ce_tok.double(), want_ce.detach(), atol=1e-5)
    assert torch.allclose(kl_tok.double(), want_kl.detach(), atol=1e-5)
    assert (kl_tok[kl_w == 0] == 0).all() and (ce_tok[labels == IGNORE_INDEX] == 0).all()
    assert torch.allclose(h.grad.double(), h64.grad, atol=1e-5)
    # positions with neither a label nor a KL weight get no gradient
    idle = (labels == IGNORE_INDEX) & (kl_w == 0)
    assert idle.any() and (h.grad[idle] == 0).all()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_dropped_labels_leave_the_kl_and_renormalise(direction: str) -> None:
    hidden, ref_hidden, head, labels, ce_w, kl_w = make_inputs(seed=1)
    drop = labels.clone()
    drop[0] = IGNORE_INDEX  # rows without a dropped label keep the plain KL
    h = hidden.clone().requires_grad_(True)
    loss, _, kl_tok = head_losses(h, head, labels, 0.0, KLTerm(ref_hidden, head, kl_w, direction, drop),
                                  chunk_rows=3)  # fmt: skip
    loss.backward()
    assert torch.isfinite(h.grad).all()
    h64 = hidden.double().clone().requires_grad_(True)
    want, _, want_kl = reference_loss(
        h64, ref_hidden, head, labels, torch.zeros_like(ce_w), kl_w, direction, drop
    )
    want.backward()
    assert torch.allclose(kl_tok.double(), want_kl.detach(), atol=1e-5)
    assert torch.allclose(h.grad.double(), h64.grad, atol=1e-5)


def test_kl_is_zero_when_policy_equals_reference() -> None:
    hidden, _, head, labels, _, kl_w = make_inputs(seed=3)
    for direction in ("forward", "reverse"):
        _, _, kl = head_losses(hidden, head, labels, 1.0, KLTerm(hidden, head, kl_w, direction))
        assert kl.abs().max() < 1e-6


def test_cross_entropy_alone_is_torch_cross_entropy() -> None:
    hidden, _, head, labels, _, _ = make_inputs(seed=5)
    keep = labels != IGNORE_INDEX
    h = hidden.clone().requires_grad_(True)
    loss, _, _ = head_losses(h, head, labels, 1.0 / int(keep.sum()))
    expected = torch.nn.functional.cross_entropy(head(hidden)[keep], labels[keep])
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    with torch.no_grad():  # values only: nothing for backward is built
        loss, _, _ = head_losses(h, head, labels, 1.0)
    assert loss.grad_fn is None


def test_trainable_and_softcapped_heads_get_autograd_gradients() -> None:
    """A trainable output layer (e.g. LoRA on lm_head) and a soft-capped one (Gemma) behave like autograd."""
    hidden, ref_hidden, head, labels, ce_w, kl_w = make_inputs(seed=6)
    head.requires_grad_(True)

    def capped(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(head(x) / 3.0) * 3.0

    h = hidden.clone().requires_grad_(True)
    loss, _, _ = head_losses(h, capped, labels, ce_w, KLTerm(ref_hidden, capped, kl_w), [head.weight], 4)
    loss.backward()
    ours_h, ours_w = h.grad.clone(), head.weight.grad.clone()
    head.weight.grad = None
    h2 = hidden.clone().requires_grad_(True)
    z = capped(h2).log_softmax(-1)
    with torch.no_grad():
        logq = capped(ref_hidden).log_softmax(-1)
    has = labels != IGNORE_INDEX
    ce = -z.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * has
    kl = (z.exp() * (z - logq)).sum(-1)
    ((ce * ce_w).sum() + (kl * kl_w).sum()).backward()
    assert torch.allclose(ours_h, h2.grad, atol=1e-5)
    assert torch.allclose(ours_w, head.weight.grad, atol=1e-5)


def test_bf16_autocast_is_close_to_float32() -> None:
    hidden, ref_hidden, head, labels, ce_w, kl_w = make_inputs(seed=4, H=64, V=97)
    results = []
    for enabled in (False, True):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss, _, _ = head_losses(h, head, labels, ce_w, KLTerm(ref_hidden, head, kl_w))
        loss.backward()
        assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32
        results.append((float(loss.detach()), h.grad))
    (loss32, g32), (loss16, g16) = results
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert (g16 - g32).abs().max() < 0.05 * g32.abs().max()


def test_default_chunk_rows_bounds_one_float32_logits_block() -> None:
    for vocab in (11, 49_152, 151_936, 262_144):
        rows = default_chunk_rows(vocab)
        assert rows >= 16 and (rows * vocab * 4 <= 32 * 2**20 or rows == 16)


def test_plain_arr_loss_is_the_formula() -> None:
    from arrtune.losses import arr_loss

    torch.manual_seed(0)
    sft, ref_sft = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    replay, ref_replay = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    sft_labels = torch.randint(0, 11, (2, 5))
    sft_labels[:, :2] = -100  # the prompt
    replay_labels = torch.randint(0, 11, (3, 5))
    ce_sft = F.cross_entropy(sft.reshape(-1, 11), sft_labels.reshape(-1), ignore_index=-100)
    ce_replay = F.cross_entropy(replay.reshape(-1, 11), replay_labels.reshape(-1))
    plain = arr_loss(sft, sft_labels, ref_sft, replay, replay_labels, ref_replay, replay_weight=0.5)
    assert torch.allclose(plain, ce_sft + 0.5 * ce_replay)
    # reverse KL on the replay tokens of the first 2 of 3 rows (kl_fraction 0.5 -> ceil(1.5) = 2)
    logp, logq = replay.log_softmax(-1)[:2], ref_replay.log_softmax(-1)[:2]
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    got = arr_loss(sft, sft_labels, ref_sft, replay, replay_labels, ref_replay, replay_weight=0.5, kl_coef=0.3,
                   kl_on="replay", kl_fraction=0.5)  # fmt: skip
    assert torch.allclose(got, ce_sft + 0.5 * ce_replay + 0.3 * kl)
    # forward KL on the SFT response tokens only
    has = sft_labels != -100
    logp, logq = sft.log_softmax(-1), ref_sft.log_softmax(-1)
    fkl = (logq.exp() * (logq - logp)).sum(-1)[has].mean()
    got = arr_loss(sft, sft_labels, ref_sft, kl_coef=2.0, kl_on="sft", kl_direction="forward")
    assert torch.allclose(got, ce_sft + 2.0 * fkl)
    # identical policy and reference: no KL, whatever the options
    same = arr_loss(sft, sft_labels, sft.clone(), kl_coef=5.0, kl_on="sft", kl_mask_target=True)
    assert torch.allclose(same, ce_sft, atol=1e-6)


def _parts_for_grid(seed: int, short_replay: bool, padding: bool, H: int = 6, V: int = 13):
    """SFT rows with prompts (IGNORE_INDEX) and optional right padding, replay rows that are optionally short
    (one row narrower than the SFT rows, mostly padding), both policy and reference hidden states."""
    g = torch.Generator().manual_seed(seed)
    sft_hidden = torch.randn(3, 7, H, generator=g)
    sft_labels = torch.randint(0, V, (3, 7), generator=g)
    sft_labels[:, :2] = IGNORE_INDEX  # the prompt
    if padding:
        sft_labels[1, 5:] = IGNORE_INDEX
        sft_labels[2, 4:] = IGNORE_INDEX
    width = 3 if short_replay else 7
    replay_hidden = torch.randn(2, width, H, generator=g)
    replay_labels = torch.randint(0, V, (2, width), generator=g)
    if padding:
        replay_labels[1, width - 1 :] = IGNORE_INDEX
    ref_sft = sft_hidden + 0.7 * torch.randn(sft_hidden.shape, generator=g)
    ref_replay = replay_hidden + 0.7 * torch.randn(replay_hidden.shape, generator=g)
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    return sft_hidden, sft_labels, ref_sft, replay_hidden, replay_labels, ref_replay, head


@pytest.mark.parametrize("kl_on", ["sft", "replay", "both"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("mask_target", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("short_replay", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_chunked_objective_equals_the_specification(
    kl_on, direction, mask_target, fraction, short_replay, padding
):
    """chunked_arr_loss (hidden states, chunks of 4 token rows) == arr_loss (full logits): value and the
    gradient of every hidden state, over the whole option grid; no model involved."""
    from arrtune.losses import arr_loss, chunked_arr_loss

    sft_h, sft_y, ref_sft, rep_h, rep_y, ref_rep, head = _parts_for_grid(0, short_replay, padding)
    options = dict(replay_weight=0.7, kl_coef=0.3, kl_on=kl_on, kl_direction=direction,
                   kl_mask_target=mask_target, kl_fraction=fraction)  # fmt: skip
    a = [sft_h.clone().requires_grad_(True), rep_h.clone().requires_grad_(True)]
    spec = arr_loss(head(a[0]), sft_y, head(ref_sft), head(a[1]), rep_y, head(ref_rep), **options)
    spec.backward()
    b = [sft_h.clone().requires_grad_(True), rep_h.clone().requires_grad_(True)]
    fast = chunked_arr_loss(b[0], sft_y, ref_sft, b[1], rep_y, ref_rep, head=head, chunk_rows=4, **options)
    fast.backward()
    assert torch.allclose(fast, spec, rtol=1e-5, atol=1e-6), (float(fast), float(spec))
    for x, y in zip(a, b):
        assert torch.allclose(y.grad, x.grad, rtol=1e-4, atol=1e-6), float((y.grad - x.grad).abs().max())


def test_chunked_objective_without_replay_or_kl_is_the_response_cross_entropy() -> None:
    from arrtune.losses import chunked_arr_loss

    sft_h, sft_y, *_, head = _parts_for_grid(1, False, True)
    got = chunked_arr_loss(sft_h, sft_y, None, head=head)
    want = F.cross_entropy(head(sft_h).reshape(-1, head.out_features), sft_y.reshape(-1), ignore_index=-100)
    assert torch.allclose(got, want, rtol=1e-5)


def test_token_weights_are_the_means_of_the_specification() -> None:
    from arrtune.losses import token_weights

    sft = torch.tensor([[-100, 1, 2], [-100, -100, 3]])
    replay = torch.tensor([[4, 5, -100], [6, 7, 8]])
    w = token_weights(
        {"sft": sft, "replay": replay}, replay_weight=0.5, kl_coef=2.0, kl_on="both", kl_fraction=0.5
    )
    assert w["sft"].n_targets == 3 and w["replay"].n_targets == 5
    assert torch.allclose(w["sft"].ce_weight, (sft != -100) / 3.0)
    assert torch.allclose(w["replay"].ce_weight, 0.5 * (replay != -100) / 5.0)
    # the KL on the first ceil(0.5 x 2) = 1 row of each part: 2 + 2 tokens, one mean over the four
    assert (w["sft"].n_kl_targets, w["replay"].n_kl_targets) == (2, 2)
    assert torch.allclose(w["sft"].kl_weight, torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]))
    assert torch.allclose(w["replay"].kl_weight, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
