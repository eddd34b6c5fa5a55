"""The synthetic i-CLEVR dataset: scene sampling, `make_dataset`, and the cached built-in set.

Every scene adds one object at a time and gives three images (1, 2, 3 objects), the later ones
holding the same objects in the same places plus one more, exactly like the real train.json.
Scene i depends only on (seed, i): its own numpy generator draws the looks and places, and the
classes come from a shuffled deal of the 24 classes per group of 8 scenes (so every class is
used equally often). Rendering is batch independent (see render.py), so the bytes written do not
depend on --workers or on how scenes are grouped.

Layout written (the real one, plus a held-out labelled set):

    ROOT/train.json     {"CLEVR_train_000000_0.png": ["red cube"], ...}
    ROOT/heldout.json   {"CLEVR_heldout_000000_0.png": [...], ...}  (other seeds: known labels)
    ROOT/objects.json ROOT/test.json ROOT/new_test.json   (the packaged files)
    ROOT/iclevr/*.png
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iclevr_diffusion.data.render import (
    MATERIALS,
    SIZES,
    SceneObject,
    in_frame,
    parse_size,
    render_scenes,
)
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.io import write_json
from iclevr_diffusion.labels import LABELS, packaged_file

OBJECTS_PER_SCENE = 3
AREA = 3.0  # objects are placed in [-AREA, AREA]^2 (and must lie inside the frame)
GAP = 0.15  # least space between two footprints
MIN_VISIBLE = 0.75  # no object may be more than a quarter hidden behind the others
MIN_SAMPLES = 30  # ... nor show fewer samples than this at the check resolution
CHECK_SIZE = (96, 72)  # occlusion is judged here, so layouts do not depend on --size
TRAIN, HELDOUT, VALIDATION = 0, 1, 2  # seed streams
BLOCK = 32  # scenes per work item
DATASET_VERSION = 1  # bump when the pictures or the sampling change (invalidates the cache)
CACHE_ENV = "ICLEVR_CACHE_DIR"
COMPLETE = ".complete"
CONDITION_FILES = ("objects.json", "test.json", "new_test.json")

Progress = Callable[[int], None]  # called with the number of images just written


# --------------------------------------------------------------------------------- scene sampling


def scene_labels(seed: int, index: int, stream: int = TRAIN) -> list[str]:
    """The classes of scene `index`, in order of addition: three distinct ones. Each group of 8
    scenes deals one shuffled pack of the 24 classes."""
    group, k = divmod(index, 24 // OBJECTS_PER_SCENE)
    deck = np.random.default_rng([seed, stream, 1, group]).permutation(len(LABELS))
    return [LABELS[c] for c in deck[k * OBJECTS_PER_SCENE : (k + 1) * OBJECTS_PER_SCENE]]


def validation_conditions(scenes: int = 100, seed: int = 0) -> list[list[str]]:
    """The `val` split: label sets drawn like the training data (each scene's first 1, 2 and 3 classes, as
    train.json lists a scene growing one object at a time) from a stream of its own, without those in
    test.json or new_test.json. For choosing recipes, so that test / new_test stay for reporting."""
    from iclevr_diffusion.data.iclevr import load_conditions

    reported = {frozenset(c) for split in ("test", "new_test") for c in load_conditions(split)}
    out = []
    for i in range(scenes):
        labels = scene_labels(seed, i, VALIDATION)
        out += [labels[:k] for k in (1, 2, 3) if frozenset(labels[:k]) not in reported]
    return out


class SceneSampler:
    """Draws one scene's looks once and its layout as often as asked (rejection sampling)."""

    def __init__(self, seed: int, index: int, stream: int = TRAIN):
        self.rng = np.random.default_rng([seed, stream, 0, index])
        self.labels = scene_labels(seed, index, stream)
        self.looks = [
            (
                MATERIALS[int(self.rng.integers(len(MATERIALS)))],
                tuple(SIZES)[int(self.rng.integers(len(SIZES)))],
                float(self.rng.uniform(0, 360)),
            )
            for _ in self.labels
        ]

    def propose(self) -> list[SceneObject]:
        """A layout with every object inside the frame and apart from the others."""
        while True:
            placed: list[SceneObject] = []
            for label, (material, size, rotation) in zip(self.labels, self.looks, strict=True):
                color, shape = label.split()
                for _ in range(200):
                    x, y = (float(v) for v in self.rng.uniform(-AREA, AREA, 2))
                    obj = SceneObject(shape, color, material, size, x, y, rotation)
                    if in_frame(obj) and all(
                        (o.x - x) ** 2 + (o.y - y) ** 2 >= (o.radius + obj.radius + GAP) ** 2 for o in placed
                    ):
                        placed.append(obj)
                        break
                else:
                    break  # no room left: start the layout again
            if len(placed) == len(self.labels):
                return placed


