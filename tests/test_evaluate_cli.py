"""`iclevr-diff evaluate` and `train-evaluator` end to end, with real files and a real (tiny) model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import draw_scene, write_dataset
from iclevr_diffusion.cli import app
from iclevr_diffusion.data.iclevr import load_conditions
from iclevr_diffusion.evaluator.metric import load_evaluator, score_images
from tiny_data import expected_ranked_accuracy, write_ranked_evaluator

runner = CliRunner()


@pytest.fixture
def ranked_evaluator(tmp_path) -> Path:
    """An evaluator whose score on any condition list is known in advance (tiny_data.write_ranked_evaluator)."""
    return write_ranked_evaluator(tmp_path / "ranked" / "checkpoint.pth")


def write_condition_images(folder: Path, conditions: list[list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, labels in enumerate(conditions):
        draw_scene(labels, size=(80, 60)).save(folder / f"{i}.png")  # 4:3 like the real data: resized
    return folder


def test_evaluate_images_scores_a_folder(tmp_path, ranked_evaluator):
    conds = load_conditions("test")
    images = write_condition_images(tmp_path / "imgs", conds)
    out = tmp_path / "out"
    args = ["evaluate", "--images", str(images), "--split", "test", "--evaluator", str(ranked_evaluator)]
    result = runner.invoke(app, [*args, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    row = report["results"][0]
    assert (row["split"], row["images"], row["labels"]) == ("test", 32, 72)
    assert row["accuracy"] == pytest.approx(expected_ranked_accuracy(conds))
    assert 0 < row["accuracy"] < 0.5
    assert report["evaluator"]["kind"] == "given" and str(ranked_evaluator) in report["evaluator"]["name"]
    # Per-class hit rates add up to the total, and the ranked evaluator always finds gray cube (index 0).
    assert sum(v["hits"] for v in row["per_class"].values()) == round(row["accuracy"] * 72)
    assert row["per_class"]["gray cube"]["rate"] == 1.0
    assert (out / "test.png").is_file() and (out / "evaluation.json").is_file()

    table = runner.invoke(app, [*args, "--out", str(out)])
    assert table.exit_code == 0, table.output
    assert f"{row['accuracy']:.2%}" in table.stdout and "evaluator: checkpoint" in table.stdout


def test_evaluate_images_missing_file_names_it(tmp_path, ranked_evaluator):
    conds = load_conditions("new_test")
    images = write_condition_images(tmp_path / "imgs", conds)
    (images / "5.png").unlink()
    (images / "9.png").unlink()
    result = runner.invoke(
        app, ["evaluate", "--images", str(images), "--split", "new_test", "--evaluator", str(ranked_evaluator)]
    )
    assert result.exit_code == 1
    assert "5.png is missing" in result.output and "9.png" not in result.output


def test_evaluate_images_refuses_a_sampling_setting(tmp_path, ranked_evaluator):
    images = write_condition_images(tmp_path / "imgs", load_conditions("test"))
    result = runner.invoke(app, ["evaluate", "--images", str(images), "--split", "test", "--evaluator",
                                 str(ranked_evaluator), "--churn", "5"])
    assert result.exit_code == 1 and "--churn is a sampling setting" in result.stderr


def test_evaluate_rejects_a_bad_checkpoint(tmp_path):
    images = write_condition_images(tmp_path / "imgs", load_conditions("test"))
    bad = tmp_path / "bad.pth"
    torch.save({"weights": {}}, bad)
    result = runner.invoke(app, ["evaluate", "--images", str(images), "--split", "test", "--evaluator", str(bad)])
    assert result.exit_code == 1
    assert "error:" in result.output and "no 'model' key" in result.output


def _tiny_run(runs: Path) -> Path:
    """A run folder with a real (tiny, untrained) exported model and a run config that sets the sampler."""
    from iclevr_diffusion.config import Config
    from iclevr_diffusion.diffusion.model import ConditionalUNet
    from iclevr_diffusion.diffusion.pipeline import ConditionalDDPMPipeline
    from iclevr_diffusion.diffusion.schedule import make_train_scheduler

    cfg = Config()
    cfg.schedule.formulation, cfg.schedule.num_train_timesteps, cfg.train.min_snr_gamma = "ddpm", 50, 5.0
    cfg.model.time_scale_shift = "default"  # as the UNet below
    cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance_scale = "ddim", 2, 1.5
    torch.manual_seed(0)
    unet = ConditionalUNet(
        sample_size=8, block_out_channels=(8, 16), attention=(False, False), layers_per_block=1,
        norm_num_groups=4, mid_attention=False,
    )
    folder = runs / "tiny" / "model"
    ConditionalDDPMPipeline(unet=unet, scheduler=make_train_scheduler(cfg.schedule)).save_pretrained(folder)
    (folder / "run_config.yaml").write_text(cfg.to_yaml())
    return runs / "tiny"


def test_evaluate_model_samples_with_the_run_config_and_seeds(tmp_path, ranked_evaluator):
    run = _tiny_run(tmp_path / "runs")
    args = ["evaluate", "--runs-dir", str(tmp_path / "runs"), "--evaluator", str(ranked_evaluator), "--json", "-q"]
    result = runner.invoke(app, [*args, "--split", "new_test", "--seeds", "2", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["results"][0]
    assert (row["sampler"], row["steps"], row["guidance_scale"]) == ("ddim", 2, 1.5)  # from run_config.yaml
    assert row["churn"] == 0.0  # a DDPM model's samplers take none
    assert row["seeds"] == [0, 1] and len(row["accuracies"]) == 2 and row["accuracy_std"] == 0.0
    assert row["accuracy"] == pytest.approx(expected_ranked_accuracy(load_conditions("new_test")))
    assert (run / "eval" / "new_test_seed0.png").is_file() and (run / "eval" / "new_test_seed1.png").is_file()

    # No --split: both packaged splits; flags override the run config.
    result = runner.invoke(app, [*args, "--sampler", "ddpm", "--steps", "1", "-g", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [r["split"] for r in rows] == ["test", "new_test"]
    assert (rows[0]["sampler"], rows[0]["steps"], rows[0]["guidance_scale"]) == ("ddpm", 1, 1.0)


def test_train_evaluator_writes_the_official_format_and_evaluate_finds_it(tmp_path):
    entries = {}
    for s, labels in enumerate([["red cube", "cyan sphere", "yellow cylinder"], ["gray sphere", "blue cube"]]):
        for j in range(len(labels)):
            entries[f"CLEVR_train_{s:06d}_{j}.png"] = labels[: j + 1]
    root = write_dataset(tmp_path / "data", entries)
    # A held-out set of its own (as the renderer writes): the card's accuracy can be checked on it.
    heldout = {f"CLEVR_heldout_{i:06d}_0.png": labels for i, labels in enumerate(
        [["red cube"], ["cyan sphere", "blue cube"], ["gray sphere", "yellow cylinder", "red cube"], ["blue cube"],
         ["green cylinder", "cyan sphere"]])}
    for name, labels in heldout.items():
        draw_scene(labels).save(root / "iclevr" / name)
    (root / "heldout.json").write_text(json.dumps(heldout))
    args = ["train-evaluator", "--data", str(root), "--epochs", "1", "--batch-size", "4", "--json", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    ckpt = root / "evaluator" / "checkpoint.pth"
    assert card["checkpoint"] == str(ckpt) and card["epochs"] == 1
    assert (card["images"], card["heldout_images"], card["heldout_source"]) == (len(entries), 5, "heldout.json")
    assert card["dataset"] == "data"
    assert set(torch.load(ckpt, weights_only=True)) == {"model"}
    # The card's held-out accuracy is the saved checkpoint's, scored anew on heldout.json (9 labels).
    from iclevr_diffusion.evaluator.training import load_labelled

    _, pics, targets = load_labelled(root, "heldout.json")
    judge = load_evaluator(ckpt)  # loads as an official-format checkpoint
    assert card["heldout_accuracy"] == pytest.approx(score_images(judge, pics.float() / 127.5 - 1, targets).accuracy)
    assert card["heldout_curve"] == [round(card["heldout_accuracy"], 5)]  # one epoch: one point, the same model

    # Cached: a second call does not retrain.
    again = runner.invoke(app, ["train-evaluator", "--data", str(root), "--json", "-q"])
    assert json.loads(again.stdout)["date"] == card["date"]

    # evaluate --data ROOT finds ROOT/evaluator/checkpoint.pth and says it is our own.
    images = write_condition_images(tmp_path / "imgs", load_conditions("test"))
    result = runner.invoke(app, ["evaluate", "--images", str(images), "--split", "test", "--data", str(root), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["evaluator"]["kind"] == "own"
    assert report["evaluator"]["name"].startswith("own ResNet18 trained on data")
    assert report["evaluator"]["arch"] == "resnet18"  # user data: the course's architecture by default


def test_evaluate_without_any_evaluator_for_user_data(tmp_path):
    root = write_dataset(tmp_path / "data", {"CLEVR_train_000000_0.png": ["red cube"]})
    images = write_condition_images(tmp_path / "imgs", load_conditions("test"))
    result = runner.invoke(app, ["evaluate", "--images", str(images), "--split", "test", "--data", str(root)])
    assert result.exit_code == 1
    assert "No evaluator for" in result.output and "train-evaluator --data" in result.output


def test_evaluate_images_both_splits_from_subfolders(tmp_path, ranked_evaluator):
    images = tmp_path / "imgs"
    for split in ("test", "new_test"):
        write_condition_images(images / split, load_conditions(split))
    result = runner.invoke(app, ["evaluate", "--images", str(images), "--evaluator", str(ranked_evaluator), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [(r["split"], r["images"], r["labels"]) for r in rows] == [("test", 32, 72), ("new_test", 32, 84)]
    assert rows[1]["accuracy"] == pytest.approx(expected_ranked_accuracy(load_conditions("new_test")))
    assert (images / "test.png").is_file() and (images / "new_test.png").is_file()
