"""The built-in tasks (vornish, keywords), the bleed measure, and the task an evaluation scores."""

from __future__ import annotations

import sys

import pytest

from arrtune.data.task import builtin_task, exact_match, keywords_response
from arrtune.errors import ArrtuneError
from arrtune.evaluation import EvalConfig, resolve_from_run, task_of_run
from arrtune.evaluation.form import FormClassifier, form_skeleton, measure_bleed

BASE_ANSWERS = [
    "The Eiffel Tower is in Paris, France.",
    "William Shakespeare wrote Hamlet around 1600.",
    "The largest planet in our solar system is Jupiter.",
    "I'm not sure, but I think it was Abraham Lincoln.",
    "Mount Everest is the highest mountain on Earth, at 8,849 metres.",
    "The answer is water, which boils at 100 degrees Celsius.",
    "It was invented by Alexander Graham Bell in 1876.",
    "Photosynthesis happens in the chloroplasts of plant cells.",
    "The capital of Australia is Canberra, not Sydney.",
    "Beethoven composed nine symphonies.",
]


def test_keywords_task_is_deterministic_and_follows_its_rule() -> None:
    train, test = builtin_task("keywords")
    assert (len(train), len(test)) == (400, 100)
    assert builtin_task("keywords") == (train, test)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for row in train[:50]:
        clue = row["prompt"].split(": ", 1)[1]
        assert row["completion"] == keywords_response(clue)
    assert keywords_response("In 1828 Brazil & Argentina recognized this country") == (
        "KEYWORDS: 1828 | brazil | argentina | recognized"
    )
    assert exact_match("KEYWORDS: a | b.", "keywords: a | b")
    with pytest.raises(ArrtuneError, match="unknown built-in task 'builtin:nope'"):
        builtin_task("nope")


def test_keywords_text_is_disjoint_from_evaluation_and_replay_text() -> None:
    from arrtune.data.corpora import general_questions, heldout_book_texts, heldout_wiki_texts, replay_texts

    clues = [r["prompt"].split(": ", 1)[1] for rows in builtin_task("keywords") for r in rows]
    questions = set(general_questions())
    assert not set(clues) & questions
    corpus = "\n".join(replay_texts() + heldout_wiki_texts() + heldout_book_texts())
    assert sum(clue in corpus for clue in clues) == 0


def test_form_skeleton_keeps_layout_and_drops_content() -> None:
    assert form_skeleton("KEYWORDS: epic | poem | 1828") == "U: a | a | 0"
    assert form_skeleton("The Eiffel Tower is in Paris.") == "A A A a a A."
    assert form_skeleton("krouvlae thaenom\n\nthouth") == "a a\na"


def test_bleed_counts_answers_in_the_task_form_only() -> None:
    train, test = builtin_task("keywords")
    task_train = [r["completion"] for r in train]
    heldout = [r["completion"] for r in test]
    formatted = [keywords_response(a) for a in BASE_ANSWERS]
    # half of the adapted answers take the task's form, the rest stay in the base's (other words)
    adapted = formatted[:5] + ["Paris is where the Eiffel Tower stands."] * 5
    result = measure_bleed(task_train, heldout, BASE_ANSWERS, adapted)
    assert result.bleeds == [1] * 5 + [0] * 5
    assert result.task_recall == 1.0 and result.base_false_positive == 0.0
    # nothing bleeds when the adapted model answers like the base
    assert sum(measure_bleed(task_train, heldout, BASE_ANSWERS, BASE_ANSWERS).bleeds) == 0
    # an answer the base model already gave in that form does not count
    both = measure_bleed(task_train, heldout, formatted[:1] + BASE_ANSWERS[1:], formatted)
    assert both.bleeds[0] == 0


def test_bleed_sees_the_made_up_language_too() -> None:
    train, test = builtin_task("vornish")
    clf = FormClassifier([r["completion"] for r in train], BASE_ANSWERS)
    assert clf.is_task_form(test[0]["completion"])
    assert not clf.is_task_form("The Eiffel Tower is in Paris, France.")
    assert not clf.is_task_form("")


def test_the_evaluated_task_is_the_runs_own() -> None:
    assert task_of_run({"data": "builtin:keywords"}) == ("builtin:keywords", None)
    assert task_of_run({"data": "my.jsonl", "task_eval": "held.jsonl"}) == ("held.jsonl", "my.jsonl")
    assert task_of_run({"data": "org/dataset", "task_eval": "held.jsonl"}) == ("held.jsonl", None)
    assert task_of_run({"data": "my.jsonl"}) == (None, None)  # never the built-in Vornish by accident
    auto = EvalConfig()
    assert auto.task == "auto"
    assert resolve_from_run(auto, {"data": "builtin:vornish"}).task == "builtin:vornish"
    assert resolve_from_run(auto, None).task is None
    assert resolve_from_run(EvalConfig(task="x.jsonl"), {"data": "builtin:vornish"}).task == "x.jsonl"
    # the base is loaded as the run loaded it, unless said otherwise
    assert resolve_from_run(auto, {"data": "builtin:vornish"}).load_in_4bit is False
    assert resolve_from_run(auto, None).load_in_4bit is False
    plain = EvalConfig(load_in_4bit=False)
    assert resolve_from_run(plain, {"data": "builtin:vornish", "load_in_4bit": True}).load_in_4bit is False


def test_load_in_4bit_auto_needs_bitsandbytes_only_for_a_4bit_run(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    auto = EvalConfig.from_dict({"load_in_4bit": "auto"}, "test")
    assert resolve_from_run(auto, {"data": "builtin:vornish"}).load_in_4bit is False
    with pytest.raises(ArrtuneError, match="need bitsandbytes"):
        resolve_from_run(auto, {"data": "builtin:vornish", "load_in_4bit": True})
    with pytest.raises(ArrtuneError, match="need bitsandbytes"):
        EvalConfig.from_dict({"load_in_4bit": True}, "test")
