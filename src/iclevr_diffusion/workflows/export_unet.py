"""`iclevr-diff export-unet`: a model as a plain diffusers UNet2DModel folder plus the label projection."""

from __future__ import annotations

from pathlib import Path

from iclevr_diffusion.workflows.console import out as stdout
from iclevr_diffusion.workflows.console import print_json


def run(model: Path | None, runs_dir: Path, out: Path, force: bool = False, as_json: bool = False) -> None:
    from iclevr_diffusion.diffusion.export import (
        PROJECTION,
        PROJECTION_CARD,
        SCHEDULER_DIR,
        UNET_DIR,
        export_plain_unet,
    )
    from iclevr_diffusion.diffusion.sampling import load_pipeline

    pipe, _, folder = load_pipeline(model, runs_dir, device="cpu")
    export_plain_unet(pipe, out, force=force)
    summary = {"model": str(folder), "out": str(out), "unet": str(out / UNET_DIR),
               "label_projection": str(out / PROJECTION), "card": str(out / PROJECTION_CARD),
               "scheduler": str(out / SCHEDULER_DIR)}
    if as_json:
        print_json(summary)
        return
    stdout.print(f"Wrote {out}: {UNET_DIR}/ (UNet2DModel.from_pretrained), {PROJECTION} "
              f"(emb = labels @ weight.T + bias, passed as class_labels=emb), {SCHEDULER_DIR}/, {PROJECTION_CARD}.")
