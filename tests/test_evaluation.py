"""The evaluator: the course's metric, its checkpoint format, safe loading, images from a folder."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.evaluator.choice import find_evaluator
from iclevr_diffusion.evaluator.metric import (
    accuracy,
    build_evaluator,
    load_evaluator,
    load_image_folder,
    score_outputs,
    scored_grid,
)
from iclevr_diffusion.labels import LABEL_INDEX, multi_hot_batch


def course_accuracy(out: torch.Tensor, onehot: torch.Tensor) -> float:
    """The course's compute_acc, written as it is in the original evaluator.py (one batch = whole set)."""
    acc, total = 0, 0
    for i in range(out.size(0)):
        k = int(onehot[i].sum().item())
        total += k
        _, outi = out[i].topk(k)
        _, li = onehot[i].topk(k)
        for j in outi:
            if j in li:
                acc += 1
    return acc / total


def outputs_for(scores: dict[str, float]) -> list[float]:
    row = [0.0] * 24
    for name, v in scores.items():
        row[LABEL_INDEX[name]] = v
    return row


def test_accuracy_hand_computed_k1_k2_k3():
    conds = [["red cube"], ["red cube", "blue sphere"], ["gray cube", "cyan cylinder", "yellow sphere"]]
    out = torch.tensor([
        outputs_for({"red cube": 0.9, "blue cube": 0.1}),  # k=1: hit
        outputs_for({"red cube": 0.8, "green cube": 0.7, "blue sphere": 0.6}),  # k=2: 1 of 2
        outputs_for({"gray cube": 0.9, "cyan cylinder": 0.8, "purple cube": 0.7, "yellow sphere": 0.6}),  # 2 of 3
    ])
    assert accuracy(out, multi_hot_batch(conds)) == pytest.approx(4 / 6)
    score = score_outputs(out, multi_hot_batch(conds))
    assert score.per_image == [(1, 1), (1, 2), (2, 3)]
    assert (score.hits, score.labels, score.images) == (4, 6, 3)
    assert score.per_class["blue sphere"] == (0, 1) and score.per_class["red cube"] == (2, 2)
    assert score.group_rates(["cube", "sphere", "cylinder"]) == {"cube": 1.0, "sphere": 0.0, "cylinder": 1.0}


def test_accuracy_is_a_micro_average_over_all_labels():
    conds = [["red cube"], ["gray cube", "cyan cylinder", "yellow sphere"]]
    out = torch.tensor([
        outputs_for({"red cube": 0.9}),
        outputs_for({"gray cube": 0.9, "red sphere": 0.8, "blue sphere": 0.7}),
    ])
    # 2 hits of 4 labels = 0.5; a mean of per-image scores would be (1 + 1/3) / 2.
    assert accuracy(out, multi_hot_batch(conds)) == 0.5


def test_extra_objects_are_not_penalised():
    # The image also shows a blue sphere (high output) that nobody asked for: only the top-k count.
    out = torch.tensor([outputs_for({"red cube": 0.99, "blue sphere": 0.95})])
    assert accuracy(out, multi_hot_batch([["red cube"]])) == 1.0
    out = torch.tensor([outputs_for({"red cube": 0.99, "cyan cube": 0.98, "blue sphere": 0.97})])
    assert accuracy(out, multi_hot_batch([["red cube", "cyan cube"]])) == 1.0


def test_ties_go_to_the_lower_class_index():
    # gray cube (0) and red cube (1) tie at 1.0 (a saturated sigmoid): k=1 takes index 0.
    out = torch.tensor([outputs_for({"gray cube": 1.0, "red cube": 1.0})] * 2)
    assert accuracy(out, multi_hot_batch([["gray cube"], ["red cube"]])) == 0.5
    # Ties among the true labels themselves cost nothing.
    out = torch.tensor([outputs_for({"gray cube": 1.0, "red cube": 1.0})])
    assert accuracy(out, multi_hot_batch([["gray cube", "red cube"]])) == 1.0


def test_matches_the_course_code_on_random_outputs():
    g = torch.Generator().manual_seed(0)
    names = list(LABEL_INDEX)
    conds = [[names[j] for j in torch.randperm(24, generator=g)[: 1 + i % 3]] for i in range(200)]
    out = torch.rand(200, 24, generator=g)
    target = multi_hot_batch(conds)
    assert accuracy(out, target) == pytest.approx(course_accuracy(out, target))
    assert 0.05 < accuracy(out, target) < 0.5


