"""`iclevr-diff make-data`: render the synthetic i-CLEVR dataset, with a progress bar and a summary.

Also `ensure_default_data`, for the commands that fall back to the built-in set when given no
--data: it renders the set into the cache on first use, showing the same progress bar.
"""

from __future__ import annotations

from pathlib import Path

from iclevr_diffusion.data import synthetic
from iclevr_diffusion.workflows import console


def run(out: Path, scenes: int = 6003, size: str | int = 64, seed: int = 0, workers: int = 1,
        force: bool = False, quiet: bool = False, as_json: bool = False) -> None:
    """Render `scenes` scenes (3 images each, plus a 5% held-out set) into `out`."""
    synthetic.validate_request(out, scenes, size, seed, workers, force)  # fail before drawing a bar
    with console.progress_bar("Rendering", synthetic.planned_images(scenes), quiet=quiet) as advance:
        summary = synthetic.make_dataset(
            Path(out), scenes=scenes, size=size, seed=seed, workers=workers, force=force, progress=advance
        )
    _print_summary(summary, as_json)


def _print_summary(summary: synthetic.DatasetSummary, as_json: bool = False) -> None:
    if as_json:
        console.print_json({
            "root": str(summary.root), "scenes": summary.scenes, "images": summary.images,
            "heldout_images": summary.heldout_images, "seconds": round(summary.seconds, 3),
            "images_per_second": round(summary.images_per_second, 1),
        })
        return
    images = summary.images + summary.heldout_images
    console.out.print(
        f"Wrote {images:,} images ({summary.images:,} train + {summary.heldout_images:,} held-out) to "
        f"{summary.root} in {summary.seconds:.1f} s, {summary.images_per_second:.0f} images/s."
    )


def ensure_default_data(scenes: int = 6003, quiet: bool = False, workers: int = 0) -> Path:
    """The built-in synthetic set's folder; renders it (with a progress bar) on first use."""
    cached = synthetic.cached_root(scenes)
    if (cached / synthetic.COMPLETE).is_file():
        return cached
    if not quiet:
        console.err.print(
            f"No --data given: rendering the built-in synthetic dataset ({scenes:,} scenes) once, "
            f"into {synthetic.cache_dir()} (set {synthetic.CACHE_ENV} to move it)."
        )
    with console.progress_bar("Rendering", synthetic.planned_images(scenes), quiet=quiet) as advance:
        return synthetic.default_dataset_root(scenes, workers=workers, progress=advance)
