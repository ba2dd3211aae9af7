"""ARR's compute and memory overhead, measured side by side in one run.

Methods: sft, kl, replay, arr; ``arr-copy``, ARR with the KL reference held as a **separate frozen copy**
of the model (the common approach in other trainers); and ``sft-hf``, the plain transformers step
(``model(**batch).loss`` with full logits), for context. For each model and precision one worker process
builds the LoRA model once and runs every method's optimizer step in turn, round after round (one warm-up
round, then ``--steps`` timed rounds; each round starts one method later than the last), so drifts in this
machine's speed, and what ran just before, hit all methods alike. A step is
arrtune's real training code: ``ARRTrainer.training_step`` (both passes with their backward, under the
Trainer's own autocast) plus the AdamW step. It reports the median step time and SFT tokens/s, each also
as a ratio to ``sft``.

Peak memory, per method in a process of its own: on GPU ``torch.cuda.max_memory_allocated``; on CPU the
peak RSS of a one-step run (the peak is reset once the model is built, so loading or quantizing it does not
count) with ``MALLOC_MMAP_THRESHOLD_=65536``, where every block over 64 KiB goes back to
the OS when freed, so RSS tracks live memory (glibc's default keeps freed blocks and grows its heap rather
than reuse them, which overstates what a step needs, and makes the number depend on allocation history).

Time floors: the **FLOP floor** is the ratio of matmul FLOPs actually required (see ``step_flops``: policy
forward + activation backward over every position, the output layer only where a loss needs it, the
reference's no-grad forward over the KL rows); the **simple floor** is the rule of thumb (a LoRA step ~ 2
forwards per token, the reference +1 per KL token, replay doubles the tokens). MFU is the FLOP count over the
step time, against this machine's measured matmul rate.

Real shapes: ``qwen2.5-1.5b-shape`` and ``qwen2.5-7b-shape`` are random-weight models built from the
configs of Qwen2.5-1.5B and -7B. ``--weights`` sets the precision of the base weights (``fp32``, ``bf16``, or
``nf4``: bitsandbytes 4-bit, QLoRA) independently of the training precision (``--precisions``: autocast);
``--checkpointing on`` adds gradient checkpointing. ``--memory-only`` skips the interleaved timing rounds
and runs each method alone for one step (peak memory, and that one step's time), for shapes where rounds
would take too long.

    python benchmarks/overhead.py                       # both small models, fp32 and bf16 on CPU
    python benchmarks/overhead.py --models smollm2 --precisions bf16 --weights fp32 bf16 --steps 3
``--synthetic`` uses random token rows (the last 20% of each SFT row as the response) and random replay rows
instead of the built-in task and corpus, so the script needs neither the model nor the data packages (what
``benchmarks/gpu.sh`` runs on a GPU machine).

    python benchmarks/overhead.py --models qwen2.5-1.5b-shape --precisions bf16 --weights fp32 bf16 nf4 \
        --checkpointing off on --methods sft arr --memory-only
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("sft-hf", "sft", "kl", "replay", "arr", "arr-copy", "arr-kl_half", "arr-default")
QWEN_05B_SHAPE = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
)  # fmt: skip


QWEN_15B_SHAPE = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
)  # fmt: skip
QWEN_7B_SHAPE = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False,
)  # fmt: skip
#: a few-MB model of Qwen2.5's architecture: for checking this script (and gpu.sh) end to end, not for numbers
TINY_SHAPE = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
)  # fmt: skip
SHAPES = {"qwen2.5-0.5b-shape": QWEN_05B_SHAPE, "qwen2.5-1.5b-shape": QWEN_15B_SHAPE,
          "qwen2.5-7b-shape": QWEN_7B_SHAPE, "tiny-shape": TINY_SHAPE}  # fmt: skip


class SyntheticTokenizer:
    """What the trainer needs of a tokenizer in ``--synthetic`` mode: a pad id."""

    pad_token_id = 0


class SyntheticReplay:
    """Random replay tokens, packed into rows of the SFT batch's width as ``ReplayStream`` packs them (the last
    row right-padded), so a replay batch costs what a real one does."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.vocab, self.generator = vocab, torch.Generator().manual_seed(seed)

    def batch(self, n_tokens: int, width: int, pad_id: int) -> dict[str, torch.Tensor]:
        from arrtune.data.replay import pack

        tokens = torch.randint(1, self.vocab, (n_tokens,), generator=self.generator).tolist()
        return pack(tokens, [True] * n_tokens, width, pad_id)

    def state_dict(self) -> dict[str, int]:
        return {}


