"""SFT formats with response-only labels, replay packing, sharding and resumable position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from arrtune.data.replay import ReplayStream
from arrtune.data.sft import collate_sft, load_sft_examples
from arrtune.errors import ArrtuneError
from arrtune.losses import IGNORE_INDEX

ROWS = {
    "messages": {
        "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]
    },
    "prompt_completion": {"prompt": "Say hi", "completion": "hi there"},
    "alpaca": {"instruction": "Say", "input": "hi", "output": "hi there"},
}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_labels_cover_exactly_the_assistant_response(fmt: str, tmp_path: Path, tiny_tokenizer) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", [ROWS[fmt]])
    (ex,), stats = load_sft_examples(src, tiny_tokenizer, max_length=128)
    labeled = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    assert [lab for lab in ex["labels"] if lab != IGNORE_INDEX] == labeled
    assert tiny_tokenizer.decode(labeled) == "hi there<|im_end|>\n"
    unlabeled = tiny_tokenizer.decode(
        [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE_INDEX]
    )
    assert unlabeled.endswith("<|im_start|>assistant\n") and "hi there" not in unlabeled
    assert stats.n_kept == 1


def test_multi_turn_labels_every_assistant_turn(tmp_path: Path, tiny_tokenizer) -> None:
    row = {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "two"},
    ]}  # fmt: skip
    (ex,), _ = load_sft_examples(write_jsonl(tmp_path / "d.jsonl", [row]), tiny_tokenizer, max_length=128)
    labeled = tiny_tokenizer.decode(
        [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX]
    )
    assert labeled == "one<|im_end|>\ntwo<|im_end|>\n"


def test_long_and_empty_examples_are_dropped_and_counted(tmp_path: Path, tiny_tokenizer) -> None:
    rows = [
        ROWS["prompt_completion"],
        {"prompt": "x " * 200, "completion": "y"},
        {"prompt": "q", "completion": "  "},
    ]
    examples, stats = load_sft_examples(
        write_jsonl(tmp_path / "d.jsonl", rows), tiny_tokenizer, max_length=64
    )
    assert (len(examples), stats.n_too_long, stats.n_empty_response) == (1, 1, 1)
    with pytest.raises(ArrtuneError, match="every example was filtered out"):
        load_sft_examples(write_jsonl(tmp_path / "e.jsonl", rows[1:]), tiny_tokenizer, max_length=64)


def test_bad_rows_name_the_file_and_line(tmp_path: Path, tiny_tokenizer) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS["alpaca"]) + "\n{not json\n")
    with pytest.raises(ArrtuneError, match=r"bad.jsonl:2: invalid JSON"):
        load_sft_examples(str(path), tiny_tokenizer, max_length=64)
    path.write_text(json.dumps({"prompt": 3, "completion": "x"}) + "\n")
    with pytest.raises(ArrtuneError, match=r"bad.jsonl:1: field 'prompt' must be a string"):
        load_sft_examples(str(path), tiny_tokenizer, max_length=64)
    array = tmp_path / "bad.json"  # a JSON array file: the line where the decoder stopped
    array.write_text("[\n" + json.dumps(ROWS["alpaca"]) + ",\n{not json}\n]\n")
    with pytest.raises(ArrtuneError, match=r"bad.json:3: invalid JSON"):
        load_sft_examples(str(array), tiny_tokenizer, max_length=64)
    array.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArrtuneError, match=r"bad.json: invalid JSON \(nested too deeply\)"):
        load_sft_examples(str(array), tiny_tokenizer, max_length=64)


def test_builtin_task_and_collate(tiny_tokenizer) -> None:
    examples, _ = load_sft_examples("builtin:vornish", tiny_tokenizer, max_length=128)
    batch = collate_sft(examples[:4], tiny_tokenizer.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples[:4]]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def _right_padded(rows: list[list[int]], value: int) -> torch.Tensor:
    """The reference: each row followed by ``value`` up to the longest row, as a long tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([[*r, *[value] * (width - len(r))] for r in rows], dtype=torch.long)


