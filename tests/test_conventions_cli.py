"""Command-line conventions (issue 16): fixed choices are click choices (exit 2), shell completion, --json
summaries, plain progress lines where no terminal is attached, 0644 files, and every config value checked
when the config is resolved (so `train --dry-run` refuses it too)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iclevr_diffusion.cli import app
from iclevr_diffusion.config import CHOICES, PRESETS, SPLITS
from iclevr_diffusion.evaluator.archs import ARCHS

runner = CliRunner()


def flat(text: str) -> str:
    """A message as one line: rich's error box (borders, wrapping) removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize(
    "argv,listed",
    [
        (["sample", "--sampler", "eulr"], CHOICES["sample.sampler"]),
        (["evaluate", "--sampler", "DDIM!"], CHOICES["sample.sampler"]),
        (["sample", "--split", "train"], SPLITS),
        (["evaluate", "--split", "tset"], SPLITS),
        (["train", "-c", "defualt", "--dry-run"], PRESETS),
        (["compare-timesteps", "--config", "no/such.yaml", "--dry-run"], PRESETS),
        (["train-evaluator", "--arch", "resnet50"], ARCHS),
    ],
)
def test_a_bad_fixed_choice_is_a_usage_error_listing_the_choices(argv, listed):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert "Invalid value for" in message and "Traceback" not in message
    assert all(name in message for name in listed), message


@pytest.mark.parametrize("command,listing", [
    ("sample", "<" + "|".join(CHOICES["sample.sampler"]) + ">"),
    ("evaluate", "<list[" + "|".join(SPLITS) + "]>"),
    ("train", "(" + ",".join(PRESETS) + ")"),
    ("train-evaluator", "<" + "|".join(ARCHS) + ">"),
])
def test_help_lists_the_choices(command, listing):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"})  # wide enough not to wrap a cell
    assert result.exit_code == 0
    assert listing in result.output.replace(", ", ","), result.output


def test_shell_completion_is_offered_and_completes_choices(monkeypatch):
    import shellingham

    assert "--install-completion" in runner.invoke(app, ["--help"]).output
    # typer looks for the user's shell among this process's parents; a detached test run (started with
    # `(pytest &)`, reparented to init) has none, and the completion script then fails. Name the shell.
    monkeypatch.setattr(shellingham, "detect_shell", lambda *args, **kwargs: ("bash", "/bin/bash"))
    script = runner.invoke(app, ["--show-completion"])
    assert script.exit_code == 0 and "_ICLEVR_DIFF_COMPLETE=complete_bash" in script.output, script.output
    env = {**os.environ, "_ICLEVR_DIFF_COMPLETE": "complete_bash", "COMP_WORDS": "iclevr-diff sample --sampler dp",
           "COMP_CWORD": "3"}
    done = subprocess.run([sys.executable, "-m", "iclevr_diffusion"], env=env, capture_output=True, text=True)
    assert sorted(done.stdout.split()) == ["dpm++", "dpm++sde"], done.stdout + done.stderr


# Each value on its own (or in the combination named) through `train --dry-run --set`: one line, exit 1.
BAD_VALUES = {
    "train.log_every=0": "train.log_every",
    "train.lr=-1": "train.lr",
    "train.lr=0": "train.lr",
    "model.dropout=1.5": "model.dropout",
    "model.attention_head_dim=256": "model.attention_head_dim",
    "model.norm_num_groups=0": "model.norm_num_groups",
    "train.ema_decay=2": "train.ema_decay",
    "train.warmup_steps=-5": "train.warmup_steps",
    "train.max_minutes=-1": "train.max_minutes",
    "train.min_snr_gamma=-1": "train.min_snr_gamma",
    "train.checkpoint_every=-1": "train.checkpoint_every",
    "train.sample_every=-100": "train.sample_every",
    "schedule.beta_start=0.5": "schedule.beta_start",
    "schedule.beta_end=-0.1": "schedule.beta_end",
    "schedule.num_train_timesteps=1": "schedule.num_train_timesteps",
    "seed=-3": "seed",
    "train.max_minutes=null": "train.max_steps",  # no stop condition left
}
DDPM = ["--set", "schedule.formulation=ddpm", "--set", "sample.sampler=ddim"]


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_each_bad_config_value_is_refused_by_dry_run_in_one_line(override):
    result = runner.invoke(app, ["train", "--dry-run", *DDPM, "--set", override])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert BAD_VALUES[override] in lines[0] and "--steps" not in lines[0], lines[0]


def test_zero_means_never_for_the_periodic_work():
    result = runner.invoke(app, ["train", "--dry-run", "--set", "train.checkpoint_every=0", "--set",
                                 "train.sample_every=0", "--set", "train.eval_every=0"])
    assert result.exit_code == 0, result.output
    assert "checkpoint_every: 0" in result.output and "sample_every: 0" in result.output


def test_make_data_json_summary_and_0644_files(tmp_path):
    old = os.umask(0o022)
    try:
        result = runner.invoke(app, ["make-data", "--out", str(tmp_path / "d"), "--scenes", "2", "--size", "16",
                                     "--workers", "1", "--json", "-q"])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["scenes"] == 2 and summary["images"] == 6 and Path(summary["root"]) == tmp_path / "d"
    assert_0644(tmp_path / "d")


def assert_0644(folder: Path) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    modes = {str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, {k: v for k, v in modes.items() if v != "0o644"}


def test_train_without_a_terminal_prints_plain_progress_lines_json_and_0644_files(tmp_path):
    """A real tiny `train` as under nohup: stderr is a pipe, so no bar but plain lines with step, loss,
    images/s and time left; --json prints the summary; every file in the run folder is 0644."""
    from tiny_data import TINY_MODEL, make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=8)
    argv = [sys.executable, "-m", "iclevr_diffusion", "train", "--data", str(data), "--name", "t", "--runs-dir",
            str(tmp_path / "runs"), "--max-steps", "6", "--json"]
    for s in TINY_MODEL:
        argv += ["--set", s]
    env = {**os.environ, "ICLEVR_PROGRESS_SECONDS": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600,
                            preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("train: ")]
    pattern = re.compile(r"^train: (\d+)/6, [\d.]+/s, (done in \S+, )?loss \d+\.\d+ [\d.?]+ img/s \S+ left$")
    assert len(lines) >= 6 and all(pattern.match(x) for x in lines), result.stderr
    assert [int(pattern.match(x).group(1)) for x in lines][-1] == 6
    assert "━" not in result.stderr  # no bar drawn into the log
    summary = json.loads(result.stdout)
    assert summary["step"] == 6 and summary["stopped_by"] == "max_steps"
    assert Path(summary["model_dir"]) == tmp_path / "runs" / "t" / "model"
    assert_0644(tmp_path / "runs" / "t")


def test_plots_leave_the_process_matplotlib_backend_alone(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "loss": 1 / i, "lr": 1e-3}) + "\n" for i in range(1, 30)))
    code = (
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "from pathlib import Path\n"
        "from iclevr_diffusion.report import plot_loss\n"
        f"assert plot_loss(Path({str(metrics)!r}), Path({str(tmp_path / 'loss.png')!r}))\n"
        "print(matplotlib.get_backend())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "svg"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