def synthetic_batch(rows: int, width: int, vocab: int) -> dict[str, torch.Tensor]:
    """Random SFT rows whose last 20% of tokens are the response (carry labels)."""
    ids = torch.randint(1, vocab, (rows, width), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, : int(0.8 * width)] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def build_model(
    name: str, weights: str = "fp32", compute: torch.dtype = torch.float32, synthetic: bool = False
):
    """The model under test: SmolLM2-135M (real weights) or a random model of a Qwen2.5 shape, with base
    weights in ``weights`` (fp32, bf16, or nf4 via a saved copy reloaded 4-bit, computing in ``compute``)."""
    import hashlib

    from arrtune.models import load_model, load_tokenizer

    # token ids < 49152 are valid in Qwen's vocabulary
    tokenizer = SyntheticTokenizer() if synthetic else load_tokenizer("smollm2-135m-instruct")
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    if name == "smollm2":
        if weights == "nf4":
            return load_model("smollm2-135m-instruct", dtype=compute, load_in_4bit=True), tokenizer
        return load_model("smollm2-135m-instruct", dtype=dtype), tokenizer
    if weights == "nf4":  # arrtune's own 4-bit loading, from a bf16 copy saved once for all worker processes
        saved = (
            Path(tempfile.gettempdir())
            / f"arrtune-{name}-{hashlib.sha1(repr(SHAPES[name]).encode()).hexdigest()[:8]}"
        )
        if not saved.is_dir():  # renamed into place once complete: present means whole
            partial = Path(tempfile.mkdtemp(prefix=saved.name + ".tmp-", dir=saved.parent))
            random_model(name, "bf16").save_pretrained(partial)
            partial.rename(saved)  # complete or absent: a killed save never passes for a model
        return load_model(str(saved), dtype=compute, load_in_4bit=True), tokenizer
    return random_model(name, weights), tokenizer


def random_model(name: str, weights: str):
    """A random-weight model of shape ``name``, built in place on the GPU where there is one (seconds at 7B,
    where initializing on the CPU takes minutes), with fp32 or bf16 weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if weights == "bf16" else torch.float32)  # build in place, no copy
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            return Qwen2ForCausalLM(Qwen2Config(**SHAPES[name]))
    finally:
        torch.set_default_dtype(previous)


def matmul_flops(model) -> tuple[int, int]:
    """(multiply-adds per position in the matmuls except the output layer's, in the output layer's), from
    each linear layer's shape: a 4-bit layer stores its weight packed, so its parameter count would halve it."""
    head_layer = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    body = sum(m.in_features * m.out_features for m in linears if m is not head_layer)
    return body, head_layer.in_features * head_layer.out_features


