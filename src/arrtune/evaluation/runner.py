"""Temporary: only for ``arrtune.report``'s ``from arrtune.evaluation.runner import behaviour_note``, until that
line imports from :mod:`arrtune.evaluation`; delete this module then. The evaluation lives in
:mod:`arrtune.evaluation.run` and the modules next to it."""

from arrtune.evaluation.output import behaviour_note

__all__ = ["behaviour_note"]
