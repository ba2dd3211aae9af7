"""Batched log-likelihood scoring of multiple-choice items, as lm-evaluation-harness scores them, with less work.

**What is computed** (identical to the harness's ``loglikelihood`` requests): for each (context, continuation)
pair, trailing whitespace of the context is moved to the front of the continuation, then
``context_ids = tok(context)``, ``continuation_ids = tok(context + continuation)[len(context_ids):]`` (no special
tokens; an empty context is replaced by the BOS token, else EOS), and the score is the sum of
``log p(continuation token | context_ids, previous continuation tokens)``. ``acc`` takes the argmax of the
scores, ``acc_norm`` the argmax of ``score / len(choice in characters)``; ties go to the first choice.

**How** (the work sharing): all choices of an item share ``context_ids``, so an item becomes one token *prefix
tree*: the context once, then the continuations, which also share their common leading tokens (PIQA's two
solutions often differ in a few words only). Tree nodes are laid out in one sequence with a tree attention mask
(each token sees its ancestors only) and position ids equal to the node depth, so every token is conditioned
exactly as in its own separate sequence. Short trees are packed several to a row (first-fit decreasing; rows of
``max(ROW_TOKENS, longest tree)`` tokens), a forward pass takes ``batch_size`` items, and the output head is
applied only at positions that predict a continuation token (each once), through a chunked ``logsumexp``. The
result equals scoring every pair on its own up to float rounding (tested). Attention implementations that take
no custom 4-D mask (flash attention) fall back to one right-padded row per pair.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from arrtune.evaluation._common import binomial_stderr, encode, max_positions, mean
from arrtune.evaluation.benchmarks import MCItem
from arrtune.lm import HEAD_CHUNK, LMParts, base_model, chunks, eval_mode, pad_token_id, prefix_token_id

ROW_TOKENS = 256  # minimum packed row width: short items are packed several to a row


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the way lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":
        return [prefix_token_id(tokenizer)], encode(tokenizer, continuation)
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


@dataclass
class _Tree:
    """A context and the continuations scored after it, as a token prefix tree: the context is a chain of
    nodes, continuations share nodes as long as their tokens agree. ``paths[j]`` lists the nodes of
    continuation ``j``; ``refs[j]`` is its (item index, choice index)."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    n_context: int
    paths: list[list[int]] = field(default_factory=list)
    refs: list[tuple[int, int]] = field(default_factory=list)
    _children: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)

    @classmethod
    def start(cls, context: list[int]) -> _Tree:
        n = len(context)
        return cls(list(context), list(range(-1, n - 1)), list(range(n)), n)

    def add(self, continuation: list[int], ref: tuple[int, int]) -> None:
        node, path = self.n_context - 1, []
        for token in continuation:
            child = self._children.get((node, token))
            if child is None:
                child = self._children[(node, token)] = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(self.depths[node] + 1)
            path.append(child)
            node = child
        self.paths.append(path)
        self.refs.append(ref)

    def __len__(self) -> int:
        return len(self.tokens)

    def ancestors(self) -> torch.Tensor:
        """(N, N) bool: node q may attend to node k (k is q or one of its ancestors)."""
        n, c = len(self.tokens), self.n_context
        allowed = torch.zeros((n, n), dtype=torch.bool)
        allowed[:c, :c] = torch.ones((c, c), dtype=torch.bool).tril()
        for q in range(c, n):
            allowed[q] = allowed[self.parents[q]]
            allowed[q, q] = True
        return allowed


def _make_trees(tokenizer, items: Sequence[MCItem], max_len: int, share: bool = True) -> list[_Tree]:
    """Prefix trees of the items' requests: one per distinct context of an item, or, with ``share=False``,
    one per (context, continuation) pair."""
    trees: list[_Tree] = []
    for i, item in enumerate(items):
        pairs = [encode_pair(tokenizer, c, x) for c, x in item.requests()]
        by_context: dict[tuple[int, ...], list[int]] = {}
        for j, (ctx, _) in enumerate(pairs):
            by_context.setdefault(tuple(ctx) if share else (j, *ctx), []).append(j)
        for key, choice_ids in by_context.items():
            ctx = key if share else key[1:]
            conts = [pairs[j][1][-max_len:] for j in choice_ids]
            keep = max(1, max_len - max(len(c) for c in conts))  # left-truncate a context that does not fit
            tree = _Tree.start(list(ctx[-keep:]))
            for j, cont in zip(choice_ids, conts):
                tree.add(cont, (i, j))
            trees.append(tree)
    return trees