def measured_matmul_rate(dtype: torch.dtype, device: str) -> float:
    """FLOP/s of a large square matmul on this machine (the MFU denominator): the best of 5 timings."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * 3 / (time.perf_counter() - start))
    return best


#: each method's arrtune settings, over ``method: arr``'s preset. ``arr`` is ARR at its costliest common
#: setting (replay_ratio 1, the KL on every row); ``arr-default`` is what ``method: arr`` trains with
#: (kl_coef 1, replay_ratio 0.25, the KL on the replay rows)
SETTINGS: dict[str, dict] = {
    "sft-hf": {"kl_coef": 0, "replay_ratio": 0}, "sft": {"kl_coef": 0, "replay_ratio": 0},
    "kl": {"kl_coef": 0.1, "replay_ratio": 0, "kl_on": "both"}, "replay": {"kl_coef": 0, "replay_ratio": 1},
    "arr": {"kl_coef": 0.1, "replay_ratio": 1, "kl_on": "both"},
    "arr-copy": {"kl_coef": 0.1, "replay_ratio": 1, "kl_on": "both"},
    "arr-kl_half": {"kl_coef": 0.1, "replay_ratio": 1, "kl_on": "both", "kl_fraction": 0.5},
    "arr-default": {},
}  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    """Measure ``args.methods`` on one model and precision in this process and print one JSON line each.

    Timing mode: every method's step runs in turn, round after round (after one warm-up round), each round
    starting one method later than the last, so drifts of this machine's speed, and the order, hit all
    methods alike; the median per method is reported. Memory mode
    (``--memory``, one method): one step, then the peak memory.
    """

    from peft import LoraConfig, get_peft_model

    from arrtune.config_files import build_config
    from arrtune.data.replay import ReplayStream
    from arrtune.data.sft import collate_sft, load_sft_examples
    from arrtune.trainer import ARRTrainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model, tokenizer = build_model(args.model, args.weights, compute, args.synthetic)
    copy_ref = None
    if "arr-copy" in args.methods:  # the common approach: a second, frozen model as the reference
        copy_ref = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    if args.weights == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing == "on")
    elif args.checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(
        model if args.weights == "nf4" else model.to(device),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )

    class CopyReference:
        """arr-copy's KL reference: the separate frozen copy, in ``InitialModel``'s interface."""

        def hidden(self, ids, mask):
            with torch.no_grad():
                return copy_ref.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state

        def head(self, _policy_head=None):
            return lambda hidden: copy_ref.get_output_embeddings()(hidden).detach()

    if args.synthetic:
        vocab = min(49152, model.get_output_embeddings().weight.shape[0])
        batch = {k: v.to(device) for k, v in synthetic_batch(args.batch_size, args.max_length, vocab).items()}
        replay = SyntheticReplay(vocab)
    else:  # built-in task examples packed to max_length tokens per row
        examples, _ = load_sft_examples("builtin:vornish", tokenizer, max_length=args.max_length)
        rows = []
        for i in range(args.batch_size):  # concatenate examples until a row holds max_length tokens
            ids, labels, j = [], [], i
            while len(ids) + len(examples[j % len(examples)]["input_ids"]) <= args.max_length:
                ids += examples[j % len(examples)]["input_ids"]
                labels += examples[j % len(examples)]["labels"]
                j += args.batch_size
            rows.append({"input_ids": ids, "labels": labels})
        batch = {k: v.to(device) for k, v in collate_sft(rows, tokenizer.pad_token_id).items()}
        replay = ReplayStream("builtin", tokenizer)
    sft_tokens = int(batch["attention_mask"].sum())
    trainers = {}
    for method in args.methods:
        targs = build_config({"output_dir": os.path.join(tempfile.gettempdir(), "arrtune-bench"), "max_steps": 1,
                              "use_cpu": device == "cpu", "precision": args.precision, "method": "arr",
                              **SETTINGS[method]}, "benchmark")  # fmt: skip
        trainers[method] = ARRTrainer(model=model, args=targs, processing_class=tokenizer,
                                      replay=replay if targs.resolved_replay_ratio() else None)  # fmt: skip
    if "arr-copy" in trainers:
        trainers["arr-copy"].reference = CopyReference()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(method: str) -> float:
        trainer = trainers[method]
        start = time.perf_counter()
        if method == "sft-hf":  # what a plain transformers/TRL SFT step does: full logits, HF's loss
            with trainer.accelerator.autocast():
                loss = model(**batch).loss
            loss.backward()
        else:
            trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()  # the peak of the steps, not of building or loading the model
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for round_ in range(args.warmup + args.steps):
        # each round starts one method later, so that no method always follows the same one: a step's time
        # depends on what ran before it (memory the previous step freed or kept), by up to ~10% on CPU
        shift = round_ % len(args.methods)
        for method in args.methods[shift:] + args.methods[:shift]:
            elapsed = step(method)
            if round_ >= args.warmup:
                times[method].append(elapsed)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss()
    body, head = matmul_flops(model.get_base_model())
    # positions the matmuls run on: every position of a row through the body; the output layer only where a
    # loss needs it (label tokens; all positions for sft-hf, which computes full logits)
    sft_pos, sft_labels = batch["input_ids"].numel(), int((batch["labels"][:, 1:] != -100).sum())
    source = SyntheticReplay(vocab) if args.synthetic else ReplayStream("builtin", tokenizer)
    for method in args.methods:
        cfg = trainers[method].args
        kl, ratio, kl_on, fraction = (cfg.resolved_kl_coef(), cfg.resolved_replay_ratio(), cfg.resolved_kl_on(),
                                      cfg.kl_fraction)  # fmt: skip
        n_replay, replay_width = trainers[method].replay_shape(sft_tokens, batch["input_ids"].shape[1])
        rb = source.batch(n_replay, replay_width, tokenizer.pad_token_id)  # the replay rows the trainer draws
        # the reference's rows: the first ceil(fraction x rows) of the SFT rows and of the replay rows it covers
        ref_rows = [(b, math.ceil(fraction * len(b["input_ids"]))) for b, on in ((batch, kl_on != "replay"),
                    (rb, kl_on != "sft" and ratio > 0)) if on]  # fmt: skip
        print(json.dumps({
            "model": args.model, "method": method, "precision": args.precision, "device": device,
            "weights": args.weights, "checkpointing": args.checkpointing,
            "step_s": statistics.median(times[method]) if times[method] else float("nan"),
            "times": times[method], "sft_tokens": sft_tokens, "peak_bytes": peak, "body_params": body,
            "head_params": head, "replay_ratio": ratio, "kl": kl > 0, "kl_on": kl_on, "kl_fraction": fraction,
            "sft_positions": sft_pos,
            "sft_head_positions": sft_pos if method == "sft-hf" else sft_labels,
            "replay_positions": rb["input_ids"].numel() if ratio else 0,
            "replay_head_positions": int((rb["labels"][:, 1:] != -100).sum()) if ratio else 0,
            "ref_positions": sum(b["input_ids"][:k].numel() for b, k in ref_rows) if kl else 0,
            "ref_head_positions": sum(int((b["labels"][:k, 1:] != -100).sum()) for b, k in ref_rows) if kl else 0,
        }))  # fmt: skip


def reset_peak_rss() -> None:
    """Reset this process's peak resident set size (Linux: ``/proc/self/clear_refs``), where possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident set size in bytes since :func:`reset_peak_rss` (``VmHWM``; else ``ru_maxrss``)."""
    import re
    import resource

    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step_flops(r: dict) -> float:
    """Matmul FLOPs of one step: policy forward + activation backward (2 + 2 FLOPs per parameter and
    position) over the SFT and replay rows, the output layer only where used, and the reference's no-grad
    forward (2 per parameter and position) over the rows that carry the KL (kl_on: both)."""
    body, head = r["body_params"], r["head_params"]
    positions = r["sft_positions"] + r["replay_positions"]
    head_positions = r["sft_head_positions"] + r["replay_head_positions"]
    reference = 2 * body * r["ref_positions"] + 2 * head * r["ref_head_positions"]
    return 4 * body * positions + 4 * head * head_positions + reference


