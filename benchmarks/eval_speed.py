"""Multiple-choice scoring speed: arrtune's ``score_items`` vs. lm-evaluation-harness's Hugging Face backend.

Both score the same items with the same local model (float32, CPU, same batch size) and the results are compared
item by item: the (context, continuation) requests, every choice's log-likelihood, and ``acc`` / ``acc_norm``.

* The items are a fixed-seed subset of each benchmark from ``arrtune.evaluation.load_benchmark``, exported to
  ``<workdir>/data/<benchmark>.jsonl`` as arrtune's user-benchmark schema (``prompt``, ``choices``, ``label``).
* The harness reads the same files through task YAMLs in ``<workdir>/tasks/`` (``dataset_path: json``,
  ``output_type: multiple_choice``, ``doc_to_text: prompt``, ``doc_to_choice: choices``, ``doc_to_target: label``,
  ``target_delimiter: " "``). The fields are named directly instead of through Jinja templates
  (``"{{prompt}}"``), so the prompt reaches the harness byte for byte; ``context = prompt``,
  ``continuation = " " + choice``, exactly arrtune's :meth:`MCItem.requests` (checked per item).
* lm-eval runs in its own venv (``benchmarks/.venv-lmeval``, created on first use from
  ``benchmarks/requirements-lmeval.txt``, torch==2.13.0 first so pip keeps the CPU wheel), in a worker process
  that does what ``lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --batch_size 16 --device cpu
  --tasks ... --include_path ... --log_samples`` does, through the Python API (``HFLM`` + ``simple_evaluate``),
  keeping the model loaded between tasks; arrtune runs in this process (the project's .venv).
* **What is timed.** Scoring only, on both sides, after the model is loaded and one warm-up forward pass:
  arrtune: ``score_items`` (tokenization, prefix trees, forward passes, log-probs, argmax);
  lm-eval: the time spent inside ``HFLM.loglikelihood`` (tokenization, forward passes, log-probs), measured by
  wrapping that method. Also reported: lm-eval's whole ``simple_evaluate`` per task (adds reading the JSON data
  set, building requests, metrics, sample logging) and the model load times.
  Each side scores every benchmark ``--repeats`` times (default 2), the two sides taking turns and alternating
  which goes first, so that load from other processes hits both alike; the fastest run of each side counts.
  CPU time (``time.process_time``) of the same calls is reported too: it is less disturbed by such load.

Run with one thread per side on a shared machine (the worker inherits the environment)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_speed.py                 # arc_easy, piqa, 100 items each
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_speed.py --benchmarks hellaswag --repeats 1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_speed.py --cli-check      # also run the real lm_eval CLI

``--cli-check`` additionally runs the ``lm_eval`` command line itself on the same tasks (``--log_samples
--output_path``) and checks that its per-sample accuracies equal the API worker's (its wall time includes
start-up and model loading, so it is only reported, not used for items/s). Results and per-item data go to
``--workdir`` (default ``runs/eval_speed``). Only benchmarks without partial evaluation (not winogrande) work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REQUIREMENTS = HERE / "requirements-lmeval.txt"
DEFAULT_VENV = HERE / ".venv-lmeval"
DEFAULT_WORKDIR = ROOT / "runs" / "eval_speed"
TORCH_PIN = "torch==2.13.0"
TASK_PREFIX = "arrtune_speed_"
WARMUP_TOKENS = 16


# --------------------------------------------------------------------------------------------------------------
# lm-eval environment


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_lmeval_venv(venv: Path) -> Path:
    """Create ``venv`` with torch==2.13.0 and the pinned lm-eval (once; again when the requirements change)."""
    python = venv_python(venv)
    stamp = venv / ".eval-speed-installed"
    want = hashlib.sha1((TORCH_PIN + "\n" + REQUIREMENTS.read_text()).encode()).hexdigest()
    if python.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return python
    print(f"[eval_speed] setting up {venv} (torch first, then {REQUIREMENTS.name}) ...", flush=True)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # keep the venv out of git without touching .gitignore (what `python -m venv` does itself from 3.13 on)
    (venv / ".gitignore").write_text("# created by benchmarks/eval_speed.py\n*\n")
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, TORCH_PIN], check=True)  # first: any other torch spec pulls GBs of CUDA wheels
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(want + "\n")
    return python


# --------------------------------------------------------------------------------------------------------------
# items and task definitions


def export_items(benchmarks: list[str], n: int, seed: int, data_dir: Path) -> dict[str, Path]:
    """Write each benchmark's subset as arrtune user-benchmark JSONL; returns benchmark -> file."""
    from arrtune.evaluation import load_benchmark

    data_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in benchmarks:
        items = load_benchmark(name, n, seed)
        bad = [i for i, item in enumerate(items) if item.suffix is not None or item.delimiter != " "]
        if bad:
            raise SystemExit(
                f"{name}: items with partial evaluation (suffix) or a delimiter other than ' ' are not supported"
            )
        path = data_dir / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for item in items:
                row = {"prompt": item.prompt, "choices": list(item.choices), "label": item.label}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        files[name] = path
    return files


