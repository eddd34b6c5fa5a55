"""The package as a user gets it from a built wheel, not the editable checkout: the presets and the
condition files must be inside the wheel, and the code must find them there.

The wheel is built from a copy of pyproject.toml, README.md and src/ (so nothing is written into the
checkout), installed with `pip install --no-deps --target` (no network; torch and the other
dependencies come from this interpreter's environment), and run from a folder outside the checkout
with only the install folder on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel file, the folder it was installed into)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("iclevr_diffusion-*.whl")
    target = tmp / "site"
    done = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return wheel, target


def run_installed(target: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1", ICLEVR_CACHE_DIR=str(cwd / "cache"))
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_wheel_holds_the_presets_and_condition_files(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in ("default", "seed", "full", "compare-timesteps"):
        assert f"iclevr_diffusion/presets/{preset}.yaml" in names
    for split in ("objects", "test", "new_test", "val"):
        assert f"iclevr_diffusion/data/files/{split}.json" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_the_installed_package_runs_from_its_own_files(installed, tmp_path):
    _, target = installed
    code = """
import json, sys
import iclevr_diffusion
from iclevr_diffusion.config import load_config
from iclevr_diffusion.data.iclevr import load_conditions
from iclevr_diffusion.labels import LABEL_INDEX, packaged_file
seed = load_config("seed", [])
print(json.dumps({
    "module": iclevr_diffusion.__file__,
    "objects": str(packaged_file("objects.json")),
    "seed_channels": seed.model.block_out_channels,
    "default_formulation": load_config("default", []).schedule.formulation,
    "test": load_conditions("test"), "new_test": load_conditions("new_test"),
    "labels": LABEL_INDEX,
}))
"""
    info = json.loads(run_installed(target, [sys.executable, "-c", code], tmp_path).stdout)
    assert Path(info["module"]).is_relative_to(target) and Path(info["objects"]).is_relative_to(target)
    assert info["seed_channels"] == [32, 64, 96, 128] and info["default_formulation"] == "flow"
    assert len(info["test"]) == len(info["new_test"]) == 32 and sum(map(len, info["test"])) == 72
    assert info["labels"]["gray cube"] == 0 and len(info["labels"]) == 24

    # The console script pip wrote, with the package's own presets and label list.
    script = target / "bin" / "iclevr-diff"
    labels = json.loads(run_installed(target, [sys.executable, str(script), "labels", "--json"], tmp_path).stdout)
    assert labels == info["labels"]
    dry = run_installed(target, [sys.executable, str(script), "train", "-c", "seed", "--dry-run"], tmp_path).stdout
    assert dry.startswith("name: seed\n") and "  - 96\n" in dry
