"""Self-replay (``replay: self``): prompts, documents with answer-only labels, mixing, cache, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arrtune.config_files import load_config
from arrtune.data.replay import MixedReplay, ReplayStream
from arrtune.data.self_replay import load_prompts
from arrtune.errors import ArrtuneError
from arrtune.losses import IGNORE_INDEX
from arrtune.recipe import train
from arrtune.testing import copy_run


def _norm(text: str) -> str:
    return " ".join(text.lower().rstrip("?").split())


def test_builtin_prompts_are_disjoint_from_every_evaluation_prompt() -> None:
    from arrtune.data.corpora import general_questions, heldout_book_texts, heldout_wiki_texts
    from arrtune.data.task import builtin_task

    prompts = load_prompts(None)
    assert len(prompts) > 3000
    evaluation = {_norm(q) for q in general_questions()}
    for name in ("vornish", "keywords"):
        train_rows, test_rows = builtin_task(name)
        evaluation |= {_norm(r["prompt"]) for r in train_rows + test_rows}
    assert not {_norm(p) for p in prompts} & evaluation
    held = " ".join(heldout_wiki_texts()[:50] + heldout_book_texts()[:50]).lower()
    assert sum(_norm(p) in held for p in prompts[:500]) == 0


def test_prompt_files_and_their_errors(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("Why is the sky blue?\n\n  \nWhat is rain?\nWhy is the sky blue?\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["Why is the sky blue?", "What is rain?"]
    (tmp_path / "p.jsonl").write_text('{"question": "A?"}\n{"prompt": "B?"}\n')
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["A?", "B?"]
    (tmp_path / "bad.jsonl").write_text('{"question": "A?"}\n{"q": "B?"}\n')
    with pytest.raises(ArrtuneError, match=r"bad.jsonl:2: needs a string field"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ArrtuneError, match="is a directory, not a file"):
        load_prompts(str(tmp_path))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ArrtuneError, match="holds no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))


def _docs() -> list[tuple[list[int], list[int]]]:
    # prompt tokens 1..3 unlabelled, answer tokens labelled
    return [([1, 2, 3, 10 + i, 20 + i], [IGNORE_INDEX] * 3 + [10 + i, 20 + i]) for i in range(6)]


def test_document_stream_labels_only_answer_tokens_and_resumes(tiny_tokenizer) -> None:
    stream = ReplayStream("self", tiny_tokenizer, documents=_docs(), seed=1)
    batch = stream.batch(12, 5, pad_token_id=0)
    ids, labels = batch["input_ids"].view(-1)[:12], batch["labels"].view(-1)[:12]
    assert batch["input_ids"].shape == (3, 5)
    prompt = torch.isin(ids, torch.tensor([1, 2, 3]))
    assert bool((labels[prompt] == IGNORE_INDEX).all()) and bool((labels[~prompt] == ids[~prompt]).all())
    assert bool((batch["labels"].view(-1)[12:] == IGNORE_INDEX).all())  # padding carries no label

    state = json.loads(json.dumps(stream.state_dict()))
    expected = stream.batch(9, 3, pad_token_id=0)
    again = ReplayStream("self", tiny_tokenizer, documents=_docs(), seed=1)
    again.load_state_dict(state)
    got = again.batch(9, 3, pad_token_id=0)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_mixed_replay_takes_each_stream_by_token_share(tiny_tokenizer, tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("\n\n".join(f"corpus document {i} about rivers" for i in range(4)))
    corpus = ReplayStream(str(tmp_path / "c.txt"), tiny_tokenizer)
    own = ReplayStream("self", tiny_tokenizer, documents=_docs())
    mixed = MixedReplay(own, corpus, 0.25)
    batch = mixed.batch(40, 8, pad_token_id=0)
    flat = batch["input_ids"].view(-1)[:40]
    assert set(flat[:10].tolist()) <= {1, 2, 3} | set(range(10, 26))  # the first 25%: self-replay tokens
    assert bool((batch["labels"].view(-1)[10:40] != IGNORE_INDEX).all())  # corpus tokens all labelled
    state = json.loads(json.dumps(mixed.state_dict()))
    assert state["rank"] == 0 and {"first", "second"} <= set(state)
    with pytest.raises(ArrtuneError, match="not that of a mixed replay"):
        mixed.load_state_dict(own.state_dict())


def _args(model_dir: Path, out: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "model": model_dir, "output_dir": out, "method": "arr", "replay_ratio": 1, "replay": "self", "max_steps": 4,
        "warmup_steps": 0, "per_device_train_batch_size": 2, "learning_rate": 0.01, "precision": "fp32",
        "replay_max_new_tokens": 8, "disable_tqdm": True,
    }  # fmt: skip
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_self_replay_run_generates_once_and_reuses_the_cache(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("ARRTUNE_CACHE", str(tmp_path / "cache"))
    first = train(load_config(None, _args(tiny_model_dir, tmp_path / "a")))
    summary = json.loads((first / "train_summary.json").read_text())
    assert summary["self_replay_answers"] > 0 and summary["self_replay_generation_s"] > 0
    cache = Path(summary["self_replay_cache"])
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    prompts = set(load_prompts(None))
    assert rows and all(r["prompt"] in prompts and isinstance(r["answer_ids"], list) for r in rows)
    records = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert all(r["replay_loss"] > 0 and r["kl"] >= 0 for r in records if "sft_loss" in r)

    # another seed of the same grid: same prompts and settings -> the cache is read, nothing generated
    second = train(load_config(None, _args(tiny_model_dir, tmp_path / "b", seed=1)))
    summary2 = json.loads((second / "train_summary.json").read_text())
    assert summary2["self_replay_generation_s"] == 0 and summary2["self_replay_cache"] == str(cache)
    assert cache.read_text() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def test_mixed_self_replay_resumes_to_the_same_adapter(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("ARRTUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "c.txt").write_text("\n\n".join(f"Corpus document {i} about the sea." for i in range(5)))
    extra = {
        "replay": tmp_path / "c.txt",
        "replay_mix": 0.5,
        "max_steps": 8,
        "save_steps": 4,
        "lora_dropout": 0.1,
    }
    full = train(load_config(None, _args(tiny_model_dir, tmp_path / "full", **extra)))
    state = json.loads((full / "checkpoints" / "checkpoint-4" / "replay_state_rank0.json").read_text())
    assert {"first", "second"} <= set(state)

    res = copy_run(full, tmp_path / "res")
    shutil.rmtree(res / "adapter")
    shutil.rmtree(res / "checkpoints" / "checkpoint-8")
    (res / "train_summary.json").unlink()
    train(load_config(None, _args(tiny_model_dir, res, **extra)))
    assert json.loads((res / "train_summary.json").read_text())["resumed_from"].endswith("checkpoint-4")
    a, b = (
        load_file(full / "adapter" / "adapter_model.safetensors"),
        load_file(res / "adapter" / "adapter_model.safetensors"),
    )
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_replay_mix_and_generation_settings_are_validated() -> None:
    for item, message in (("replay_mix=1.5", "replay_mix=1.5 must be in"), ("replay_top_p=0", "replay_top_p"),
                          ("replay_max_new_tokens=0", "replay_max_new_tokens"),
                          ("replay_temperature=-1", "replay_temperature")):  # fmt: skip
        with pytest.raises(ArrtuneError, match=message):
            load_config(None, [item])
    assert load_config(None, ["replay=self"]).resolved_replay_mix() == 1.0
    assert load_config(None, ["replay_mix=0.5"]).resolved_replay_mix() == 0.5
