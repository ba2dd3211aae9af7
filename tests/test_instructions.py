"""Instruction following: prompts built offline from IFEval's checkers, scored strict and loose."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval.tasks.ifeval", reason="needs arrtune[ifeval]")

from arrtune.errors import ArrtuneError  # noqa: E402
from arrtune.evaluation.instructions import INSTRUCTIONS, InstructionPrompt, build_prompts, checkers, score  # noqa: E402


def test_prompts_are_deterministic_disjoint_and_respect_conflicts() -> None:
    from arrtune.data.corpora import general_questions, self_replay_prompts

    registry, _ = checkers()
    conflicts = registry.conflict_make({k: set(v) for k, v in registry.INSTRUCTION_CONFLICTS.items()})
    prompts = build_prompts(300)
    assert [p.prompt for p in prompts] == [p.prompt for p in build_prompts(300)]
    assert len({p.question for p in prompts}) == 300
    for p in prompts:
        assert 1 <= len(p.instruction_ids) <= 3 and set(p.instruction_ids) <= set(INSTRUCTIONS)
        for i, a in enumerate(p.instruction_ids):
            assert not any(b in conflicts[a] for b in p.instruction_ids[i + 1 :]), p.instruction_ids
    assert {len(p.instruction_ids) for p in prompts} == {1, 2, 3}
    others = {q.lower().strip() for q in (*general_questions(), *self_replay_prompts())}
    assert not any(p.question.lower().strip() in others for p in prompts)
    assert len({i for p in prompts for i in p.instruction_ids}) == len(INSTRUCTIONS)  # every kind is drawn


def _prompt(ids: tuple[str, ...], kwargs: tuple[dict, ...]) -> InstructionPrompt:
    return InstructionPrompt(
        0, "Where do you keep a spare key?", "Where do you keep a spare key? ...", ids, kwargs
    )


def test_a_compliant_answer_passes_and_a_broken_one_fails() -> None:
    cases = [
        (("detectable_format:json_format",), ({},), '{"answer": "under the mat"}', "Under the mat."),
        (("punctuation:no_comma", "change_case:english_lowercase"), ({}, {}),
         "under the mat by the door", "Under the mat, by the door"),
        (("startend:end_checker",), ({"end_phrase": "Any other questions?"},),
         "Under the mat. Any other questions?", "Under the mat. Anything else?"),
        (("keywords:existence",), ({"keywords": ["mat", "door"]},), "The mat by the door.", "Under a rock."),
        (("detectable_format:number_bullet_lists",), ({"num_bullets": 2},), "* mat\n* door", "A mat, then a door."),
        (("detectable_content:postscript",), ({"postscript_marker": "P.S."},), "The mat.\nP.S. Hide it well.", "The mat."),
    ]  # fmt: skip
    for ids, kwargs, good, bad in cases:
        result = score([_prompt(ids, kwargs)] * 2, [good, bad])
        assert result.prompt_strict == [1, 0], (ids, result)
        assert result.prompt_loose == [1, 0], (ids, result)
        assert result.instruction_strict[: len(ids)] == [1] * len(ids)


def test_loose_forgives_what_ifeval_forgives() -> None:
    # a first line of preamble: the loose test also tries the response without it
    prompt = _prompt(("detectable_format:json_format",), ({},))
    result = score([prompt], ['Sure, here it is:\n{"answer": "under the mat"}'])
    assert result.prompt_strict == [0] and result.prompt_loose == [1]
    metrics = result.metrics()
    assert metrics["ifeval/prompt_strict"] == 0.0 and metrics["ifeval/prompt_loose"] == 1.0


def test_behaviour_not_protected_is_said_in_one_sentence() -> None:
    from arrtune.evaluation import behaviour_note

    quiet = {"adapted": {"bleed": 0.02, "bleed_stderr": 0.02}, "delta": {"ifeval/prompt_strict": -0.01,
                                                                       "ifeval/prompt_strict_stderr": 0.03}}  # fmt: skip
    assert behaviour_note(quiet) is None
    # over the limit, but not beyond one standard error: noise, no sentence
    within_noise = {"adapted": {"bleed": 0.08, "bleed_stderr": 0.05}, "delta": {"ifeval/prompt_strict": -0.02,
                                                                              "ifeval/prompt_strict_stderr": 0.03}}  # fmt: skip
    assert behaviour_note(within_noise) is None
    bleeding = {"adapted": {"bleed": 0.57, "bleed_stderr": 0.09}, "delta": {}}
    assert "57% of its answers" in behaviour_note(bleeding) and "replay_mix: 0.5" in behaviour_note(bleeding)
    forgetting = {
        "adapted": {},
        "delta": {"ifeval/prompt_strict": -0.10, "ifeval/prompt_strict_stderr": 0.039},
    }
    assert "-10.0 ± 3.9 points" in behaviour_note(forgetting)
    # the fix named depends on what the run did: corpus replay is told to mix in its own answers, a run that
    # already does is told to replay more
    corpus = {"method": "arr", "replay_ratio": 0.25, "replay": "builtin", "replay_mix": 0.0}
    assert "`replay_mix: 0.5`" in behaviour_note(bleeding, corpus)
    mixed = behaviour_note(bleeding, {**corpus, "replay_mix": 0.5})
    assert (
        "already replays" in mixed
        and "`replay_ratio` above 0.25" in mixed
        and "`replay_mix: 0.5`" not in mixed
    )
    assert "already replays" in behaviour_note(bleeding, {**corpus, "replay": "self"})


def test_ifeval_format_data_is_read_and_scored(tmp_path) -> None:
    """A local file in google/IFEval's format (its kwargs carry every key, None where unused) reads into
    prompts that IFEval's checkers score: a compliant answer passes, a broken one fails."""
    import json

    from arrtune.evaluation.instructions import instruction_prompts, score

    unused = {"num_highlights": None, "relation": None, "num_words": None, "keywords": None}
    rows = [
        {"key": 1000, "prompt": "Describe the sea in all lowercase letters.",
         "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [unused]},
        {"key": 1001, "prompt": "Name a fruit. Do not use any commas. Include the keyword banana.",
         "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
         "kwargs": [unused, {**unused, "keywords": ["banana"]}]},
    ]  # fmt: skip
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = instruction_prompts(str(path), 5)
    assert [p.key for p in prompts] == [1000, 1001] and prompts[1].kwargs[1] == {"keywords": ["banana"]}
    assert prompts[0].prompt == rows[0]["prompt"]
    good = score(prompts, ["the sea is wide and blue", "i like a banana a lot"])
    bad = score(prompts, ["The Sea is wide", "i like apples, pears"])
    assert good.prompt_strict == [1, 1] and good.instruction_strict == [1, 1, 1]
    assert bad.prompt_strict == [0, 0] and bad.instruction_strict == [0, 0, 0]
    with pytest.raises(ArrtuneError, match="no column instruction_id_list"):
        bad_path = tmp_path / "other.jsonl"
        bad_path.write_text(json.dumps({"prompt": "x", "kwargs": []}) + "\n")
        instruction_prompts(str(bad_path), 5)


def test_an_instruction_that_needs_missing_nltk_data_is_one_line() -> None:
    """IFEval's own prompts include sentence counts, which need NLTK's punkt data: without it, one clear line."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        pytest.skip("punkt_tab is installed here")
    except LookupError:
        pass
    prompt = InstructionPrompt(1, "x", "Write three sentences.", ("length_constraints:number_sentences",),
                               ({"relation": "at least", "num_sentences": 3},))  # fmt: skip
    with pytest.raises(
        ArrtuneError, match="needs NLTK data that is not installed: python -m nltk.downloader"
    ):
        score([prompt], ["One. Two. Three."])
