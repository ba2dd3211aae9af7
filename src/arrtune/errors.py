"""arrtune's own error type: every user-facing failure is raised as :class:`ArrtuneError`."""


class ArrtuneError(Exception):
    """A problem with the user's input (config, data file, model spec) that arrtune explains in one line.

    The CLI prints ``arrtune: error: <message>`` and exits with status 2; ``--debug`` shows the traceback.
    The message names the source: a file and line, a field, or a config key.
    """
