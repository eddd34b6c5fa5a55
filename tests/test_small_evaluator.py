"""The small CNN evaluator of the built-in synthetic data: its size, its checkpoint, the precision
choice, and the first-use path of `evaluate` end to end on a tiny rendered set (trained, cached,
reused, refused for other labels), with progress lines when no terminal is attached."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_dataset
from iclevr_diffusion import precision
from iclevr_diffusion.cli import app
from iclevr_diffusion.data.iclevr import load_conditions
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.evaluator import training as evaluator_training
from iclevr_diffusion.evaluator.choice import resolve_evaluator
from iclevr_diffusion.evaluator.metric import (
    RESNET18,
    SMALL_CNN,
    SmallCNN,
    build_evaluator,
    flops_per_image,
    load_evaluator,
    parameter_count,
    save_checkpoint,
)
from iclevr_diffusion.evaluator.training import cached_card, fingerprint, resolve_precision, time_precisions

runner = CliRunner()
TINY_SCENES = 3  # 9 training images + 1 held-out scene (3 images): renders in about a second


def test_small_cnn_is_much_cheaper_than_resnet18():
    small, big = flops_per_image(SMALL_CNN), flops_per_image(RESNET18)
    assert big / small > 12  # 0.019 vs 0.296 GFLOP forward at 64x64
    assert flops_per_image(SMALL_CNN, backward=True) > 2 * small
    model = build_evaluator(SMALL_CNN).eval()
    assert parameter_count(model) < 200_000
    with torch.no_grad():
        out = model(torch.rand(3, 3, 64, 64) * 2 - 1)
    assert out.shape == (3, 24) and bool(((out > 0) & (out < 1)).all())  # the same sigmoid head
    with pytest.raises(IclevrError, match="Unknown evaluator architecture 'vgg'"):
        build_evaluator("vgg")


def test_checkpoint_names_its_architecture(tmp_path):
    torch.manual_seed(0)
    small = build_evaluator(SMALL_CNN).eval()
    save_checkpoint(small, tmp_path / "small.pth")
    raw = torch.load(tmp_path / "small.pth", weights_only=True)
    assert set(raw) == {"model", "arch"} and raw["arch"] == SMALL_CNN
    loaded = load_evaluator(tmp_path / "small.pth")
    assert isinstance(loaded, SmallCNN)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    # ResNet18 keeps the course's format exactly: no extra key.
    save_checkpoint(build_evaluator(RESNET18), tmp_path / "big.pth")
    assert set(torch.load(tmp_path / "big.pth", weights_only=True)) == {"model"}
    assert not isinstance(load_evaluator(tmp_path / "big.pth"), SmallCNN)
    # An unknown architecture, or weights that do not fit the named one, are refused.
    torch.save({"model": small.state_dict(), "arch": "vgg"}, tmp_path / "vgg.pth")
    with pytest.raises(IclevrError, match="unknown 'arch' 'vgg'"):
        load_evaluator(tmp_path / "vgg.pth")
    torch.save({"model": small.state_dict()}, tmp_path / "unnamed.pth")  # small weights, no arch: read as ResNet18
    with pytest.raises(IclevrError, match="missing keys"):
        load_evaluator(tmp_path / "unnamed.pth")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_small_checkpoint_with_pickled_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": SmallCNN().state_dict(), "arch": SMALL_CNN, "x": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(IclevrError, match="Refusing to load .*could run code"):
        load_evaluator(tmp_path / "evil.pth")
    assert not marker.exists()


def test_precision_is_measured_not_assumed(monkeypatch):
    model = SmallCNN()
    cpu = torch.device("cpu")
    assert resolve_precision(model, cpu, True) == (True, None)  # asked for: no timing
    assert resolve_precision(model, cpu, False) == (False, None)
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert resolve_precision(model, cpu, None) == (False, None)  # no native bf16: fp32, nothing timed
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    for fp32, bf16, want in ((100.0, 180.0, True), (100.0, 102.0, False), (100.0, 60.0, False)):
        timing = {"fp32_images_per_s": fp32, "bf16_images_per_s": bf16, "batch": 2}
        monkeypatch.setattr(evaluator_training, "time_precisions", lambda m, b, t=timing: t)
        assert resolve_precision(model, cpu, None) == (want, timing)


def test_timing_leaves_the_model_and_random_stream_alone():
    model = SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    timing = time_precisions(model, batch=2, rounds=1)
    assert timing["fp32_images_per_s"] > 0 and timing["bf16_images_per_s"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.fixture
def builtin_cache(tmp_path, monkeypatch):
    """An empty cache for the built-in set, and small-CNN defaults that train in a second."""
    monkeypatch.setenv("ICLEVR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(evaluator_training.TRAINING_DEFAULTS, SMALL_CNN, {"epochs": 1, "batch_size": 4, "lr": 1e-2})
    return tmp_path / "cache"


def test_first_use_trains_caches_reuses_and_refuses_other_labels(builtin_cache):
    from iclevr_diffusion.data.synthetic import default_dataset_root

    root = Path(default_dataset_root(TINY_SCENES, workers=1))
    events, notes = [], []

    def resolve():
        return resolve_evaluator(None, None, train_progress=lambda stage, *a, **k: events.append(stage),
                                 note=notes.append, synthetic_scenes=TINY_SCENES)

    # First use: no evaluator yet, so the small CNN is trained, with progress, and saved with its card.
    net, choice = resolve()
    assert isinstance(net, SmallCNN)
    assert {"loading images", "training", "epoch done"} <= set(events)
    assert len(notes) == 1 and "small CNN" in notes[0]
    ckpt = root / "evaluator" / "checkpoint.pth"
    assert choice.path == ckpt and choice.kind == "own" and choice.arch == SMALL_CNN
    assert choice.name.startswith("own small CNN trained on built-in synthetic i-CLEVR (")
    assert "% on held-out images" in choice.name
    assert set(torch.load(ckpt, weights_only=True)) == {"model", "arch"}
    card = json.loads((root / "evaluator" / "card.json").read_text())
    assert card["arch"] == SMALL_CNN and card["parameters"] == parameter_count(SmallCNN())
    assert card["gflop_per_image"] == pytest.approx(flops_per_image(SMALL_CNN) / 1e9, abs=1e-4)
    assert card["gflop_total"] > 0 and card["fingerprint"] == fingerprint(root)
    assert card["heldout_source"] == "heldout.json" and card["epochs"] == 1
    mtime = ckpt.stat().st_mtime_ns

    # Second use: the cached one, not trained again.
    events.clear()
    notes.clear()
    net, again = resolve()
    assert isinstance(net, SmallCNN) and again.path == ckpt
    assert events == [] and notes == [] and ckpt.stat().st_mtime_ns == mtime

    # Other labels (train.json changed): the cached evaluator is refused and a new one trained.
    labels = json.loads((root / "train.json").read_text())
    first = next(iter(labels))
    labels[first] = ["cyan cylinder"] if labels[first] != ["cyan cylinder"] else ["red cube"]
    (root / "train.json").write_text(json.dumps(labels))
    assert cached_card(root) is None
    net, retrained = resolve()
    assert "training" in events and len(notes) == 1 and "trained on other labels" in notes[0]
    assert json.loads((root / "evaluator" / "card.json").read_text())["fingerprint"] == fingerprint(root)
    assert cached_card(root) is not None


def test_stale_own_evaluator_of_user_data_is_refused(tmp_path):
    entries = {f"CLEVR_train_{s:06d}_0.png": [label] for s, label in enumerate(["red cube", "blue sphere"])}
    root = write_dataset(tmp_path / "data", entries)
    card = evaluator_training.train_evaluator(root, arch=SMALL_CNN, epochs=1, batch_size=2, bf16=False)
    assert card["arch"] == SMALL_CNN
    assert cached_card(root, RESNET18) is None and cached_card(root, SMALL_CNN) is not None
    net, choice = resolve_evaluator(None, root)
    assert isinstance(net, SmallCNN) and choice.name.startswith("own small CNN trained on data")
    entries["CLEVR_train_000000_0.png"] = ["green cube"]
    (root / "train.json").write_text(json.dumps(entries))
    with pytest.raises(IclevrError, match="trained on other labels.*train-evaluator --data .* --force"):
        resolve_evaluator(None, root)


def _tiny_builtin_as_default(cache: Path) -> Path:
    """A tiny set where the CLI's default built-in set (6,003 scenes) is looked for: the CLI path
    without rendering 18,000 images."""
    from iclevr_diffusion.config import DataConfig
    from iclevr_diffusion.data.synthetic import COMPLETE, cached_root, make_dataset

    root = cached_root(DataConfig().synthetic_scenes)
    make_dataset(root, scenes=TINY_SCENES, workers=1, force=True)
    (root / COMPLETE).write_text("{}")
    return root


def test_evaluate_first_use_from_the_cli_logs_progress_without_a_terminal(builtin_cache, tmp_path):
    from conftest import draw_scene

    root = _tiny_builtin_as_default(builtin_cache)
    images = tmp_path / "imgs"
    images.mkdir()
    for i, labels in enumerate(load_conditions("test")):
        draw_scene(labels).save(images / f"{i}.png")
    args = ["evaluate", "--images", str(images), "--split", "test", "--out", str(tmp_path / "out")]
    result = runner.invoke(app, args)  # CliRunner's stderr is no terminal, as in a log file
    assert result.exit_code == 0, result.output
    log = result.stderr
    assert "No evaluator for it yet: training its own small CNN once" in log
    assert "evaluator: epoch 1/1 done, loss " in log and " images/s, " in log and " left" in log
    assert (root / "evaluator" / "checkpoint.pth").is_file()
    # The result table keeps whole headers in a log (rich would squeeze it to 80 columns: "accur…").
    assert "…" not in result.stdout
    for header in ("accuracy", "evaluator", "guidance", "seconds"):
        assert header in result.stdout
    assert "own small CNN" in result.stdout and "evaluator: own small CNN trained on built-in" in result.stdout

    again = runner.invoke(app, [*args, "--json"])
    assert again.exit_code == 0, again.output
    assert "evaluator: epoch" not in again.stderr  # cached: not trained again
    assert json.loads(again.stdout)["evaluator"]["arch"] == SMALL_CNN


def test_train_evaluator_cli_arch_choice(builtin_cache):
    root = _tiny_builtin_as_default(builtin_cache)
    result = runner.invoke(app, ["train-evaluator", "--json", "-q"])  # built-in set: the small CNN by default
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    assert card["arch"] == SMALL_CNN and card["checkpoint"] == str(root / "evaluator" / "checkpoint.pth")
    table = runner.invoke(app, ["train-evaluator"])  # cached: its card as a table
    assert table.exit_code == 0 and "Own small CNN evaluator (cached)" in table.stdout
    assert "GFLOP per image" in table.stdout

    # --arch resnet18 is not satisfied by the cached small CNN: it trains the course's architecture.
    result = runner.invoke(app, ["train-evaluator", "--arch", "resnet18", "--batch-size", "4", "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["arch"] == RESNET18
    assert set(torch.load(root / "evaluator" / "checkpoint.pth", weights_only=True)) == {"model"}
    bad = runner.invoke(app, ["train-evaluator", "--arch", "vgg", "--force"])  # a click choice: a usage error
    assert bad.exit_code == 2 and "'vgg'" in bad.output and RESNET18 in bad.output and SMALL_CNN in bad.output


def test_plain_progress_lines_and_wide_tables():
    from rich.console import Console

    from iclevr_diffusion.workflows import console
    from iclevr_diffusion.workflows.train_evaluator import evaluator_progress

    buf = io.StringIO()
    original = console.err.file
    console.err.file = buf  # a file: no terminal
    try:
        with evaluator_progress(quiet=False, log_every=0.0) as report:
            report("precision", 0, None, fp32_images_per_s=1000.0, bf16_images_per_s=1800.0, batch=32, choice="bf16")
            report("training", 5, 40, epoch=1, epochs=8, loss=0.25, images_per_s=900.0, eta_s=75.0)
            report("epoch done", 1, 8, heldout_accuracy=0.5, loss=0.2, images_per_s=900.0, eta_s=3725.0, seconds=9.0)
        with console.progress_bar("rendering", 10, log_every=0.0) as advance:
            advance(5)
            advance(5)
    finally:
        console.err.file = original
    lines = buf.getvalue().splitlines()
    assert lines[0] == "evaluator: timed fp32 1000 images/s, bf16 autocast 1800 images/s -> bf16"
    assert lines[1] == "evaluator: epoch 1/8, step 5/40, loss 0.2500, 900 images/s, about 1m 15s left"
    assert lines[2] == ("evaluator: epoch 1/8 done, loss 0.2000, held-out accuracy 50.00%, 900 images/s, "
                        "9s so far, about 1h 02m left")
    assert lines[3].startswith("rendering: 5/10, ") and "left" in lines[3]
    assert lines[4].startswith("rendering: 10/10, ") and "done in" in lines[4]

    out = Console(file=io.StringIO(), width=80, soft_wrap=True)  # as console.out
    cols = ["split", "images", "labels", "accuracy", "evaluator", "sampler", "steps", "guidance", "seconds"]
    out.print(console.table("t", cols, [["new_test", 32, 84, "54.76% ± 1.23% (3 seeds)", "own small CNN",
                                         "ddim", 25, 3.0, 123.4]]))
    text = out.file.getvalue()
    assert "…" not in text and "54.76% ± 1.23% (3 seeds)" in text and all(c in text for c in cols)
