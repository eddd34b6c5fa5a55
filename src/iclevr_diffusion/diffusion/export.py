"""Writing a model as a plain diffusers UNet2DModel folder plus the label projection.

Scripts written for the lab report's architecture (the `seed` preset) hold a `UNet2DModel` with
`class_embed_type="identity"` and a `Linear(24 -> time_embed_dim)` of their own. `export_plain_unet`
writes OUT/unet/ (`UNet2DModel.save_pretrained`), OUT/label_projection.safetensors (`weight`, `bias`),
OUT/scheduler/ (the training noise schedule) and OUT/label_projection.json saying how they fit:

    emb = labels @ W.T + b                      # labels: (B, 24) multi-hot, objects.json order
    eps = unet(x_t, t, class_labels=emb).sample

Only models a plain UNet2DModel expresses exactly are written: patch_size 1 (no pixel folding around
the UNet) and the DDPM formulation (EDM's timestep scaling and preconditioning live outside the UNet).
"""

from __future__ import annotations

from pathlib import Path

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.io import write_json
from iclevr_diffusion.labels import LABELS

UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
PROJECTION = "label_projection.safetensors"
PROJECTION_CARD = "label_projection.json"


def plain_unet_refusal(model) -> str | None:
    """Why `model` (a ConditionalUNet) cannot be written as a plain UNet2DModel, or None if it can."""
    if model.config.patch_size != 1:
        p = model.config.patch_size
        return (f"its UNet runs on {p}x{p} pixel patches folded into channels (model.patch_size={p}): "
                "a plain UNet2DModel user would have to pixel_unshuffle the input and pixel_shuffle the output")
    if getattr(model.config, "patch_head", 0):
        return (f"a {model.config.patch_head}-channel conv head refines its UNet's output at full resolution "
                "(model.patch_head): a plain UNet2DModel has no such head")
    if any(getattr(model.config, "cross_attention", ())):
        return ("its blocks cross-attend to one token per class (model.cross_attention): it is a "
                "UNet2DConditionModel, not a UNet2DModel")
    if model.config.timestep_scale != 1.0:
        return ("it is an EDM or rectified-flow model: its UNet takes a scaled noise level as the timestep and "
                "its output needs the preconditioning (c_skip, c_out, c_in), which a plain UNet2DModel user would "
                "not apply")
    return None


def export_plain_unet(pipe, out: Path, force: bool = False) -> Path:
    """Write `pipe`'s model as OUT/unet/ + OUT/label_projection.{safetensors,json} + OUT/scheduler/."""
    from safetensors.torch import save_file

    from iclevr_diffusion.diffusion.edm import is_edm

    model, schedule = pipe.unet, getattr(pipe, "_noise_scheduler", pipe.scheduler)
    why = plain_unet_refusal(model)
    if why is None and is_edm(schedule):
        why = ("it is an EDM or rectified-flow model: its sampler applies the preconditioning (c_skip, c_out, c_in) "
               "to the UNet")
    if why:
        raise IclevrError(f"Cannot write this model as a plain UNet2DModel: {why}. "
                          "Use the exported pipeline folder (RUN/model) instead.")
    out = Path(out)
    if (out / UNET_DIR).exists() and not force:
        raise IclevrError(f"{out / UNET_DIR} already exists; choose another --out or pass --force.")
    out.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(out / UNET_DIR)
    proj = model.label_proj
    save_file({"weight": proj.weight.detach().float().cpu().contiguous(),
               "bias": proj.bias.detach().float().cpu().contiguous()}, str(out / PROJECTION))
    schedule.save_pretrained(out / SCHEDULER_DIR)
    write_json(out / PROJECTION_CARD, {
        "usage": "emb = labels @ weight.T + bias; eps = unet(x_t, t, class_labels=emb).sample",
        "labels": "multi-hot float (B, num_classes) in the order of 'label_names' (objects.json); "
                  "all zeros = unconditioned (classifier-free guidance)",
        "weight_shape": list(proj.weight.shape),
        "unet": f"{UNET_DIR}/ (UNet2DModel, class_embed_type='identity')",
        "scheduler": f"{SCHEDULER_DIR}/ (the training noise schedule)",
        "prediction_type": schedule.config.get("prediction_type", "epsilon"),
        "label_names": list(LABELS) if proj.weight.shape[1] == len(LABELS) else None,
    })
    return out
