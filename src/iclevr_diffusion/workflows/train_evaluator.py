"""Workflow for `iclevr-diff train-evaluator`: our own ResNet18 evaluator for a dataset."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from iclevr_diffusion.workflows.console import err, print_json, progress_bar, table
from iclevr_diffusion.workflows.console import out as stdout


def synthetic_root(quiet: bool = False, scenes: int | None = None) -> Path:
    """The built-in synthetic dataset, rendered into the cache on first use (a few CPU minutes)."""
    from iclevr_diffusion.config import DataConfig
    from iclevr_diffusion.data.synthetic import COMPLETE, cached_root, default_dataset_root, planned_images

    scenes = scenes or DataConfig().synthetic_scenes
    if (cached_root(scenes) / COMPLETE).is_file():  # already rendered: no empty progress bar
        return Path(default_dataset_root(scenes))
    with progress_bar("rendering the built-in synthetic set (once)", planned_images(scenes), quiet) as advance:
        return Path(default_dataset_root(scenes, progress=advance))


@contextmanager
def evaluator_progress(quiet: bool):
    """A callback for evaluator_training's progress(stage, done, total, **info) on a rich bar."""
    with progress_bar("evaluator", None, quiet, extra="{task.fields[info]}") as advance:

        def report(stage: str, done: int, total: int | None, **info) -> None:
            if stage == "epoch done":
                if not quiet:
                    err.print(f"epoch {done}/{total}: held-out accuracy {info['heldout_accuracy']:.2%}")
                return
            if "loss" not in info:  # loading or scoring: keep the bar, change the text
                advance(0, info=stage)
                return
            advance(0, completed=done, total=total, info=f"epoch {info['epoch']}  loss {info['loss']:.4f}")

        yield report


def print_card(card: dict, as_json: bool, note: str = "") -> None:
    if as_json:
        print_json(card)
        return
    rows = [
        ("dataset", card.get("dataset")),
        ("checkpoint", card.get("checkpoint")),
        ("epochs", card.get("epochs")),
        ("training images", card.get("images")),
        ("held-out images", f"{card.get('heldout_images')} ({card.get('heldout_source')})"),
        ("held-out accuracy", f"{card.get('heldout_accuracy', 0):.2%}"),
        ("precision", card.get("precision")),
        ("seconds", card.get("seconds")),
        ("date", card.get("date")),
    ]
    stdout.print(table(f"Own ResNet18 evaluator{note}", ["", ""], rows))


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
) -> dict:
    from iclevr_diffusion.devices import resolve_device
    from iclevr_diffusion.evaluator_training import cached_card, train_evaluator

    root = Path(data) if data is not None else synthetic_root(quiet)
    if not force and out is None and epochs is None:
        card = cached_card(root)
        if card is not None:
            if not quiet:
                err.print(f"Evaluator for {root} already trained; --force retrains it.", markup=False)
            print_card(card, as_json, " (cached)")
            return card
    with evaluator_progress(quiet) as report:
        card = train_evaluator(
            root, out=out, images=images, epochs=epochs, batch_size=batch_size,
            device=resolve_device(device), seed=seed, progress=report,
        )
    print_card(card, as_json)
    return card
