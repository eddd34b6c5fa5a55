"""Which evaluator scores a set, and getting one where there is none yet.

`find_evaluator`: --evaluator PATH, else DATA_ROOT/checkpoint.pth (where the course's file sits), else
the toolkit's own one trained on that dataset (DATA_ROOT/evaluator/checkpoint.pth). `resolve_evaluator`
also provides the built-in synthetic set's own evaluator on first use (`ensure_evaluator`: the shipped
one where it fits, shipped.py, else one trained there, training.py). Every reported
number carries the evaluator's name, so an official figure is never confused with one from our own network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.evaluator.networks import (
    OFFICIAL_NAME,
    arch_of,
    describe,
    load_evaluator,
    own_evaluator_path,
    read_card,
)
from iclevr_diffusion.evaluator.shipped import fits, install_shipped, shipped_evaluator
from iclevr_diffusion.evaluator.training import Progress, cached_card, fingerprint, train_evaluator


@dataclass
class EvaluatorChoice:
    path: Path
    kind: str  # "given" (--evaluator), "official" (DATA_ROOT/checkpoint.pth) or "own"
    name: str  # how reports name it
    arch: str | None = None  # "resnet18" or "small-cnn" once the checkpoint is read

    def to_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "name": self.name, "arch": self.arch}



def _trained_on_other_labels(checkpoint: Path, root: str | Path) -> bool:
    """Whether our own evaluator's card names a fingerprint of other labels than ROOT's (no card: can't say)."""
    card = read_card(checkpoint)
    return bool(card and card.get("fingerprint")) and card["fingerprint"] != fingerprint(Path(root))


def find_evaluator(evaluator: str | Path | None, data_root: str | Path | None) -> EvaluatorChoice | None:
    """--evaluator, else DATA_ROOT/checkpoint.pth, else DATA_ROOT/evaluator/checkpoint.pth; None if none."""
    if evaluator is not None:
        path = Path(evaluator)
        if path.is_dir():
            path = path / OFFICIAL_NAME
        if not path.is_file():
            raise IclevrError(f"--evaluator {evaluator}: no such checkpoint file.")
        return EvaluatorChoice(path, "given", describe(path, "given"))
    if data_root is None:
        return None
    for path, kind in ((Path(data_root) / OFFICIAL_NAME, "official"), (own_evaluator_path(data_root), "own")):
        if path.is_file():
            return EvaluatorChoice(path, kind, describe(path, kind))
    return None



def resolve_evaluator(
    evaluator: str | Path | None,
    data_root: str | Path | None,
    device: torch.device | str = "cpu",
    train_progress=None,  # evaluator_training progress(stage, done, total, **info) for a first-use training
    note=None,  # note(message): tells the user a first-use training starts
    synthetic_scenes: int = 6003,  # which built-in set data_root None means (cfg.data.synthetic_scenes)
) -> tuple[nn.Module, EvaluatorChoice]:
    """The evaluator network and its name: --evaluator, DATA_ROOT's checkpoint.pth, else our own.

    data_root None means the built-in synthetic set (rendered by then: whoever asks has trained or
    sampled on it); its own evaluator is trained once on first use and cached. For a user's dataset
    without any evaluator we stop and say how to get one rather than train for minutes unasked.
    """
    if evaluator is not None:
        choice = find_evaluator(evaluator, None)
        net = load_evaluator(choice.path, device)
        choice.arch = arch_of(net)
        return net, choice
    builtin = data_root is None
    if builtin:
        from iclevr_diffusion.data.synthetic import default_dataset_root

        data_root = default_dataset_root(synthetic_scenes)
    choice = find_evaluator(None, data_root)
    stale = choice is not None and choice.kind == "own" and _trained_on_other_labels(choice.path, data_root)
    if stale:
        if not builtin:
            raise IclevrError(
                f"The own evaluator {choice.path} was trained on other labels than {Path(data_root) / 'train.json'} "
                f"holds now; retrain it with 'iclevr-diff train-evaluator --data {data_root} --force'."
            )
        choice = None  # the built-in set's own evaluator: trained again below
    if choice is None:
        if not builtin:
            raise IclevrError(
                f"No evaluator for {data_root}: put the course's checkpoint.pth there, pass --evaluator PATH, "
                f"or train one with 'iclevr-diff train-evaluator --data {data_root}'."
            )
        if note is not None:
            why = "Its evaluator was trained on other labels" if stale else "No evaluator for it yet"
            how = ("installing the small CNN shipped for it, after it scores the held-out images here"
                   if fits(Path(data_root), shipped_evaluator()[1])
                   else "training its own small CNN once (a few minutes on a 2-core CPU; progress by epoch below)")
            note(f"Built-in synthetic data: {why}: {how}.")
        card = ensure_evaluator(data_root, progress=train_progress, device=device)
        path = Path(card["checkpoint"])
        choice = EvaluatorChoice(path, "own", describe(path, "own"))
    net = load_evaluator(choice.path, device)
    choice.arch = arch_of(net)
    return net, choice



def ensure_evaluator(root: str | Path, progress: Progress | None = None, shipped=None, **kwargs) -> dict:
    """The cached own evaluator of ROOT; on first use (missing or stale) the shipped one where it fits
    ROOT (shipped.py: seconds), else one trained on ROOT (minutes). kwargs go to train_evaluator."""
    root = Path(root)
    return (cached_card(root) or install_shipped(root, progress, shipped)
            or train_evaluator(root, progress=progress, **kwargs))
