import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from iclevr_diffusion.cli import app

runner = CliRunner()


def test_help_lists_every_subcommand():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("train", "sample", "evaluate", "compare-timesteps", "make-data", "train-evaluator", "export-unet",
                "labels"):
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


def test_dry_run_prints_the_resolved_config_of_the_chosen_preset():
    import yaml

    from iclevr_diffusion.config import load_config

    result = runner.invoke(app, ["train", "-c", "seed", "--dry-run", "--lr", "0.001", "--set", "train.batch_size=8"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    default = yaml.safe_load(runner.invoke(app, ["train", "--dry-run"]).output)
    # seed.yaml's own values, each different from the default preset's: -c seed was honoured ...
    ours = {("name",): "seed", ("model", "block_out_channels"): [32, 64, 96, 128], ("model", "layers_per_block"): 2,
            ("schedule", "formulation"): "ddpm", ("train", "epochs"): 100, ("sample", "sampler"): "ddpm",
            ("sample", "steps"): 1000}
    for (*section, key), value in ours.items():
        assert _get(printed, *section, key) == value and _get(default, *section, key) != value, key
    # ... and the flags and --set win over it (seed.yaml: lr 2e-4, batch 32).
    assert printed["train"]["lr"] == 0.001 and printed["train"]["batch_size"] == 8
    assert printed == load_config("seed", ["train.batch_size=8"], {"train.lr": 0.001}).to_dict()


def _get(tree, *keys):
    for k in keys:
        tree = tree[k]
    return tree


def test_debug_env_shows_the_traceback_instead_of_one_line():
    """ICLEVR_DEBUG=1 re-raises what would be one `error:` line (exit 1 either way)."""
    argv = [sys.executable, "-m", "iclevr_diffusion", "train", "--dry-run", "--set", "train.lrr=1"]
    env = {k: v for k, v in os.environ.items() if k != "ICLEVR_DEBUG"}
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 1 and plain.stderr.startswith("error: Unknown config key 'train.lrr'")
    assert "Traceback" not in plain.stderr and len(plain.stderr.strip().splitlines()) == 1
    debug = subprocess.run(argv, capture_output=True, text=True, env={**env, "ICLEVR_DEBUG": "1"}, timeout=120)
    assert debug.returncode == 1 and debug.stderr.startswith("Traceback (most recent call last):")
    assert debug.stderr.strip().splitlines()[-1].startswith(
        "iclevr_diffusion.errors.IclevrError: Unknown config key 'train.lrr'")
    assert "error: " not in debug.stderr


def test_debug_env_also_re_raises_os_errors(tmp_path, monkeypatch):
    import iclevr_diffusion.workflows.labels as labels_workflow
    from tiny_data import TINY_MODEL, make_tiny_dataset

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = make_tiny_dataset(tmp_path / "data", n=4)
    argv = ["train", "--data", str(data), "--runs-dir", str(blocker / "sub"), "--max-steps", "1", "-q",
            *[a for s in TINY_MODEL for a in ("--set", s)]]  # an OSError no IclevrError explains
    monkeypatch.delenv("ICLEVR_DEBUG", raising=False)
    plain = runner.invoke(app, argv)
    assert plain.exit_code == 1 and plain.stderr.startswith("error: ") and "Not a directory" in plain.stderr
    monkeypatch.setattr(labels_workflow, "run", _ctrl_c)  # Ctrl-C while a command runs
    stopped = runner.invoke(app, ["labels"])
    assert stopped.exit_code == 130 and stopped.stderr.strip() == "interrupted"

    monkeypatch.setenv("ICLEVR_DEBUG", "0")  # off, as an unset variable
    assert runner.invoke(app, argv).stderr.startswith("error: ")

    monkeypatch.setenv("ICLEVR_DEBUG", "1")
    debug = runner.invoke(app, argv)
    assert isinstance(debug.exception, NotADirectoryError) and debug.stderr == ""
    stopped = runner.invoke(app, ["labels"])  # Ctrl-C: the traceback, and still exit 130
    assert stopped.exit_code == 130 and "Traceback" in stopped.stderr and "KeyboardInterrupt" in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == "interrupted"


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def test_make_data_through_the_cli_honours_every_option(tmp_path):
    from PIL import Image

    from iclevr_diffusion.data import synthetic

    out = tmp_path / "d"
    argv = ["make-data", "--out", str(out), "--scenes", "2", "--size", "12x8", "--seed", "3", "--workers", "1"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    train_json = json.loads((out / "train.json").read_text())
    heldout = json.loads((out / "heldout.json").read_text())
    assert len(train_json) == 6 and len(heldout) == 3 * synthetic.default_heldout(2)
    assert f"Wrote {len(train_json) + len(heldout)} images (6 train + {len(heldout)} held-out) to {out}" in " ".join(
        result.stdout.split())
    for name in train_json:
        with Image.open(out / "iclevr" / name) as img:
            assert img.size == (12, 8)
    # --seed reaches the renderer: the same bytes as the library call with that seed, others with seed 0.
    synthetic.make_dataset(tmp_path / "lib", scenes=2, size="12x8", seed=3, workers=1)
    assert (tmp_path / "lib" / "train.json").read_text() == (out / "train.json").read_text()
    first = sorted(train_json)[0]
    assert (tmp_path / "lib" / "iclevr" / first).read_bytes() == (out / "iclevr" / first).read_bytes()
    other = runner.invoke(app, ["make-data", "--out", str(tmp_path / "s0"), "--scenes", "2", "--size", "12x8",
                                "--seed", "0", "--workers", "1"])
    assert other.exit_code == 0, other.output
    assert (tmp_path / "s0" / "train.json").read_text() != (out / "train.json").read_text()
    # A non-empty folder needs --force; a bad --size is one error line.
    again = runner.invoke(app, argv)
    assert again.exit_code == 1 and "not empty" in again.stderr and "--force" in again.stderr
    assert runner.invoke(app, [*argv, "--force"]).exit_code == 0
    bad = runner.invoke(app, ["make-data", "--out", str(tmp_path / "bad"), "--size", "big", "--workers", "1"])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: ") and "--size" in bad.stderr


def test_device_flag_is_honoured_and_a_bad_one_is_one_error_line(tmp_path):
    import torch

    from iclevr_diffusion.testing import write_tiny_run
    from tiny_data import TINY_MODEL, make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=4)
    train = ["train", "--data", str(data), "--runs-dir", str(tmp_path / "runs"), "--name", "t", "--max-steps", "1",
             "-q", *[a for s in TINY_MODEL for a in ("--set", s)]]
    ok = runner.invoke(app, [*train, "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert "device: cpu" in (tmp_path / "runs" / "t" / "config.yaml").read_text().splitlines()
    model = write_tiny_run(tmp_path / "tiny", train_steps=0)
    sample = ["sample", "--model", str(model), "--labels", "red cube", "--steps", "1", "--sampler", "ddim", "-q",
              "--json"]
    drawn = runner.invoke(app, [*sample, "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert drawn.exit_code == 0, drawn.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["device"] == "cpu"

    no_cuda = "asked for CUDA, but no CUDA GPU is available" if not torch.cuda.is_available() else "CUDA device(s)"
    cases = {"banana": "--device 'banana' is not a device", "meta": "--device 'meta' is not supported",
             "cuda:99": no_cuda}
    evaluate = ["evaluate", "--images", str(tmp_path), "--split", "test", "--evaluator", str(tmp_path / "none.pth")]
    for spec, fragment in cases.items():
        for argv in (train, [*sample, "--out", str(tmp_path / f"bad-{spec}")], evaluate):
            result = runner.invoke(app, [*argv, "--device", spec])
            assert result.exit_code == 1, (spec, argv[0], result.output)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (spec, argv[0], lines)
    assert not (tmp_path / "bad-meta").exists()  # nothing written before the device is checked
