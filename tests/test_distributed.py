"""Two CPU processes (gloo, ``torchrun``) on the tiny model, under DDP (with gradient checkpointing) and under
FSDP: the same per-step losses as one process with the same global batch, a disjoint share of the replay
stream per rank, and outputs written by rank 0 only.

Tolerance: DDP averages the ranks' per-micro-batch mean losses, while one process takes the mean over the
whole batch; these agree when every example has the same number of tokens and response tokens, so the data
here is built that way. The SFT rows then see the same weights and the same inputs in both setups, and the
logged ``sft_loss``, ``kl`` and ``loss`` agree up to float32 summation order: at most 1e-5 absolute is
allowed (measured about 5e-7). The KL coefficient is a drift-budget multiplier, which every rank must hold at
the same value as the single process (it follows the KL reduced across ranks). Replay is on (``replay_ratio=1``) so that its sharding is exercised, but
``replay_weight=0`` and ``kl_on=sft``: replay batches differ between the setups by design (each rank reads
its own documents), so they must not feed the compared gradients.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed

from arrtune.config_files import load_config
from arrtune.data.replay import ReplayStream
from arrtune.data.sft import tokenize_messages
from arrtune.recipe import train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
TOLERANCE = 1e-5
N_REPLAY_DOCS = 40


def check_exit(done: subprocess.CompletedProcess) -> None:
    """Fail with the end of the launcher's output in full (an assertion message would be cut short)."""
    if done.returncode != 0:
        pytest.fail(f"exit code {done.returncode}\n--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n"
                    f"{done.stderr[-8000:]}", pytrace=False)  # fmt: skip


def equal_length_examples(tokenizer, n: int) -> list[dict[str, str]]:
    """``n`` prompt/completion rows that all tokenize to the same length and the same number of labels."""
    groups: dict[tuple[int, int], list[dict[str, str]]] = {}
    words = ["red", "blue", "green", "cold", "warm", "tall", "small", "old", "new", "dark"]
    for a in words:
        for b in words:
            row = {"prompt": f"Describe the {a} house.", "completion": f"The house is {b}."}
            ids, labels = tokenize_messages(tokenizer, [{"role": "user", "content": row["prompt"]},
                                                        {"role": "assistant", "content": row["completion"]}])  # fmt: skip
            groups.setdefault((len(ids), sum(x != -100 for x in labels)), []).append(row)
    best = max(groups.values(), key=len)
    assert len(best) >= n
    random.Random(0).shuffle(best)
    return best[:n]


def write_replay_docs(path: Path) -> Path:
    """``N_REPLAY_DOCS`` short replay documents, separated by blank lines."""
    path.write_text("\n\n".join(f"Replay document number {i} is about topic {i * 7 % 13}." for i in range(N_REPLAY_DOCS)))  # fmt: skip
    return path


