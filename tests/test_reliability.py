"""Reliability of ``arrtune train``: resume after a real SIGKILL, checkpoint integrity, one-line errors for bad
input that leave run directories untouched, NaN/inf stops, fuzzed loaders, and safe (non-pickle) loading."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from arrtune.cli import main
from arrtune.config import TrainConfig
from arrtune.config_files import load_config
from arrtune.data.replay import ReplayStream
from arrtune.data.sft import load_sft_examples
from arrtune.errors import ArrtuneError
from arrtune.models import load_model
from arrtune.recipe import train
from arrtune.rundir import CHECKPOINT_FILES, last_complete_checkpoint
from arrtune.testing import copy_run

SRC = Path(__file__).resolve().parents[1] / "src" / "arrtune"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
TERMS = ("loss", "sft_loss", "replay_loss", "kl", "grad_norm", "lr")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Runs in this process on one thread, like the subprocess runs they are compared with (``ENV``): the
    thread count changes the order of float sums, which alone moves a gradient norm by ~1e-6."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- helpers -------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-example SFT file (3 steps per epoch at batch 4) and a 6-document replay corpus."""
    root = tmp_path_factory.mktemp("inputs")
    write_jsonl(root / "sft.jsonl", [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."}
                                     for i in range(10)])  # fmt: skip
    (root / "replay.txt").write_text(
        "\n\n".join(f"Replay document {i} talks about the weather and the sea." for i in range(6))
    )
    return root


def train_args(model_dir: Path, inputs: Path, out: Path, **extra: object) -> list[str]:
    """Overrides of a short ARR run that crosses SFT and replay epochs, with dropout and a decaying LR."""
    values: dict[str, object] = {
        "model": model_dir, "data": inputs / "sft.jsonl", "replay": inputs / "replay.txt", "output_dir": out,
        "method": "arr", "max_steps": 22, "save_steps": 4, "save_total_limit": 10, "warmup_steps": 2,
        "lr_scheduler_type": "linear", "learning_rate": 0.01, "per_device_train_batch_size": 4,
        "lora_dropout": 0.1, "seed": 3, "precision": "fp32", "disable_tqdm": True,
    }  # fmt: skip
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def adapter_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def step_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "sft_loss" in r]


def assert_same_steps(a: Path, b: Path, n_steps: int) -> None:
    ra, rb = step_records(a), step_records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, n_steps + 1))  # each step once
    for x, y in zip(ra, rb):
        for key in TERMS:
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in root.rglob("*")
        if p.is_file()
    }


def error_line(stderr: str) -> str:
    """The single ``arrtune: error:`` line of a failed command (and no traceback)."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("arrtune: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference run (22 steps, a checkpoint every 4 and at the end, mid-epoch)."""
    out = tmp_path_factory.mktemp("full") / "run"
    return train(load_config(None, train_args(tiny_model_dir, inputs, out)))


