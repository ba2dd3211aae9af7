"""Command line: ``arrtune train | eval | compare | demo``. Parses argv, calls the library, prints results.

Errors in user input print one line (``arrtune: error: ...``) and exit with status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from arrtune.errors import ArrtuneError


def _cmd_train(args: argparse.Namespace) -> int:
    from arrtune.config import load_config
    from arrtune.recipe import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, overwrite=args.overwrite)
    print(f"adapter saved to {run_dir / 'adapter'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``arrtune`` command."""
    parser = argparse.ArgumentParser(prog="arrtune", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA adapter with the ARR loss")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--overwrite", action="store_true", help="replace a run directory that holds another run")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, applied after the file"
    )
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``arrtune`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ArrtuneError as exc:
        if args.debug:
            raise
        print(f"arrtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("arrtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
