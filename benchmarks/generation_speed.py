"""Self-replay generation speed: Hugging Face ``generate`` with its dynamic cache vs. a static cache.

Answers the first ``--prompts`` prompts of the built-in self-replay pool with the built-in model, the way
``replay: self`` does (chat template, left-padded batches of ``--batch-size``, sampling at temperature 0.7 and
top-p 0.9, up to ``--max-new-tokens`` tokens), once per cache kind, the kinds taking turns for ``--repeats``
rounds so that a drift of the machine's speed hits them alike; prints the best and the median wall time of each
kind and its generated tokens per second. Kinds:

* ``dynamic``: transformers' default cache, which grows by one position per generated token (what
  ``arrtune.generation.generate`` uses on CPU);
* ``static``: a cache allocated once at its full length (``cache_implementation="static"``), so every decoding
  step has the same shapes; on CUDA, ``generate`` then compiles the model's forward (``torch.compile``), which
  is where static shapes pay;
* ``static-compiled``: the same, compiled on this device too (transformers does so only on accelerators).

It also checks that greedy answers agree between the kinds (the cache changes the arithmetic's order, so a
near-tie may flip; the count of differing answers is printed).

    python benchmarks/generation_speed.py                          # 64 prompts, batch 32, 96 new tokens
    python benchmarks/generation_speed.py --kinds dynamic static --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=["dynamic", "static", "static-compiled"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    from arrtune.data.corpora import self_replay_prompts
    from arrtune.generation import generate, question_prompt_ids
    from arrtune.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", dtype=getattr(torch, args.dtype))
    prompts = [question_prompt_ids(tokenizer, p) for p in list(self_replay_prompts())[: args.prompts]]
    print(f"{len(prompts)} prompts, batch {args.batch_size}, up to {args.max_new_tokens} new tokens, "
          f"{args.dtype} weights, {torch.get_num_threads()} threads")  # fmt: skip

    greedy = {
        kind: generate(model, tokenizer, prompts[: args.batch_size], 24, args.batch_size, cache=kind)
        for kind in args.kinds
    }  # fmt: skip  (also the warm-up: compiles the compiled kind)
    for kind in args.kinds[1:]:
        differ = sum(a != b for a, b in zip(greedy[args.kinds[0]], greedy[kind]))
        print(f"greedy answers, {kind} vs {args.kinds[0]}: {differ} of {len(greedy[kind])} differ")

    seconds: dict[str, list[float]] = {kind: [] for kind in args.kinds}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for kind in args.kinds:
            torch.manual_seed(0)
            start = time.perf_counter()
            out = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, temperature=0.7,
                           top_p=0.9, cache=kind)  # fmt: skip
            seconds[kind].append(time.perf_counter() - start)
            tokens[kind] = sum(len(a) for a in out)
    print(f"{'kind':<16} {'best s':>8} {'median s':>9} {'tokens':>7} {'tok/s':>7}")
    for kind in args.kinds:
        best = min(seconds[kind])
        print(f"{kind:<16} {best:8.1f} {statistics.median(seconds[kind]):9.1f} {tokens[kind]:7d} "
              f"{tokens[kind] / best:7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
