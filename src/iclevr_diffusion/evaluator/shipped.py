"""The small-CNN evaluator shipped with the toolkit for the built-in synthetic set.

Training the own evaluator on first use cost 2 minutes on a 2-core CPU with bf16 and longer without
(an AVX2-only CPU trains the small CNN in fp32), on every fresh machine, for a network that comes out
the same each time: the built-in set is deterministic. So it was trained once (`iclevr-diff
train-evaluator` with its defaults) and ships as package data (data/files/evaluator/, ~0.5 MB) with its
card. It is used only where it fits, and checked there:

- only for a dataset whose train.json and heldout.json have the card's fingerprint (the built-in set
  as this version renders it; any other data, or a later renderer, trains its own as before);
- only after scoring that dataset's held-out images (rendered on this machine, never trained on):
  below SHIPPED_MIN_ACCURACY it is not used and the evaluator is trained as before.

It stays independent of the generator: it saw only rendered images. Installing it means copying it to
ROOT/evaluator/ with a card that records the accuracy measured here, so later runs reuse it at once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from iclevr_diffusion.evaluator.metric import score_images
from iclevr_diffusion.evaluator.networks import CARD_NAME, load_evaluator, own_evaluator_path
from iclevr_diffusion.evaluator.training import HELDOUT_FILE, Progress, fingerprint, load_labelled, pixels_to_float
from iclevr_diffusion.io import atomic_path, write_json
from iclevr_diffusion.labels import packaged_file

SHIPPED_CHECKPOINT = "evaluator/small-cnn.pth"
SHIPPED_CARD = "evaluator/small-cnn.json"
# The shipped network scored 99.1% on the built-in held-out images where it was trained; a rendering
# that differs enough to cost it more than a point is better served by training on it.
SHIPPED_MIN_ACCURACY = 0.98


def shipped_evaluator() -> tuple[Path, dict]:
    """(checkpoint path, card) of the evaluator that ships with the package."""
    return Path(str(packaged_file(SHIPPED_CHECKPOINT))), json.loads(packaged_file(SHIPPED_CARD).read_text())


def fits(root: Path, card: dict) -> bool:
    """Whether a shipped card was trained on ROOT's labels (same fingerprint) and ROOT has held-out images."""
    return (root / HELDOUT_FILE).is_file() and card.get("fingerprint") == fingerprint(root)


def install_shipped(
    root: str | Path, progress: Progress | None = None, shipped: tuple[Path, dict] | None = None
) -> dict | None:
    """Install the shipped evaluator for ROOT if it fits and scores well on ROOT's held-out images.

    Returns the installed card (with "checkpoint"), or None when it does not fit or scores below
    SHIPPED_MIN_ACCURACY (the caller then trains one). `shipped` overrides the packaged (path, card).
    """
    root = Path(root)
    checkpoint, card = shipped or shipped_evaluator()
    if not fits(root, card):
        return None
    report = progress or (lambda *a, **k: None)
    started = time.perf_counter()
    report("checking the shipped evaluator", 0, None)
    _, pics, targets = load_labelled(root, HELDOUT_FILE)
    held = score_images(load_evaluator(checkpoint), pixels_to_float(pics), targets)
    if held.accuracy < SHIPPED_MIN_ACCURACY:
        return None
    path = own_evaluator_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        shutil.copyfile(checkpoint, tmp)
    installed = {
        **card,
        "root": str(root.resolve()),
        "source": "shipped",
        "heldout_accuracy_where_trained": card.get("heldout_accuracy"),
        "heldout_accuracy": held.accuracy,  # measured here, on this machine's rendering
        "heldout_per_shape": held.to_dict()["per_shape"],
        "heldout_per_color": held.to_dict()["per_color"],
        "seconds_installing": round(time.perf_counter() - started, 1),
    }
    write_json(path.parent / CARD_NAME, installed)
    installed["checkpoint"] = str(path)
    return installed
