"""Command line: ``arrtune train | eval | compare | demo | report | export``. Parses argv, calls the library, prints results.

Errors in user input print one line (``arrtune: error: ...``) and exit with status 2; ``--debug`` (before
or after ``train``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from arrtune.errors import ArrtuneError


def _cmd_train(args: argparse.Namespace) -> int:
    from arrtune.config_files import load_config
    from arrtune.recipe import train

    cfg = load_config(args.config, args.overrides)
    args.resumable = cfg.save_steps > 0  # what an interrupt can tell the user
    run_dir = train(cfg, overwrite=args.overwrite)
    # under torchrun / accelerate launch only the main process says it
    if os.environ.get("RANK", "0") == "0":
        print(f"adapter saved to {run_dir / 'adapter'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from arrtune.config_files import parse_override, read_yaml_mapping
    from arrtune.evaluation import EvalConfig, check_eval_inputs, evaluate_run, format_table, resolve_from_run
    from arrtune.evaluation.run import adapter_base

    data = read_yaml_mapping(args.config, "eval config", "a mapping of eval settings") if args.config else {}
    for item in args.overrides:
        key, value = parse_override(item)
        data[key] = value
    cfg = EvalConfig.from_dict(data, args.config or "override")
    run_config = None
    if args.adapter:
        adapter = Path(args.adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise ArrtuneError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
        saved = adapter.parent / "config.yaml"
        if saved.is_file():
            run_config = read_yaml_mapping(saved, "run config", "a mapping of config keys")
    cfg = resolve_from_run(cfg, run_config)
    check_eval_inputs(cfg)
    output = Path(args.output or (Path(args.adapter).parent / "eval.json" if args.adapter else "eval.json"))
    if output.is_dir():
        raise ArrtuneError(f"--output {output}: is a directory, not a file")
    if output.parent.exists() and not output.parent.is_dir():
        raise ArrtuneError(f"--output {output}: {output.parent} is a file, not a directory")
    from arrtune.models import DEFAULT_MODEL

    model_spec = args.model or (adapter_base(args.adapter) if args.adapter else DEFAULT_MODEL)
    if data.get("task", "auto") == "auto":
        print(f"task: {cfg.task or 'none (set task=FILE or, in training, task_eval)'}", file=sys.stderr)
    if data.get("load_in_4bit", "auto") == "auto" and cfg.load_in_4bit:
        print(
            "load_in_4bit: true (the run trained on a 4-bit base; load_in_4bit=false to change)",
            file=sys.stderr,
        )
    result = evaluate_run(model_spec, cfg, args.adapter, output, progress=not args.no_progress)
    print(format_table(result))
    print(f"\nwrote {output}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from arrtune.experiments import load_grid

    return _run_grid(load_grid(args.config, args.overrides), args)


def _run_grid(grid: Any, args: argparse.Namespace) -> int:
    """Train and evaluate a grid (``compare``, ``demo``), then print its report."""
    from arrtune.experiments import run_grid

    out = run_grid(grid, progress=not args.no_progress, debug=args.debug)
    print((out / "report.md").read_text())
    print(f"report written to {out / 'report.md'}")
    return 0


#: what ``arrtune demo`` trains, and about how long it takes on 2 CPU cores, set-up excluded (docs/demo.md)
DEMO_RUNS = {False: (("sft", "arr"), "7-9 minutes"), True: (("sft", "kl", "replay", "arr"), "12-15 minutes")}


def _cmd_demo(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from arrtune.experiments import load_grid

    grid = load_grid(
        files("arrtune") / "configs" / "demo.yaml", [f"output_dir={args.output}", *args.overrides]
    )
    methods, duration = DEMO_RUNS[args.all]
    grid.runs = [{"method": m} for m in methods]
    print(
        f"[demo] trains SmolLM2-135M-Instruct on the built-in Vornish task {len(methods)} ways ({', '.join(methods)}; "
        f"40 steps each), evaluates each against the base model and writes {args.output}/report.md: about "
        f"{duration} on 2 CPU cores{'' if args.all else '; --all adds KL-only and replay-only runs'}"
    )
    return _run_grid(grid, args)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from arrtune.report import write_report

    root = Path(args.dir)
    names = (
        sorted(p.name for p in (root / "runs").iterdir() if p.is_dir()) if (root / "runs").is_dir() else []
    )
    if not names:
        raise ArrtuneError(f"{root}: no runs/ to report on (run 'arrtune compare' first)")
    previous = root / "results.json"
    if previous.is_file():  # keep the run order of the grid's own report
        import json

        order = [r["run"] for r in json.loads(previous.read_text()) if r.get("run") in names]
        names = order + [n for n in names if n not in order]
    print(write_report(root, names).read_text())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from arrtune.config_files import parse_override
    from arrtune.export import export_run

    settings = dict(parse_override(item) for item in args.overrides)
    scale: float | str = args.scale
    if scale != "auto":
        try:
            scale = float(args.scale)
        except ValueError:
            raise ArrtuneError(f"--scale {args.scale}: expected a number in [0, 1] or auto") from None
    out = export_run(args.run_dir, args.out, adapter_only=args.adapter_only, dtype=args.dtype, scale=scale,
                     evaluate=not args.no_eval, eval_settings=settings, progress=not args.no_progress)  # fmt: skip
    kind = "adapter" if args.adapter_only else "merged model"
    print(f"{kind} written to {out} (model card: {out / 'README.md'})")
    return 0


def _eval_settings_help() -> str:
    """One line per EvalConfig field: name, default and the first sentence of its documentation."""
    import dataclasses
    import inspect
    import re

    from arrtune.evaluation import EvalConfig

    try:
        source = inspect.getsource(EvalConfig)
    except (OSError, TypeError):  # installed without source files: names and defaults only
        source = ""
    lines = []
    for f in dataclasses.fields(EvalConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        comment = re.search(rf"((?:\s*#: .*\n)+)\s*{f.name}:", source)
        doc = " ".join(c.strip()[3:] for c in comment.group(1).strip().splitlines()) if comment else ""
        doc = doc.split("; default")[0]
        lines.append(f"  {f.name}={default!r}: {doc}")
    return "\n".join(lines)


DESCRIPTION = """\
LoRA fine-tuning that keeps what the model knows: supervised fine-tuning plus replay of general text and a KL
to the initial model (approximate regularized replay), and the measurements that show what a fine-tune cost.

