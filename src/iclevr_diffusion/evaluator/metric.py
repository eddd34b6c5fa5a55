"""The accuracy metric of the multi-label evaluators, and images to score.

The course's score: for an image with k true labels take the k highest outputs of the evaluator and
count the true ones; accuracy = all hits / all k over the whole set (a micro average; extra objects
cost nothing). The networks and their files are in networks.py (their names are re-exported here,
for scripts that imported them from the metric's module); which evaluator scores a set: choice.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.evaluator.networks import (  # noqa: F401  (re-exported, see the module notes)
    ARCH_DESCRIPTIONS,
    ARCH_NAMES,
    ARCHS,
    CARD_NAME,
    IMAGE_SIZE,
    OFFICIAL_NAME,
    OWN_DIR,
    RESNET18,
    SMALL_CNN,
    SmallCNN,
    arch_of,
    build_evaluator,
    card_arch,
    describe,
    flops_per_image,
    is_builtin_synthetic,
    load_checkpoint,
    load_evaluator,
    load_state_dict,
    own_evaluator_path,
    parameter_count,
    read_card,
    save_checkpoint,
)
from iclevr_diffusion.labels import COLORS, LABELS, NUM_CLASSES, SHAPES

# ---------------------------------------------------------------------------------------------
# The metric


def top_k_hits(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, C) bool: class c counted as a hit for image i (c is true and among i's k highest outputs).

    k is the number of true labels of each image. Ties between equal outputs go to the lower class
    index (a stable sort), so a score never depends on the order torch happens to return ties in.
    """
    if outputs.shape != targets.shape or outputs.dim() != 2:
        raise IclevrError(f"Outputs {tuple(outputs.shape)} and labels {tuple(targets.shape)} must both be (N, 24).")
    outputs = outputs.detach().float().cpu()
    truth = targets.detach().cpu() > 0.5
    k = truth.sum(dim=1)
    order = torch.sort(outputs, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(outputs.shape[1]).expand_as(order).contiguous())
    return truth & (rank < k.unsqueeze(1))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The course's score: hits in each image's top-k outputs / total k, over the whole set."""
    hits = top_k_hits(outputs, targets)
    total = int((targets > 0.5).sum())
    if total == 0:
        raise IclevrError("No true labels to score: every condition is empty.")
    return int(hits.sum()) / total


@dataclass
class Score:
    """What one scored image set yields: the accuracy and where the misses are."""

    accuracy: float
    hits: int
    labels: int
    images: int
    per_image: list[tuple[int, int]] = field(repr=False)  # (hits, k) of each image, in order
    per_class: dict[str, tuple[int, int]] = field(repr=False)  # name -> (hits, times asked for)

    def group_rates(self, names: Sequence[str]) -> dict[str, float | None]:
        """Hit rate per colour or per shape (None where no image asks for it)."""
        out = {}
        for name in names:
            got = [v for k, v in self.per_class.items() if name in k.split()]
            total = sum(t for _, t in got)
            out[name] = sum(h for h, _ in got) / total if total else None
        return out

    def to_dict(self) -> dict:
        rate = {k: (h / t if t else None) for k, (h, t) in self.per_class.items()}
        return {
            "accuracy": self.accuracy,
            "hits": self.hits,
            "labels": self.labels,
            "images": self.images,
            "per_class": {k: {"hits": h, "total": t, "rate": rate[k]} for k, (h, t) in self.per_class.items() if t},
            "per_color": {k: v for k, v in self.group_rates(COLORS).items() if v is not None},
            "per_shape": {k: v for k, v in self.group_rates(SHAPES).items() if v is not None},
        }


def score_outputs(outputs: torch.Tensor, targets: torch.Tensor) -> Score:
    hits = top_k_hits(outputs, targets)
    truth = targets.cpu() > 0.5
    per_image = [(int(h), int(k)) for h, k in zip(hits.sum(1), truth.sum(1), strict=True)]
    per_class = {LABELS[c]: (int(hits[:, c].sum()), int(truth[:, c].sum())) for c in range(NUM_CLASSES)}
    total = int(truth.sum())
    if total == 0:
        raise IclevrError("No true labels to score: every condition is empty.")
    return Score(int(hits.sum()) / total, int(hits.sum()), total, len(per_image), per_image, per_class)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 24) sigmoid outputs for (N, 3, H, W) images in [-1, 1]; other sizes are resized to 64x64."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise IclevrError(f"Images must be (N, 3, H, W), got {tuple(images.shape)}.")
    device = next(model.parameters()).device
    outs = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device, torch.float32)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        outs.append(model(x).float().cpu())
    return torch.cat(outs)


def score_images(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> Score:
    """Score (N, 3, H, W) images in [-1, 1] against (N, 24) multi-hot labels."""
    if len(images) != len(targets):
        raise IclevrError(f"{len(images)} images but {len(targets)} label lists; they must match one to one.")
    return score_outputs(predict(model, images, batch_size), targets)


# ---------------------------------------------------------------------------------------------
# Images on disk and which evaluator to use


def load_image_folder(folder: str | Path, count: int) -> torch.Tensor:
    """(count, 3, 64, 64) in [-1, 1] from FOLDER/0.png ... FOLDER/{count-1}.png (any size or mode)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor, resize

    folder = Path(folder)
    if not folder.is_dir():
        raise IclevrError(f"--images {folder} is not a folder.")
    for i in range(count):
        if not (folder / f"{i}.png").is_file():
            raise IclevrError(
                f"{folder / f'{i}.png'} is missing: --images needs 0.png ... {count - 1}.png, one per condition."
            )
    out = []
    for i in range(count):
        path = folder / f"{i}.png"
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # RGBA, grayscale and palette images become RGB
        except (UnidentifiedImageError, OSError) as e:
            raise IclevrError(f"Cannot read image {path}: {e}.") from None
        x = pil_to_tensor(img)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = resize(x, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)
        out.append(x)
    return torch.stack(out).float() / 127.5 - 1.0



def scored_grid(images: torch.Tensor, per_image: Sequence[tuple[int, int]], nrow: int = 8):
    """PIL grid of (N, 3, H, W) images in [-1, 1], 8 per row, each framed by its score:
    green = every asked-for object found, orange = some, red = none."""
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    colors = {"all": (0.1, 0.8, 0.2), "some": (1.0, 0.6, 0.0), "none": (0.9, 0.1, 0.1)}
    framed = []
    for x, (hits, k) in zip(images.float().cpu(), per_image, strict=True):
        rgb = colors["all" if hits == k else "some" if hits else "none"]
        frame = torch.tensor(rgb).view(3, 1, 1).expand(3, x.shape[1] + 4, x.shape[2] + 4).clone()
        frame[:, 2:-2, 2:-2] = (x.clamp(-1, 1) + 1) / 2
        framed.append(frame)
    grid = make_grid(torch.stack(framed), nrow=nrow, padding=2, pad_value=1.0)
    return to_pil_image(grid)

