"""Loading an exported model and drawing images for lists of label lists.

A run folder looks like runs/NAME/{config.yaml, model/, checkpoints/, ...}; `model/` is a
ConditionalDDPMPipeline.save_pretrained folder (model_index.json, unet/, scheduler/) plus
`run_config.yaml`, the resolved config of the run that made it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from iclevr_diffusion.config import Config, config_from_dict
from iclevr_diffusion.config import read_yaml as read_config_yaml
from iclevr_diffusion.devices import resolve_device
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.labels import multi_hot_batch
from iclevr_diffusion.pipeline import ConditionalDDPMPipeline
from iclevr_diffusion.samplers import make_sampler

MODEL_DIR = "model"
RUN_CONFIG = "run_config.yaml"


def newest_model(runs_dir: Path) -> Path:
    """The exported model of the most recently trained run under `runs_dir`."""
    found = sorted(Path(runs_dir).glob(f"*/{MODEL_DIR}/model_index.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise IclevrError(
            f"No trained model found under {runs_dir}/. Train one with 'iclevr-diff train' or pass --model."
        )
    return found[-1].parent


def find_model_dir(model: Path | None, runs_dir: Path = Path("runs")) -> Path:
    """Accept an exported model folder or a run folder (which holds model/)."""
    if model is None:
        return newest_model(runs_dir)
    model = Path(model)
    if (model / "model_index.json").is_file():
        return model
    if (model / MODEL_DIR / "model_index.json").is_file():
        return model / MODEL_DIR
    if not model.exists():
        raise IclevrError(f"--model {model} does not exist.")
    raise IclevrError(
        f"--model {model} holds no exported model (model_index.json); give a run folder or its model/ folder."
    )


def load_pipeline(
    model: Path | None, runs_dir: Path = Path("runs"), device: str | None = "auto"
) -> tuple[ConditionalDDPMPipeline, Config, Path]:
    """The pipeline (on `device`), the config of the run that made it, and the model folder."""
    from diffusers.utils import logging as dlogging

    folder = find_model_dir(model, runs_dir)
    dlogging.disable_progress_bar()
    dlogging.set_verbosity_error()
    try:
        pipe = ConditionalDDPMPipeline.from_pretrained(folder)
    except Exception as e:  # diffusers raises many types for a broken or foreign folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IclevrError(f"Cannot load the model in {folder}: {first}") from None
    cfg = Config()
    if (folder / RUN_CONFIG).is_file():
        cfg = config_from_dict(read_config_yaml(folder / RUN_CONFIG))
    pipe.to(resolve_device(device))
    pipe.unet.eval()
    return pipe, cfg, folder


def generate(
    pipe: ConditionalDDPMPipeline,
    conditions: Sequence[Sequence[str]],
    sampler: str = "dpm++",
    steps: int = 25,
    guidance_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """(N, 3, S, S) images in [-1, 1] for N label lists, drawn in batches with one seeded generator."""
    train_scheduler = pipe.scheduler
    pipe.scheduler = make_sampler(sampler, train_scheduler)
    try:
        generator = torch.Generator().manual_seed(seed)
        labels = multi_hot_batch(conditions)
        chunks = [
            pipe(labels[i : i + batch_size], steps, guidance_scale, generator=generator, callback=progress)
            for i in range(0, len(labels), batch_size)
        ]
    finally:
        pipe.scheduler = train_scheduler
    return torch.cat(chunks)