def sample_scenes(seed: int, indices: Iterable[int], stream: int = TRAIN) -> list[list[SceneObject]]:
    """Full scenes (all objects, in order of addition) whose every object stays clearly visible."""
    samplers = [SceneSampler(seed, i, stream) for i in indices]
    scenes = [s.propose() for s in samplers]
    pending = list(range(len(scenes)))
    for _ in range(1000):
        if not pending:
            return scenes
        check = render_scenes([scenes[i] for i in pending], CHECK_SIZE, supersample=1)
        ok = (check.visible_fraction >= MIN_VISIBLE).all(1) & (check.visible >= MIN_SAMPLES).all(1)
        pending = [i for i, good in zip(pending, ok, strict=True) if not good]
        for i in pending:
            scenes[i] = samplers[i].propose()
    raise RuntimeError("could not place the objects of some scenes")  # not reached in practice


# --------------------------------------------------------------------------------- writing


def image_name(split: str, index: int, k: int) -> str:
    """CLEVR_train_000123_0.png: scene 123 with its first object only."""
    return f"CLEVR_{split}_{index:06d}_{k}.png"


def label_files(scenes: int, seed: int = 0, heldout: int | None = None) -> dict[str, dict[str, list[str]]]:
    """{"train": ..., "heldout": ...}: the label files `make_dataset` writes, without rendering an image
    (what the shipped evaluator's fingerprint is checked against; see evaluator/shipped.py)."""
    heldout = default_heldout(scenes) if heldout is None else heldout
    out = {}
    for split, stream, count in (("train", TRAIN, scenes), ("heldout", HELDOUT, heldout)):
        out[split] = {image_name(split, i, k): scene_labels(seed, i, stream)[: k + 1]
                      for i in range(count) for k in range(OBJECTS_PER_SCENE)}
    return out


def _write_png(path: Path, pixels: np.ndarray) -> None:
    """Encode in memory, write a hidden temp file, rename: an interrupted run leaves no half image.
    (No fsync per image: that would cost more than the rendering; train.json is written last.)"""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise IclevrError(f"Cannot write {path}: {e.strerror}. Free some space or choose another folder.") from None
    except BaseException:  # Ctrl-C
        tmp.unlink(missing_ok=True)
        raise


def _render_block(task) -> list[tuple[str, list[str]]]:
    """Render and write scenes [start, stop) of one split: 3 images each. Returns (name, labels)."""
    images_dir, split, stream, start, stop, size, seed, supersample = task
    scenes = sample_scenes(seed, range(start, stop), stream)
    entries: dict[tuple[int, int], tuple[str, list[str]]] = {}
    for k in range(OBJECTS_PER_SCENE):  # one batch per object count: no padding slots
        result = render_scenes([s[: k + 1] for s in scenes], size, supersample=supersample)
        for i, (scene, pixels) in enumerate(zip(scenes, result.images, strict=True)):
            name = image_name(split, start + i, k)
            _write_png(Path(images_dir) / name, pixels)
            entries[(i, k)] = (name, [o.label for o in scene[: k + 1]])
    return [entries[key] for key in sorted(entries)]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


@dataclass
class DatasetSummary:
    root: Path
    scenes: int
    images: int  # train images (3 per scene)
    heldout_images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return (self.images + self.heldout_images) / max(self.seconds, 1e-9)


