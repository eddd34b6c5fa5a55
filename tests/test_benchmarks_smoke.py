"""Every benchmark script runs in its --smoke mode (seconds), so none can rot unnoticed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ICLEVR_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *args], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


@pytest.mark.parametrize(
    "script, out_flag",
    [("render_speed.py", "--out"), ("train_speed.py", "--out"), ("learn_speed.py", "--out"), ("samplers.py", "--json"),
     ("quality_at_budget.py", "--out"), ("gpu_check.py", "--out"),
     ("x0_check.py", "--out")],
)
def test_benchmark_smoke_writes_results(script, out_flag, tmp_path):
    result = tmp_path / "result.json"
    extra = ["--plot", str(tmp_path / "plot.png")] if script == "samplers.py" else []
    run(script, out_flag, str(result), *extra, tmp_path=tmp_path)
    data = json.loads(result.read_text())
    assert "machine" in data and data["machine"]["cores"] >= 1


def test_evaluator_benchmark_smoke(tmp_path):
    out = run("evaluator.py", tmp_path=tmp_path)
    assert "accuracy" in out.stdout.lower()
