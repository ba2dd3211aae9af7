"""Reliability of ``arrtune train``: resume after a real SIGKILL, checkpoint integrity, one-line errors for bad
input that leave run directories untouched, NaN/inf stops, fuzzed loaders, and safe (non-pickle) loading."""

from __future__ import annotations

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
from arrtune.config import TrainConfig, load_config
from arrtune.data.replay import ReplayStream
from arrtune.data.sft import load_sft_examples
from arrtune.errors import ArrtuneError
from arrtune.models import load_model
from arrtune.recipe import CHECKPOINT_FILES, last_complete_checkpoint, train

SRC = Path(__file__).resolve().parents[1] / "src" / "arrtune"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
TERMS = ("loss", "sft_loss", "replay_loss", "kl", "grad_norm", "lr")


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
        "lora_dropout": 0.1, "seed": 3, "precision": "fp32", "progress_bar": False,
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


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run directory whose config.yaml names its new place."""
    shutil.copytree(src, dst)
    saved = yaml.safe_load((dst / "config.yaml").read_text())
    saved["output_dir"] = str(dst)
    (dst / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return dst


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
        train(load_config(None, train_args(tiny_model_dir, inputs, run, progress_bar=True)))  # cosmetic key
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
    }  # fmt: skip


CASE_NAMES = [
    "missing data file", "empty data file", "only blank lines", "malformed JSON line", "missing field",
    "mistyped field", "bad messages", "no assistant turn", "unknown format", "non-UTF-8 bytes", "unencodable text",
    "all too long", "all empty responses", "empty replay corpus", "missing replay file", "replay field",
    "unknown model spec", "not a model directory", "corrupt safetensors", "corrupt gguf", "pickle weights refused",
    "unknown key", "unknown key in file", "negative kl_coef", "negative replay_ratio", "zero learning rate",
    "negative learning rate", "nan learning rate", "zero rank", "negative rank", "mistyped rank",
    "unknown scheduler", "unknown target module", "not a run directory", "output_dir is a file",
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
    base = [f"model={tiny_model_dir}", f"output_dir={out}", "method=sft", "max_steps=2", "progress_bar=false"]
    watched = [Path(v.split("=", 1)[1]) for v in values if v.startswith("output_dir=")]
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
    assert "safe_serialization=True" in (SRC / "recipe.py").read_text()


def test_long_and_empty_examples_are_dropped_and_counted_in_the_log(
    tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    rows = [{"prompt": f"Say {i}", "completion": f"{i}"} for i in range(4)]
    rows += [{"prompt": "x " * 100, "completion": "y"}, {"prompt": "q", "completion": ""}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_config(None, [f"model={tiny_model_dir}", f"data={data}", f"output_dir={tmp_path / 'run'}",
                             "method=sft", "max_steps=1", "max_length=64", "progress_bar=false"])  # fmt: skip
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
