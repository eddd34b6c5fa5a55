"""The synthetic dataset: real on-disk layout, nested 1-2-3 scenes, balance, visibility,
determinism, argument errors, the cached built-in set and the make-data workflow."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from iclevr_diffusion.data import synthetic
from iclevr_diffusion.data.render import render_scenes
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.labels import LABEL_INDEX, LABELS, packaged_file

SCENES = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic.make_dataset(root, scenes=SCENES, size=16, seed=7, workers=1, heldout=2)
    return root


def read(root: Path, name: str):
    return json.loads((root / name).read_text())


def test_layout_matches_the_real_format(dataset: Path):
    train = read(dataset, "train.json")
    assert len(train) == 3 * SCENES
    assert all(re.fullmatch(r"CLEVR_train_\d{6}_[012]\.png", k) for k in train)
    assert all(isinstance(v, list) and all(label in LABEL_INDEX for label in v) for v in train.values())
    for name in ("objects.json", "test.json", "new_test.json"):
        assert read(dataset, name) == json.loads(packaged_file(name).read_text())
    for name in train:
        with Image.open(dataset / "iclevr" / name) as img:
            assert img.mode == "RGB" and img.size == (16, 16)
    heldout = read(dataset, "heldout.json")
    assert len(heldout) == 6 and all(k.startswith("CLEVR_heldout_") for k in heldout)
    assert all((dataset / "iclevr" / k).is_file() for k in heldout)
    assert not list(dataset.rglob("*.tmp"))


def test_scenes_are_nested_1_2_3(dataset: Path):
    train = read(dataset, "train.json")
    for i in range(SCENES):
        one, two, three = (train[synthetic.image_name("train", i, k)] for k in range(3))
        assert (len(one), len(two), len(three)) == (1, 2, 3)
        assert two[:1] == one and three[:2] == two  # same objects, in order of addition
        assert len(set(three)) == 3


def test_later_images_keep_the_objects_in_place():
    """Adding an object leaves the earlier ones where they were: their pixels keep their colour
    except where the new object hides or shadows them."""
    scene = synthetic.sample_scenes(3, [5])[0]
    result = render_scenes([scene[:1], scene[:2]], 32, masks=True)
    first = (result.masks[0, 0] == 1.0) & (result.masks[1, 1] == 0.0)
    assert first.sum() >= 10
    same = (result.images[0][first] == result.images[1][first]).all(1)
    assert same.mean() >= 0.8


def test_same_seed_same_bytes(dataset: Path, tmp_path: Path):
    again = tmp_path / "again"
    synthetic.make_dataset(again, scenes=SCENES, size=16, seed=7, workers=1, heldout=2)
    for path in sorted(dataset.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (again / path.relative_to(dataset)).read_bytes(), path


def test_another_seed_other_scenes(dataset: Path, tmp_path: Path):
    other = tmp_path / "other"
    synthetic.make_dataset(other, scenes=2, size=16, seed=8, workers=1, heldout=0)
    assert read(other, "train.json") != {k: v for k, v in read(dataset, "train.json").items() if "_00000" in k}
    assert not (other / "heldout.json").exists()


@pytest.mark.slow
def test_worker_count_does_not_change_bytes(dataset: Path, tmp_path: Path):
    two = tmp_path / "two"
    synthetic.make_dataset(two, scenes=SCENES, size=16, seed=7, workers=2, heldout=2)
    for name in read(dataset, "train.json"):
        assert (two / "iclevr" / name).read_bytes() == (dataset / "iclevr" / name).read_bytes()


def test_labels_are_balanced():
    counts, images = Counter(), Counter()
    for i in range(400):
        labels = synthetic.scene_labels(0, i)
        assert len(set(labels)) == 3
        counts.update(labels)
        for k in range(3):
            images.update(labels[: k + 1])
    assert set(counts) == set(LABELS)
    assert set(counts.values()) == {50}  # every group of 8 scenes deals all 24 classes once
    mean = sum(images.values()) / 24
    assert all(abs(c - mean) < 0.25 * mean for c in images.values())


def test_every_object_is_clearly_visible():
    scenes = synthetic.sample_scenes(11, range(24))
    result = render_scenes(scenes, 64, masks=True)
    pixels = result.masks.sum((2, 3))  # (scenes, 3) visible coverage in 64x64 pixels
    assert pixels.min() >= 12, pixels.min()
    assert result.visible_fraction.min() >= 0.6


def test_progress_reports_every_image(tmp_path: Path):
    seen = []
    summary = synthetic.make_dataset(tmp_path / "p", scenes=2, size=8, workers=1, heldout=1, progress=seen.append)
    assert sum(seen) == synthetic.planned_images(2, 1) == 9
    assert summary.images == 6 and summary.heldout_images == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scenes": 0}, "--scenes"),
        ({"scenes": -3}, "--scenes"),
        ({"scenes": "many"}, "--scenes"),
        ({"size": "big"}, "--size"),
        ({"size": "64x0"}, "--size"),
        ({"seed": -1}, "--seed"),
        ({"workers": -2}, "--workers"),
    ],
)
def test_bad_arguments_fail_clearly(tmp_path: Path, kwargs, message):
    args = {"scenes": 1, "size": 8, "workers": 1} | kwargs
    with pytest.raises(IclevrError, match=message):
        synthetic.make_dataset(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


def test_refuses_non_empty_folder_without_force(tmp_path: Path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(IclevrError, match="not empty.*--force"):
        synthetic.make_dataset(out, scenes=1, size=8, workers=1)
    synthetic.make_dataset(out, scenes=1, size=8, workers=1, force=True)
    assert (out / "train.json").is_file() and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(IclevrError, match="is a file"):
        synthetic.make_dataset(out / "notes.txt", scenes=1, size=8, workers=1)


def test_default_dataset_is_rendered_once_and_reused(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path / "cache"))
    stale = tmp_path / "cache" / f".{synthetic.cached_root(2).name}.tmp-99999"
    stale.mkdir(parents=True)  # left by an interrupted run
    root = synthetic.default_dataset_root(2, workers=1)
    assert root == synthetic.cached_root(2) and (root / synthetic.COMPLETE).is_file()
    assert len(read(root, "train.json")) == 6 and not stale.exists()
    with Image.open(next((root / "iclevr").glob("*.png"))) as img:
        assert img.size == (64, 64)

    def fail(*args, **kwargs):
        raise AssertionError("rendered twice")

    monkeypatch.setattr(synthetic, "make_dataset", fail)
    assert synthetic.default_dataset_root(2) == root


def test_interrupted_default_dataset_leaves_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path / "cache"))

    def interrupted(out, *args, progress=None, **kwargs):
        (Path(out) / "iclevr").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "make_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.default_dataset_root(3)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{synthetic.cached_root(3).name}.lock"]


def test_make_data_workflow_prints_a_summary(tmp_path: Path, capsys):
    from iclevr_diffusion.workflows import make_data

    make_data.run(out=tmp_path / "w", scenes=2, size="8", seed=0, workers=1, force=False, quiet=True)
    printed = capsys.readouterr().out
    assert re.search(r"Wrote 9 images .* images/s", printed.replace("\n", " ")), printed
    with pytest.raises(IclevrError, match="not empty"):
        make_data.run(out=tmp_path / "w", scenes=2, size="8", seed=0, workers=1, force=False, quiet=True)