# -- resume --------------------------------------------------------------------------------------------
def test_checkpoints_are_complete_safetensors_and_staging_is_empty(full_run: Path) -> None:
    ckpts = sorted((full_run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in ckpts] == [f"checkpoint-{s}" for s in (4, 8, 12, 16, 20, 22)]
    for ckpt in ckpts:
        assert all((ckpt / name).is_file() for name in CHECKPOINT_FILES)
        assert (ckpt / "rng_state.pth").is_file() and (ckpt / "replay_state_rank0.json").is_file()
        # weights only as safetensors (the .pt files are optimizer/scheduler/RNG state, read with weights_only)
        assert not list(ckpt.glob("*model*.bin")) and not list(ckpt.glob("*.pkl"))
    assert not list((full_run / "checkpoints" / ".staging").iterdir())
    assert sorted(p.name for p in (full_run / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"
    ]  # fmt: skip
    assert last_complete_checkpoint(full_run / "checkpoints", True) == str(ckpts[-1])


def test_resume_skips_incomplete_checkpoints_and_matches_the_uninterrupted_run(
    full_run: Path, tiny_model_dir: Path, inputs: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    res = copy_run(full_run, tmp_path / "res")
    shutil.rmtree(res / "adapter")
    (res / "train_summary.json").unlink()
    ck = res / "checkpoints"
    for step in (12, 16, 20, 22):
        shutil.rmtree(ck / f"checkpoint-{step}")
    # a newer checkpoint without its optimizer state (a damaged copy) must be skipped, not resumed from
    shutil.copytree(ck / "checkpoint-8", ck / "checkpoint-12")
    (ck / "checkpoint-12" / "optimizer.pt").unlink()
    # a half-written staging directory and a metrics line cut short, as a SIGKILL leaves them
    (ck / ".staging" / "checkpoint-16").mkdir(parents=True)
    (ck / ".staging" / "checkpoint-16" / "adapter_model.safetensors").write_bytes(b"\x00partial")
    with (res / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "loss": 1')

    loads: list[object] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with caplog.at_level(logging.INFO, logger="arrtune"):
        train(load_config(None, train_args(tiny_model_dir, inputs, res)))
    assert re.search(r"ignoring incomplete checkpoint \S*checkpoint-12 \(missing optimizer.pt\)", caplog.text)
    assert json.loads((res / "train_summary.json").read_text())["resumed_from"] == str(ck / "checkpoint-8")
    assert loads and all(w is True for w in loads)  # optimizer, scheduler and RNG states: weights_only=True
    assert adapter_diff(full_run / "adapter", res / "adapter") <= 1e-6
    assert_same_steps(full_run, res, 22)
    assert (ck / "checkpoint-12" / "optimizer.pt").is_file()  # the damaged one was replaced by a real one
    assert not list((ck / ".staging").iterdir())


def test_sigkill_mid_run_then_the_same_command_resumes_to_the_same_adapter(
    full_run: Path, tiny_model_dir: Path, inputs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "arrtune", "train", *train_args(tiny_model_dir, inputs, out)]
    with (tmp_path / "first.log").open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "checkpoint-8").is_dir():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "adapter").exists() and not (out / "train_summary.json").exists()
    last = last_complete_checkpoint(out / "checkpoints", True)
    assert last is not None and int(last.rsplit("-", 1)[1]) < 22

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {last}" in again.stderr
    assert adapter_diff(full_run / "adapter", out / "adapter") <= 1e-6
    assert_same_steps(full_run, out, 22)


def test_killed_after_the_last_checkpoint_writes_the_adapter_without_training_more(
    full_run: Path, tiny_model_dir: Path, inputs: Path, tmp_path: Path
) -> None:
    res = copy_run(full_run, tmp_path / "res")
    shutil.rmtree(res / "adapter")  # killed between the final checkpoint (step 22) and the adapter
    (res / "train_summary.json").unlink()
    train(load_config(None, train_args(tiny_model_dir, inputs, res)))
    assert adapter_diff(full_run / "adapter", res / "adapter") == 0.0
    assert_same_steps(full_run, res, 22)  # step 22 sits mid-epoch: no 23rd step was run
    assert json.loads((res / "train_summary.json").read_text())["steps"] == 22


def test_same_config_finished_is_a_no_op_and_another_config_is_refused(
    full_run: Path, tiny_model_dir: Path, inputs: Path, tmp_path: Path, caplog
) -> None:
    run = copy_run(full_run, tmp_path / "done")
    before = snapshot(run)
    with caplog.at_level(logging.INFO, logger="arrtune"):
        train(load_config(None, train_args(tiny_model_dir, inputs, run, disable_tqdm=False)))  # cosmetic key
    assert "already complete" in caplog.text
    assert snapshot(run) == before
    with pytest.raises(
        ArrtuneError, match=r"holds another run \(config differs in: learning_rate\).*--overwrite"
    ):
        train(load_config(None, train_args(tiny_model_dir, inputs, run, learning_rate=0.02)))
    assert snapshot(run) == before
    # --overwrite: a fresh run; the old checkpoints and metrics are gone
    train(
        load_config(None, train_args(tiny_model_dir, inputs, run, max_steps=2, save_steps=0)), overwrite=True
    )
    assert [r["step"] for r in step_records(run)] == [1, 2]
    assert not (run / "checkpoints" / "checkpoint-4").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 2


# -- non-finite loss ------------------------------------------------------------------------------------
def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(
    tiny_model_dir: Path, inputs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nan"
    # learning_rate=1e30: step 1 is finite, the update makes the weights overflow and step 2's loss NaN
    args = train_args(tiny_model_dir, inputs, out, learning_rate=1e30, warmup_steps=0, save_steps=1,
                      lr_scheduler_type="constant", method="sft", max_steps=6)  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "arrtune", "train", *args], capture_output=True, text=True,
                          timeout=300, env=ENV)  # fmt: skip
    assert done.returncode == 2
    line = error_line(done.stderr)
    assert "non-finite loss (NaN or inf) at step 2" in line
    assert f"the last good checkpoint is kept: {out / 'checkpoints' / 'checkpoint-1'}" in line
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1"]
    weights = load_file(out / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (out / "adapter").exists() and not (out / "train_summary.json").exists()
    records = step_records(out)
    assert math.isfinite(records[0]["sft_loss"]) and math.isnan(records[1]["sft_loss"]) and len(records) == 2


# -- bad input: one error line, nothing written -----------------------------------------------------------
def test_cli_bad_data_with_overwrite_leaves_the_earlier_run_untouched(
    full_run: Path, tiny_model_dir: Path, inputs: Path, tmp_path: Path
) -> None:
    run = copy_run(full_run, tmp_path / "earlier")
    before = snapshot(run)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    args = train_args(tiny_model_dir, inputs, run, data=bad, learning_rate=0.05)
    done = subprocess.run([sys.executable, "-m", "arrtune", "train", "--overwrite", *args], capture_output=True,
                          text=True, timeout=300, env=ENV)  # fmt: skip
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.strip()] == [error_line(done.stderr)]
    assert f"{bad}:2: invalid JSON" in done.stderr
    assert snapshot(run) == before


def _bad_cases(tmp: Path, model: Path, inputs: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (overrides, fragment of the error line); files are created under ``tmp``."""
    good = inputs / "sft.jsonl"
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.jsonl").write_text("\n  \n\n")
    (tmp / "malformed.jsonl").write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n'
    )
    write_jsonl(tmp / "missing_field.jsonl", [{"prompt": "a"}])
    write_jsonl(
        tmp / "mistyped.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "b"}]
    )
    write_jsonl(tmp / "bad_messages.jsonl", [{"messages": [{"role": "user"}]}])
    write_jsonl(tmp / "no_assistant.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    write_jsonl(tmp / "unknown_format.jsonl", [{"question": "a", "answer": "b"}])
    (tmp / "latin1.jsonl").write_bytes(
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n'
    )
    write_jsonl(tmp / "surrogate.jsonl", [{"prompt": "a\ud800", "completion": "b"}])
    write_jsonl(tmp / "too_long.jsonl", [{"prompt": "x " * 200, "completion": "y"}] * 2)
    write_jsonl(
        tmp / "empty_response.jsonl", [{"prompt": "a", "completion": " "}, {"instruction": "a", "output": ""}]
    )
    (tmp / "empty_replay.txt").write_text("\n\n \n")
    (tmp / "bad_replay.jsonl").write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    (tmp / "notes").mkdir()
    (tmp / "notes" / "x.txt").write_text("not a run")
    (tmp / "a_file").write_text("x")
    (tmp / "cfg.yaml").write_text("learning_rat: 0.01\n")
    corrupt = tmp / "corrupt_model"
    shutil.copytree(model, corrupt)
    (corrupt / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:500])
    (tmp / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 not really")
    (tmp / "dup.yaml").write_text("max_steps: 2\nlearning_rate: 0.01\nmax_steps: 3\n")
    (tmp / "one.json").write_text('{\n  "prompt": "a",\n  "completion": "b"\n}\n')
    pickled = tmp / "pickle_model"
    shutil.copytree(model, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    d = str(tmp)
    return {
        "missing data file": ([f"data={d}/nope.jsonl"], f"{d}/nope.jsonl: data file not found"),
        "empty data file": ([f"data={d}/empty.jsonl"], "empty.jsonl: data file is empty"),
        "only blank lines": ([f"data={d}/blank.jsonl"], "blank.jsonl: no examples"),
        "malformed JSON line": ([f"data={d}/malformed.jsonl"], "malformed.jsonl:2: invalid JSON"),
        "missing field": ([f"data={d}/missing_field.jsonl"], "missing_field.jsonl:1: field 'completion' must be a string (missing)"),
        "mistyped field": ([f"data={d}/mistyped.jsonl"], "mistyped.jsonl:2: field 'prompt' must be a string (int)"),
        "bad messages": ([f"data={d}/bad_messages.jsonl"], "bad_messages.jsonl:1: messages[0] needs string fields"),
        "no assistant turn": ([f"data={d}/no_assistant.jsonl"], "no_assistant.jsonl:1: 'messages' has no assistant turn"),
        "unknown format": ([f"data={d}/unknown_format.jsonl"], "unknown_format.jsonl:1: unknown format"),
        "non-UTF-8 bytes": ([f"data={d}/latin1.jsonl"], "latin1.jsonl:2: not valid UTF-8"),
        "unencodable text": ([f"data={d}/surrogate.jsonl"], "surrogate.jsonl:1: cannot apply the chat template"),
        "all too long": ([f"data={d}/too_long.jsonl", "max_length=64"], "every example was filtered out (2 longer than max_length=64"),
        "all empty responses": ([f"data={d}/empty_response.jsonl"], "every example was filtered out (0 longer than max_length=256, 2 with an empty response)"),
        "empty replay corpus": ([f"data={good}", f"replay={d}/empty_replay.txt", "method=arr"], "replay: corpus"),
        "missing replay file": ([f"data={good}", f"replay={d}/nope.txt", "method=replay"], "replay: file not found"),
        "replay field": ([f"data={good}", f"replay={d}/bad_replay.jsonl", "method=arr"], "bad_replay.jsonl:2: field 'text' must be a string"),
        "unknown model spec": ([f"data={good}", "model=no-such-model"], "model: unknown spec 'no-such-model'"),
        "not a model directory": ([f"data={good}", f"model={d}/notes"], "is a directory without config.json"),
        "corrupt safetensors": ([f"data={good}", f"model={corrupt}"], "model: cannot load"),
        "corrupt gguf": ([f"data={good}", f"model={d}/broken.gguf"], "broken.gguf: cannot read this GGUF file"),
        "pickle weights refused": ([f"data={good}", f"model={pickled}"], "model: cannot load"),
        "unknown key": (["kl_cof=0.1"], "unknown config key 'kl_cof' (did you mean 'kl_coef'?)"),
        "unknown key in file": ([f"--config={d}/cfg.yaml"], "cfg.yaml: unknown config key 'learning_rat' (did you mean 'learning_rate'?)"),
        "negative kl_coef": (["kl_coef=-0.1"], "config: kl_coef=-0.1 must be >= 0"),
        "negative replay_ratio": (["replay_ratio=-1"], "config: replay_ratio=-1.0 must be >= 0"),
        "zero learning rate": (["learning_rate=0"], "config: learning_rate=0.0 must be > 0"),
        "negative learning rate": (["learning_rate=-1e-3"], "config: learning_rate=-0.001 must be > 0"),
        "nan learning rate": (["learning_rate=.nan"], "config: learning_rate=nan must be"),
        "zero rank": (["lora_r=0"], "config: lora_r=0 must be > 0"),
        "negative rank": (["lora_r=-4"], "config: lora_r=-4 must be > 0"),
        "mistyped rank": (["lora_r=sixteen"], "override: lora_r='sixteen' has the wrong type"),
        "unknown scheduler": (["lr_scheduler_type=cosine_annealing"], "config: lr_scheduler_type='cosine_annealing' is not one of"),
        "unknown target module": ([f"data={good}", "target_modules=[not_a_module]"], "config: target_modules=['not_a_module']"),
        "not a run directory": ([f"output_dir={d}/notes"], "exists and is not an arrtune run directory"),
        "output_dir is a file": ([f"output_dir={d}/a_file"], "output_dir exists and is not a directory"),
        # every field validated (class 1 of the reliability round two)
        "negative seed": (["seed=-1"], "config: seed=-1 must be in [0, 2**32)"),
        "negative weight_decay": (["weight_decay=-0.1"], "config: weight_decay=-0.1 must be >= 0"),
        "negative max_grad_norm": (["max_grad_norm=-1"], "config: max_grad_norm=-1.0 must be >= 0"),
        "zero save_total_limit": (["save_total_limit=0"], "config: save_total_limit=0 must be >= 1"),
        "empty target_modules": (["target_modules=[]"], "config: target_modules=[] must be"),
        "replay_mix above 1": (["replay_mix=2"], "config: replay_mix=2.0 must be in [0, 1]"),
        "duplicate key in file": ([f"--config={d}/dup.yaml"], "dup.yaml:3: duplicate key 'max_steps' (first at line 1)"),
        # the environment (class 2)
        "output_dir under a file": ([f"output_dir={d}/a_file/run"], f"{d}/a_file is a file, not a directory"),
        # messages that say what is true (class 7)
        "data is a directory": ([f"data={d}/notes"], "data is a directory, not a file"),
        "data holds one JSON object": ([f"data={d}/one.json"], "one.json: holds one JSON object"),
        "replay is a directory": ([f"data={good}", f"replay={d}/notes", "method=replay"], "is a directory, not a file"),
        "config is a directory": ([f"--config={d}/notes"], "config file expected, this is a directory"),
        "self-replay prompts missing": ([f"data={good}", "method=arr", "replay=self", f"replay_prompts={d}/nope.txt"], "replay_prompts: file not found"),
    }  # fmt: skip


CASE_NAMES = [
    "missing data file", "empty data file", "only blank lines", "malformed JSON line", "missing field",
    "mistyped field", "bad messages", "no assistant turn", "unknown format", "non-UTF-8 bytes", "unencodable text",
    "all too long", "all empty responses", "empty replay corpus", "missing replay file", "replay field",
    "unknown model spec", "not a model directory", "corrupt safetensors", "corrupt gguf", "pickle weights refused",
    "unknown key", "unknown key in file", "negative kl_coef", "negative replay_ratio", "zero learning rate",
    "negative learning rate", "nan learning rate", "zero rank", "negative rank", "mistyped rank",
    "unknown scheduler", "unknown target module", "not a run directory", "output_dir is a file",
    "negative seed", "negative weight_decay", "negative max_grad_norm", "zero save_total_limit",
    "empty target_modules", "replay_mix above 1", "duplicate key in file", "output_dir under a file",
    "data is a directory", "data holds one JSON object", "replay is a directory",
    "config is a directory", "self-replay prompts missing",
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_cases(tiny_model_dir: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory):
    return _bad_cases(tmp_path_factory.mktemp("bad"), tiny_model_dir, inputs)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_error_line_and_writes_nothing(
    name: str, bad_cases, tiny_model_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("ARRTUNE_CACHE", str(tmp_path / "cache"))  # a GGUF conversion would land here
    overrides, fragment = bad_cases[name]
    out = tmp_path / "run"
    options = [o for o in overrides if o.startswith("--")]
    values = [o for o in overrides if not o.startswith("--")]
    base = [f"model={tiny_model_dir}", f"output_dir={out}", "method=sft", "max_steps=2", "disable_tqdm=true"]
    watched = [Path(v.split("=", 1)[1]) for v in values if v.startswith("output_dir=")]
    watched = [p for p in watched if p.exists()]
    before = {p: snapshot(p) if p.is_dir() else p.read_bytes() for p in watched}
    assert main(["train", *options, *base, *values]) == 2
    line = error_line(capsys.readouterr().err)
    assert fragment in line
    assert not out.exists()
    assert {p: snapshot(p) if p.is_dir() else p.read_bytes() for p in watched} == before
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_bad_case_names_cover_the_table(bad_cases) -> None:
    assert sorted(bad_cases) == sorted(CASE_NAMES)


def test_debug_shows_the_traceback_before_or_after_the_subcommand(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    args = [f"model={tiny_model_dir}", f"data={tmp_path}/nope.jsonl", f"output_dir={tmp_path}/run"]
    for argv in (["--debug", "train", *args], ["train", "--debug", *args]):
        with pytest.raises(ArrtuneError, match="data file not found"):
            main(argv)


def test_remote_code_is_not_run_unless_the_config_allows_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, model)
    sentinel = tmp_path / "remote_code_ran"
    (model / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    assert TrainConfig().trust_remote_code is False
    loaded = load_model(str(model))  # the config's auto_map is ignored: the built-in Llama class is used
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not sentinel.exists()


def test_source_reads_weights_safely() -> None:
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "import pickle" not in text and "trust_remote_code=True" not in text, path
    models = (SRC / "models.py").read_text()
    assert "use_safetensors=True" in models and "safe_serialization=True" in models
    assert "safe_serialization=True" in (SRC / "rundir.py").read_text()


def test_long_and_empty_examples_are_dropped_and_counted_in_the_log(
    tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    rows = [{"prompt": f"Say {i}", "completion": f"{i}"} for i in range(4)]
    rows += [{"prompt": "x " * 100, "completion": "y"}, {"prompt": "q", "completion": ""}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_config(None, [f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path / 'run'}",
                             "method=sft", "max_steps=1", "max_length=64", "disable_tqdm=true"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="arrtune"):
        run = train(cfg)
    assert "dropped 2 of 6 examples (1 longer than max_length=64, 1 with an empty response)" in caplog.text
    assert "d.jsonl:5" in caplog.text
    summary = json.loads((run / "train_summary.json").read_text())
    assert (summary["examples"], summary["dropped_too_long"], summary["dropped_empty_response"]) == (4, 1, 1)


# -- fuzzing the loaders ----------------------------------------------------------------------------------
KEYS = ["messages", "prompt", "completion", "instruction", "input", "output", "role", "content", "text"]
ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(ANY_CHAR, max_size=12)
JSON = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), kids, max_size=4),
    max_leaves=10,
)  # fmt: skip
ROLES = st.sampled_from(["user", "assistant", "system", "tool", ""]) | st.text(max_size=4)
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": st.text(ANY_CHAR, max_size=20)})
ANSWER = st.fixed_dictionaries({"role": st.just("assistant"), "content": st.text(ANY_CHAR, max_size=20)})
SHAPED = (  # rows in (or close to) the supported formats, so that the tokenizing paths are fuzzed too
    st.fixed_dictionaries({"messages": st.tuples(st.lists(MESSAGE, max_size=3), ANSWER).map(lambda t: [*t[0], t[1]])})
    | st.fixed_dictionaries({"prompt": st.text(ANY_CHAR, max_size=20), "completion": st.text(ANY_CHAR, max_size=20)})
    | st.fixed_dictionaries({"instruction": SCALARS, "output": SCALARS}, optional={"input": SCALARS})
    | st.fixed_dictionaries({"text": SCALARS})
)  # fmt: skip
ROW = SHAPED | JSON


def _jsonl(rows: list, ascii_only: bool) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows).encode(
        "utf-8", "surrogatepass"
    )


FILES = st.one_of(
    st.binary(max_size=300),
    st.text(ANY_CHAR, max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(_jsonl, st.lists(ROW, max_size=4), st.booleans()),
    st.builds(_jsonl, st.lists(SHAPED, min_size=1, max_size=4), st.booleans()),
    st.builds(lambda rows: json.dumps(rows).encode(), st.lists(ROW, max_size=4)),
)
FUZZ = settings(max_examples=80, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


def _outcome(load) -> None:
    try:
        load()
    except ArrtuneError as exc:
        assert str(exc)


@FUZZ
@given(blob=FILES, suffix=st.sampled_from([".jsonl", ".json", ".txt"]))
def test_fuzzed_files_give_data_or_an_arrtune_error(
    blob: bytes, suffix: str, tiny_tokenizer, tmp_path
) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(blob)
    _outcome(lambda: load_sft_examples(str(path), tiny_tokenizer, max_length=64))
    _outcome(lambda: ReplayStream(str(path), tiny_tokenizer).take(64))


@FUZZ
@given(blob=FILES | st.dictionaries(st.sampled_from([f.name for f in TrainConfig.__dataclass_fields__.values()])
                                    | st.text(max_size=6), JSON, max_size=4).map(
    lambda d: yaml.safe_dump(d, allow_unicode=True).encode("utf-8", "surrogatepass")))  # fmt: skip
def test_fuzzed_config_files_give_a_config_or_an_arrtune_error(blob: bytes, tmp_path) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(blob)
    _outcome(lambda: load_config(path))


# -- round two: one section per class of fault -----------------------------------------------------------
# 1. every value validated before anything is touched


FIELD_VALUES = st.one_of(
    # values of the kinds transformers checks late (strategies, trackers, optimizers, schedulers, ...)
    st.sampled_from(["steps", "epoch", "best", "notatracker", "all", "wandb", "adamw_torch", "sgd", "no", "auto"]),
    st.integers(min_value=-(2**40), max_value=2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.booleans(), st.none(), st.lists(st.text(max_size=5), max_size=3),
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from([f.name for f in TrainConfig.__dataclass_fields__.values()]), value=FIELD_VALUES)
def test_any_value_of_any_field_is_a_config_or_one_error_before_anything_is_read(
    field, value, tmp_path
) -> None:
    """Every field with arbitrary values: validation and the TrainingArguments built from the config either
    pass or raise ArrtuneError (which the CLI prints as one line); nothing else escapes."""
    from arrtune.recipe import check_inputs, training_arguments

    item = f"{field}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
    try:
        cfg = load_config(None, [item, f"output_dir={tmp_path / 'r'}"])
        training_arguments(cfg, tmp_path / "r")
        check_inputs(cfg)  # transformers' own Trainer checks, and the task_eval file
    except ArrtuneError:
        pass
    assert not (tmp_path / "r").exists()


def test_overwrite_with_a_bad_value_keeps_the_earlier_run(full_run: Path, tiny_model_dir: Path, inputs: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    run = copy_run(full_run, tmp_path / "earlier")
    before = snapshot(run)
    for bad in ("seed=-1", "weight_decay=-0.5"):
        args = train_args(tiny_model_dir, inputs, run, **dict([bad.split("=")]))
        done = subprocess.run([sys.executable, "-m", "arrtune", "train", "--overwrite", *args], capture_output=True,
                              text=True, timeout=300, env=ENV)  # fmt: skip
        assert done.returncode == 2 and bad.split("=")[0] in error_line(done.stderr)
        assert [line for line in done.stderr.splitlines() if line.strip()] == [error_line(done.stderr)]
    assert snapshot(run) == before


def test_yaml_with_a_byte_order_mark_and_duplicate_keys_in_nested_grid_mappings(tmp_path: Path) -> None:
    from arrtune.config_files import read_yaml_mapping

    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfmax_steps: 3\n")
    assert load_config(tmp_path / "bom.yaml").max_steps == 3
    (tmp_path / "grid.yaml").write_text("base:\n  seed: 1\n  lora_r: 4\n  seed: 2\nruns: []\n")
    with pytest.raises(ArrtuneError, match=r"grid.yaml:4: duplicate key 'seed' \(first at line 2\)"):
        read_yaml_mapping(tmp_path / "grid.yaml", "grid", "a mapping")


# 2. the environment: read-only or impossible locations get one line before the model is loaded


@contextlib.contextmanager
def tmpfs(mount: Path, options: str):
    """A tmpfs mounted at ``mount`` for the block (the test is skipped where mounting is not allowed)."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A read-only file system (a tmpfs mounted ro): as root, chmod would not stop writes."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        yield mount


def test_read_only_output_and_cache_are_one_line_before_loading(read_only_dir: Path, tiny_model_dir: Path,
                                                                 inputs: Path, tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:  # fmt: skip
    monkeypatch.setenv("ARRTUNE_CACHE", str(tmp_path / "cache"))
    base = [f"model={tiny_model_dir}", f"data={inputs / 'sft.jsonl'}", "method=sft", "max_steps=1"]
    assert main(["train", *base, f"output_dir={read_only_dir / 'run'}"]) == 2
    assert "read-only file system" in error_line(capsys.readouterr().err)
    monkeypatch.setenv("ARRTUNE_CACHE", str(read_only_dir / "cache"))
    assert main(["train", *base, f"output_dir={tmp_path / 'run'}"]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{read_only_dir / 'cache'}: cannot write there" in line and not (tmp_path / "run").exists()


def test_no_home_directory_still_trains_or_says_what_to_set(tiny_model_dir: Path, inputs: Path,
                                                            tmp_path: Path) -> None:  # fmt: skip
    env = {k: v for k, v in ENV.items() if k not in ("HOME", "ARRTUNE_CACHE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    cmd = [sys.executable, "-m", "arrtune", "train", f"model={tiny_model_dir}", f"data={inputs / 'sft.jsonl'}",
           "method=sft", "max_steps=1", f"output_dir={tmp_path / 'run'}", "disable_tqdm=true"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert "Traceback" not in done.stderr
    assert done.returncode == 0 or "set ARRTUNE_CACHE" in error_line(done.stderr)


# 3. a checkpoint is complete only if it matches its manifest


def test_corrupt_newest_checkpoint_falls_back_and_cuts_nothing_first(full_run: Path, tiny_model_dir: Path,
                                                                     inputs: Path, tmp_path: Path,
                                                                     caplog) -> None:  # fmt: skip
    res = copy_run(full_run, tmp_path / "res")
    shutil.rmtree(res / "adapter")
    (res / "train_summary.json").unlink()
    ck = res / "checkpoints"
    for step in (16, 20, 22):
        shutil.rmtree(ck / f"checkpoint-{step}")
    optimizer = ck / "checkpoint-12" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # truncated
    adapter = ck / "checkpoint-8" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    adapter.write_bytes(bytes(data))
    assert last_complete_checkpoint(ck, True) == str(ck / "checkpoint-4")
    assert "optimizer.pt has 100 bytes" in caplog.text and "adapter_model.safetensors differs" in caplog.text

    metrics_before = (res / "metrics.jsonl").read_text()
    assert json.loads(metrics_before.splitlines()[-1])["step"] > 4
    with caplog.at_level(logging.INFO, logger="arrtune"):
        train(load_config(None, train_args(tiny_model_dir, inputs, res)))
    assert f"resuming from {ck / 'checkpoint-4'}" in caplog.text
    assert adapter_diff(full_run / "adapter", res / "adapter") <= 1e-6
    assert_same_steps(full_run, res, 22)
    assert all((ck / f"checkpoint-{s}" / "manifest.json").is_file() for s in (12, 16, 20, 22))


# 4. one process per output directory (and per grid, and per GGUF conversion)


def test_second_train_on_the_same_output_dir_is_refused_naming_the_first(tiny_model_dir: Path, inputs: Path,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, inputs, out, max_steps=100000, save_steps=0, method="sft")
    cmd = [sys.executable, "-m", "arrtune", "train", *args]
    with (tmp_path / "first.log").open("w") as log_file:
        first = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=ENV)
        try:
            deadline = time.monotonic() + 240
            while not (out / "metrics.jsonl").is_file():
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
            assert second.returncode == 2
            assert f"is in use by pid {first.pid}" in error_line(second.stderr)
            assert first.poll() is None  # the first run is untouched
        finally:
            first.kill()
            first.wait(timeout=60)


def test_grid_lock_and_waiting_lock(tmp_path: Path) -> None:
    import threading

    from arrtune.locks import hold_lock, release_lock, waiting_lock

    lock = tmp_path / "grid" / ".arrtune.lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from arrtune.locks import hold_lock; "
                               f"hold_lock({str(lock)!r}, 'x'); print('held', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ArrtuneError, match=f"grid: this comparison is in use by pid {holder.pid}"):
            hold_lock(lock, "grid: this comparison")
    finally:
        holder.kill()
        holder.wait()
    hold_lock(lock, "grid")  # free again once its holder is gone
    release_lock(lock)

    order: list[str] = []
    entered = threading.Event()

    def first() -> None:
        with waiting_lock(tmp_path / "conv.lock"):
            entered.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    entered.wait(10)
    with waiting_lock(tmp_path / "conv.lock"):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


# 5. eval checks everything first and follows the adapter


def test_eval_refuses_bad_names_before_loading_and_uses_the_adapters_base(tiny_model_dir: Path, tmp_path: Path,
                                                                          capsys) -> None:  # fmt: skip
    from arrtune.testing import build_tiny_model

    missing_model = str(tmp_path / "no-such-model")
    small = ["n_per_benchmark=2", "n_text=1", "max_text_tokens=16", "n_questions=2", "max_new_tokens=2", "n_task=2",
             "--no-progress"]  # fmt: skip
    for extra, fragment in (
        (["benchmarks=[arc_easy, no_such_bench]"], "unknown benchmark 'no_such_bench'"),
        ([f"task={tmp_path}/missing.jsonl"], "task: cannot read"),
        ([f"task={tmp_path}"], "is a directory, not a file"),
        (["--output", str(tmp_path)], "is a directory, not a file"),
    ):
        assert main(["eval", "--model", missing_model, *extra, *small]) == 2
        assert fragment in error_line(capsys.readouterr().err)  # not the missing model: checked first

    run = tmp_path / "run"
    assert main(["train", f"model={tiny_model_dir}", f"output_dir={run}", "method=sft", "max_steps=1",
                 "disable_tqdm=true"]) == 0  # fmt: skip
    assert main(["eval", "--adapter", str(run / "adapter"), "benchmarks=[arc_easy]", *small]) == 0
    assert json.loads((run / "eval.json").read_text())["mode"] == "pair"
    other = build_tiny_model(tmp_path / "other", hidden_size=48)
    capsys.readouterr()
    assert (
        main(["eval", "--model", str(other), "--adapter", str(run / "adapter"), "benchmarks=[]", *small]) == 2
    )
    assert "this adapter was trained on" in error_line(capsys.readouterr().err)


# 6. interrupts say what happens next


@pytest.mark.parametrize("save_steps", [0, 2])
def test_ctrl_c_says_whether_and_how_to_resume(save_steps: int, tiny_model_dir: Path, inputs: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, inputs, out, max_steps=100000, save_steps=save_steps, method="sft")
    # a test run started in the background (nohup, `cmd &`) ignores SIGINT, and so would the child: restore it
    proc = subprocess.Popen([sys.executable, "-m", "arrtune", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").is_file():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    if save_steps:
        assert "resume from the last checkpoint with the same command: arrtune train" in stderr
    else:
        assert "nothing can be resumed" in stderr and "save_steps=N" in stderr


# 7. messages say what is true; nothing comes before the error line


def test_error_after_model_loading_bars_is_the_only_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    # the model loads (transformers draws its loading bar), then the LoRA target is refused
    done = subprocess.run([sys.executable, "-m", "arrtune", "train", f"model={tiny_model_dir}", "method=sft",
                           "target_modules=[not_a_module]", f"output_dir={tmp_path}/r"],
                          capture_output=True, text=True, timeout=300, env=ENV)  # fmt: skip
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.strip()] == [error_line(done.stderr)]


def test_data_files_with_a_byte_order_mark_load(tiny_tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')
    examples, stats = load_sft_examples(str(path), tiny_tokenizer, 64)
    assert stats.n_kept == 1 and examples


def test_disk_full_is_one_line(
    tiny_model_dir: Path, inputs: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("ARRTUNE_CACHE", str(tmp_path / "cache"))
    with tmpfs(tmp_path / "small", "size=12k") as mount:
        code = main(["train", f"model={tiny_model_dir}", f"data={inputs / 'sft.jsonl'}", "method=sft",
                     "max_steps=1", f"output_dir={mount / 'run'}", "disable_tqdm=true"])  # fmt: skip
        assert code == 2
        assert "No space left on device" in error_line(capsys.readouterr().err)


# 3. inputs that transformers or the evaluation would refuse late: refused before anything is written


def run_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arrtune", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env or ENV)  # fmt: skip


def assert_one_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode == 2, done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [error_line(done.stderr)]
    assert fragment in done.stderr, done.stderr


def _late_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (overrides, fragment of the error line): values arrtune's own rules pass and transformers'
    Trainer or the evaluation refused only after training (or after the run directory was cleared)."""
    (tmp / "not_jsonl.jsonl").write_text("prompt: a\ncompletion: b\n")
    write_jsonl(
        tmp / "no_response.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": " "}]
    )
    return {
        "task_eval missing": ([f"task_eval={tmp / 'missing.jsonl'}"], "task_eval: cannot read"),
        "task_eval not JSON Lines": ([f"task_eval={tmp / 'not_jsonl.jsonl'}"], "not_jsonl.jsonl:1: invalid JSON"),
        "task_eval without a response": ([f"task_eval={tmp / 'no_response.jsonl'}"], "no_response.jsonl:2: empty response"),
        "unknown tracker": (["report_to=notatracker"], "notatracker is not supported"),
        "tracker not installed": (["report_to=wandb"], "WandbCallback requires wandb"),
        "evaluation without held-out data": (["eval_strategy=steps"], "eval_strategy=steps evaluates on held-out"),
    }  # fmt: skip


def test_late_refusals_come_first_and_keep_the_earlier_run(full_run: Path, tiny_model_dir: Path, inputs: Path,
                                                          tmp_path: Path, capsys) -> None:  # fmt: skip
    import importlib.util

    run = copy_run(full_run, tmp_path / "earlier")
    before = snapshot(run)
    for i, (name, (overrides, fragment)) in enumerate(_late_cases(tmp_path).items()):
        if name == "tracker not installed" and importlib.util.find_spec("wandb") is not None:
            continue
        for target in (run, tmp_path / f"new-{i}"):
            assert (
                main(["train", "--overwrite", *train_args(tiny_model_dir, inputs, target), *overrides]) == 2
            )
            err = capsys.readouterr().err
            assert [line for line in err.splitlines() if line.strip()] == [error_line(err)], name
            assert fragment in err, (name, err)
        assert snapshot(run) == before, name
        assert not (tmp_path / f"new-{i}").exists(), name  # no lock, no config.yaml left behind
    # the same through the console script, in a process of its own
    done = run_cli("train", "--overwrite", *train_args(tiny_model_dir, inputs, run), "report_to=notatracker")
    assert_one_error(done, "notatracker is not supported")
    assert snapshot(run) == before


def test_a_grid_with_no_runs_is_one_line(tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"output_dir: {tmp_path / 'out'}\nruns: []\n")
    assert_one_error(run_cli("compare", "--config", grid), "grid: no runs to train")
    assert not (tmp_path / "out").exists()


def test_a_grid_checks_every_run_before_training_any(tiny_model_dir: Path, inputs: Path,
                                                               tmp_path: Path) -> None:  # fmt: skip
    good = write_jsonl(
        tmp_path / "held_out.jsonl", [{"prompt": "What is 1 plus 1?", "completion": "It is 2."}]
    )
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "base": {"model": str(tiny_model_dir), "data": str(inputs / "sft.jsonl"), "replay": str(inputs / "replay.txt"),
                 "task_eval": str(good), "max_steps": 1, "disable_tqdm": True},
        "runs": [{"method": "sft"}, {"method": "arr", "report_to": "notatracker"}],
        "eval": {"benchmarks": [], "n_text": 0, "n_questions": 0, "n_task": 1},
    }))  # fmt: skip
    assert_one_error(
        run_cli("compare", "--config", grid),
        "run arr-report_to=notatracker: config: notatracker is not supported",
    )
    assert not (tmp_path / "out" / "runs").exists()  # the first run was not trained


def test_any_value_trainer_refuses_is_refused_before_the_run(tmp_path: Path) -> None:
    """Values of HF fields that pass TrainConfig and TrainingArguments but fail Trainer.__init__."""
    from arrtune.recipe import check_inputs

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    for items in (["report_to=notatracker"], ["report_to=[tensorboard, notatracker]"],
                  ["eval_strategy=epoch", f"data={data}"]):  # fmt: skip
        cfg = load_config(None, [*items, f"output_dir={tmp_path / 'r'}"])
        with pytest.raises(ArrtuneError, match="^config: "):
            check_inputs(cfg)
    assert not (tmp_path / "r").exists()


# 4. one line means one line, whatever libraries log


NOISY_SITECUSTOMIZE = '''
import importlib.abc, logging, sys, warnings

class _Noisy(importlib.abc.MetaPathFinder):
    """Logs as a library does at import (kernels under HF_HUB_OFFLINE), when transformers is first imported."""
    done = False

    def find_spec(self, name, path=None, target=None):
        if name == "transformers" and not self.done:
            _Noisy.done = True
            logging.getLogger("noisylib.hub").warning("NOISY-WARNING at import")
            logging.getLogger("noisylib.ops").error("NOISY-ERROR at import")
            warnings.warn("NOISY-PYWARNING at import", FutureWarning)
        return None

sys.meta_path.insert(0, _Noisy())
'''


def test_library_log_lines_never_come_before_the_error_line(tiny_model_dir: Path, inputs: Path,
                                                            tmp_path: Path) -> None:  # fmt: skip
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NOISY_SITECUSTOMIZE)
    env = {**ENV, "PYTHONPATH": str(tmp_path / "site")}
    env.pop("TRANSFORMERS_VERBOSITY")
    base = [f"model={tiny_model_dir}", f"data={inputs / 'sft.jsonl'}", "method=sft", "max_steps=1",
            "disable_tqdm=true"]  # fmt: skip
    # fails after the model loaded: only the error line
    failed = run_cli("train", *base, "target_modules=[not_a_module]", f"output_dir={tmp_path / 'a'}", env=env)
    assert_one_error(failed, "target_modules")
    # fails at the first check: only the error line
    assert_one_error(run_cli("train", *base, "seed=-1", f"output_dir={tmp_path / 'b'}", env=env), "seed")
    # succeeds: the library's error is shown (after the run), its warnings are not
    done = run_cli("train", *base, f"output_dir={tmp_path / 'c'}", env=env)
    assert done.returncode == 0, done.stderr
    assert "NOISY-ERROR" in done.stderr and "NOISY-WARNING" not in done.stderr
    assert "NOISY-PYWARNING" not in done.stderr
    # --debug shows everything
    debug = run_cli("--debug", "train", *base, "seed=-1", f"output_dir={tmp_path / 'd'}", env=env)
    assert "NOISY-WARNING" in debug.stderr and "NOISY-ERROR" in debug.stderr
