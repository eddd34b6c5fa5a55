"""Training the toolkit's own evaluator where the course's checkpoint.pth is absent.

Two architectures (networks.py): for a user's dataset the official one (torchvision ResNet18,
random init, fc = Linear(512, 24) + Sigmoid), saved in the same format ({"model": state_dict}); for
the built-in synthetic data a small CNN ("small-cnn", ~15x fewer FLOPs per image, saved as
{"model": state_dict, "arch": "small-cnn"}), so the first `evaluate` on it takes minutes, not an hour,
on a 2-core CPU (`--arch resnet18` still trains the ResNet18 there). Either goes to
DATA_ROOT/evaluator/checkpoint.pth with a JSON card next to it (dataset, architecture, parameters,
GFLOP per image, epochs, images, held-out accuracy, date), so `evaluate` can name it.

Speed on a CPU: all images are decoded once into a uint8 tensor (64x64, 12 KB each, so the
18,009-image set is ~220 MB) and augmented on whole batches with tensor ops. Precision is measured,
not assumed: on a CPU with native bf16 a few forward+backward passes of the network are timed in
fp32 and under bf16 autocast and the faster one is used (bf16 only if >= 5% faster: on a Xeon with
AMX the small CNN runs ~1.8x faster in bf16, ResNet18 not at all). Augmentations keep the
labels true: horizontal flips (labels say nothing about left and right), shifts of a couple of pixels
(the renderer keeps objects clear of the border) and faint pixel noise (generated images are noisier
than rendered ones); never colour changes.
"""

from __future__ import annotations

import copy
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

from iclevr_diffusion import __version__, precision
from iclevr_diffusion.data.iclevr import ICLEVRDataset
from iclevr_diffusion.devices import cpu_model
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.evaluator.metric import score_images
from iclevr_diffusion.evaluator.networks import (
    ARCH_DESCRIPTIONS,
    ARCHS,
    CARD_NAME,
    IMAGE_SIZE,
    OFFICIAL_NAME,
    RESNET18,
    SMALL_CNN,
    build_evaluator,
    card_arch,
    flops_per_image,
    is_builtin_synthetic,
    load_checkpoint,
    own_evaluator_path,
    parameter_count,
    read_card,
    save_checkpoint,
)
from iclevr_diffusion.io import write_json
from iclevr_diffusion.labels import to_multi_hot

HELDOUT_FILE = "heldout.json"  # labelled images the renderer keeps out of train.json
# Training defaults per architecture. ResNet18: 99.3% held-out on the synthetic set after 8 epochs.
TRAINING_DEFAULTS = {
    RESNET18: {"epochs": 8, "batch_size": 64, "lr": 2e-3},
    SMALL_CNN: {"epochs": 8, "batch_size": 64, "lr": 1e-2},
}
DEFAULT_EPOCHS = TRAINING_DEFAULTS[RESNET18]["epochs"]  # of the official architecture
DEFAULT_BATCH = 64
HOLDOUT_FRACTION = 0.05  # share of scenes held out of train.json when the dataset has no heldout.json
BF16_MARGIN = 1.05  # bf16 autocast only where timed at least this much faster than fp32

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


def pixels_to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def default_arch(root: str | Path) -> str:
    """The small CNN for the built-in synthetic data, the course's ResNet18 for any other dataset."""
    return SMALL_CNN if is_builtin_synthetic(root) else RESNET18