def simple_floor(r: dict) -> float:
    """The rule of thumb, as a multiple of ``sft``: a step = 2 forwards per token; the reference adds 1 forward
    per KL token; replay adds ``replay_ratio`` x the SFT tokens."""
    ratio, kl_on = r["replay_ratio"], r.get("kl_on", "both")
    kl_tokens = r["kl"] * r.get("kl_fraction", 1) * ((kl_on != "replay") + ratio * (kl_on != "sft"))
    return ((1 + ratio) * 2 + kl_tokens) / 2


#: the worker commands that failed (the script then exits 1, after reporting the rows that were measured)
FAILED: list[list[str]] = []


def run_worker(cmd: list[str], env: dict[str, str] | None = None) -> list[dict]:
    """Run measurements in a fresh process; their JSON lines (none, with stderr printed, on failure)."""
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"FAILED: {' '.join(cmd[2:])}\n{out.stderr[-2000:]}")
        FAILED.append(cmd)
        return []
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen2.5-0.5b-shape"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "bf16"], help="training precision (autocast)"
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16", "nf4"],
        help="precision of the base weights (nf4: 4-bit, QLoRA)",
    )
    parser.add_argument(
        "--checkpointing", nargs="+", default=["off"], choices=["off", "on"], help="gradient checkpointing"
    )
    parser.add_argument("--synthetic", action="store_true", help="random token rows (no model/data packages)")
    parser.add_argument("--peak-tflops", type=float, help="MFU denominator (default: a measured matmul rate)")
    parser.add_argument("--memory-only", action="store_true",
                        help="no timing rounds: each method alone, one step (peak memory and that step's time)")  # fmt: skip
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (every method once per round)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--weight", dest="weights_one", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", dest="checkpointing_one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args()
    if args.worker:
        args.weights, args.checkpointing = args.weights_one, args.checkpointing_one
        worker(args)
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rates = {
        p: args.peak_tflops * 1e12
        if args.peak_tflops
        else measured_matmul_rate(torch.bfloat16 if p == "bf16" else torch.float32, device)
        for p in args.precisions
    }
    print(
        f"device: {device}; MFU denominator ({'--peak-tflops' if args.peak_tflops else 'measured matmul rate'}): "
        + ", ".join(f"{p} {r / 1e9:.0f} GFLOP/s" for p, r in rates.items())
    )
    results: list[dict] = []
    signal.signal(signal.SIGTERM, stop)
    try:
        measure(args, device, results)
    finally:
        report(results, rates, args.json)
    if FAILED:
        sys.exit(f"{len(FAILED)} measurement(s) failed (above)")


