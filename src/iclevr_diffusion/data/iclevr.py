"""The i-CLEVR dataset as the course ships it, and the condition files test.json / new_test.json.

Layout read here (the real one, and what `make-data` writes):

    ROOT/train.json      {"CLEVR_train_001032_0.png": ["yellow sphere"], ...}
    ROOT/objects.json    {"gray cube": 0, ...}   (optional; must match the 24 classes if present)
    ROOT/iclevr/*.png    the images (or ROOT/images/, ROOT itself, a sibling ROOT/../iclevr/, or --images)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.labels import LABEL_INDEX, packaged_file, parse_labels, to_multi_hot

SPLITS = ("test", "new_test")  # the course's condition files, for reporting
VALIDATION = "val"  # our packaged validation conditions, for choosing recipes (data/synthetic.validation_conditions)


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file, turning every failure into a one-line error that names the file."""
    if not path.is_file():
        raise IclevrError(f"{what} not found: {path}.")
    try:
        text = path.read_text()
    except OSError as e:
        raise IclevrError(f"Cannot read {path}: {e.strerror}.") from None
    if not text.strip():
        raise IclevrError(f"{path} is empty; it should hold the {what}.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise IclevrError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}.") from None


def load_conditions(split: str | None = None, file: str | Path | None = None) -> list[list[str]]:
    """Label lists of a packaged split ('test', 'new_test', 'val') or of a user's condition file."""
    if (split is None) == (file is None):
        raise IclevrError("Give either a split (--split test|new_test|val) or a condition file (--conditions).")
    if split is not None:
        if split not in (*SPLITS, VALIDATION):
            raise IclevrError(f"Unknown split '{split}'; choose one of: {', '.join((*SPLITS, VALIDATION))}.")
        path = Path(str(packaged_file(f"{split}.json")))
    else:
        path = Path(file)
    data = read_json(path, "condition file")
    if not isinstance(data, list) or not data:
        raise IclevrError(
            f"{path} must be a non-empty JSON list of label lists, e.g. [[\"red sphere\", \"cyan cube\"]]."
        )
    conditions = []
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            entry = [entry]
        if not isinstance(entry, list) or not all(isinstance(x, str) for x in entry):
            raise IclevrError(f"{path} entry {i} must be a list of label names, got {entry!r}.")
        conditions.append(parse_labels(entry, where=f"{path.name} entry {i}"))
    return conditions


def check_objects_file(root: Path) -> None:
    """A dataset's objects.json, when present, must be the 24 classes in the course's order."""
    path = root / "objects.json"
    if not path.exists():
        return
    objects = read_json(path, "objects.json")
    if objects != LABEL_INDEX:
        raise IclevrError(
            f"{path} does not match the 24 i-CLEVR classes in the course's order "
            "(see 'iclevr-diff labels'); this toolkit's models and evaluator use that order."
        )


def find_images_dir(root: Path, names: Sequence[str], images: str | Path | None = None) -> Path:
    """Where the PNGs named in train.json live: --images, else ROOT/iclevr, ROOT/images, ROOT, ../iclevr."""
    if images is not None:
        candidates = [Path(images)]
        if not candidates[0].is_dir():
            raise IclevrError(f"--images {images} is not a folder.")
    else:
        candidates = [root / "iclevr", root / "images", root, root.parent / "iclevr"]
    probe = names[0]
    for folder in candidates:
        if (folder / probe).is_file():
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise IclevrError(
        f"Image '{probe}' listed in train.json was not found in: {tried}. Point --images at the PNG folder."
    )


class ICLEVRDataset:
    """(image in [-1, 1] of shape (3, S, S), multi-hot label of shape (24,)) pairs from train.json.

    A torch `Dataset` by duck typing (len and getitem); torch is imported only when it is built.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 64,
        resize: str = "squash",
        images: str | Path | None = None,
        labels_file: str = "train.json",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise IclevrError(f"Dataset folder {self.root} does not exist; pass the i-CLEVR folder with --data.")
        meta = read_json(self.root / labels_file, labels_file)
        if not isinstance(meta, dict) or not meta:
            raise IclevrError(
                f"{self.root / labels_file} must map image file names to label lists, "
                "e.g. {\"CLEVR_train_001032_0.png\": [\"yellow sphere\"]}."
            )
        check_objects_file(self.root)
        self.files = sorted(meta)
        self.labels = []
        for name in self.files:
            entry = meta[name]
            if not isinstance(entry, list):
                raise IclevrError(f"{labels_file} entry '{name}' must be a list of label names.")
            # Real data never exceeds 3 objects; a larger count is the user's own data, not an error.
            self.labels.append(parse_labels(entry, where=f"{labels_file} entry '{name}'", max_objects=99))
        self.images_dir = find_images_dir(self.root, self.files, images)
        missing = [f for f in self.files if not (self.images_dir / f).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise IclevrError(
                f"Image {self.images_dir / missing[0]}{more} listed in {labels_file} is missing."
            )
        if resize not in ("squash", "center_crop"):
            raise IclevrError(f"Unknown resize mode '{resize}'; use squash or center_crop.")
        self.image_size = image_size
        self.resize = resize
        self._transform = None

    def __len__(self) -> int:
        return len(self.files)

    def transform(self):
        if self._transform is None:
            from torchvision import transforms as T

            size = self.image_size
            steps = [T.Resize((size, size), antialias=True)]
            if self.resize == "center_crop":
                steps = [T.Resize(size, antialias=True), T.CenterCrop(size)]
            steps += [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
            self._transform = T.Compose(steps)
        return self._transform

    def load_image(self, index: int):
        from PIL import Image, UnidentifiedImageError

        path = self.images_dir / self.files[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")  # grayscale, RGBA and palette images all become RGB
        except (UnidentifiedImageError, OSError) as e:
            raise IclevrError(f"Cannot read image {path}: {e}. Replace or remove it from train.json.") from None

    def __getitem__(self, index: int):
        import torch

        image = self.transform()(self.load_image(index))
        label = torch.tensor(to_multi_hot(self.labels[index]), dtype=torch.float32)
        return image, label