def train_evaluator(
    root: str | Path,
    out: str | Path | None = None,  # checkpoint.pth path or folder; default ROOT/evaluator/checkpoint.pth
    images: str | Path | None = None,  # PNG folder when not ROOT/iclevr
    epochs: int | None = None,  # passes over train.json (default: TRAINING_DEFAULTS of the architecture)
    batch_size: int | None = None,  # images per step (default: TRAINING_DEFAULTS)
    lr: float | None = None,  # AdamW peak learning rate of the one-cycle schedule (default: TRAINING_DEFAULTS)
    device: torch.device | str = "cpu",
    seed: int = 0,
    bf16: bool | None = None,  # autocast precision; None = measured (CPU), bf16 where supported (CUDA)
    max_images: int | None = None,  # use only the first N training images (tests, smoke runs)
    progress: Progress | None = None,  # called as progress(stage, done, total, **info)
    init: str | Path | None = None,  # continue from this checkpoint (its architecture) instead of random init
    arch: str | None = None,  # "small-cnn" or "resnet18"; None: default_arch(root) (or init's)
) -> dict:
    """Train, evaluate on held-out labelled images, save checkpoint + card; returns the card.

    progress stages: "loading images"; "precision" (info: fp32/bf16 images/s, choice); "training"
    after each step (info: epoch, loss, images_per_s, eta_s); "epoch done" after each epoch (done =
    epochs finished; info: heldout_accuracy, loss, images_per_s, eta_s, seconds); "scoring held-out images".
    """
    root = Path(root)
    device = torch.device(device)
    init_state = None
    if init is not None:
        init_state, init_arch = load_checkpoint(init)
        if arch is not None and arch != init_arch:
            raise IclevrError(f"--arch {arch} cannot continue from {init}, a {init_arch} checkpoint.")
        arch = init_arch
    arch = arch or default_arch(root)
    if arch not in ARCHS:
        raise IclevrError(f"Unknown evaluator architecture '{arch}'; choose one of: {', '.join(ARCHS)}.")
    defaults = TRAINING_DEFAULTS[arch]
    epochs = defaults["epochs"] if epochs is None else epochs
    batch_size = batch_size or defaults["batch_size"]
    lr = defaults["lr"] if lr is None else lr
    if epochs < 1 or batch_size < 1:
        raise IclevrError("--epochs and --batch-size must be at least 1.")
    if not lr > 0:
        raise IclevrError(f"--lr must be positive, got {lr}.")
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
    loading_seconds = time.perf_counter() - started

    model = build_evaluator(arch)
    previous = None
    if init_state is not None:
        model.load_state_dict(init_state)
        previous = read_card(Path(init)) or {}
        previous = {"checkpoint": str(init), "epochs": previous.get("epochs"), "lr": previous.get("lr"),
                    "heldout_accuracy": previous.get("heldout_accuracy")}
    model = model.to(device)
    use_bf16, timing = resolve_precision(model, device, bf16, min(batch_size, 32))
    if timing is not None:
        report("precision", 0, None, **timing, choice="bf16" if use_bf16 else "fp32")
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
    step = seen = 0
    loss_ema = None
    curve: list[float] = []
    train_seconds = score_seconds = 0.0  # pure training steps; held-out scoring after each epoch

    def eta(epochs_done: int) -> float:
        per_step = train_seconds / max(step, 1)
        # Scoring the held-out images: a forward pass, ~1/3 of a training step per image.
        per_score = score_seconds / epochs_done if epochs_done else per_step * len(held_pics) / (3 * batch_size)
        return (total_steps - step) * per_step + (epochs - epochs_done) * per_score

    for epoch in range(epochs):
        order = torch.randperm(len(pics), generator=gen)
        for i in range(0, len(order), batch_size):
            tick = time.perf_counter()
            idx = order[i : i + batch_size]
            x = augment(pixels_to_float(pics[idx]), gen).to(device)
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
            seen += len(idx)
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
            train_seconds += time.perf_counter() - tick
            report("training", step, total_steps, epoch=epoch + 1, epochs=epochs, loss=loss_ema,
                   images_per_s=seen / train_seconds, eta_s=eta(epoch))
        # Held-out accuracy after each epoch (a few seconds): the learning curve goes into the card.
        # Scoring logits instead of sigmoids ranks the classes the same way.
        tick = time.perf_counter()
        model.eval()
        curve.append(score_images(model, pixels_to_float(held_pics), held_targets).accuracy)
        model.train()
        score_seconds += time.perf_counter() - tick
        report("epoch done", epoch + 1, epochs, heldout_accuracy=curve[-1], loss=loss_ema,
               images_per_s=seen / train_seconds, eta_s=eta(epoch + 1), seconds=time.perf_counter() - started)
    model.fc[1] = sigmoid
    model.eval()

    report("scoring held-out images", 0, None)
    held = score_images(model, pixels_to_float(held_pics), held_targets)
    seconds = time.perf_counter() - started
    fwd_flops, train_flops = flops_per_image(arch), flops_per_image(arch, backward=True)
    # Compute spent: forward+backward of every training image, forward of the held-out images after
    # each epoch and once more at the end (the precision timing's few passes left out).
    total_flops = train_flops * seen + fwd_flops * len(held_pics) * (epochs + 1)
    path = Path(out) if out is not None else own_evaluator_path(root)
    if path.suffix != ".pth":
        path = path / OFFICIAL_NAME
    card = {
        "dataset": dataset_name(root),
        "root": str(root.resolve()),
        "fingerprint": fingerprint(root),
        "arch": arch,
        "architecture": ARCH_DESCRIPTIONS[arch],
        "parameters": parameter_count(model),
        "gflop_per_image": round(fwd_flops / 1e9, 4),  # forward, 64x64 (FlopCounterMode: multiply-add = 2)
        "train_gflop_per_image": round(train_flops / 1e9, 4),  # forward + backward
        "gflop_total": round(total_flops / 1e9, 1),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "precision": "bf16 autocast" if use_bf16 else "fp32",
        "precision_timing": timing,  # images/s of both, where measured (CPU with bf16)
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
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "images_per_s": round(seen / max(train_seconds, 1e-9), 1),  # training steps only
        "seconds_loading": round(loading_seconds, 1),
        "seconds_training": round(train_seconds, 1),
        "seconds": round(seconds, 1),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "toolkit": f"iclevr-diffusion {__version__}",
    }
    if previous is not None:
        card["continued_from"] = previous  # `epochs` and `lr` above are this stage's only
    save_checkpoint(model, path)
    write_json(path.parent / CARD_NAME, card)
    card["checkpoint"] = str(path)
    return card


