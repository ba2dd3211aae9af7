"""The drift budget: kl_coef becomes a multiplier that holds the smoothed KL at ``drift_budget``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from arrtune.budget import KLController
from arrtune.config_files import load_config
from arrtune.errors import ArrtuneError
from arrtune.recipe import train
from arrtune.testing import copy_run

BUDGET = 0.005  # nats per replay token; with these settings a fixed kl_coef of about 30 holds it


def _args(model: Path, out: Path, coef: float, steps: int, **extra: object) -> list[str]:
    values = {"model": model, "output_dir": out, "method": "arr", "replay_ratio": 1, "kl_coef": coef, "drift_budget": BUDGET,
              "max_steps": steps, "warmup_steps": 0, "per_device_train_batch_size": 4, "learning_rate": 0.01,
              "precision": "fp32", "disable_tqdm": True, **extra}  # fmt: skip
    return [f"{k}={v}" for k, v in values.items()]


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "kl_coef" in r]


def test_controller_rule() -> None:
    ctl = KLController(coef=1.0, budget=0.1)
    ctl.update(0.0)  # the adapter has not moved yet: no information, nothing changes
    assert ctl.smoothed is None and ctl.coef == 1.0
    ctl.update(0.2)  # twice the budget: the integral up by e^(0.3 log 2), the coefficient by e^(1.3 log 2)
    assert ctl.smoothed == 0.2 and ctl.integral == pytest.approx(2**0.3) and ctl.coef == pytest.approx(2**1.3)
    ctl.update(0.05)  # falling: the forecast 4 steps ahead is below the smoothed KL
    smoothed = 0.75 * 0.2 + 0.25 * 0.05
    assert ctl.smoothed == pytest.approx(smoothed)
    assert ctl.forecast == pytest.approx(smoothed * (smoothed / 0.2) ** 4)
    assert ctl.integral == pytest.approx(2**0.3 * (ctl.forecast / 0.1) ** 0.3)
    assert ctl.coef == pytest.approx(ctl.integral * ctl.forecast / 0.1)

    rising = KLController(coef=1.0, budget=0.1)
    for kl in (0.001, 0.0011, 0.0013):  # far below the budget, but rising: the coefficient is held
        rising.update(kl)
    assert rising.coef == 1.0 and rising.growth > 0
    kl = 0.002
    while rising.forecast < 0.1:  # doubling every step: the forecast crosses the budget first
        kl *= 2
        rising.update(kl)
    assert rising.smoothed < 0.1 and rising.coef > 1.0  # raised before the KL reaches the budget

    idle = KLController(coef=1.0, budget=0.1)
    for _ in range(200):
        idle.update(1e-6)  # no drift at all: the coefficient falls, but not below 1e-4 x its start
    assert idle.coef == pytest.approx(1e-4)


# 100x below and above the coefficient that holds the budget; measured on the probe (default) and, from below,
# on the loss's own KL tokens (drift_probe 0)
@pytest.mark.parametrize(("start", "probe"), [(0.3, 4), (3000.0, 4), (0.3, 0)])
def test_closed_loop_reaches_the_budget_from_far_off(
    start: float, probe: int, tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = train(load_config(None, _args(tiny_model_dir, tmp_path / "run", start, 150, drift_probe=probe)))
    records = _records(run)
    assert len(records) == 150 and all(r["drift_budget"] == BUDGET for r in records)
    assert all(("drift_probe" in r) == bool(probe) for r in records[1:])
    final = records[-1]["kl_smoothed"]
    assert BUDGET * 0.5 <= final <= BUDGET * 1.5, final
    # it moved the coefficient towards the right range (about 30), from either side
    assert 3 <= records[-1]["kl_coef"] <= 3000


def test_controller_state_is_checkpointed_and_resumed(tiny_model_dir: Path, tmp_path: Path) -> None:
    full = train(load_config(None, _args(tiny_model_dir, tmp_path / "full", 30.0, 8, save_steps=4)))
    saved = json.loads((full / "checkpoints" / "checkpoint-4" / "kl_controller_rank0.json").read_text())
    assert saved["coef"] == pytest.approx(_records(full)[3]["kl_coef"])
    res = copy_run(full, tmp_path / "res")
    shutil.rmtree(res / "adapter")
    shutil.rmtree(res / "checkpoints" / "checkpoint-8")
    (res / "train_summary.json").unlink()
    train(load_config(None, _args(tiny_model_dir, res, 30.0, 8, save_steps=4)))
    want, got = _records(full), _records(res)
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(want, got):
        assert a["kl_coef"] == pytest.approx(b["kl_coef"], rel=1e-6)


def test_a_budget_needs_a_kl() -> None:
    with pytest.raises(ArrtuneError, match="drift_budget"):
        load_config(None, ["method=replay", "drift_budget=0.1"])
    with pytest.raises(ArrtuneError, match="drift_budget=-0.1 must be > 0"):
        load_config(None, ["drift_budget=-0.1"])


def test_probe_reads_the_drift_arrtune_eval_measures(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The probe's last reading equals KL(initial || trained) per token, computed here from full logits, on the
    last drift_probe documents of the replay corpus's epoch-0 order (first 256 tokens after BOS)."""
    import torch
    from peft import PeftModel

    from arrtune.data.replay import ReplayStream
    from arrtune.models import load_model, load_tokenizer

    run = train(load_config(None, _args(tiny_model_dir, tmp_path / "run", 30.0, 6, drift_probe=3)))
    reading = _records(run)[-1]["drift_probe"]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    stream = ReplayStream("builtin", tokenizer, seed=0)
    texts = [stream.texts[i] for i in stream.document_ids(epoch=0)[-3:]]
    model = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), run / "adapter").eval()
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[start] + tokenizer(text, add_special_tokens=False)["input_ids"][:256]])
            logp = model(ids).logits[0, :-1].float().log_softmax(-1)
            with model.disable_adapter():
                logq = model(ids).logits[0, :-1].float().log_softmax(-1)
            total += float((logq.exp() * (logq - logp)).sum())
            tokens += ids.shape[1] - 1
    assert reading > 1e-6
    assert reading == pytest.approx(total / tokens, rel=1e-3)
