import json
import subprocess
import sys

from typer.testing import CliRunner

from iclevr_diffusion.cli import app

runner = CliRunner()


def test_help_lists_every_subcommand():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("train", "sample", "evaluate", "compare-timesteps", "make-data", "train-evaluator", "labels"):
        assert cmd in result.output


def test_help_does_not_import_torch():
    code = "import sys; from iclevr_diffusion.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "iclevr_diffusion", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("iclevr-diffusion ")


def test_labels_table_and_json():
    result = runner.invoke(app, ["labels"])
    assert result.exit_code == 0 and "yellow cylinder" in result.output
    result = runner.invoke(app, ["labels", "--json"])
    data = json.loads(result.output)
    assert data["gray cube"] == 0 and data["yellow cylinder"] == 23 and len(data) == 24


def test_error_is_one_line_exit_1():
    result = runner.invoke(app, ["train", "--dry-run", "--set", "train.lrr=1"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Unknown config key 'train.lrr'")


def test_usage_error_exit_2():
    assert runner.invoke(app, ["train", "--no-such-flag"]).exit_code == 2


def test_dry_run_prints_resolved_config():
    result = runner.invoke(app, ["train", "-c", "seed", "--dry-run", "--lr", "0.001", "--set", "train.batch_size=8"])
    assert result.exit_code == 0
    assert "block_out_channels:\n  - 32" in result.output or "- 32" in result.output
    assert "lr: 0.001" in result.output and "batch_size: 8" in result.output