def per_step(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "sft_loss" in r]
    assert len(steps) == len(set(steps))  # one record per step: only rank 0 writes metrics
    return {r["step"]: r for r in records if "sft_loss" in r}


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")  # fmt: skip
def test_two_processes_match_one_process_and_shard_the_replay_stream(
    tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path
) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in equal_length_examples(tiny_tokenizer, 16)))
    replay = write_replay_docs(tmp_path / "replay.txt")
    # drift_probe=0: the controller reads the loss's KL, which is rank-local until reduced across ranks
    common = [f"model={tiny_model_dir}", f"data={data}", f"replay={replay}", "method=arr", "replay_weight=0",
              "kl_on=sft", "kl_coef=0.1", "max_steps=6", "save_steps=3", "warmup_steps=0", "learning_rate=0.01",
              "seed=5", "precision=fp32", "disable_tqdm=true", "drift_budget=0.01", "gradient_checkpointing=true",
              "drift_probe=0"]  # fmt: skip

    two = tmp_path / "two"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "arrtune", "train", *common,
           f"output_dir={two}", "per_device_train_batch_size=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    check_exit(done)
    assert done.stdout.count("adapter saved to") == 1  # printed by rank 0 only

    one = train(
        load_config(None, [*common, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=4"])
    )

    # per-step loss terms: the same global batch of 4 gives the same values
    a, b = per_step(one), per_step(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    worst = 0.0
    for step in a:
        for key in ("sft_loss", "kl", "loss"):
            worst = max(worst, abs(a[step][key] - b[step][key]))
    assert worst <= TOLERANCE, worst
    assert all("replay_loss" in b[s] for s in b)

    # outputs: the same files as one process; the checkpoint holds both ranks' RNG and replay state
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    ckpt = two / "checkpoints" / "checkpoint-6"
    assert {p.name for p in ckpt.iterdir()} >= {"rng_state_0.pth", "rng_state_1.pth", "replay_state_rank0.json",
                                                "replay_state_rank1.json", "adapter_model.safetensors"}  # fmt: skip
    assert not list((two / "checkpoints" / ".staging").iterdir())

    # drift budget: every rank holds the same multiplier, the one a single process reaches (global KL)
    ranks = [json.loads((ckpt / f"kl_controller_rank{r}.json").read_text()) for r in (0, 1)]
    alone = json.loads((one / "checkpoints" / "checkpoint-6" / "kl_controller_rank0.json").read_text())
    assert ranks[0] == ranks[1]
    # (the controller's forecast and proportional term amplify float rounding of the KL, whose summation order
    # differs between one and two processes, about tenfold: 1e-4 relative; a rank-local KL is off by percents)
    assert ranks[0]["coef"] != 0.1 and abs(ranks[0]["coef"] - alone["coef"]) <= 1e-4 * alone["coef"]

    # replay: each rank read its own documents, none shared, and both read some
    consumed = []
    for rank in (0, 1):
        state = json.loads((ckpt / f"replay_state_rank{rank}.json").read_text())
        assert (state["rank"], state["world_size"]) == (rank, 2)
        # the default replay mixes the model's own answers ("first") with the corpus ("second"), both sharded
        assert (state["first"]["rank"], state["first"]["world_size"]) == (rank, 2)
        corpus = state["second"]
        assert (corpus["rank"], corpus["world_size"], corpus["epoch"]) == (rank, 2, 0)
        order = ReplayStream(str(replay), tiny_tokenizer, rank=rank, world_size=2, seed=5).document_ids(0)
        consumed.append(set(order[: corpus["docs_consumed"]]))
    assert consumed[0] and consumed[1] and not consumed[0] & consumed[1]
    single = json.loads(
        (tmp_path / "one" / "checkpoints" / "checkpoint-6" / "replay_state_rank0.json").read_text()
    )
    assert single["world_size"] == 1


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")  # fmt: skip
def test_fsdp_two_processes_match_one_process(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    """FSDP (full shard, through the Trainer's ``fsdp``/``fsdp_config`` fields) on 2 CPU processes with gloo,
    with the two-pass step (SFT rows, then replay rows): the same per-step loss terms and the same final
    adapter as one process with the same global batch. (As in the DDP test, the replay pass runs but carries
    no weight, since each rank replays its own documents.)"""
    from safetensors.torch import load_file

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in equal_length_examples(tiny_tokenizer, 12)))
    replay = write_replay_docs(tmp_path / "replay.txt")
    config = tmp_path / "fsdp.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {data}\nreplay: {replay}\nmethod: arr\nkl_coef: 0.1\n"
                      "kl_on: sft\nreplay_ratio: 1\nreplay_weight: 0\nmax_steps: 3\nwarmup_steps: 0\n"
                      "learning_rate: 0.01\nseed: 5\nprecision: fp32\ndisable_tqdm: true\n")  # fmt: skip
    fsdp = ["fsdp=full_shard auto_wrap",
            'fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "use_orig_params": true}']  # fmt: skip
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "arrtune", "train", "--config", str(config),
           *fsdp, f"output_dir={tmp_path / 'two'}", "per_device_train_batch_size=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    check_exit(done)
    one = train(load_config(config, [f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=4"]))
    a, b = per_step(one), per_step(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step]["replay_loss"] > 0  # the replay pass ran under FSDP
        for key in ("sft_loss", "kl", "loss"):
            assert abs(a[step][key] - b[step][key]) <= 1e-4, (step, key, a[step][key], b[step][key])
    single = load_file(one / "adapter" / "adapter_model.safetensors")
    sharded = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert single.keys() == sharded.keys()
    for name in single:
        assert torch.allclose(single[name], sharded[name], atol=1e-4), name


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")  # fmt: skip
def test_self_replay_with_two_processes_generates_once_and_shards_the_answers(
    tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path
) -> None:
    """``replay: self`` under 2 processes: the main process generates (one cache file), the other rank reads
    its cache, and the ranks replay disjoint answers."""
    from arrtune.data.self_replay import conversations

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Tell me about topic number {i}.\n" for i in range(24)))
    cache = tmp_path / "cache"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "arrtune", "train", f"model={tiny_model_dir}",
           "method=arr", "replay=self", f"replay_prompts={prompts}", "replay_max_new_tokens=12", "max_steps=3",
           "save_steps=3", "warmup_steps=0", "per_device_train_batch_size=2", "precision=fp32", "disable_tqdm=true",
           f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "ARRTUNE_CACHE": str(cache)}  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    check_exit(done)
    files = list((cache / "self_replay").glob("*.jsonl"))
    assert len(files) == 1
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["self_replay_cache"] == str(files[0]) and summary["self_replay_answers"] > 2
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    docs = conversations(tiny_tokenizer, rows)
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    consumed = []
    for rank in (0, 1):
        state = json.loads((ckpt / f"replay_state_rank{rank}.json").read_text())
        assert (state["rank"], state["world_size"]) == (rank, 2)
        order = ReplayStream(
            "self", tiny_tokenizer, rank=rank, world_size=2, seed=0, documents=docs
        ).document_ids(0)
        consumed.append(set(order[: state["docs_consumed"]]))
    assert consumed[0] and consumed[1] and not consumed[0] & consumed[1]