@pytest.mark.parametrize("spec", ["builtin:vornish", "builtin:keywords"])
def test_collate_sft_right_pads_ids_labels_and_mask_as_the_reference(spec: str, tiny_tokenizer) -> None:
    """collate_sft (torch's pad_sequence) gives the tensors of the hand-written padding it replaced: ids padded
    with the given id, labels with IGNORE_INDEX, a mask of ones then zeros; int64 throughout."""
    examples, _ = load_sft_examples(spec, tiny_tokenizer, max_length=128)
    batches = [examples[i : i + size] for size in (1, 2, 4, 7) for i in range(0, 28, size)]
    assert any(len({len(e["input_ids"]) for e in b}) > 1 for b in batches)  # padding is exercised
    for rows in batches:
        for pad in (tiny_tokenizer.pad_token_id, 7):
            batch = collate_sft(rows, pad)
            expected = {
                "input_ids": _right_padded([e["input_ids"] for e in rows], pad),
                "labels": _right_padded([e["labels"] for e in rows], IGNORE_INDEX),
                "attention_mask": _right_padded([[1] * len(e["input_ids"]) for e in rows], 0),
            }
            assert list(batch) == list(expected)
            for key, tensor in expected.items():
                assert batch[key].dtype == torch.long and torch.equal(batch[key], tensor), key


def test_collate_sft_refuses_labels_of_another_length() -> None:
    with pytest.raises(ArrtuneError, match=r"row 1: 2 labels for 3 input_ids"):
        collate_sft([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [1, 2, 3], "labels": [1, 2]}], 0)


def corpus(tmp_path: Path, n: int = 9) -> str:
    return write_jsonl(tmp_path / "r.jsonl", [{"text": f"document number {i} says hello"} for i in range(n)])


def test_replay_packs_documents_with_eos_into_rows(tmp_path: Path, tiny_tokenizer) -> None:
    stream = ReplayStream(corpus(tmp_path), tiny_tokenizer, seed=0)
    order = stream.document_ids(0)
    texts = [json.loads(line)["text"] for line in Path(tmp_path / "r.jsonl").read_text().splitlines()]
    expected: list[int] = []
    for i in order:
        expected += tiny_tokenizer(texts[i], add_special_tokens=False)["input_ids"] + [
            tiny_tokenizer.eos_token_id
        ]
    batch = stream.batch(23, width=10, pad_token_id=tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (3, 10)
    assert batch["attention_mask"].sum() == 23
    assert batch["input_ids"].view(-1)[:23].tolist() == expected[:23]
    assert (batch["labels"].view(-1)[23:] == IGNORE_INDEX).all()
    assert stream.take(5) == expected[23:28]


def test_replay_ranks_read_disjoint_documents(tmp_path: Path, tiny_tokenizer) -> None:
    src = corpus(tmp_path, n=10)
    shards = [set(ReplayStream(src, tiny_tokenizer, rank=r, world_size=3).document_ids(0)) for r in range(3)]
    assert set().union(*shards) == set(range(10))
    assert sum(len(s) for s in shards) == 10


def test_replay_resumes_where_it_stopped_across_epochs(tmp_path: Path, tiny_tokenizer) -> None:
    src = corpus(tmp_path, n=4)
    full = ReplayStream(src, tiny_tokenizer, seed=3)
    reference = [full.take(17) for _ in range(20)]  # several epochs of a 4-document corpus
    first = ReplayStream(src, tiny_tokenizer, seed=3)
    got = [first.take(17) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    second = ReplayStream(src, tiny_tokenizer, seed=3)
    second.load_state_dict(state)
    got += [second.take(17) for _ in range(17)]
    assert got == reference
    assert full.epoch >= 2


def test_empty_replay_corpus_is_an_error(tmp_path: Path, tiny_tokenizer) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ArrtuneError, match="has no text"):
        ReplayStream(str(tmp_path / "empty.txt"), tiny_tokenizer)


def test_builtin_replay_is_disjoint_from_evaluation_text() -> None:
    from arrtune.data import corpora

    replay = set(corpora.replay_texts())
    assert len(replay) > 1000
    assert not replay & set(corpora.heldout_wiki_texts())
    assert not replay & set(corpora.heldout_book_texts())
    # no held-out Wikipedia paragraph is a substring of a replay document either
    joined = "\n".join(replay)
    assert not any(t in joined for t in corpora.heldout_wiki_texts())
