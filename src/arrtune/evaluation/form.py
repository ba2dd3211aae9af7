"""Bleed: how often answers to unrelated general questions take the *form* of the new task's responses.

``leak`` sees task *words* (invented words of a made-up language); a format task (a fixed answer layout) has
no such words, and its damage is its layout showing up where it does not belong. Bleed is task-agnostic:

1. Each answer is reduced to its **form**, a skeleton that keeps layout and drops content
   (:func:`form_skeleton`): a lower-case word becomes ``a``, a capitalised word ``A``, an all-capitals word
   ``U``, a number ``0``; spaces, line breaks and punctuation stay. ``"KEYWORDS: epic | poem"`` ->
   ``"U: a | a"``; ``"The Eiffel Tower is in Paris."`` -> ``"A A A a a A."``.
2. A naive-Bayes classifier on character 1-4-grams of the skeletons (start and end marked, add-one smoothing,
   equal priors) learns *task form* from the task's training responses and *base form* from the base
   model's answers to the general questions (:class:`FormClassifier`).
3. An adapted answer **bleeds** when it is classified as task form and the base model's answer to the same
   question is not. ``bleed`` is the share of general questions whose adapted answer bleeds.

The classifier is checked on data it was not trained on (``form_check``): the share of held-out task
references it calls task form (should be near 1) and, by 5-fold cross-validation, the share of base answers
it calls task form (should be near 0).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_TOKEN = re.compile(r"[^\W\d_]+|\d+|\s+|.", re.UNICODE)
MAX_CHARS = 200  # the form of an answer is read from its first characters


def form_skeleton(text: str) -> str:
    """The layout of ``text`` without its content (see the module docstring)."""
    out = []
    for tok in _TOKEN.findall(text.strip()[:MAX_CHARS]):
        if tok.isspace():
            out.append("\n" if "\n" in tok else " ")
        elif tok.isdigit():
            out.append("0")
        elif tok.isalpha():
            out.append("U" if len(tok) > 1 and tok.isupper() else "A" if tok[0].isupper() else "a")
        else:
            out.append(tok)
    return "".join(out)


def _ngrams(text: str, n_max: int = 4) -> Counter[str]:
    s = "^" + form_skeleton(text) + "$"
    return Counter(s[i : i + n] for n in range(1, n_max + 1) for i in range(len(s) - n + 1))


class FormClassifier:
    """Naive Bayes over skeleton n-grams: task form (the task's responses) vs. base form (base answers)."""

    def __init__(self, task_texts: Sequence[str], base_texts: Sequence[str]) -> None:
        self.counts = [Counter[str](), Counter[str]()]  # 0: base form, 1: task form
        for label, texts in ((1, task_texts), (0, base_texts)):
            for text in texts:
                self.counts[label].update(_ngrams(text))
        self.vocab = len(set(self.counts[0]) | set(self.counts[1])) + 1
        self.totals = [sum(c.values()) for c in self.counts]

    def log_odds(self, text: str) -> float:
        """log P(text | task form) - log P(text | base form), per n-gram (length-normalised)."""
        grams = _ngrams(text)
        score = 0.0
        for gram, k in grams.items():
            p_task = (self.counts[1][gram] + 1) / (self.totals[1] + self.vocab)
            p_base = (self.counts[0][gram] + 1) / (self.totals[0] + self.vocab)
            score += k * (math.log(p_task) - math.log(p_base))
        return score / max(sum(grams.values()), 1)

    def is_task_form(self, text: str) -> bool:
        """True when ``text`` is more likely task form than base form (empty text never is)."""
        return bool(text.strip()) and self.log_odds(text) > 0


@dataclass
class Bleed:
    """Per question: whether the adapted answer bleeds; and the classifier's checks on unseen data."""

    bleeds: list[int]
    task_recall: float  # share of held-out task references classified as task form
    base_false_positive: float  # share of base answers classified as task form (5-fold cross-validation)


def measure_bleed(
    task_train: Sequence[str],
    task_heldout: Sequence[str],
    base_answers: Sequence[str],
    adapted_answers: Sequence[str],
    folds: int = 5,
) -> Bleed:
    """Bleed of ``adapted_answers`` (same questions, same order as ``base_answers``)."""
    clf = FormClassifier(task_train, base_answers)
    bleeds = [
        int(clf.is_task_form(a) and not clf.is_task_form(b)) for a, b in zip(adapted_answers, base_answers)
    ]
    recall = sum(clf.is_task_form(t) for t in task_heldout) / max(len(task_heldout), 1)
    false_pos = 0
    for k in range(folds):
        train = [b for i, b in enumerate(base_answers) if i % folds != k]
        held = [b for i, b in enumerate(base_answers) if i % folds == k]
        if held and train:
            fold_clf = FormClassifier(task_train, train)
            false_pos += sum(fold_clf.is_task_form(b) for b in held)
    return Bleed(bleeds, recall, false_pos / max(len(base_answers), 1))