def resolve_precision(
    model: nn.Module, device: torch.device, bf16: bool | None, batch: int = 32
) -> tuple[bool, dict | None]:
    """(use bf16 autocast, the timing that decided it or None): as asked, else by the precision policy
    (precision.measured_bf16): on a CPU with native bf16 whichever `time_precisions` measures faster
    (bf16 only if BF16_MARGIN faster: it rounds, so a tie goes to fp32)."""
    if bf16 is not None:
        return bf16, None
    return precision.measured_bf16(device, lambda: time_precisions(model, batch),
                                   lambda t: t["bf16_images_per_s"] >= BF16_MARGIN * t["fp32_images_per_s"])


def time_precisions(model: nn.Module, batch: int = 32, rounds: int = 2) -> dict:
    """Training speed (images/s, forward + backward) of this network on this CPU in fp32 and under bf16
    autocast, timed alternately on a copy (other load hits both alike; the model's BatchNorm
    statistics and the global random stream stay untouched); one untimed pass of each first."""
    probe = copy.deepcopy(model).train()
    device = next(probe.parameters()).device
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1).to(device)
    fp32_s, bf16_s = precision.time_passes(lambda: probe(x).float().square().mean(), probe, device.type, rounds)
    return {"fp32_images_per_s": round(batch / fp32_s, 1), "bf16_images_per_s": round(batch / bf16_s, 1),
            "batch": batch}


def dataset_name(root: Path) -> str:
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


def cached_card(root: Path, arch: str | None = None) -> dict | None:
    """The card of ROOT's own evaluator if it exists, was trained on ROOT's current labels (and is of
    architecture ARCH, where given)."""
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
    if arch is not None and card_arch(card) != arch:
        return None
    card["checkpoint"] = str(ckpt)
    return card
