"""``recipe.environment``: one variable set for a block, and only that variable restored after it.

``unittest.mock.patch.dict(os.environ, {name: value})`` is not a replacement: on exit it puts back the whole
environment as it was, undoing what the block set besides ``name`` (the block builds the Trainer, whose
``Accelerator`` sets ``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP`` when given such a plugin); the
first test fails with it.
"""

from __future__ import annotations

import os

import pytest

from arrtune.recipe import environment

NAME, OTHER = "ARRTUNE_TEST_ENV_NAME", "ARRTUNE_TEST_ENV_OTHER"


@pytest.fixture(autouse=True)
def _unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (NAME, OTHER):  # absent now, and absent again after the test whatever it sets
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)


@pytest.mark.parametrize("before", [None, "before"])
def test_sets_the_variable_then_restores_only_it(before: str | None) -> None:
    if before is not None:
        os.environ[NAME] = before
    with environment(NAME, "inside"):
        assert os.environ[NAME] == "inside"
        os.environ[OTHER] = "set in the block"
    assert os.environ.get(NAME) == before
    assert os.environ[OTHER] == "set in the block"  # not undone


@pytest.mark.parametrize("before", [None, "before"])
def test_none_leaves_the_variable_and_still_restores_it(before: str | None) -> None:
    if before is not None:
        os.environ[NAME] = before
    with environment(NAME, None):
        assert os.environ.get(NAME) == before
        os.environ[NAME] = "changed in the block"
    assert os.environ.get(NAME) == before


def test_restores_after_an_error() -> None:
    os.environ[NAME] = "before"
    with pytest.raises(RuntimeError), environment(NAME, "inside"):
        raise RuntimeError("in the block")
    assert os.environ[NAME] == "before"