def default_heldout(scenes: int) -> int:
    """Held-out scenes for a set of `scenes` (5%, at least 1): 300 for the full 6,003."""
    return max(1, scenes // 20)


def planned_images(scenes: int, heldout: int | None = None) -> int:
    """How many images `make_dataset` writes (for a progress bar's total)."""
    heldout = default_heldout(scenes) if heldout is None else heldout
    return OBJECTS_PER_SCENE * (scenes + heldout)


def _check_int(value, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise IclevrError(f"{name} must be a whole number >= {least}, got {value!r}.")
    return int(value)


def validate_request(out, scenes, size, seed, workers, force) -> tuple[int, int, int, tuple[int, int]]:
    """Check make-data's arguments (before any work): (scenes, seed, workers, (width, height))."""
    scenes = _check_int(scenes, "--scenes", 1)
    seed = _check_int(seed, "--seed", 0)
    workers = _check_int(workers, "--workers", 0) or (os.cpu_count() or 1)
    size = parse_size(size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IclevrError(f"--out {out} is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise IclevrError(f"--out {out} is not empty; choose an empty folder or pass --force to write into it.")
    return scenes, seed, workers, size


def make_dataset(
    out: str | Path,
    scenes: int = 6003,
    size: str | int = 64,
    seed: int = 0,
    workers: int = 1,
    force: bool = False,
    progress: Progress | None = None,
    heldout: int | None = None,
    supersample: int = 2,
) -> DatasetSummary:
    """Render a synthetic i-CLEVR dataset into `out` in the real on-disk format.

    scenes: scenes in train.json (3 images each); size: 64 or 'WxH' (e.g. '320x240');
    workers: processes (0 = one per CPU); force: write into a non-empty folder;
    progress: called with the number of images just written; heldout: held-out scenes
    (default 5%, 0 = none); supersample: samples per pixel side (anti-aliasing).
    """
    scenes, seed, workers, (width, height) = validate_request(out, scenes, size, seed, workers, force)
    heldout = default_heldout(scenes) if heldout is None else _check_int(heldout, "heldout", 0)
    supersample = _check_int(supersample, "supersample", 1)
    out = Path(out)
    images_dir = out / "iclevr"
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IclevrError(f"Cannot create {images_dir}: {e.strerror}. Choose another --out.") from None

    start = time.perf_counter()
    tasks = [
        (str(images_dir), split, stream, a, min(a + BLOCK, count), (width, height), seed, supersample)
        for split, stream, count in (("train", TRAIN, scenes), ("heldout", HELDOUT, heldout))
        for a in range(0, count, BLOCK)
    ]
    labels: dict[str, dict[str, list[str]]] = {"train": {}, "heldout": {}}
    results: dict[int, list] = {}
    for i, entries in _run(tasks, min(workers, len(tasks))):
        results[i] = entries
        if progress is not None:
            progress(len(entries))
    for i, task in enumerate(tasks):
        labels[task[1]].update(results[i])

    for name in CONDITION_FILES:
        write_json(out / name, json.loads(packaged_file(name).read_text()), indent=None)
    if heldout:
        write_json(out / "heldout.json", labels["heldout"], indent=None)
    write_json(out / "train.json", labels["train"], indent=None)  # last: its presence means done
    return DatasetSummary(out, scenes, len(labels["train"]), len(labels["heldout"]), time.perf_counter() - start)


def _run(tasks: Sequence, workers: int):
    """Yield (task index, result) as blocks finish, in this process or in `workers` processes."""
    if workers <= 1:
        for i, task in enumerate(tasks):
            yield i, _render_block(task)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: forking a process that already runs torch threads can deadlock.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        futures = {pool.submit(_render_block, task): i for i, task in enumerate(tasks)}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# --------------------------------------------------------------------------------- built-in set


def cache_dir() -> Path:
    """Where the built-in dataset lives: $ICLEVR_CACHE_DIR, else the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("iclevr-diffusion"))


@contextmanager
def _locked(path: Path):
    """An exclusive lock between processes (POSIX; elsewhere the rename alone keeps it safe)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_root(scenes: int = 6003, seed: int = 0) -> Path:
    """Where the built-in set of `scenes` scenes lives (complete once it holds the marker file)."""
    return cache_dir() / f"synthetic-v{DATASET_VERSION}-seed{seed}-{scenes}"


def default_dataset_root(
    scenes: int = 6003,
    *,
    seed: int = 0,
    workers: int = 0,
    progress: Progress | None = None,
) -> Path:
    """The built-in synthetic set (64x64), rendered into the cache on first use and reused after.

    Safe against concurrent callers and interruptions: one process renders (under a lock) into a
    temp folder, marks it complete and renames it into place; the others wait and reuse it.
    """
    scenes = _check_int(scenes, "data.synthetic_scenes", 1)
    root = cached_root(scenes, seed)
    cache, name = root.parent, root.name
    if (root / COMPLETE).is_file():
        return root
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IclevrError(f"Cannot create the cache folder {cache}: {e.strerror}. Set {CACHE_ENV}.") from None
    with _locked(cache / f".{name}.lock"):
        if (root / COMPLETE).is_file():  # another process finished it while we waited
            return root
        for stale in cache.glob(f".{name}.tmp-*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache / f".{name}.tmp-{os.getpid()}"
        try:
            summary = make_dataset(tmp, scenes, 64, seed, workers, force=True, progress=progress)
            write_json(tmp / COMPLETE, {"version": DATASET_VERSION, "seed": seed, "scenes": scenes,
                                        "images": summary.images, "seconds": round(summary.seconds, 1)})
            if root.exists():  # an incomplete folder from elsewhere
                shutil.rmtree(root)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root
