"""How fast the synthetic i-CLEVR renderer is: raw rendering and the full `make-data` (with PNGs).

    python benchmarks/render_speed.py                 # full size: 6,003 scenes, 18,009 + 900 images
    python benchmarks/render_speed.py --smoke         # a few seconds
    python benchmarks/render_speed.py --contact-sheet # also redraw docs/contact_sheet.png/.json

Prints a table and writes benchmarks/results/render_speed.json with the machine it ran on. The goal
(issue #3) is >= 100 images/s for the full set on a 2-core machine, i.e. at most 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine

from iclevr_diffusion.data import synthetic
from iclevr_diffusion.data.render import render_scenes

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def render_only(scenes: int, size, repeats: int) -> list[dict]:
    """Images/s of render_scenes alone (one process, one thread), per object count."""
    full = synthetic.sample_scenes(0, range(scenes))
    render_scenes([full[0]], size)  # warm-up
    rows = []
    for k in (1, 2, 3):
        batch = [s[:k] for s in full]
        best = min(_timed(lambda b=batch: render_scenes(b, size)) for _ in range(repeats))
        rows.append({"what": f"render {k} object(s), {size}", "images": scenes, "seconds": best,
                     "images_per_s": scenes / best})
    best = min(_timed(lambda: synthetic.sample_scenes(1, range(scenes))) for _ in range(repeats))
    rows.append({"what": "scene sampling + occlusion check", "images": 3 * scenes, "seconds": best,
                 "images_per_s": 3 * scenes / best})
    return rows


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_data(scenes: int, workers: int, size) -> dict:
    """The full make-data path: sampling, rendering, PNG writing, JSON, worker processes."""
    work = HERE / "work"
    work.mkdir(exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="render-speed-", dir=work))
    try:
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        summary = synthetic.make_dataset(out / "data", scenes=scenes, size=size, seed=0, workers=workers)
        images = summary.images + summary.heldout_images
        return {"what": f"make-data --scenes {scenes} --workers {workers} --size {size}", "images": images,
                "seconds": summary.seconds, "images_per_s": images / summary.seconds,
                "load_avg_before": load_before,
                "load_avg_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def contact_sheet(png: Path, sidecar: Path, seed: int = 0) -> None:
    """64 dataset images (train scenes 0-63 of `seed`, with 1, 2, 3 objects in turn) in an 8x8 grid,
    each shown at 2x, and their file names and labels in a JSON sidecar."""
    from PIL import Image

    scenes = synthetic.sample_scenes(seed, range(64))
    picks = [(i, i % 3) for i in range(64)]
    images = render_scenes([scenes[i][: k + 1] for i, k in picks], 64).images
    tile, gap = 128, 4
    sheet = Image.new("RGB", (8 * tile + 9 * gap,) * 2, (255, 255, 255))
    entries = []
    for n, ((i, k), pixels) in enumerate(zip(picks, images, strict=True)):
        row, col = divmod(n, 8)
        img = Image.fromarray(pixels).resize((tile, tile), Image.NEAREST)
        sheet.paste(img, (gap + col * (tile + gap), gap + row * (tile + gap)))
        entries.append({"row": row, "col": col, "file": synthetic.image_name("train", i, k),
                        "labels": [o.label for o in scenes[i][: k + 1]]})
    png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png, optimize=True)
    sidecar.write_text(json.dumps({
        "what": f"iclevr-diff make-data --seed {seed}: train scenes 0-63, image _0/_1/_2 in turn, "
                "64x64 shown at 2x (nearest), row by row",
        "images": entries,
    }, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=6003, help="scenes for the make-data run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--size", default="64")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; finishes in seconds")
    parser.add_argument("--contact-sheet", action="store_true", help="redraw docs/contact_sheet.png/.json")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    args.out = args.out or HERE / "results" / ("render_speed_smoke.json" if args.smoke else "render_speed.json")

    if args.contact_sheet:
        contact_sheet(REPO / "docs" / "contact_sheet.png", REPO / "docs" / "contact_sheet.json")
        print("wrote docs/contact_sheet.png and docs/contact_sheet.json")
    scenes = 16 if args.smoke else args.scenes
    info = machine()
    rows = render_only(16 if args.smoke else 128, 64, 1 if args.smoke else 3)
    if not args.smoke:
        rows += render_only(16, "320x240", 2)[:3]
    rows.append(make_data(scenes, args.workers, args.size))

    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, load {info['load_avg_1min']}")
    print(f"{'what':<52} {'images':>7} {'seconds':>8} {'images/s':>9}")
    for r in rows:
        print(f"{r['what']:<52} {r['images']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
