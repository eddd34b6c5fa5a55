"""Crash safety of `iclevr-diff train`, on real subprocesses: SIGKILL at an arbitrary moment, a
half-written newest checkpoint, and Ctrl-C (SIGINT), each followed by running the command again.

The runs use the tiny model of tiny_data.py (about 20 steps/s on one thread), so a run started with
a huge --max-steps is killed after a few checkpoints and resumed with a small one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iclevr_diffusion.config import load_config
from iclevr_diffusion.diffusion.sampling import generate, load_pipeline
from iclevr_diffusion.training import checkpoints as ckpt
from iclevr_diffusion.training.loop import train
from tiny_data import TINY_MODEL, make_tiny_dataset

EVERY = 5  # checkpoint_every of the killed run: wide enough to kill it between two checkpoints
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "iclevr_data", n=12)


def train_argv(root, runs, *extra):
    argv = [sys.executable, "-m", "iclevr_diffusion", "train", "--data", str(root), "--name", "run",
            "--runs-dir", str(runs)]
    for s in TINY_MODEL:
        argv += ["--set", s]
    return [*argv, *extra]


def start(argv, logs: Path) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    out, err = open(logs / "stdout", "w"), open(logs / "stderr", "w")
    # As from a terminal: SIGINT at its default even when pytest runs in the background (nohup, CI),
    # where the child would otherwise inherit an ignored SIGINT and rightly keep ignoring it.
    proc = subprocess.Popen(argv, stdout=out, stderr=err, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out.close(), err.close()
    return proc


def logged_steps(run: Path) -> list[int]:
    """Steps of metrics.jsonl; a last line cut short by a kill is skipped, as the resume does."""
    steps = []
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except ValueError:
                pass
    return steps


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def wait_until(proc: subprocess.Popen, ready, logs: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}): {(logs / 'stderr').read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training did not reach the expected step in time")
        time.sleep(0.01)


def run_to_end(argv, logs: Path, timeout: float = 120.0) -> tuple[int, str]:
    proc = start(argv, logs)
    proc.wait(timeout=timeout)
    return proc.returncode, (logs / "stderr").read_text()


def newest_weights(run: Path) -> tuple[dict, dict]:
    last = ckpt.list_checkpoints(run / "checkpoints")[-1]
    return load_file(str(last / "model.safetensors")), load_file(str(last / "ema.safetensors"))


def test_sigkill_then_the_same_command_resumes_exactly(data_root, tmp_path):
    runs = tmp_path / "runs"
    run = runs / "run"
    sets = ["--set", f"train.checkpoint_every={EVERY}"]
    proc = start(train_argv(data_root, runs, *sets, "--max-steps", "100000", "--quiet"), tmp_path / "killed")

    def between_checkpoints() -> bool:  # a checkpoint exists and the run is 2-3 steps past the newest
        found = ckpt.list_checkpoints(run / "checkpoints")
        steps = logged_steps(run)
        return bool(found and steps) and steps[-1] % EVERY in (2, 3) and steps[-1] > step_of(found[-1])

    wait_until(proc, between_checkpoints, tmp_path / "killed")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    newest = step_of(ckpt.list_checkpoints(run / "checkpoints")[-1])
    assert max(logged_steps(run)) > newest  # lines the resume must drop

    rc, err = run_to_end(train_argv(data_root, runs, *sets, "--max-steps", str(newest + 3)), tmp_path / "resumed")
    assert rc == 0, err
    assert f"resumed from {run / 'checkpoints' / ckpt.step_dir_name(newest)}" in err.replace("\n", "")
    # The curve continues from the checkpoint: every step once, none of the killed run's later lines.
    assert logged_steps(run) == list(range(1, newest + 4))
    assert not list((run / "checkpoints").glob(".tmp-*"))

    # Same weights as a run stopped cleanly at that checkpoint and resumed the same way (in-process).
    ref = tmp_path / "ref"
    base = [*TINY_MODEL, f"data.root={data_root}", f"train.checkpoint_every={EVERY}"]
    with pytest.raises(KeyboardInterrupt):
        train(load_config("default", [*base, "train.max_steps=100000"]), ref, interrupt_after=newest)
    train(load_config("default", [*base, f"train.max_steps={newest + 3}"]), ref)
    got, want = newest_weights(run), newest_weights(ref)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    pipe, cfg, folder = load_pipeline(run, device="cpu")  # the final export loads and draws
    assert folder == run / "model" and cfg.data.image_size == 16
    images = generate(pipe, [["red cube"]], "ddim", steps=2)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_half_written_newest_checkpoint_is_skipped(data_root, tmp_path):
    runs = tmp_path / "runs"
    run = runs / "run"
    every = ["--set", "train.checkpoint_every=2", "--quiet"]
    rc, err = run_to_end(train_argv(data_root, runs, *every, "--max-steps", "4"), tmp_path / "first")
    assert rc == 0, err
    checkpoints = run / "checkpoints"
    # What a crash at the worst moment could leave: the newest state file cut short, and the temp
    # folder of a checkpoint that was never renamed into place.
    state = checkpoints / "step_000004" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    tmp = checkpoints / ".tmp-step_000006"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)

    rc, err = run_to_end(train_argv(data_root, runs, "--set", "train.checkpoint_every=2", "--max-steps", "6"),
                         tmp_path / "again")
    assert rc == 0, err
    flat = " ".join(err.split())
    assert "step_000004 is unreadable" in flat and "falling back to the previous one" in flat
    assert "resumed from" in flat and "step_000002" in flat
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)][-1] == "step_000006"
    assert not tmp.exists()  # the leftover was replaced by the real step 6, then renamed away
    ckpt.load(checkpoints / "step_000006")


def test_sigint_saves_a_checkpoint_and_exits_130(data_root, tmp_path):
    runs = tmp_path / "runs"
    run = runs / "run"
    logs = tmp_path / "interrupted"
    proc = start(train_argv(data_root, runs, "--max-steps", "100000"), logs)  # checkpoint_every=1000
    wait_until(proc, lambda: len(logged_steps(run)) >= 3, logs)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    err = " ".join((logs / "stderr").read_text().split())
    assert "interrupted: saving a checkpoint" in err and err.endswith("interrupted")
    saved = ckpt.list_checkpoints(run / "checkpoints")
    assert len(saved) == 1  # no scheduled checkpoint this early: the interrupt wrote it
    step = step_of(saved[0])
    assert f"checkpoint {saved[0].name} (interrupted)" in err
    assert step >= 3 and step in (max(logged_steps(run)), max(logged_steps(run)) + 1)
    assert (run / "model" / "model_index.json").is_file()

    rc, out = run_to_end(train_argv(data_root, runs, "--max-steps", str(step + 2), "--quiet"), tmp_path / "again")
    assert rc == 0, out
    assert logged_steps(run)[-2:] == [step + 1, step + 2]
    assert len(set(logged_steps(run))) == len(logged_steps(run))


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path):
    from iclevr_diffusion import io

    target = tmp_path / "manifest.json"
    io.write_text(target, "old\n")
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("the process dies here")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # no temp file left behind
