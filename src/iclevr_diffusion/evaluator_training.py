"""Training the toolkit's own ResNet18 evaluator where the course's checkpoint.pth is absent.

Same network as the official one (torchvision ResNet18, random init, fc = Linear(512, 24) + Sigmoid),
saved in the same format ({"model": state_dict}) to DATA_ROOT/evaluator/checkpoint.pth with a JSON
card next to it (dataset, epochs, images, held-out accuracy, date), so `evaluate` can name it.

Speed on a 2-core CPU: all images are decoded once into a uint8 tensor (64x64, 12 KB each, so the
18,009-image set is ~220 MB) and augmented on whole batches with tensor ops; the forward and backward
run under bf16 autocast where the CPU has bf16 instructions (2-core EPYC, quiet: 384 vs 279 images/s
for fp32; channels_last would add ~10% more; see BENCHMARKS.md). Augmentations keep the
labels true: horizontal flips (labels say nothing about left and right), shifts of a couple of pixels
(the renderer keeps objects clear of the border) and faint pixel noise (generated images are noisier
than rendered ones); never colour changes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from iclevr_diffusion import __version__
from iclevr_diffusion.data.iclevr import ICLEVRDataset
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.evaluation import (
    CARD_NAME,
    IMAGE_SIZE,
    OFFICIAL_NAME,
    build_evaluator,
    own_evaluator_path,
    score_images,
)
from iclevr_diffusion.io import atomic_path, write_json
from iclevr_diffusion.labels import to_multi_hot

HELDOUT_FILE = "heldout.json"  # labelled images the renderer keeps out of train.json
DEFAULT_EPOCHS = 8  # 99.3% held-out on the synthetic set; ~50-75 s per epoch on 2 CPU cores (BENCHMARKS.md)
DEFAULT_BATCH = 64
HOLDOUT_FRACTION = 0.05  # share of scenes held out of train.json when the dataset has no heldout.json

Progress = Callable[..., None]


def _decode(path: Path) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor, resize

    with Image.open(path) as img:
        x = pil_to_tensor(img.convert("RGB"))
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = resize(x, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)  # squash, as the course does
    return x


def load_labelled(
    root: Path, labels_file: str = "train.json", images: str | Path | None = None, workers: int = 2
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(file names, uint8 images (N, 3, 64, 64), multi-hot labels (N, 24)) of one label file."""
    ds = ICLEVRDataset(root, image_size=IMAGE_SIZE, images=images, labels_file=labels_file)
    paths = [ds.images_dir / f for f in ds.files]
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes outside the GIL
            pics = list(pool.map(_decode, paths))
    except OSError as e:
        raise IclevrError(f"Cannot read an image of {root / labels_file}: {e}.") from None
    targets = torch.tensor([to_multi_hot(x) for x in ds.labels], dtype=torch.float32)
    return list(ds.files), torch.stack(pics), targets


def _scene(name: str) -> str:
    """CLEVR_train_001032_2.png -> CLEVR_train_001032: the 1-, 2- and 3-object images of one scene."""
    stem = name.rsplit(".", 1)[0]
    head, _, tail = stem.rpartition("_")
    return head if head and tail.isdigit() else stem


