"""`iclevr-diff sample` end to end on a tiny, briefly trained model in a real run folder."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from iclevr_diffusion.cli import app
from iclevr_diffusion.data.iclevr import load_conditions
from iclevr_diffusion.testing import one_thread, tiny_config, write_tiny_run

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """runs/tiny: T = 100, run config sample section: dpm++, 5 steps, guidance 2, batch 8."""
    root = tmp_path_factory.mktemp("runs")
    with one_thread():
        write_tiny_run(root / "tiny", tiny_config(num_train_timesteps=100), train_steps=10)
    return root


def sample(*args: str):
    return runner.invoke(app, ["sample", *args])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_outputs_are_named_as_the_course_expects(runs):
    inputs = ["--split", "test", "--labels", "red sphere,cyan cube", "--labels", "gray cube", "--n", "2"]
    process = ["--process", "red sphere,cyan cylinder,cyan cube", "--frames", "4"]
    result = sample("--model", str(runs / "tiny"), *inputs, *process, "--quiet")
    assert result.exit_code == 0, result.output
    out = runs / "tiny" / "samples-dpm++-5"  # defaults from the run config's sample section
    assert sorted(p.name for p in (out / "test").iterdir()) == sorted(f"{i}.png" for i in range(32))
    assert sorted(p.name for p in (out / "labels").iterdir()) == [f"{i}.png" for i in range(4)]
    with Image.open(out / "test" / "31.png") as img:
        assert img.size == (16, 16) and img.mode == "RGB"
    with Image.open(out / "test_grid.png") as img:  # 32 images, 8 per row, 2-pixel padding
        assert img.size == (8 * 18 + 2, 4 * 18 + 2)
    with Image.open(out / "process.png") as img:  # one row of 4 frames
        assert img.size == (4 * 18 + 2, 18 + 2)
    manifest = json.loads((out / "manifest.json").read_text())
    settings = (manifest["sampler"], manifest["steps"], manifest["guidance_scale"], manifest["seed"])
    assert settings == ("dpm++", 5, 2.0, 0)
    assert manifest["model"] == str((runs / "tiny" / "model").resolve())
    test_images = [im for im in manifest["images"] if im["group"] == "test"]
    assert [im["labels"] for im in test_images] == load_conditions("test")
    assert test_images[5]["file"] == "test/5.png"
    labels = [im["labels"] for im in manifest["images"] if im["group"] == "labels"]
    assert labels == [["red sphere", "cyan cube"]] * 2 + [["gray cube"]] * 2
    process = {"file": "process.png", "labels": ["red sphere", "cyan cylinder", "cyan cube"], "frames": 4}
    assert manifest["process"] == process
    assert manifest["seconds_per_image"] > 0 and manifest["images_per_second"] > 0
    assert "36 images in" in result.stdout and "images/s" in result.stdout


def test_existing_output_is_refused_unless_force(runs, tmp_path):
    out = tmp_path / "out"
    base = ["--model", str(runs / "tiny"), "--out", str(out), "--quiet", "--steps", "2"]
    assert sample(*base, "--labels", "red cube", "--n", "3").exit_code == 0
    assert "not empty; pass --force" in one_line_error(sample(*base, "--labels", "red cube"))
    result = sample(*base, "--labels", "blue cube", "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["0.png"]  # no stale 1.png, 2.png


def test_json_prints_the_manifest(runs, tmp_path):
    out = tmp_path / "out"
    result = sample("--model", str(runs / "tiny"), "--labels", "red cube", "--out", str(out), "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((out / "manifest.json").read_text())


def test_ddpm_takes_all_training_steps_unless_told(runs, tmp_path):
    result = sample("--model", str(runs / "tiny"), "--sampler", "ddpm", "--labels", "red cube", "--json", "-q")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["steps"] == 100 and manifest["out"].endswith("samples-ddpm-100")
    flags = ["--sampler", "ddpm", "--steps", "3", "-g", "1", "--labels", "red cube", "--json", "-q"]
    result = sample("--model", str(runs / "tiny"), *flags, "--out", str(tmp_path / "o"))
    assert (json.loads(result.stdout)["steps"], json.loads(result.stdout)["guidance_scale"]) == (3, 1.0)


def test_same_seed_same_png_bytes(runs, tmp_path):
    for name in ("a", "b", "c"):
        seed = "4" if name != "c" else "5"
        args = ["--model", str(runs / "tiny"), "--labels", "red cube,gray sphere", "--steps", "3", "--seed", seed]
        assert sample(*args, "--out", str(tmp_path / name), "-q").exit_code == 0
    png = [(tmp_path / name / "labels" / "0.png").read_bytes() for name in ("a", "b", "c")]
    assert png[0] == png[1] and png[0] != png[2]


def test_condition_file_and_newest_run(runs, tmp_path):
    file = tmp_path / "mine.json"
    file.write_text(json.dumps([["red sphere"], ["cyan cube", "gray sphere"]]))
    out = tmp_path / "out"
    result = sample("--runs-dir", str(runs), "--conditions", str(file), "--out", str(out), "--steps", "2", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "mine").iterdir()) == ["0.png", "1.png"]
    assert (out / "mine_grid.png").is_file()


def test_bad_labels_fail_with_one_clear_line(runs, tmp_path):
    line = one_line_error(sample("--model", str(runs / "tiny"), "--labels", "red cub", "--out", str(tmp_path / "o")))
    assert "Unknown label 'red cub'" in line and "Did you mean 'red cube'?" in line
    assert not (tmp_path / "o").exists()
    file = tmp_path / "bad.json"
    file.write_text(json.dumps([["red sphere"], ["purple cone"]]))
    assert "bad.json entry 1" in one_line_error(sample("--model", str(runs / "tiny"), "--conditions", str(file)))
    assert "--process" in one_line_error(sample("--model", str(runs / "tiny"), "--process", "red sphre"))


def test_missing_model_and_bad_options_fail_with_one_clear_line(runs, tmp_path):
    assert "does not exist" in one_line_error(sample("--model", str(tmp_path / "nope"), "--labels", "red cube"))
    line = one_line_error(sample("--runs-dir", str(tmp_path / "empty"), "--labels", "red cube"))
    assert "No trained model found" in line
    assert "Nothing to draw" in one_line_error(sample("--model", str(runs / "tiny")))
    model = ["--model", str(runs / "tiny")]
    assert "at most 100" in one_line_error(sample(*model, "--labels", "red cube", "--steps", "500"))
    assert "Unknown sampler" in one_line_error(sample(*model, "--labels", "red cube", "--sampler", "euler"))
    bad_split = sample(*model, "--split", "train")  # a fixed choice: click's usage error, exit 2
    message = " ".join(bad_split.stderr.replace("│", " ").split())  # rich's error box, unwrapped
    assert bad_split.exit_code == 2 and "'train' is not one of 'test', 'new_test', 'val'" in message
    assert "--batch-size" in one_line_error(sample(*model, "--labels", "red cube", "--batch-size", "0"))
    assert "--seed" in one_line_error(sample(*model, "--labels", "red cube", "--seed", "-1", "-o", str(tmp_path / "s")))
    assert "--frames" in one_line_error(sample(*model, "--process", "red cube", "--frames", "1"))
    line = one_line_error(sample(*model, "--labels", "red cube", "--churn", "5"))  # a DDPM model: no churn
    assert "--churn applies to the heun and euler samplers of EDM and flow models" in line
