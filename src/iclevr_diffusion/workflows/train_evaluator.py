"""Workflow for `iclevr-diff train-evaluator`: our own evaluator for a dataset (small CNN or ResNet18)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from iclevr_diffusion.workflows import console
from iclevr_diffusion.workflows.console import duration, err, plain_line, print_json, progress_bar, table
from iclevr_diffusion.workflows.console import out as stdout

LOG_EVERY = console.LOG_EVERY  # seconds between progress lines within an epoch when stderr is no terminal


def synthetic_root(quiet: bool = False, scenes: int | None = None) -> Path:
    """The built-in synthetic dataset, rendered into the cache on first use (a few CPU minutes)."""
    from iclevr_diffusion.config import DataConfig
    from iclevr_diffusion.data.synthetic import COMPLETE, cached_root, default_dataset_root, planned_images

    scenes = scenes or DataConfig().synthetic_scenes
    if (cached_root(scenes) / COMPLETE).is_file():  # already rendered: no empty progress bar
        return Path(default_dataset_root(scenes))
    with progress_bar("rendering the built-in synthetic set (once)", planned_images(scenes), quiet,
                      log_every=LOG_EVERY) as advance:
        return Path(default_dataset_root(scenes, progress=advance))


def _epoch_line(done: int, total: int, info: dict) -> str:
    return (f"evaluator: epoch {done}/{total} done, loss {info['loss']:.4f}, held-out accuracy "
            f"{info['heldout_accuracy']:.2%}, {info['images_per_s']:.0f} images/s, "
            f"{duration(info['seconds'])} so far, about {duration(info['eta_s'])} left")


def _precision_line(info: dict) -> str:
    return (f"evaluator: timed fp32 {info['fp32_images_per_s']:.0f} images/s, bf16 autocast "
            f"{info['bf16_images_per_s']:.0f} images/s -> {info['choice']}")


@contextmanager
def evaluator_progress(quiet: bool, log_every: float = LOG_EVERY):
    """A callback for evaluator_training's progress(stage, done, total, **info).

    On a terminal: a rich bar (epoch, loss, images/s, time left) and a line per epoch. Without one
    (a log file, a pipe, nohup): plain lines, one per epoch and one every LOG_EVERY seconds within an
    epoch, each with epoch, loss, images/s and time left.
    """
    if quiet:
        yield lambda *a, **k: None
        return
    if not err.is_terminal:
        last = [time.monotonic()]

        def plain(stage: str, done: int, total: int | None, **info) -> None:
            if stage == "epoch done":
                plain_line(_epoch_line(done, total, info))
                last[0] = time.monotonic()
            elif stage == "precision":
                plain_line(_precision_line(info))
            elif stage == "training":
                if time.monotonic() - last[0] >= log_every:
                    last[0] = time.monotonic()
                    plain_line(f"evaluator: epoch {info['epoch']}/{info['epochs']}, step {done}/{total}, "
                               f"loss {info['loss']:.4f}, {info['images_per_s']:.0f} images/s, "
                               f"about {duration(info['eta_s'])} left")
            else:  # loading images, scoring held-out images
                plain_line(f"evaluator: {stage}")

        yield plain
        return
    with progress_bar("evaluator", None, quiet, extra="{task.fields[info]}") as advance:

        def report(stage: str, done: int, total: int | None, **info) -> None:
            if stage == "epoch done":
                err.print(_epoch_line(done, total, info), markup=False)
                return
            if stage == "precision":
                err.print(_precision_line(info), markup=False)
                return
            if "loss" not in info:  # loading or scoring: keep the bar, change the text
                advance(0, info=stage)
                return
            advance(0, completed=done, total=total,
                    info=f"epoch {info['epoch']}/{info['epochs']}  loss {info['loss']:.4f}  "
                         f"{info['images_per_s']:.0f} images/s")

        yield report


def print_card(card: dict, as_json: bool, note: str = "") -> None:
    from iclevr_diffusion.evaluator.metric import ARCH_NAMES, card_arch

    if as_json:
        print_json(card)
        return
    gflop = card.get("gflop_per_image")
    rows = [
        ("dataset", card.get("dataset")),
        ("checkpoint", card.get("checkpoint")),
        ("architecture", card.get("architecture")),
        ("parameters", f"{card['parameters']:,}" if isinstance(card.get("parameters"), int) else "?"),
        ("GFLOP per image", f"{gflop} forward, {card.get('train_gflop_per_image')} training" if gflop else "?"),
        ("epochs", card.get("epochs")),
        ("training images", card.get("images")),
        ("held-out images", f"{card.get('heldout_images')} ({card.get('heldout_source')})"),
        ("held-out accuracy", f"{card.get('heldout_accuracy', 0):.2%}"),
        ("precision", card.get("precision")),
        ("seconds", card.get("seconds")),
        ("date", card.get("date")),
    ]
    stdout.print(table(f"Own {ARCH_NAMES[card_arch(card)]} evaluator{note}", ["", ""], rows))


def run(
    data: Path | None = None,
    images: Path | None = None,
    out: Path | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    seed: int = 0,
    force: bool = False,
    as_json: bool = False,
    quiet: bool = False,
    arch: str | None = None,
    lr: float | None = None,
) -> dict:
    from iclevr_diffusion.devices import resolve_device
    from iclevr_diffusion.evaluator.training import cached_card, train_evaluator

    root = Path(data) if data is not None else synthetic_root(quiet)
    if not force and out is None and epochs is None and lr is None:
        card = cached_card(root, arch)
        if card is not None:
            if not quiet:
                err.print(f"Evaluator for {root} already trained; --force retrains it.", markup=False)
            print_card(card, as_json, " (cached)")
            return card
    with evaluator_progress(quiet) as report:
        card = train_evaluator(
            root, out=out, images=images, epochs=epochs, batch_size=batch_size, lr=lr,
            device=resolve_device(device), seed=seed, progress=report, arch=arch,
        )
    print_card(card, as_json)
    return card