def _pack_rows(trees: list[_Tree], width: int) -> list[list[int]]:
    """First-fit decreasing: tree indices per row, each row at most ``width`` tokens; fullest rows first."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for k in sorted(range(len(trees)), key=lambda k: -len(trees[k])):
        for r in range(len(rows)):
            if fill[r] + len(trees[k]) <= width:
                rows[r].append(k)
                fill[r] += len(trees[k])
                break
        else:
            rows.append([k])
            fill.append(len(trees[k]))
    return [rows[r] for r in sorted(range(len(rows)), key=lambda r: -fill[r])]


@dataclass
class _Layout:
    """Trees packed in rows as model inputs, and which output positions score which continuation tokens."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    padding: torch.Tensor
    allowed: torch.Tensor | None  # (rows, width, width): position q may attend to k; pads see themselves
    head_pos: dict[tuple[int, int], int] = field(default_factory=dict)  # (row, column) -> index at the head
    node_head: list[int] = field(default_factory=list)  # per scored node: head index of its parent
    node_token: list[int] = field(default_factory=list)  # per scored node: its token
    branch_nodes: list[int] = field(default_factory=list)  # with branch_ids: (scored node, branch) pairs
    branch_ids: list[int] = field(default_factory=list)
    branches: list[tuple[int, int]] = field(default_factory=list)  # branch index -> (tree index, path index)

    def place(self, r: int, offset: int, k: int, tree: _Tree) -> None:
        """Put tree ``k`` in row ``r`` from column ``offset`` on, and register its paths' scored nodes."""
        m = len(tree)
        self.input_ids[r, offset : offset + m] = torch.tensor(tree.tokens)
        self.position_ids[r, offset : offset + m] = torch.tensor(tree.depths)
        self.padding[r, offset : offset + m] = 1
        if self.allowed is not None:
            self.allowed[r, offset : offset + m, offset : offset + m] = tree.ancestors()
        scored: dict[int, int] = {}  # tree node -> scored node index
        for p, path in enumerate(tree.paths):
            b = len(self.branches)
            self.branches.append((k, p))
            for node in path:
                if node not in scored:
                    key = (r, offset + tree.parents[node])
                    if key not in self.head_pos:
                        self.head_pos[key] = len(self.head_pos)
                    scored[node] = len(self.node_head)
                    self.node_head.append(self.head_pos[key])
                    self.node_token.append(tree.tokens[node])
                self.branch_nodes.append(scored[node])
                self.branch_ids.append(b)


def _layout_rows(trees: list[_Tree], rows: list[list[int]], pad_id: int, tree_mask: bool) -> _Layout:
    """The packed rows' inputs (right-padded to the widest row) and scored positions."""
    width = max(sum(len(trees[k]) for k in row) for row in rows)
    n = len(rows)
    layout = _Layout(
        input_ids=torch.full((n, width), pad_id, dtype=torch.long),
        position_ids=torch.zeros((n, width), dtype=torch.long),
        padding=torch.zeros((n, width), dtype=torch.long),
        allowed=torch.eye(width, dtype=torch.bool).repeat(n, 1, 1) if tree_mask else None,
    )
    for r, row in enumerate(rows):
        offset = 0
        for k in row:
            layout.place(r, offset, k, trees[k])
            offset += len(trees[k])
    return layout


def _head_states(parts: LMParts, layout: _Layout) -> torch.Tensor:
    """One forward pass over the rows; the last hidden states at the positions given to the head."""
    if layout.allowed is not None:
        n, width = layout.input_ids.shape
        mask = torch.zeros((n, 1, width, width), dtype=parts.dtype)
        mask.masked_fill_(~layout.allowed[:, None], torch.finfo(parts.dtype).min)
        hidden = parts.hidden(
            layout.input_ids.to(parts.device), mask.to(parts.device), layout.position_ids.to(parts.device)
        )
    else:  # one single-path tree per row: a plain causal model call with a padding mask
        hidden = parts.hidden(layout.input_ids.to(parts.device), layout.padding.to(parts.device), None)
    rows_t = torch.tensor([key[0] for key in layout.head_pos], dtype=torch.long)
    cols_t = torch.tensor([key[1] for key in layout.head_pos], dtype=torch.long)
    return hidden[rows_t.to(hidden.device), cols_t.to(hidden.device)]


def _node_logprobs(
    parts: LMParts, selected: torch.Tensor, node_head: list[int], node_token: list[int]
) -> torch.Tensor:
    """Float64 log-probability of each scored node's token, from its parent's hidden state."""
    node_head_t = torch.tensor(node_head, dtype=torch.long)
    node_token_t = torch.tensor(node_token, dtype=torch.long)
    # log p(token) = logit[token] - logsumexp(logits) at the parent's position, head applied in chunks
    logsumexp = torch.empty(selected.shape[0], dtype=torch.float32)
    gathered = torch.empty(len(node_head), dtype=torch.float32)
    for s in chunks(selected.shape[0], HEAD_CHUNK):
        logits = parts.logits(selected[s]).cpu()
        logsumexp[s] = torch.logsumexp(logits, dim=-1)
        in_chunk = (node_head_t >= s.start) & (node_head_t < s.stop)
        gathered[in_chunk] = logits[node_head_t[in_chunk] - s.start, node_token_t[in_chunk]]
    return (gathered - logsumexp[node_head_t]).double()


