"""What an ``arrtune`` command shows on stderr: arrtune's own log lines, and libraries' records held back.

Without ``--debug``, records of arrtune's logger (``arrtune``) are printed as they come, from INFO up. Every
other logger's records (transformers, kernels, datasets, accelerate, bitsandbytes, torch, ...) and Python
warnings are held in memory instead: a command that fails then shows exactly one ``arrtune: error:`` line, whatever a library
logged at import or load time, and a command that succeeds shows afterwards only the held records at ERROR or
above (something went wrong that the user must act on). Library warnings are dropped; which ones were seen and
why none of them needs the user: docs/reliability.md. ``--debug`` prints every record as it comes.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(levelname)s %(name)s: %(message)s"
#: a library record at this level or above is shown after a command that succeeds
SHOWN_AFTER_SUCCESS = logging.ERROR


class Console(logging.Handler):
    """The root handler of a command: prints arrtune's records to the current ``sys.stderr``, holds the
    others at ERROR and above in :attr:`held` for :meth:`show_held` and drops the rest."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter(FORMAT))
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "arrtune" or record.name.startswith("arrtune."):
            try:
                print(self.format(record), file=sys.stderr)
            except Exception:  # noqa: BLE001 (logging must not raise)
                self.handleError(record)
        elif record.levelno >= SHOWN_AFTER_SUCCESS:  # lower levels are dropped at once
            self.held.append(record)

    def show_held(self) -> None:
        """After a command that succeeded: print the held records, then forget them."""
        for record in self.held:
            print(self.format(record), file=sys.stderr)
        self.held.clear()


def configure(debug: bool) -> Console | None:
    """Set up logging for one command; returns the root handler holding library records (None under
    ``debug``, where every record is printed as it comes)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, Console):
            root.removeHandler(handler)
    if debug:
        logging.basicConfig(level=logging.DEBUG, format=FORMAT)
        return None
    console = Console()
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings (deprecations, ...) become records of 'py.warnings': held
    return console
