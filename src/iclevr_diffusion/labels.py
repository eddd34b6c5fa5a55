"""The 24 i-CLEVR classes and parsing of user label lists into multi-hot vectors.

The class order is the one in the course's objects.json (shipped as package data), so a multi-hot
vector made here means the same thing to the official evaluator.
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources

from iclevr_diffusion.errors import IclevrError

COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
SHAPES = ("cube", "sphere", "cylinder")
# The real data never has more than three objects in one image; the model can be asked for more,
# but it has never seen such scenes, so we warn rather than refuse.
MAX_OBJECTS = 3


def packaged_file(name: str):
    """Path-like handle of a condition file shipped with the package (objects/test/new_test.json)."""
    return resources.files("iclevr_diffusion.data").joinpath("files", name)


@lru_cache(maxsize=1)
def _objects() -> dict[str, int]:
    return json.loads(packaged_file("objects.json").read_text())


def label_names() -> tuple[str, ...]:
    """The class names in index order ('gray cube', 'red cube', ...)."""
    objects = _objects()
    return tuple(sorted(objects, key=objects.__getitem__))


LABELS: tuple[str, ...] = label_names()
NUM_CLASSES = len(LABELS)
LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(LABELS)}


def normalize(name: str) -> str:
    """'  Red   SPHERE ' -> 'red sphere' (case and spacing are forgiven)."""
    return " ".join(name.strip().lower().split())


def suggest(name: str, choices: Iterable[str] = LABELS) -> str:
    """A 'Did you mean ...?' tail for an unknown label, or a pointer to the list of labels."""
    close = difflib.get_close_matches(normalize(name), list(choices), n=1, cutoff=0.5)
    if close:
        return f"Did you mean '{close[0]}'?"
    return "Run 'iclevr-diff labels' to see the 24 valid names."


def check_label(name: str, where: str = "") -> str:
    """Normalise one label and make sure it is one of the 24 classes."""
    norm = normalize(name)
    if norm not in LABEL_INDEX:
        place = f" in {where}" if where else ""
        raise IclevrError(f"Unknown label '{name.strip()}'{place}. {suggest(name)}")
    return norm


def parse_labels(
    spec: str | Sequence[str], where: str = "", max_objects: int = MAX_OBJECTS
) -> list[str]:
    """Parse "red sphere,cyan cube" (or a list of names) into normalised, validated label names.

    Empty lists and duplicates are errors; more objects than `max_objects` only warn.
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    place = f" in {where}" if where else ""
    names = [check_label(p, where) for p in parts if p.strip()]
    if not names:
        raise IclevrError(
            f"Empty label list{place}. Give one to three objects, e.g. \"red sphere,cyan cube\"."
        )
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise IclevrError(
                f"Label '{name}' appears twice{place}; each class can be asked for only once."
            )
        seen.add(name)
    if len(names) > max_objects:
        warnings.warn(
            f"{len(names)} objects asked for{place}, but i-CLEVR scenes hold at most "
            f"{max_objects}; the model has never seen such scenes.",
            stacklevel=2,
        )
    return names


def to_multi_hot(names: Sequence[str]) -> list[float]:
    """Multi-hot vector (length 24) of already-validated label names."""
    vec = [0.0] * NUM_CLASSES
    for name in names:
        vec[LABEL_INDEX[normalize(name)]] = 1.0
    return vec


def from_multi_hot(vec: Sequence[float], threshold: float = 0.5) -> list[str]:
    """The names whose entries are above `threshold` (the inverse of `to_multi_hot`)."""
    return [LABELS[i] for i, v in enumerate(vec) if float(v) > threshold]


def multi_hot_batch(conditions: Sequence[Sequence[str]]):
    """(N, 24) float tensor for a list of label lists."""
    import torch

    return torch.tensor([to_multi_hot(c) for c in conditions], dtype=torch.float32)
