"""`iclevr-diff train` end to end through the real CLI on a tiny model and a tiny dataset."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from iclevr_diffusion.cli import app
from iclevr_diffusion.diffusion.sampling import generate, load_pipeline
from tiny_data import TINY_MODEL, make_tiny_dataset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "iclevr_data", n=12)


def train_args(root, runs, *extra, name="cli"):
    args = ["train", "--data", str(root), "--name", name, "--runs-dir", str(runs), "--quiet"]
    for s in TINY_MODEL:
        args += ["--set", s]
    return [*args, *extra]


def test_cli_writes_the_run_folder_and_resumes(data_root, tmp_path):
    runner = CliRunner()
    args = train_args(data_root, tmp_path, "--max-steps", "3", "--set", "train.checkpoint_every=2")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "cli"
    for rel in ("config.yaml", "metrics.jsonl", "loss.png", "samples/step_000003.png",
                "checkpoints/step_000002/state.pt", "checkpoints/step_000003/model.safetensors",
                "model/model_index.json", "model/unet/config.json", "model/scheduler/scheduler_config.json",
                "model/run_config.yaml"):
        assert (run / rel).is_file(), rel
    assert "stopped by" in result.stdout and "max_steps" in result.stdout
    # The same command with a longer budget continues where it stopped.
    again = runner.invoke(app, train_args(data_root, tmp_path, "--max-steps", "5"))
    assert again.exit_code == 0, again.output
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    # What sample/evaluate load: the exported pipeline, with the run's config.
    pipe, cfg, folder = load_pipeline(run, device="cpu")
    assert cfg.data.image_size == 16 and folder == run / "model"
    images = generate(pipe, [["red cube"], ["blue sphere", "gray cylinder"]], "ddim", steps=2, guidance_scale=2.0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_cli_resume_with_another_model_fails_cleanly(data_root, tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, train_args(data_root, tmp_path, "--max-steps", "1")).exit_code == 0
    other_model = ("--set", "model.block_out_channels=[8, 8]")
    bad = runner.invoke(app, train_args(data_root, tmp_path, "--max-steps", "2", *other_model))
    assert bad.exit_code == 1
    assert "error: model.block_out_channels" in bad.output and "--name" in bad.output


def test_cli_resume_path_and_missing_data(data_root, tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, train_args(data_root, tmp_path, "--max-steps", "2")).exit_code == 0
    ck = tmp_path / "cli" / "checkpoints" / "step_000002"
    # --resume PATH: a checkpoint of another run seeds a new run folder, which goes on from its step.
    other = runner.invoke(app, train_args(data_root, tmp_path, "--max-steps", "3", "--resume", str(ck), name="fork"))
    assert other.exit_code == 0, other.output
    steps = [json.loads(x)["step"] for x in (tmp_path / "fork" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3]
    missing = runner.invoke(app, train_args(tmp_path / "nope", tmp_path / "r2", "--max-steps", "1"))
    assert missing.exit_code == 1 and "error:" in missing.output