examples:
  arrtune demo                                   plain SFT vs ARR on the built-in model and task (CPU)
  arrtune train --config configs/arr.yaml        one run: a PEFT adapter, metrics.jsonl, config.yaml
  arrtune eval --adapter runs/arr/adapter        base vs adapted: benchmarks, drift, leak, task
  arrtune compare --config configs/compare.yaml  a grid of methods and seeds, a report with plots
  arrtune export runs/arr --out exports/arr      a merged model (or adapter) with a forgetting model card

Errors print one line (arrtune: error: ...); --debug shows tracebacks and every library's log."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``arrtune`` command."""
    parser = argparse.ArgumentParser(prog="arrtune", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA adapter with the ARR loss")
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--overwrite", action="store_true", help="replace a run directory that holds another run")
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, applied after the file"
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval", help="measure retention and plasticity of a model, or of a base + adapter pair"
    )
    p.add_argument(
        "--model",
        help="model spec (default: the adapter's own base model with --adapter, else smollm2-135m-instruct)",
    )
    p.add_argument("--adapter", help="PEFT adapter directory: evaluates base and adapted model side by side")
    p.add_argument("--config", help="eval YAML (EvalConfig fields)")
    p.add_argument("--output", help="where to write eval.json (default: next to the adapter, or ./eval.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings (below), after --config")
    p.epilog = "settings (key=value, or in --config), with their defaults:\n" + _eval_settings_help()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("compare", help="train and evaluate a grid of methods; write a report with plots")
    p.add_argument("--config", help="grid YAML (see configs/compare.yaml)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides of the grid's shared run settings"
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "demo", help="the built-in comparison on SmolLM2-135M: plain SFT vs ARR (--all: and kl, replay)"
    )
    p.add_argument("--output", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--all", action="store_true", help="also train the KL-only and replay-only runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo's run settings")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("export", help="a run as a merged model (or adapter) with a forgetting model card")
    p.add_argument("run_dir", help="a finished run directory (config.yaml, adapter/, eval.json if evaluated)")
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument(
        "--adapter-only", action="store_true", help="write the PEFT adapter instead of a merged model"
    )
    p.add_argument(
        "--dtype", default="auto", help="saved precision: auto (the base's), bfloat16, float16, float32"
    )
    p.add_argument(
        "--scale",
        default="1",
        help="multiply the LoRA update by this factor in [0, 1] (default 1), or 'auto': the smallest of "
        "0.25/0.5/0.75/1 whose task exact match is within one paired standard error of 1's",
    )
    p.add_argument("--no-eval", action="store_true", help="do not evaluate a run that has no eval.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="eval settings (as arrtune eval takes them) for that evaluation and --scale auto")  # fmt: skip
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("report", help="rebuild report.md, CSV/JSON tables and plots of a compare directory")
    p.add_argument("dir", help="a compare output directory")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``arrtune`` console script."""
    code = _run(argv)
    if _close_process_group():
        _exit_before_teardown(code)
    return code


def _run(argv: list[str] | None) -> int:
    from arrtune.logs import configure

    # first of all (building the parser imports transformers): libraries' log records are held, not printed,
    # so a failure is one line and a success shows their errors after it
    console = configure("--debug" in (sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value settings may follow options (export RUN --out D n_task=100): argparse leaves them over
    if extra and all("=" in x and not x.startswith("-") for x in extra) and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.debug:
        # datasets and the Hub client print through handlers of their own: only their errors
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        # loading bars of transformers / the Hub would come before a one-line error; training keeps its own
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # transformers' records go to the root handler (held) instead of its own stderr handler
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.set_verbosity_warning()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        if console is not None:
            console.show_held()
        return code
    except ArrtuneError as exc:
        if args.debug:
            raise
        return _error(str(exc))
    except OSError as exc:  # the environment: disk full, read-only file system, no permission, ...
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        return _error(f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        print(f"arrtune: interrupted; {_after_interrupt(args, argv)}", file=sys.stderr)
        return 130


def _close_process_group() -> bool:
    """Destroy the process group of a ``torchrun`` / ``accelerate launch`` worker; False when there is none."""
    dist = sys.modules.get("torch.distributed")  # not imported: nothing to close (and torch stays unloaded)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    dist.destroy_process_group()
    return True


def _exit_before_teardown(code: int) -> None:
    """End a launched worker without the interpreter's teardown: the exit handlers run (loggers, trackers),
    then the process exits. Torn down by the interpreter, gloo's threads and the tensors they hold can be freed
    after Python is gone, and a finished run then aborts (SIGABRT) with a non-zero exit."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _error(message: str) -> int:
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"arrtune: error: {message}", file=sys.stderr)
    return 2


def _after_interrupt(args: argparse.Namespace, argv: list[str] | None) -> str:
    """What an interrupted command leaves, and how to go on."""
    import shlex

    again = "arrtune " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.command == "train":
        if getattr(args, "resumable", False):
            return f"resume from the last checkpoint with the same command: {again}"
        return ("nothing can be resumed (save_steps is 0, so no checkpoint was written); set save_steps=N "
                "to make a run resumable")  # fmt: skip
    if args.command in ("compare", "demo"):
        return f"finished runs are kept; the same command goes on where it stopped: {again}"
    return "nothing was written"


if __name__ == "__main__":
    sys.exit(main())
