"""Data-parallel training on two real CPU processes (gloo), started with torch's own launcher
(`python -m torch.distributed.run`, i.e. torchrun) exactly as a user would start it.

What it proves: both ranks end with identical weights (and those are the checkpoint's), every global
batch of train.batch_size images is split into one distinct slice per process as batches.py plans
it, and only rank 0 writes the run folder (one metrics line per step, one summary table).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from iclevr_diffusion.data.iclevr import ICLEVRDataset
from iclevr_diffusion.labels import to_multi_hot
from iclevr_diffusion.training import checkpoints as ckpt
from iclevr_diffusion.training.batches import BatchOrder
from tiny_data import TINY_MODEL, make_tiny_dataset

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)
HELPER = Path(__file__).with_name("mp_train_helper.py")
BATCH, STEPS, N = 4, 4, 12  # 12 images, global batch 4: 3 steps per epoch, so the run crosses an epoch
SETS = [*TINY_MODEL, "train.label_dropout=0.0", "train.checkpoint_every=2", f"train.max_steps={STEPS}",
        f"train.batch_size={BATCH}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a test run under a launcher must not leak its own group into this one
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "iclevr_data", n=N)


def metrics_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_train_one_model(data_root, tmp_path):
    out, run = tmp_path / "ranks", tmp_path / "run"
    out.mkdir()
    result = torchrun(str(HELPER), str(out), str(run), str(data_root), *SETS)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [STEPS, STEPS]

    # Identical weights on both ranks, and the checkpoint rank 0 wrote holds exactly those.
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    saved = load_file(str(ckpt.list_checkpoints(run / "checkpoints")[-1] / "model.safetensors"))
    h = hashlib.sha256()
    for key in sorted(saved):
        h.update(key.encode())
        h.update(saved[key].contiguous().numpy().tobytes())
    assert h.hexdigest() == ranks[0]["sha256"]

    # Each step: rank r trains on images [2r, 2r + 2) of the global batch BatchOrder plans, so the
    # effective batch is train.batch_size (2 processes x 2), not 2 x train.batch_size.
    data = ICLEVRDataset(data_root, 16)
    order = BatchOrder(N, BATCH, seed=0)
    plan = [row for epoch in range(2) for row in order.epoch(epoch)][:STEPS]
    per = BATCH // 2
    for r, report in enumerate(ranks):
        assert len(report["labels"]) == STEPS
        expected = [[to_multi_hot(data.labels[i]) for i in row[r * per : (r + 1) * per].tolist()] for row in plan]
        assert report["labels"] == expected
    sizes = [len(a) + len(b) for a, b in zip(ranks[0]["labels"], ranks[1]["labels"])]
    assert sizes == [BATCH] * STEPS

    # Rank 0 alone writes the run folder; every process adds only its own RNG state to a checkpoint.
    assert metrics_steps(run) == list(range(1, STEPS + 1))
    last = ckpt.list_checkpoints(run / "checkpoints")[-1]
    assert sorted(p.name for p in last.glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    assert ckpt.load(last, rank=1)["rng"] is not None
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_cli_under_torchrun_prints_and_logs_once(data_root, tmp_path):
    argv = ["-m", "iclevr_diffusion", "train", "--data", str(data_root), "--name", "ddp",
            "--runs-dir", str(tmp_path)]
    for s in SETS:
        argv += ["--set", s]
    result = torchrun(*argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("train: ddp") == 1  # one summary table, from rank 0
    assert result.stderr.count("mixed precision: fp32, 2 process(es)") == 1
    assert metrics_steps(tmp_path / "ddp") == list(range(1, STEPS + 1))
    assert torch.isfinite(torch.tensor([json.loads(x)["loss"] for x in
                                        (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()])).all()
