"""compare-timesteps end to end on tiny settings: every output, reuse of finished runs, resume."""

import json

import pytest
import torch
from typer.testing import CliRunner

from iclevr_diffusion.cli import app
from iclevr_diffusion.data.iclevr import load_conditions
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.training.timestep_comparison import (
    FIXED_LEVELS,
    FixedLevelProbe,
    parse_schedules,
    parse_timesteps,
)
from tiny_data import expected_ranked_accuracy, write_ranked_evaluator

TINY = [
    "data.image_size=16", "model.block_out_channels=[8, 16]", "model.attention=[false, true]",
    "model.norm_num_groups=4", "model.attention_head_dim=8", "model.layers_per_block=1",
    "train.batch_size=2", "train.warmup_steps=0", "train.log_every=1", "train.checkpoint_every=1",
    "train.sample_every=0", "train.max_minutes=null", "sample.sampler=ddim", "sample.steps=2",
]


def compare(tmp_path, data, evaluator, *extra):
    args = ["compare-timesteps", "--data", str(data), "--out", str(tmp_path / "exp"), "--timesteps", "10,20",
            "--quiet", "--json", "--set", f"eval.evaluator={evaluator}"]
    for s in TINY:
        args += ["--set", s]
    result = CliRunner().invoke(app, args + list(extra))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.fixture
def ranked_evaluator(tmp_path):
    """An evaluator that ignores the images: its accuracy on each split is known in advance."""
    return write_ranked_evaluator(tmp_path / "checkpoint.pth")


def steps_logged(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_timesteps_end_to_end_reuse_and_resume(tmp_path, tiny_dataset, ranked_evaluator):
    rows = compare(tmp_path, tiny_dataset, ranked_evaluator, "--max-steps", "2")
    exp = tmp_path / "exp"
    for name in ("learning_curves.png", "results.csv", "results.json", "experiment.yaml"):
        assert (exp / name).is_file(), name
    assert [(r["T"], r["schedule"], r["steps"]) for r in rows] == [(10, "linear", 2), (20, "linear", 2)]
    test, new_test = (expected_ranked_accuracy(load_conditions(s)) for s in ("test", "new_test"))
    for r in rows:  # every T is scored on both packaged splits with the given evaluator
        assert r["accuracy_test"] == pytest.approx(test) and r["accuracy_new_test"] == pytest.approx(new_test)
        assert r["evaluator"] and r["ddpm_s_per_image"] > 0 and r["fast_s_per_image"] > 0
        assert r["fixed_level_loss"] > 0
    # Fewer steps leave more signal at T: the table shows it.
    assert rows[0]["alpha_bar_T"] > rows[1]["alpha_bar_T"] > 0.8
    assert (exp / "results.csv").read_text().splitlines()[0].startswith("T,schedule,run,steps")

    # Pretend T=20 was interrupted after step 2; T=10 finished. A longer rerun resumes T=20 only.
    (exp / "T20-linear" / "DONE.json").unlink()
    before = (exp / "T10-linear" / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    rows = compare(tmp_path, tiny_dataset, ranked_evaluator, "--max-steps", "4")
    assert [r["steps"] for r in rows] == [2, 4]
    assert steps_logged(exp / "T20-linear") == [1, 2, 3, 4]  # continued, not restarted or duplicated
    after = (exp / "T10-linear" / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert before == after


def test_fixed_level_probe_uses_the_same_noise_levels_for_every_T(tiny_dataset):
    from iclevr_diffusion.config import ScheduleConfig
    from iclevr_diffusion.data.iclevr import ICLEVRDataset
    from iclevr_diffusion.diffusion.schedule import make_train_scheduler

    ds = ICLEVRDataset(tiny_dataset, image_size=16)
    for T in (300, 1000):
        sched = make_train_scheduler(ScheduleConfig(formulation="ddpm", num_train_timesteps=T))
        probe = FixedLevelProbe(ds, sched, every=1, images=4)
        reached = sched.alphas_cumprod[probe.timesteps]
        assert torch.allclose(reached, torch.tensor(FIXED_LEVELS, dtype=reached.dtype), atol=0.02)


@pytest.mark.parametrize("text", ["300,x", "1", "300,300", ""])
def test_bad_timesteps(text):
    with pytest.raises(IclevrError, match="--timesteps"):
        parse_timesteps(text)


def test_bad_schedule():
    with pytest.raises(IclevrError, match="--schedules 'sqrt'"):
        parse_schedules("sqrt")
