"""Where in a passage a fine-tune's drift sits: KL(initial || adapted) per token by position.

For a trained run, scores whole passages from their start (BOS + the first 256 tokens) on held-out Wikipedia
and on documents of the built-in replay corpus, and prints the mean KL per 32-position bucket, over the first 55
positions (about the width of a replay row on the built-in tasks) and over all 256. The drift budget's probe
measures whole passages for this reason (docs/drift_budget.md).

    python benchmarks/kl_by_position.py runs/budget/runs/arr-kl_coef=0.3-seed=2 [--passages 24]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import yaml
from peft import PeftModel

from arrtune.data.corpora import heldout_wiki_texts, replay_texts
from arrtune.models import load_model, load_tokenizer

WIDTH = 256
BUCKET = 32
ROW = 55  # about the replay rows' width on the built-in tasks (the SFT batch's width)


def kl_by_position(model: PeftModel, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the per-token KL(initial || adapted) at each position over ``texts``, and the count there."""
    total, count = torch.zeros(WIDTH), torch.zeros(WIDTH)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[start] + tokenizer(text, add_special_tokens=False)["input_ids"][:WIDTH]])
            logp = model(ids).logits[0, :-1].float().log_softmax(-1)
            with model.disable_adapter():
                logq = model(ids).logits[0, :-1].float().log_softmax(-1)
            kl = (logq.exp() * (logq - logp)).sum(-1)
            total[: len(kl)] += kl
            count[: len(kl)] += 1
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained run directory (holds adapter/ and config.yaml)")
    parser.add_argument("--passages", type=int, default=24)
    args = parser.parse_args()
    spec = yaml.safe_load(Path(args.run, "config.yaml").read_text())["model"]
    tokenizer = load_tokenizer(spec)
    model = PeftModel.from_pretrained(load_model(spec), f"{args.run}/adapter").eval()
    rng = random.Random(0)
    for name, texts in (("held-out wiki", heldout_wiki_texts()), ("replay documents", replay_texts())):
        total, count = kl_by_position(model, tokenizer, rng.sample(list(texts), args.passages))

        def mean(a: int, b: int, total: torch.Tensor = total, count: torch.Tensor = count) -> float:
            return float(total[a:b].sum() / count[a:b].sum())

        buckets = " ".join(f"{mean(i, i + BUCKET):.3f}" for i in range(0, WIDTH, BUCKET))
        print(
            f"{name}: all {mean(0, WIDTH):.3f}, first {ROW} {mean(0, ROW):.3f}, per {BUCKET} positions {buckets}"
        )


if __name__ == "__main__":
    main()