def write_task_yamls(files: dict[str, Path], task_dir: Path) -> dict[str, str]:
    """One lm-eval task per benchmark, reading the exported JSONL; returns benchmark -> task name."""
    import yaml

    task_dir.mkdir(parents=True, exist_ok=True)
    for old in task_dir.glob("*.yaml"):
        old.unlink()
    names = {}
    for name, path in files.items():
        task = TASK_PREFIX + name.replace(":", "_")
        config = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "prompt",  # field names, not "{{prompt}}": no Jinja rendering of the text
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "target_delimiter": " ",
            "num_fewshot": 0,
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": 1.0},
        }
        (task_dir / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        names[name] = task
    return names


# --------------------------------------------------------------------------------------------------------------
# lm-eval worker (runs in the lm-eval venv; must not import arrtune)

SENTINEL = "@@eval_speed@@"


def lmeval_worker(spec_path: str) -> None:
    """Load the model once, then score one task per command line read from stdin (JSON ``{"bench", "out"}``)."""
    spec = json.loads(Path(spec_path).read_text())
    import importlib.metadata as md

    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    lm = HFLM(pretrained=spec["model"], dtype="float32", batch_size=spec["batch_size"], device="cpu")
    load_s = time.perf_counter() - start
    with torch.inference_mode():  # warm-up: one forward pass, as on arrtune's side
        lm._model_call(torch.full((1, WARMUP_TOKENS), lm.prefix_token_id, dtype=torch.long))

    spent = {"wall": 0.0, "cpu": 0.0}
    original = lm.loglikelihood

    def timed_loglikelihood(requests, disable_tqdm: bool = False):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return original(requests, disable_tqdm=disable_tqdm)
        finally:
            spent["wall"] += time.perf_counter() - wall
            spent["cpu"] += time.process_time() - cpu

    lm.loglikelihood = timed_loglikelihood  # simple_evaluate calls getattr(lm, "loglikelihood")
    manager = TaskManager(include_path=spec["task_dir"], include_defaults=False)
    meta = {
        "versions": {
            p: md.version(p) for p in ("lm_eval", "torch", "transformers", "tokenizers", "datasets")
        },
        "threads": torch.get_num_threads(),
        "load_seconds": load_s,
        "hflm": {
            "add_bos_token": lm.add_bos_token,
            "prefix_token_id": lm.prefix_token_id,
            "max_length": lm.max_length,
            "batch_size": lm.batch_size,
            "logits_cache": lm.logits_cache,
            "attn_implementation": getattr(lm.model.config, "_attn_implementation", None),
        },
    }
    Path(spec["meta"]).write_text(json.dumps(meta))
    print(SENTINEL, "ready", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        task = spec["tasks"][command["bench"]]
        spent["wall"] = spent["cpu"] = 0.0
        t0 = time.perf_counter()
        out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True)
        total_s = time.perf_counter() - t0
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        metrics = out["results"][task]
        result = {
            "seconds": spent["wall"],
            "cpu_seconds": spent["cpu"],
            "total_seconds": total_s,
            "acc": metrics["acc,none"],
            "acc_norm": metrics["acc_norm,none"],
            "samples": [
                {
                    "doc_id": s["doc_id"],
                    "arguments": [list(a) for a in s["arguments"]],
                    "lls": [float(r[0]) for r in s["filtered_resps"]],
                    "acc": s["acc"],
                    "acc_norm": s["acc_norm"],
                }
                for s in samples
            ],
        }
        Path(command["out"]).write_text(json.dumps(result))
        print(SENTINEL, "done", flush=True)


class LMEvalSide:
    """The harness in a persistent worker process of the lm-eval venv (model loaded once)."""

    def __init__(self, python: Path, spec: dict, workdir: Path):
        self.workdir = workdir
        spec_path = workdir / "lmeval_spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("PYTHONPATH", None)
        cmd = [str(python), str(Path(__file__).resolve()), "--worker", str(spec_path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._wait("ready")
        self.meta = json.loads(Path(spec["meta"]).read_text())

    def _wait(self, what: str) -> None:
        for line in self.proc.stdout:
            if line.startswith(SENTINEL):
                if line.split()[1] == what:
                    return
            else:
                print(line, end="")
        raise RuntimeError(f"lm-eval worker exited (code {self.proc.wait()}) before '{what}'")

    def run(self, bench: str) -> dict:
        out = self.workdir / f"lmeval_{bench}.json"
        self.proc.stdin.write(json.dumps({"bench": bench, "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        self._wait("done")
        return json.loads(out.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def run_lmeval_cli(python: Path, model_dir: str, tasks: dict[str, str], args, workdir: Path) -> dict:
    """The real ``lm_eval`` command line on the same tasks: wall time and per-sample accuracies."""
    out_dir = workdir / "cli_output"
    cmd = [
        str(python.parent / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
        "--tasks", ",".join(tasks.values()), "--include_path", str(workdir / "tasks"),
        "--batch_size", str(args.batch_size), "--device", "cpu", "--log_samples", "--output_path", str(out_dir),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print("[eval_speed] " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    per_task = {}
    for bench, task in tasks.items():
        files = sorted(out_dir.glob(f"**/samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
        rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
        rows.sort(key=lambda r: r["doc_id"])
        per_task[bench] = {"acc": [r["acc"] for r in rows], "acc_norm": [r["acc_norm"] for r in rows]}
    return {"command": cmd, "wall_seconds": wall, "tasks": per_task}


# --------------------------------------------------------------------------------------------------------------
# arrtune side


class ArrtuneSide:
    """arrtune's ``score_items`` in this process (model loaded once)."""

    def __init__(self, model_dir: str, files: dict[str, Path], args):
        import importlib.metadata as md

        import torch

        from arrtune.evaluation import load_jsonl_benchmark
        from arrtune.models import load_model, load_tokenizer

        if args.threads:
            torch.set_num_threads(args.threads)
        self.batch_size = args.batch_size
        start = time.perf_counter()
        self.model = load_model(model_dir, dtype=torch.float32)
        self.tokenizer = load_tokenizer(model_dir)
        load_s = time.perf_counter() - start
        self.model.eval()
        tok = self.tokenizer
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        with torch.inference_mode():  # warm-up: one forward pass, as on the harness's side
            self.model(torch.full((1, WARMUP_TOKENS), prefix, dtype=torch.long))
        self.items = {
            bench: load_jsonl_benchmark(path) for bench, path in files.items()
        }  # the harness's files
        self.meta = {
            "versions": {
                p: md.version(p) for p in ("arrtune", "torch", "transformers", "tokenizers", "datasets")
            },
            "threads": torch.get_num_threads(),
            "load_seconds": load_s,
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
        }

    def run(self, bench: str) -> dict:
        from arrtune.evaluation import score_items

        items = self.items[bench]
        cpu = time.process_time()
        res = score_items(self.model, self.tokenizer, items, name=bench, batch_size=self.batch_size)
        return {
            "seconds": res.seconds,
            "cpu_seconds": time.process_time() - cpu,
            "items": items,
            "lls": res.loglikelihoods,
            "correct": res.correct,
            "correct_norm": res.correct_norm,
        }


# --------------------------------------------------------------------------------------------------------------
# comparison and report


def _argmax(values) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))


def compare(ours: dict, theirs: dict) -> dict:
    """Item-by-item comparison of one benchmark."""
    items, samples = ours["items"], theirs["samples"]
    assert [s["doc_id"] for s in samples] == list(range(len(items))), "lm-eval samples do not cover the items"
    req_diff, acc_diff, norm_diff, pred_diff, pred_norm_diff, max_ll = [], [], [], [], [], 0.0
    margin = margin_norm = float("inf")  # smallest gap between the best and the runner-up choice (lm-eval's)
    for i, (item, s) in enumerate(zip(items, samples)):
        if [tuple(a) for a in s["arguments"]] != item.requests():
            req_diff.append(i)
        ll_a, ll_b = ours["lls"][i], s["lls"]
        max_ll = max(max_ll, max(abs(a - b) for a, b in zip(ll_a, ll_b)))
        lengths = item.norm_lengths()
        normed_b = sorted((v / n for v, n in zip(ll_b, lengths)), reverse=True)
        margin = min(margin, sorted(ll_b, reverse=True)[0] - sorted(ll_b, reverse=True)[1])
        margin_norm = min(margin_norm, normed_b[0] - normed_b[1])
        if _argmax(ll_a) != _argmax(ll_b):
            pred_diff.append(i)
        if _argmax([v / n for v, n in zip(ll_a, lengths)]) != _argmax([v / n for v, n in zip(ll_b, lengths)]):
            pred_norm_diff.append(i)
        if ours["correct"][i] != int(s["acc"]):
            acc_diff.append(i)
        if ours["correct_norm"][i] != int(s["acc_norm"]):
            norm_diff.append(i)
    return {
        "requests_differ": req_diff,
        "acc_differs": acc_diff,
        "acc_norm_differs": norm_diff,
        "prediction_differs": pred_diff,
        "prediction_norm_differs": pred_norm_diff,
        "max_abs_ll_diff": max_ll,
        "min_decision_margin": margin,
        "min_decision_margin_norm": margin_norm,
        "identical": not (req_diff or acc_diff or norm_diff or pred_diff or pred_norm_diff),
    }


def report(runs: dict, arr_meta: dict, lme_meta: dict, cli: dict | None, args, model_dir: str) -> dict:
    """Print the table and the details; return the summary written to ``summary.json``."""
    rows = [
        "| benchmark | items | arrtune items/s | lm-eval items/s | speed-up | arrtune acc / acc_norm "
        "| lm-eval acc / acc_norm | identical |",
        "|" + "---|" * 8,
    ]
    details, summary = [], {}
    for bench, (arr_runs, lme_runs) in runs.items():
        ours, theirs = arr_runs[-1], lme_runs[-1]
        n = len(ours["items"])
        t_arr, t_lme = min(r["seconds"] for r in arr_runs), min(r["seconds"] for r in lme_runs)
        c_arr, c_lme = min(r["cpu_seconds"] for r in arr_runs), min(r["cpu_seconds"] for r in lme_runs)
        acc_a, norm_a = sum(ours["correct"]) / n, sum(ours["correct_norm"]) / n
        cmp = compare(ours, theirs)
        stable = all(r["correct"] == ours["correct"] for r in arr_runs) and all(
            [s["acc"] for s in r["samples"]] == [s["acc"] for s in theirs["samples"]] for r in lme_runs
        )
        if cmp["identical"]:
            same = "yes, every item"
        else:
            same = f"NO: acc on {len(cmp['acc_differs'])}, acc_norm on {len(cmp['acc_norm_differs'])} items"
        rows.append(
            f"| {bench} | {n} | {n / t_arr:.2f} | {n / t_lme:.2f} | {t_lme / t_arr:.2f}x | "
            f"{acc_a:.3f} / {norm_a:.3f} | {theirs['acc']:.3f} / {theirs['acc_norm']:.3f} | {same} |"
        )
        e2e = n / min(r["total_seconds"] for r in lme_runs)

        def fmt(side_runs: list[dict]) -> str:
            return ", ".join(f"{r['seconds']:.2f}" for r in side_runs)

        details.append(
            f"{bench}: (context, continuation) requests identical on {n - len(cmp['requests_differ'])}/{n} "
            f"items; max |log-lik arrtune - lm-eval| = {cmp['max_abs_ll_diff']:.1e} (smallest gap best - "
            f"runner-up: {cmp['min_decision_margin']:.1e}, normalised {cmp['min_decision_margin_norm']:.1e}); "
            f"scoring wall s arrtune [{fmt(arr_runs)}], "
            f"lm-eval [{fmt(lme_runs)}]; "
            f"CPU-time speed-up {c_lme / c_arr:.2f}x; lm-eval whole simple_evaluate {e2e:.2f} items/s"
            + ("" if stable else "; WARNING: accuracies changed between repeats")
        )
        if cli is not None:
            c = cli["tasks"][bench]
            cli_same = c["acc"] == [s["acc"] for s in theirs["samples"]] and c["acc_norm"] == [
                s["acc_norm"] for s in theirs["samples"]
            ]
            details.append(f"{bench}: lm_eval CLI per-sample acc/acc_norm equal to the worker's: {cli_same}")
        summary[bench] = {
            "items": n,
            "arrtune_items_per_s": n / t_arr,
            "lmeval_items_per_s": n / t_lme,
            "speedup": t_lme / t_arr,
            "cpu_time_speedup": c_lme / c_arr,
            "arrtune_seconds": [r["seconds"] for r in arr_runs],
            "lmeval_seconds": [r["seconds"] for r in lme_runs],
            "arrtune_acc": acc_a,
            "arrtune_acc_norm": norm_a,
            "lmeval_acc": theirs["acc"],
            "lmeval_acc_norm": theirs["acc_norm"],
            "lmeval_simple_evaluate_items_per_s": e2e,
            **cmp,
        }
    print()
    print("\n".join(rows))
    print()
    for line in details:
        print("  " + line)
    print(
        f"  model {model_dir} (float32, CPU), batch size {args.batch_size}, seed {args.seed}, "
        f"{args.repeats} interleaved repeat(s), fastest counts; threads: arrtune {arr_meta['threads']}, "
        f"lm-eval {lme_meta['threads']}; model load s (not timed): arrtune {arr_meta['load_seconds']:.1f}, "
        f"lm-eval {lme_meta['load_seconds']:.1f}"
    )
    print(f"  attention: arrtune {arr_meta['attn_implementation']}; lm-eval HFLM {lme_meta['hflm']}")
    print(f"  versions: arrtune side {arr_meta['versions']}; lm-eval side {lme_meta['versions']}")
    for pkg in ("torch", "transformers", "tokenizers"):
        if arr_meta["versions"][pkg] != lme_meta["versions"][pkg]:
            print(f"  WARNING: {pkg} differs between the two environments")
    if cli is not None:
        print(f"  lm_eval CLI wall time (start-up + load + all tasks): {cli['wall_seconds']:.1f} s")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", nargs="+", default=["arc_easy", "piqa"])
    parser.add_argument("--n", type=int, default=100, help="items per benchmark (fixed-seed subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="arrtune model spec")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved runs per side; the fastest counts"
    )
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="lm-eval's venv (created if missing)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--cli-check", action="store_true", help="also run the lm_eval CLI and compare")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return lmeval_worker(args.worker)
    if not args.threads:
        print("[eval_speed] note: OMP_NUM_THREADS is not set; both sides use torch's default thread count")

    from arrtune.models import resolve_model_path

    python = ensure_lmeval_venv(args.venv)
    model_dir = resolve_model_path(args.model)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    files = export_items(args.benchmarks, args.n, args.seed, workdir / "data")
    tasks = write_task_yamls(files, workdir / "tasks")
    spec = {
        "model": model_dir,
        "task_dir": str(workdir / "tasks"),
        "tasks": tasks,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "meta": str(workdir / "lmeval_meta.json"),
    }
    print("[eval_speed] loading the model on both sides ...", flush=True)
    lme = LMEvalSide(python, spec, workdir)
    arr = ArrtuneSide(model_dir, files, args)
    runs: dict[str, tuple[list[dict], list[dict]]] = {bench: ([], []) for bench in files}
    try:
        # the two sides alternate which goes first, so that a neighbour's load hits both alike
        step = 0
        for rep in range(args.repeats):
            for bench in files:
                order = ("lm-eval", "arrtune") if step % 2 == 0 else ("arrtune", "lm-eval")
                for side in order:
                    print(f"[eval_speed] repeat {rep + 1}/{args.repeats}: {bench}, {side} ...", flush=True)
                    if side == "arrtune":
                        runs[bench][0].append(arr.run(bench))
                    else:
                        runs[bench][1].append(lme.run(bench))
                step += 1
    finally:
        lme.close()
    cli = run_lmeval_cli(python, model_dir, tasks, args, workdir) if args.cli_check else None
    summary = report(runs, arr.meta, lme.meta, cli, args, model_dir)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"  per-item comparison: {workdir / 'summary.json'}; lm-eval per-sample: {workdir}/lmeval_<bench>.json"
    )


if __name__ == "__main__":
    main()