def split_by_scene(files: list[str], fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held out), whole scenes at a time so no held-out scene is half seen in training."""
    def bucket(name: str) -> float:
        digest = hashlib.sha256(f"{seed}:{_scene(name)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    held = torch.tensor([bucket(f) < fraction for f in files])
    if held.all() or not held.any():  # tiny sets: keep at least one image on each side
        held = torch.zeros(len(files), dtype=torch.bool)
        held[-1] = True
    return (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 2, noise: float = 0.03) -> torch.Tensor:
    """Label-preserving augmentation of a float batch in [-1, 1]: flips, small shifts, faint noise."""
    n = len(x)
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift:
        padded = nn.functional.pad(x, (shift,) * 4, mode="replicate")
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + IMAGE_SIZE, dx[i] : dx[i] + IMAGE_SIZE] for i in range(n)])
    if noise:
        x = x + noise * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    return x


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def train_evaluator(
    root: str | Path,
    out: str | Path | None = None,  # checkpoint.pth path or folder; default ROOT/evaluator/checkpoint.pth
    images: str | Path | None = None,  # PNG folder when not ROOT/iclevr
    epochs: int | None = None,  # passes over train.json (default DEFAULT_EPOCHS)
    batch_size: int | None = None,  # images per step (default 64)
    lr: float = 2e-3,  # AdamW peak learning rate of the one-cycle schedule
    device: torch.device | str = "cpu",
    seed: int = 0,
    bf16: bool | None = None,  # autocast precision; None = bf16 (CPU with bf16 or CUDA), else fp32
    max_images: int | None = None,  # use only the first N training images (tests, smoke runs)
    progress: Progress | None = None,  # called as progress(stage, done, total, **info)
    init: str | Path | None = None,  # continue from this official-format checkpoint instead of random init
) -> dict:
    """Train, evaluate on held-out labelled images, save checkpoint + card; returns the card."""
    root = Path(root)
    device = torch.device(device)
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    batch_size = batch_size or DEFAULT_BATCH
    if epochs < 1 or batch_size < 1:
        raise IclevrError("--epochs and --batch-size must be at least 1.")
    report = progress or (lambda *a, **k: None)
    started = time.perf_counter()
    torch.manual_seed(seed)

    report("loading images", 0, None)
    files, pics, targets = load_labelled(root, "train.json", images)
    if (root / HELDOUT_FILE).is_file():
        _, held_pics, held_targets = load_labelled(root, HELDOUT_FILE, images)
        heldout_source = HELDOUT_FILE
    else:
        train_idx, held_idx = split_by_scene(files, HOLDOUT_FRACTION, seed)
        held_pics, held_targets = pics[held_idx], targets[held_idx]
        pics, targets = pics[train_idx], targets[train_idx]
        heldout_source = f"{HOLDOUT_FRACTION:.0%} of train.json scenes"
    if max_images:
        pics, targets = pics[:max_images], targets[:max_images]

    model = build_evaluator()
    previous = None
    if init is not None:
        from iclevr_diffusion.evaluation import load_state_dict, read_card

        model.load_state_dict(load_state_dict(init))
        previous = read_card(Path(init)) or {}
        previous = {"checkpoint": str(init), "epochs": previous.get("epochs"), "lr": previous.get("lr"),
                    "heldout_accuracy": previous.get("heldout_accuracy")}
    model = model.to(device)
    use_bf16 = default_bf16(device) if bf16 is None else bf16
    steps_per_epoch = math.ceil(len(pics) / batch_size)
    total_steps = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    # Train on logits (BCE-with-logits is the stable form); the Sigmoid has no weights, so the
    # saved state dict is exactly the official layout.
    sigmoid, model.fc[1] = model.fc[1], nn.Identity()
    model.train()
    step = 0
    loss_ema = None
    curve: list[float] = []
    for epoch in range(epochs):
        order = torch.randperm(len(pics), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = augment(_to_float(pics[idx]), gen).to(device)
            y = targets[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise IclevrError(f"Evaluator training diverged (loss {loss.item()}); try a lower learning rate.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
            report("training", step, total_steps, epoch=epoch + 1, loss=loss_ema)
        # Held-out accuracy after each epoch (a few seconds): the learning curve goes into the card.
        # Scoring logits instead of sigmoids ranks the classes the same way.
        model.eval()
        curve.append(score_images(model, _to_float(held_pics), held_targets).accuracy)
        model.train()
        report("epoch done", epoch + 1, epochs, heldout_accuracy=curve[-1], loss=loss_ema)
    model.fc[1] = sigmoid
    model.eval()

    report("scoring held-out images", 0, None)
    held = score_images(model, _to_float(held_pics), held_targets)
    seconds = time.perf_counter() - started
    path = Path(out) if out is not None else own_evaluator_path(root)
    if path.suffix != ".pth":
        path = path / OFFICIAL_NAME
    card = {
        "dataset": dataset_name(root),
        "root": str(root.resolve()),
        "fingerprint": fingerprint(root),
        "architecture": "torchvision resnet18, random init, fc = Sequential(Linear(512, 24), Sigmoid())",
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "precision": "bf16 autocast" if use_bf16 else "fp32",
        "images": len(pics),
        "heldout_images": len(held_pics),
        "heldout_source": heldout_source,
        "heldout_accuracy": held.accuracy,
        "heldout_curve": [round(a, 5) for a in curve],  # after each epoch
        "final_loss": round(loss_ema, 5),
        "heldout_per_shape": held.to_dict()["per_shape"],
        "heldout_per_color": held.to_dict()["per_color"],
        "seed": seed,
        "device": str(device),
        "seconds": round(seconds, 1),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "toolkit": f"iclevr-diffusion {__version__}",
    }
    if previous is not None:
        card["continued_from"] = previous  # `epochs` and `lr` above are this stage's only
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": state}, tmp)
    write_json(path.parent / CARD_NAME, card)
    card["checkpoint"] = str(path)
    return card


def default_bf16(device: torch.device) -> bool:
    """bf16 autocast on CUDA and on CPUs with native bf16 (oneDNN says so); fp32 elsewhere, where bf16 is slow."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def dataset_name(root: Path) -> str:
    from iclevr_diffusion.evaluation import is_builtin_synthetic

    return "built-in synthetic i-CLEVR" if is_builtin_synthetic(root) else root.resolve().name


def fingerprint(root: Path) -> str:
    """Changes when train.json or heldout.json change, so a cached evaluator is not reused for other data."""
    h = hashlib.sha256()
    for name in ("train.json", HELDOUT_FILE):
        path = root / name
        if path.is_file():
            h.update(name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cached_card(root: Path) -> dict | None:
    """The card of ROOT's own evaluator if it exists and was trained on ROOT's current labels."""
    ckpt = own_evaluator_path(root)
    card_path = ckpt.parent / CARD_NAME
    if not (ckpt.is_file() and card_path.is_file()):
        return None
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(card, dict) or card.get("fingerprint") != fingerprint(root):
        return None
    card["checkpoint"] = str(ckpt)
    return card


def ensure_evaluator(root: str | Path, progress: Progress | None = None, **kwargs) -> dict:
    """The cached own evaluator of ROOT, trained first if it is missing or stale (first use)."""
    root = Path(root)
    return cached_card(root) or train_evaluator(root, progress=progress, **kwargs)