def _score_rows(
    parts: LMParts, trees: list[_Tree], rows: list[list[int]], pad_id: int, tree_mask: bool = True
) -> dict[int, list[float]]:
    """Summed continuation log-probabilities of the trees packed in ``rows`` (tree index -> per path)."""
    layout = _layout_rows(trees, rows, pad_id, tree_mask)
    selected = _head_states(parts, layout)
    node_logprob = _node_logprobs(parts, selected, layout.node_head, layout.node_token)
    sums = torch.zeros(len(layout.branches), dtype=torch.float64)
    if layout.branch_nodes:
        sums.index_add_(0, torch.tensor(layout.branch_ids), node_logprob[torch.tensor(layout.branch_nodes)])
    out: dict[int, list[float]] = {}
    for (k, p), value in zip(layout.branches, sums.tolist()):
        out.setdefault(k, [0.0] * len(trees[k].paths))[p] = value
    return out


def tree_attention_supported(model) -> bool:
    """Whether the model's attention takes the custom 4-D masks of packed prefix trees (eager, sdpa)."""
    config = getattr(base_model(model), "config", None)
    return getattr(config, "_attn_implementation", "sdpa") in (None, "eager", "sdpa")


def loglikelihoods(
    model,
    tokenizer,
    items: Sequence[MCItem],
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "score",
    tree_attention: bool | None = None,
) -> list[list[float]]:
    """Per item, the log-likelihood of each choice (see the module docstring for exactly what is scored).

    Items are packed several per row (rows of ``max(ROW_TOKENS, longest item)`` tokens, first-fit decreasing);
    a forward pass takes rows until it holds ``batch_size`` items. ``tree_attention=False`` (the default for
    attention implementations that take no custom 4-D mask, such as flash attention) scores every
    (context, continuation) pair as its own right-padded row instead."""
    parts = LMParts(model)
    pad_id = pad_token_id(tokenizer)
    tree_mask = tree_attention_supported(model) if tree_attention is None else tree_attention
    trees = _make_trees(tokenizer, items, max_positions(model), share=tree_mask)
    scores: list[list[float]] = [[0.0] * len(item.choices) for item in items]
    if not trees:
        return scores
    if tree_mask:
        rows = _pack_rows(trees, max(ROW_TOKENS, max(len(t) for t in trees)))
    else:
        rows = [[k] for k in sorted(range(len(trees)), key=lambda k: -len(trees[k]))]
    batches: list[list[list[int]]] = [[]]
    for row in rows:
        if sum(len(r) for r in batches[-1]) >= batch_size:
            batches.append([])
        batches[-1].append(row)
    with eval_mode(model), tqdm(total=len(trees), desc=desc, disable=not progress, leave=False) as bar:
        for batch in batches:
            for k, values in _score_rows(parts, trees, batch, pad_id, tree_mask).items():
                for (i, j), value in zip(trees[k].refs, values):
                    scores[i][j] = value
            bar.update(sum(len(r) for r in batch))
    return scores


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))


@dataclass
class MCResult:
    """Scores of one benchmark: per-item log-likelihoods and correctness, accuracies, timing."""

    name: str
    loglikelihoods: list[list[float]]
    correct: list[int]
    correct_norm: list[int]
    seconds: float

    @property
    def n(self) -> int:
        return len(self.correct)

    def metrics(self) -> dict[str, float]:
        acc, acc_norm = mean(self.correct), mean(self.correct_norm)
        return {
            f"{self.name}/acc": acc,
            f"{self.name}/acc_stderr": binomial_stderr(acc, self.n),
            f"{self.name}/acc_norm": acc_norm,
            f"{self.name}/acc_norm_stderr": binomial_stderr(acc_norm, self.n),
            f"{self.name}/n": self.n,
        }

    @property
    def items_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def score_items(
    model, tokenizer, items: Sequence[MCItem], name: str = "mc", batch_size: int = 16, progress: bool = False
) -> MCResult:
    """Score a multiple-choice benchmark: ``acc`` (argmax log-likelihood) and ``acc_norm`` (argmax of
    log-likelihood / choice length in characters), with binomial standard errors and items/s."""
    start = time.perf_counter()
    lls = loglikelihoods(model, tokenizer, items, batch_size=batch_size, progress=progress, desc=name)
    correct, correct_norm = [], []
    for item, ll in zip(items, lls):
        correct.append(int(_argmax(ll) == item.label))
        normed = [v / length for v, length in zip(ll, item.norm_lengths())]
        correct_norm.append(int(_argmax(normed) == item.label))
    return MCResult(name, lls, correct, correct_norm, time.perf_counter() - start)
