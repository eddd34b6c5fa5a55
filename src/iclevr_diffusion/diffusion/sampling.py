"""Loading an exported model and drawing images for lists of label lists.

A run folder (run_folder.py) holds `model/`, a ConditionalDDPMPipeline.save_pretrained folder
(model_index.json, unet/, scheduler/) plus `run_config.yaml`, the resolved config of the run that made it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from iclevr_diffusion.config import Config, config_from_dict
from iclevr_diffusion.config import read_yaml as read_config_yaml
from iclevr_diffusion.devices import resolve_device
from iclevr_diffusion.diffusion.pipeline import ConditionalDDPMPipeline, labels_to_tensor, preferred_sampler
from iclevr_diffusion.diffusion.pipeline import default_steps as pipeline_default_steps
from iclevr_diffusion.diffusion.samplers import check_sampler_name, check_sampling, unreliable_sampler_message
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.run_folder import (
    MODEL_DIR as MODEL_DIR,  # re-exported: used by callers before run_folder
)
from iclevr_diffusion.run_folder import RUN_CONFIG, find_model_dir
from iclevr_diffusion.run_folder import newest_model as newest_model


def load_pipeline(
    model: Path | None, runs_dir: Path = Path("runs"), device: str | None = "auto"
) -> tuple[ConditionalDDPMPipeline, Config, Path]:
    """The pipeline (on `device`), the config of the run that made it, and the model folder."""
    from diffusers.utils import logging as dlogging

    target = resolve_device(device)  # a bad --device fails before the slow load
    folder = find_model_dir(model, runs_dir)
    dlogging.disable_progress_bar()
    dlogging.set_verbosity_error()
    try:
        pipe = ConditionalDDPMPipeline.from_pretrained(folder)
    except Exception as e:  # diffusers raises many types for a broken or foreign folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IclevrError(f"Cannot load the model in {folder}: {first}") from None
    check_model(pipe, folder)
    cfg = Config()
    if (folder / RUN_CONFIG).is_file():
        cfg = config_from_dict(read_config_yaml(folder / RUN_CONFIG))
        if pipe.config.get("default_sampler") is None:  # exported before the defaults were saved with the model
            pipe.register_to_config(default_sampler=cfg.sample.sampler, default_steps=cfg.sample.steps,
                                    default_guidance_scale=cfg.sample.guidance_scale)
        if pipe.config.get("default_churn") is None:  # exported before churn was saved with the model
            pipe.register_to_config(default_churn=cfg.sample.churn)
    pipe.set_progress_bar_config(disable=True)  # the commands draw their own progress
    pipe.to(target)
    pipe.unet.eval()
    return pipe, cfg, folder


def check_model(pipe: ConditionalDDPMPipeline, folder: Path) -> None:
    """A diffusers folder of another model (a plain UNet2DModel, another label count) loads without
    complaint but fails at the first forward pass: refuse it here, naming what it holds."""
    from iclevr_diffusion.diffusion.model import ConditionalUNet
    from iclevr_diffusion.labels import NUM_CLASSES

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, ConditionalUNet):
        kind = type(unet).__name__ if unet is not None else "no unet"
        raise IclevrError(
            f"The model in {folder} is a {kind}, not this toolkit's ConditionalUNet; give a folder written "
            "by 'iclevr-diff train' (RUN or RUN/model)."
        )
    if unet.config.num_classes != NUM_CLASSES:
        raise IclevrError(
            f"The model in {folder} takes {unet.config.num_classes} labels, but i-CLEVR has {NUM_CLASSES} "
            "(see 'iclevr-diff labels'); it cannot draw these label names."
        )


def resolve_sampling(
    cfg: Config,
    pipe: ConditionalDDPMPipeline,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> tuple[str, int, float]:
    """Sampler, steps and guidance: the flags where given, else the run config's `sample` section.

    ddpm takes all T steps unless --steps is given for it: the report's ancestral sampler is the
    full chain, and the config's step count is meant for the fast solvers (see default_steps). Warns
    (one line) when the sampler is likely to fail on this model (see samplers.unreliable_sampler_message).
    """
    sampler = sampler or preferred_sampler(cfg.sample.sampler, pipe.scheduler)
    check_sampler_name(sampler, pipe.scheduler)
    if steps is None:
        steps = default_steps(sampler, cfg, pipe.scheduler)
    guidance = cfg.sample.guidance_scale if guidance_scale is None else float(guidance_scale)
    check_sampling(sampler, steps, guidance, pipe.scheduler)  # the pipeline's own check, before any work
    message = unreliable_sampler_message(sampler, pipe.unet, pipe.scheduler)
    if message:
        warnings.warn(message, stacklevel=2)
    return sampler, steps, guidance


def default_steps(sampler: str, cfg: Config, train_scheduler) -> int:
    """Steps when --steps is not given, by the run config (see pipeline.default_steps)."""
    return pipeline_default_steps(sampler, cfg.sample.sampler, cfg.sample.steps, train_scheduler)


def image_generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, image index).

    Image i of a seed is then the same whatever the batch size and whatever else is drawn with it,
    and different seeds give unrelated noise (seed + i would make seed 1 a shifted copy of seed 0).
    """
    import numpy as np

    return [
        torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1, dtype=np.uint64)[0] >> 1))
        for i in range(start, start + count)
    ]


def generate(
    pipe: ConditionalDDPMPipeline,
    conditions: Sequence[Sequence[str]],
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    autocast: bool | None = None,
    churn: float | None = None,
) -> torch.Tensor:
    """(N, 3, S, S) images in [-1, 1] for N label lists, drawn in batches of `batch_size`.

    sampler, steps, guidance_scale: None takes the pipeline's saved defaults (the run's `sample` section).
    Image i is seeded from (seed, i), so it does not depend on batch_size. `progress(n)` is called
    after every denoising step of a batch with n = the images in that batch, so a bar over
    len(conditions) * steps fills exactly (the pipeline's own tqdm bar is off meanwhile).
    `autocast=None` takes the precision policy's default for the device (precision.sampling_autocast);
    `churn=None` the model's saved churn for heun and euler (pipeline.sampling_churn).
    The denoising-process strip comes from the pipeline itself (`pipe(..., frames=F)`).
    """
    if batch_size < 1:
        raise IclevrError(f"--batch-size must be positive, got {batch_size}.")
    if seed < 0:
        raise IclevrError(f"--seed must be 0 or more, got {seed}.")
    sampler, steps, guidance_scale = pipe.sampling_defaults(sampler, steps, guidance_scale)
    labels = labels_to_tensor(conditions, pipe.unet.config.num_classes, warn=False)  # input time warned
    chunks = []
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    if progress is not None:
        pipe.set_progress_bar_config(**{**bar_config, "disable": True})
    try:
        for i in range(0, len(labels), batch_size):
            batch = labels[i : i + batch_size]
            out = pipe(batch, steps, guidance_scale, generator=image_generators(seed, i, len(batch)),
                       callback=progress, autocast=autocast, sampler=sampler, churn=churn, output_type="pt")
            chunks.append(out.images)
    finally:
        pipe.set_progress_bar_config(**bar_config)
    return torch.cat(chunks)