def stop(*_: object) -> None:
    """SIGTERM (a time limit: ``timeout`` signals the process and then its group): end the measurements, but
    still print and save every row measured so far. Later signals are ignored, so the report completes."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(124)


def measure(args: argparse.Namespace, device: str, results: list[dict]) -> None:
    """Run the workers of every (model, precision, weights, checkpointing) row, appending to ``results``."""
    rows = [(m, p, w, c) for m in args.models for p in args.precisions for w in args.weights
            for c in args.checkpointing]  # fmt: skip
    memory_to_measure: list[tuple[dict, list[str]]] = []  # timed rows whose peak memory is measured last
    for model, precision, weights, checkpointing in rows:
        cmd = [sys.executable, __file__, "--worker", "--model", model, "--precision", precision,
               "--weight", weights, "--checkpoint", checkpointing, "--max-length", str(args.max_length),
               "--batch-size", str(args.batch_size)] + (["--synthetic"] if args.synthetic else [])  # fmt: skip
        if args.memory_only:
            for method in args.methods:
                one = run_alone(cmd, method, device)
                for r in one:
                    print(f"  {model} {precision} weights={weights} checkpointing={checkpointing} "
                          f"{method}: one step {r['step_s']:.1f} s, peak {r['peak_bytes'] / 2**30:.2f} GB",
                          flush=True)  # fmt: skip
                results += one
            continue
        timed = run_worker(cmd + ["--steps", str(args.steps), "--warmup", str(args.warmup), "--methods",
                                  *args.methods])  # fmt: skip
        for r in timed:  # the timing process's peak is all methods' together: each is measured alone below
            r["peak_bytes"] = float("nan")
            results.append(r)  # before the line that says so: a SIGTERM after it finds the row saved
            memory_to_measure.append((r, cmd))
            print(f"  timed {model} {precision} {r['method']}: {r['step_s']:.2f} s/step", flush=True)
    # peak memory after every row is timed (a time limit then costs peaks, not timings)
    for r, cmd in memory_to_measure:
        alone = run_alone(cmd, r["method"], r["device"])
        r["peak_bytes"] = alone[0]["peak_bytes"] if alone else float("nan")
        print(
            f"  alone {r['model']} {r['weights']} {r['method']}: peak {r['peak_bytes'] / 2**30:.2f} GB",
            flush=True,
        )


def run_alone(cmd: list[str], method: str, device: str) -> list[dict]:
    """``method`` alone in a fresh worker process, one step: its peak memory (and that step's time). On CPU with
    every block over 64 KiB mmapped (returned to the OS on free), so that RSS tracks live memory."""
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"} if device == "cpu" else None
    return run_worker(cmd + ["--steps", "1", "--warmup", "0", "--methods", method], env)


def report(results: list[dict], rates: dict[str, float], json_path: str | None) -> None:
    """Print the table (ratios to ``sft`` of the same row) and the per-round ``arr``/``arr-copy`` ratios; save
    the raw results to ``json_path``."""
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    header = "| model | precision | weights | ckpt | method | s/step | × sft | FLOP floor | ÷ floor | simple floor | SFT tok/s | peak GB | × sft | MFU |"
    print("\n" + header + "\n|" + "---|" * (header.count("|") - 1))
    for r in results:
        sft = same_shape(results, r, "sft")
        nan = float("nan")
        ratio = r["step_s"] / sft["step_s"] if sft else nan
        floor = step_flops(r) / step_flops(sft) if sft else nan
        mem = r["peak_bytes"] / sft["peak_bytes"] if sft else nan
        mfu = step_flops(r) / r["step_s"] / rates[r["precision"]]
        print(f"| {r['model']} | {r['precision']} | {r['weights']} | {r['checkpointing']} | {r['method']} | {r['step_s']:.2f} | {ratio:.2f} | {floor:.2f} | "
              f"{ratio / floor:.2f} | {simple_floor(r):.2f} | {r['sft_tokens'] / r['step_s']:.0f} | "
              f"{r['peak_bytes'] / 2**30:.2f} | {mem:.2f} | {100 * mfu:.0f}% |")  # fmt: skip
    same_round_ratios(results, "arr", "arr-copy")


def same_shape(results: list[dict], r: dict, method: str) -> dict | None:
    """The result of ``method`` on the same model, precision, weights and checkpointing as ``r``."""
    row = ("model", "precision", "weights", "checkpointing")
    return next((x for x in results if x["method"] == method and all(x[k] == r[k] for k in row)), None)


def same_round_ratios(results: list[dict], a: str, b: str) -> None:
    """Print method ``a``'s step time over ``b``'s, round by round (mean ± standard error over rounds): the
    comparison that a drift in this machine's speed does not bias, since both ran in the same round."""
    for r in results:
        other = same_shape(results, r, b)
        if r["method"] != a or other is None or len(r["times"]) < 2:
            continue
        ratios = [x / y for x, y in zip(r["times"], other["times"])]
        se = statistics.stdev(ratios) / math.sqrt(len(ratios))
        print(f"{r['model']} {r['weights']} weights: {a} / {b} per round {statistics.mean(ratios):.3f} ± {se:.3f} "
              f"({len(ratios)} rounds)")  # fmt: skip


if __name__ == "__main__":
    main()
