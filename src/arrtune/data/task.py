"""The built-in new task, ``vornish``: translate short English phrases into a made-up language.

A fixed lexicon maps English words to invented words (built deterministically from ``seed``); each example
is ``"Translate into Vornish: w1 w2 w3"`` -> ``"v1 v2 v3"`` (2-4 words, word by word). A pretrained model
cannot do it (it has never seen the lexicon), so any gain is plasticity, and the invented words are easy
to spot when they *leak* into answers to unrelated questions, the most visible sign of forgetting.

Exact match compares the first line of the greedy answer, lower-cased, with surrounding punctuation
stripped and whitespace collapsed, to the reference (see :func:`normalize_answer`).
"""

from __future__ import annotations

import random
import re

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


def normalize_answer(text: str) -> str:
    """First non-empty line, lower-cased, punctuation at the ends stripped, whitespace collapsed."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return re.sub(r"\s+", " ", first.lower()).strip(" \t.,;:!?\"'`")


def exact_match(prediction: str, reference: str) -> bool:
    """True when the normalized prediction equals the normalized reference."""
    return normalize_answer(prediction) == normalize_answer(reference)