def _official_style_model(seed: int) -> torch.nn.Module:
    """A plain torchvision ResNet18 built the way the course's evaluator.py builds it."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, 24), torch.nn.Sigmoid())
    # Non-trivial BatchNorm statistics, so a lost buffer would show in the outputs.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_official_format_checkpoint_gives_identical_outputs(tmp_path):
    reference = _official_style_model(seed=3)
    torch.save({"model": reference.state_dict()}, tmp_path / "checkpoint.pth")
    loaded = load_evaluator(tmp_path / "checkpoint.pth")
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
    # A checkpoint saved from nn.DataParallel ('module.' prefixes) holds the same weights.
    wrapped = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"model": wrapped}, tmp_path / "dp.pth")
    with torch.no_grad():
        assert torch.equal(load_evaluator(tmp_path / "dp.pth")(x), reference(x))


def test_build_matches_the_course_layout():
    assert build_evaluator().state_dict().keys() == _official_style_model(0).state_dict().keys()


def test_checkpoint_without_model_key(tmp_path):
    torch.save({"state_dict": build_evaluator().state_dict()}, tmp_path / "c.pth")
    with pytest.raises(IclevrError, match="no 'model' key .*state_dict"):
        load_evaluator(tmp_path / "c.pth")


def test_checkpoint_with_wrong_shapes(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, 10), torch.nn.Sigmoid())
    torch.save({"model": model.state_dict()}, tmp_path / "c.pth")
    with pytest.raises(IclevrError, match=r"'fc.0.weight' has shape \(10, 512\), expected \(24, 512\)"):
        load_evaluator(tmp_path / "c.pth")
    torch.save({"model": torchvision.models.resnet18(weights=None).state_dict()}, tmp_path / "d.pth")
    with pytest.raises(IclevrError, match="missing keys .*unexpected keys"):
        load_evaluator(tmp_path / "d.pth")


class _Payload:
    """Unpickling this would create a folder: a stand-in for code a hostile checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": build_evaluator().state_dict(), "extra": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(IclevrError, match="Refusing to load .*could run code"):
        load_evaluator(tmp_path / "evil.pth")
    assert not marker.exists()


def test_broken_and_missing_checkpoints(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(IclevrError, match="junk.pth is not an official-format evaluator checkpoint"):
        load_evaluator(tmp_path / "junk.pth")
    with pytest.raises(IclevrError, match="does not exist"):
        load_evaluator(tmp_path / "nope.pth")
    with pytest.raises(IclevrError, match="--evaluator .*no such checkpoint"):
        find_evaluator(tmp_path / "nope.pth", None)


def test_evaluator_lookup_order(tmp_path):
    root = tmp_path / "data"
    (root / "evaluator").mkdir(parents=True)
    assert find_evaluator(None, root) is None
    (root / "evaluator" / "checkpoint.pth").write_bytes(b"x")
    assert find_evaluator(None, root).kind == "own"
    (root / "checkpoint.pth").write_bytes(b"x")
    assert find_evaluator(None, root).kind == "official"
    other = tmp_path / "mine.pth"
    other.write_bytes(b"x")
    choice = find_evaluator(other, root)
    assert (choice.kind, choice.path) == ("given", other)
    assert str(other) in choice.name


def test_image_folder_converts_modes_and_sizes(tmp_path):
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "0.png")
    Image.new("RGBA", (64, 64), (0, 0, 255, 128)).save(tmp_path / "1.png")
    Image.new("L", (32, 48), 255).save(tmp_path / "2.png")
    x = load_image_folder(tmp_path, 3)
    assert x.shape == (3, 3, 64, 64)
    assert x[0, :, 10, 10].tolist() == [1.0, -1.0, -1.0]
    assert x[1, :, 10, 10].tolist() == [-1.0, -1.0, 1.0]
    assert torch.allclose(x[2], torch.ones(3, 64, 64))
    with pytest.raises(IclevrError, match=r"3\.png is missing: --images needs 0\.png \.\.\. 4\.png"):
        load_image_folder(tmp_path, 5)


def test_scored_grid_has_eight_per_row():
    grid = scored_grid(torch.zeros(10, 3, 64, 64), [(1, 1)] * 5 + [(0, 2)] * 5)
    assert grid.size == (2 + 8 * (68 + 2), 2 + 2 * (68 + 2))
    assert grid.getpixel((3, 3)) == (25, 204, 51)  # green frame: all found
    assert grid.getpixel((2 + 5 * 70 + 1, 3)) == (229, 25, 25)  # red frame: none found


def test_builtin_synthetic_roots_are_recognised(tmp_path, monkeypatch):
    from iclevr_diffusion.evaluator.metric import is_builtin_synthetic

    monkeypatch.setenv("ICLEVR_CACHE_DIR", str(tmp_path / "cache"))
    assert is_builtin_synthetic(tmp_path / "cache" / "synthetic-v1-seed0-6003")
    assert not is_builtin_synthetic(tmp_path / "data")
    assert not is_builtin_synthetic(None)
