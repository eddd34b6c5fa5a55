"""The small-CNN evaluator shipped as package data (evaluator_shipped.py): it fits the built-in set as
this version renders it, it recognises freshly rendered scenes, and the first-use path installs it
(seconds, no training) only for data it fits and only when it scores well there."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from iclevr_diffusion.config import DataConfig
from iclevr_diffusion.data.synthetic import label_files, make_dataset
from iclevr_diffusion.evaluator import training as evaluator_training
from iclevr_diffusion.evaluator.choice import ensure_evaluator
from iclevr_diffusion.evaluator.metric import SMALL_CNN, build_evaluator, load_evaluator, save_checkpoint, score_images
from iclevr_diffusion.evaluator.shipped import SHIPPED_MIN_ACCURACY, install_shipped, shipped_evaluator
from iclevr_diffusion.evaluator.training import cached_card, fingerprint, load_labelled, pixels_to_float
from iclevr_diffusion.io import write_json

HELDOUT_SCENES = 40  # the built-in set's first 40 held-out scenes: 120 images, 240 labels


def test_label_files_are_what_make_dataset_writes(tmp_path):
    make_dataset(tmp_path, scenes=4, heldout=2, workers=1)
    expected = label_files(4, heldout=2)
    assert json.loads((tmp_path / "train.json").read_text()) == expected["train"]
    assert json.loads((tmp_path / "heldout.json").read_text()) == expected["heldout"]


def test_shipped_evaluator_fits_the_builtin_set(tmp_path):
    """If the built-in set's labels change (a renderer or sampling change), the shipped weights no
    longer fit it and every newcomer would train for minutes again: retrain and ship them
    (benchmarks/evaluator.py --ship)."""
    files = label_files(DataConfig().synthetic_scenes)
    for split, labels in files.items():
        write_json(tmp_path / f"{split}.json", labels, indent=None)  # as make_dataset writes them
    _, card = shipped_evaluator()
    assert card["arch"] == SMALL_CNN and card["fingerprint"] == fingerprint(tmp_path)
    assert card["heldout_accuracy"] >= 0.99 and card["images"] == 3 * DataConfig().synthetic_scenes


def _heldout_only(root: Path) -> Path:
    """The built-in set's first HELDOUT_SCENES held-out scenes rendered into ROOT (one training scene)."""
    make_dataset(root, scenes=1, heldout=HELDOUT_SCENES, workers=1)
    return root


def test_shipped_weights_recognise_freshly_rendered_scenes(tmp_path):
    root = _heldout_only(tmp_path / "data")
    _, pics, targets = load_labelled(root, "heldout.json")
    checkpoint, _ = shipped_evaluator()
    held = score_images(load_evaluator(checkpoint), pixels_to_float(pics), targets)
    assert held.accuracy >= SHIPPED_MIN_ACCURACY, held.accuracy


def _shipped_for(root: Path, checkpoint: Path | None = None) -> tuple[Path, dict]:
    """The packaged evaluator (or CHECKPOINT) with a card that says it was trained on ROOT's labels."""
    packaged, card = shipped_evaluator()
    return checkpoint or packaged, {**card, "fingerprint": fingerprint(root)}


def test_first_use_installs_the_shipped_evaluator_where_it_fits(tmp_path):
    root = _heldout_only(tmp_path / "data")
    stages = []
    card = ensure_evaluator(root, progress=lambda stage, *a, **k: stages.append(stage), shipped=_shipped_for(root))
    assert card["source"] == "shipped" and "training" not in stages
    assert card["heldout_accuracy"] >= SHIPPED_MIN_ACCURACY and card["root"] == str(root.resolve())
    installed = Path(card["checkpoint"])
    assert installed.read_bytes() == shipped_evaluator()[0].read_bytes()
    # Reused after that: the cached card, nothing installed or trained again.
    mtime = installed.stat().st_mtime_ns
    again = ensure_evaluator(root, progress=lambda stage, *a, **k: stages.append(f"again {stage}"))
    assert again["checkpoint"] == str(installed) and installed.stat().st_mtime_ns == mtime
    assert not any(s.startswith("again") for s in stages)


def test_shipped_evaluator_is_refused_for_other_data_and_a_bad_score(tmp_path, monkeypatch):
    monkeypatch.setitem(evaluator_training.TRAINING_DEFAULTS, SMALL_CNN, {"epochs": 1, "batch_size": 4, "lr": 1e-2})
    other = _heldout_only(tmp_path / "other")
    # Other labels than the card's: not installed; ensure_evaluator trains its own instead.
    packaged = shipped_evaluator()
    assert install_shipped(other, shipped=packaged) is None
    card = ensure_evaluator(other, shipped=packaged, arch=SMALL_CNN)
    assert "source" not in card and card["epochs"] == 1 and cached_card(other) is not None
    # The right labels but a network that cannot score them (random weights): not installed either.
    root = _heldout_only(tmp_path / "data")
    torch.manual_seed(0)
    save_checkpoint(build_evaluator(SMALL_CNN).eval(), tmp_path / "random.pth")
    assert install_shipped(root, shipped=_shipped_for(root, tmp_path / "random.pth")) is None
    assert not (root / "evaluator").exists()
