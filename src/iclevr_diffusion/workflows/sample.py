"""`iclevr-diff sample`: images for --labels, packaged splits or a condition file, plus grids,
a manifest and (with --process) the denoising-process strip.

Output folder (default RUN/samples-<sampler>-<steps>/):

    test/0.png ... test/31.png      one PNG per condition, named as the course expects
    new_test/0.png ...              likewise for --split new_test
    labels/0.png ...                for --labels (each entry --n times, in order)
    <stem>/0.png ...                for --conditions FILE.json
    test_grid.png ...               one grid per group, 8 per row
    process.png                     with --process: noise -> image in --frames frames
    manifest.json                   labels per image, sampler, steps, guidance, seed, model, timing
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from iclevr_diffusion.data.iclevr import load_conditions
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.io import write_json
from iclevr_diffusion.labels import parse_labels
from iclevr_diffusion.workflows import console

RESERVED = ("labels", "test", "new_test", "val")


def collect_groups(
    labels: list[str], n: int, splits: list[str], conditions: Path | None
) -> list[tuple[str, list[list[str]]]]:
    """(folder name, label lists) per requested input, validated before any model is loaded."""
    if n < 1:
        raise IclevrError(f"--n must be at least 1, got {n}.")
    groups: list[tuple[str, list[list[str]]]] = []
    for split in dict.fromkeys(splits):  # de-duplicated, order kept
        groups.append((split, load_conditions(split=split)))
    if conditions is not None:
        stem = re.sub(r"[^\w.-]", "_", Path(conditions).stem) or "conditions"
        name = f"{stem}-file" if stem in RESERVED else stem
        groups.append((name, load_conditions(file=conditions)))
    if labels:
        parsed = [parse_labels(spec, where=f"--labels '{spec}'") for spec in labels]
        groups.append(("labels", [names for names in parsed for _ in range(n)]))
    return groups


def default_out(model_dir: Path, sampler: str, steps: int) -> Path:
    """RUN/samples-<sampler>-<steps> next to RUN/model, or inside a stand-alone exported model."""
    from iclevr_diffusion.run_folder import RunFolder

    return RunFolder.of_model(model_dir).root / f"samples-{sampler}-{steps}"


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise IclevrError(f"--out {out} is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise IclevrError(f"Output folder {out} is not empty; pass --force to overwrite it or choose another --out.")


def _clear_stale(folder: Path) -> None:
    """With --force: remove the numbered PNGs of an earlier run so no stale image survives."""
    if folder.is_dir():
        for path in folder.glob("*.png"):
            if path.stem.isdigit():
                path.unlink()


def run(
    labels: list[str],
    n: int,
    splits: list[str],
    conditions: Path | None,
    model: Path | None,
    runs_dir: Path,
    out: Path | None,
    sampler: str | None,
    steps: int | None,
    guidance_scale: float | None,
    seed: int | None,
    batch_size: int | None,
    device: str | None,
    process: str | None,
    frames: int,
    force: bool,
    as_json: bool,
    quiet: bool,
    churn: float | None = None,
) -> dict:
    groups = collect_groups(labels, n, splits, conditions)
    process_labels = parse_labels(process, where="--process") if process else None
    if not groups and process_labels is None:
        raise IclevrError(
            'Nothing to draw: give --labels "red sphere,cyan cube", --split test|new_test, '
            "--conditions FILE.json or --process LABELS."
        )
    if process_labels is not None and frames < 2:
        raise IclevrError(f"--frames must be at least 2 (noise and the final image), got {frames}.")

    from iclevr_diffusion.diffusion.sampling import generate, image_generators, load_pipeline, resolve_sampling
    from iclevr_diffusion.images import save_grid, save_pngs, save_strip
    from iclevr_diffusion.precision import sampling_autocast

    pipe, cfg, model_dir = load_pipeline(model, runs_dir, device or "auto")
    sampler, steps, guidance = resolve_sampling(cfg, pipe, sampler, steps, guidance_scale)
    churn = pipe.sampling_churn(sampler, churn)
    seed = cfg.seed if seed is None else seed
    batch_size = cfg.sample.batch_size if batch_size is None else batch_size
    if batch_size < 1:
        raise IclevrError(f"--batch-size must be positive, got {batch_size}.")
    if seed < 0:
        raise IclevrError(f"--seed must be 0 or more, got {seed}.")
    out = Path(out) if out is not None else default_out(model_dir, sampler, steps)
    check_out(out, force)
    bf16 = sampling_autocast(pipe.unet.device)

    total_images = sum(len(conds) for _, conds in groups)
    total = (total_images + (1 if process_labels else 0)) * steps
    manifest: dict = {
        "model": str(model_dir.resolve()),
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": guidance,
        "churn": churn,
        "seed": seed,
        "batch_size": batch_size,
        "device": str(pipe.unet.device),
        "precision": "bf16" if bf16 else "fp32",
        "out": str(out),
        "groups": {},
        "images": [],
        "process": None,
    }
    seconds = 0.0
    desc = f"{sampler} {steps} steps"
    with console.progress_bar(desc, total, quiet, extra="{task.fields[group]}") as advance:
        for name, conds in groups:
            advance(0, group=name)
            t0 = time.perf_counter()
            images = generate(pipe, conds, sampler, steps, guidance, seed, batch_size, progress=lambda k: advance(k),
                              churn=churn)
            seconds += time.perf_counter() - t0
            if force:
                _clear_stale(out / name)
            save_pngs(images, out / name)
            save_grid(images, out / f"{name}_grid.png")
            manifest["groups"][name] = {"folder": name, "count": len(conds), "grid": f"{name}_grid.png"}
            manifest["images"] += [{"file": f"{name}/{i}.png", "group": name, "labels": c} for i, c in enumerate(conds)]
        if process_labels is not None:
            advance(0, group="process")
            strip = pipe(
                [process_labels],
                steps,
                guidance,
                generator=image_generators(seed, 0, 1),
                frames=frames,
                callback=lambda k: advance(k),
                sampler=sampler,
                churn=churn,
                output_type="pt",
            ).frames
            save_strip(strip[:, 0], out / "process.png")
            manifest["process"] = {"file": "process.png", "labels": process_labels, "frames": len(strip)}

    manifest["seconds"] = round(seconds, 3)
    manifest["seconds_per_image"] = round(seconds / total_images, 4) if total_images else None
    manifest["images_per_second"] = round(total_images / seconds, 3) if seconds > 0 else None
    write_json(out / "manifest.json", manifest)

    if as_json:
        console.print_json(manifest)
    else:
        rate = f" in {seconds:.1f} s ({manifest['images_per_second']:.2f} images/s)" if total_images else ""
        strip_note = " + process.png" if process_labels is not None else ""
        console.out.print(
            f"{total_images} images{rate}{strip_note}: {sampler}, {steps} steps"
            f"{f', churn {churn:g}' if churn else ''}, guidance {guidance:g}, seed {seed}, {manifest['precision']} "
            f"-> {out}",
            markup=False,
        )
    return manifest
