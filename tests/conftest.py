"""Shared fixtures: a tiny dataset in the real i-CLEVR layout, written with PIL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from iclevr_diffusion.labels import LABEL_INDEX

# Never let a test render the full built-in dataset into the user's cache.
os.environ.setdefault("ICLEVR_CACHE_DIR", str(Path(__file__).parent / ".cache-do-not-use"))
# The tests' models are tiny: one thread is as fast as two, and far faster when the cores are busy.
torch.set_num_threads(1)

COLOURS = {
    "gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
    "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51),
}


def draw_scene(labels: list[str], size: tuple[int, int] = (80, 60)):
    """A flat stand-in for an i-CLEVR image: coloured squares, discs and bars on gray."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(img)
    w, h = size
    for i, label in enumerate(labels):
        colour, shape = label.split()
        x0, y0 = 5 + i * w // 3, h // 3
        box = (x0, y0, x0 + w // 5, y0 + h // 3)
        fill = COLOURS[colour]
        if shape == "cube":
            draw.rectangle(box, fill=fill)
        elif shape == "sphere":
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle((box[0] + 3, box[1], box[2] - 3, box[3]), fill=fill)
    return img


def write_dataset(root: Path, entries: dict[str, list[str]], size=(80, 60), images_dir: str = "iclevr") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / images_dir).mkdir(exist_ok=True)
    for name, labels in entries.items():
        draw_scene(labels, size).save(root / images_dir / name)
    (root / "train.json").write_text(json.dumps(entries))
    (root / "objects.json").write_text(json.dumps(LABEL_INDEX))
    return root


TINY_ENTRIES = {
    "CLEVR_train_000000_0.png": ["red cube"],
    "CLEVR_train_000000_1.png": ["red cube", "cyan sphere"],
    "CLEVR_train_000000_2.png": ["red cube", "cyan sphere", "yellow cylinder"],
    "CLEVR_train_000001_0.png": ["gray sphere"],
    "CLEVR_train_000001_1.png": ["gray sphere", "blue cube"],
    "CLEVR_train_000001_2.png": ["gray sphere", "blue cube", "green cylinder"],
}


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Six images (two scenes x 1-2-3 objects) in the real layout: ROOT/train.json, objects.json, iclevr/."""
    return write_dataset(tmp_path / "iclevr-data", TINY_ENTRIES)
