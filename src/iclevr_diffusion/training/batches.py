"""Training data for the loop: the dataset (real or built-in synthetic), decoded images kept in memory,
and a seeded, resumable batch order split across processes.

The order of epoch e is a permutation drawn from a generator seeded with (seed, e), so it depends on
nothing else: a resumed run re-creates it and skips to the saved batch. Every global batch is split
into equal per-process slices (accelerate-style data parallelism without a sharded DataLoader).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from iclevr_diffusion.config import Config
from iclevr_diffusion.errors import IclevrError


class CachedImages:
    """Wraps ICLEVRDataset: each image is decoded and resized once, then kept as uint8 (exact, 4x smaller).

    PNG decoding and resizing of the full 320x240 frames costs about as much as a training step of
    a small model on a CPU; after the first epoch it costs nothing.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.root = dataset.root  # the evaluator lookup (DATA_ROOT/checkpoint.pth) needs it
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        hit = self.cache.get(index)
        if hit is None:
            image, label = self.dataset[index]
            # ToTensor + Normalize(0.5, 0.5) maps byte u to u / 127.5 - 1, so this round-trip is exact.
            hit = (((image + 1) * 127.5).round().to(torch.uint8), label)
            self.cache[index] = hit
        return hit[0].float() / 127.5 - 1, hit[1]


def build_dataset(
    cfg: Config,
    note: Callable[[str], None] | None = None,
    render: Callable[[int, int], None] | None = None,  # render(images done, total) on first use
):
    """cfg.data.root, or the built-in synthetic set (rendered on first use) when it is None."""
    from iclevr_diffusion.data.iclevr import ICLEVRDataset

    root = cfg.data.root
    if root is None:
        from iclevr_diffusion.data.synthetic import COMPLETE, cached_root, default_dataset_root, planned_images

        scenes = cfg.data.synthetic_scenes
        if note:
            fresh = not (cached_root(scenes) / COMPLETE).is_file()
            first = ": rendering it once (about half a minute on 2 cores)" if fresh else ""
            note(f"built-in synthetic dataset, {scenes} scenes{first}")
        total, done = planned_images(scenes), [0]

        def tick(n: int) -> None:
            done[0] += n
            if render:
                render(done[0], total)

        root = default_dataset_root(scenes, progress=tick)
    # Flips are applied by the loop from its own generator (resumable), never inside the dataset.
    dataset = ICLEVRDataset(root, cfg.data.image_size, cfg.data.resize, cfg.data.images)
    return CachedImages(dataset)


class BatchOrder:
    """Global batches of `batch` indices over `n` items; the last partial batch of an epoch is dropped."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self.batches_per_epoch = n // batch

    def epoch(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        return perm[: self.batches_per_epoch * self.batch].view(self.batches_per_epoch, self.batch)


def batches(
    dataset, order: BatchOrder, epoch: int, start: int, rank: int = 0, world: int = 1, num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's slices of the epoch's batches from batch index `start` on."""
    plan = order.epoch(epoch)[start:]
    per = order.batch // world
    index_lists = [row[rank * per : (rank + 1) * per].tolist() for row in plan]
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=index_lists, num_workers=num_workers)
        yield from loader
        return
    for idx in index_lists:
        items = [dataset[i] for i in idx]
        yield torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def micro_batch(batch_size: int, grad_accum: int, world: int) -> int:
    """Images per process per forward pass: train.batch_size split over accumulation and processes."""
    per = batch_size // (grad_accum * world)
    if per * grad_accum * world != batch_size:
        raise IclevrError(
            f"train.batch_size={batch_size} must be divisible by train.grad_accum={grad_accum} x {world} "
            "process(es); change train.batch_size."
        )
    return per


def augment(images, labels, cfg: Config, gen: torch.Generator, device):
    """data.hflip flips, drawn from the run's generator so they resume exactly; channels_last; to device."""
    if cfg.data.hflip:
        flip = torch.rand(images.shape[0], generator=gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
