"""Image tensors in [-1, 1] to PIL images, PNG files and grids (8 per row), always written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from iclevr_diffusion.io import save_image

GRID_COLUMNS = 8  # the course's grids show 8 images per row


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (..., 3, H, W) -> uint8 [0, 255], rounded (not truncated) so saving is exact."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(image: torch.Tensor):
    """One (3, H, W) image in [-1, 1] as an RGB PIL image."""
    from PIL import Image

    return Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy(), mode="RGB")


def grid(images: torch.Tensor, columns: int = GRID_COLUMNS, padding: int = 2) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> one (3, H', W') image in [-1, 1], `columns` per row."""
    from torchvision.utils import make_grid

    tiled = make_grid(images.detach().float().cpu(), nrow=columns, padding=padding, normalize=True, value_range=(-1, 1))
    return tiled * 2 - 1  # make_grid normalised to [0, 1]; the padding stays black


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Save one (3, H, W) image in [-1, 1] as a PNG, atomically."""
    save_image(to_pil(image), path)


def save_pngs(images: torch.Tensor, folder: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """Save (N, 3, H, W) images as folder/0.png, 1.png, ... (or `names`); returns the paths."""
    folder = Path(folder)
    names = names or [f"{i}.png" for i in range(len(images))]
    paths = [folder / name for name in names]
    for image, path in zip(images, paths, strict=True):
        save_png(image, path)
    return paths


def save_grid(images: torch.Tensor, path: str | Path, columns: int = GRID_COLUMNS) -> None:
    """Save (N, 3, H, W) images in [-1, 1] as one grid PNG, `columns` per row."""
    save_png(grid(images, columns), path)


def save_strip(frames: torch.Tensor, path: str | Path) -> None:
    """Save (F, 3, H, W) frames (e.g. the denoising process) as one row."""
    save_grid(frames, path, columns=len(frames))
