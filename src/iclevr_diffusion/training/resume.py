"""What a training run continues from: the checkpoint to resume, whether it fits the config, and
what it recorded that the config leaves open (EDM's measured sigma_data)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import yaml

from iclevr_diffusion.config import Config, config_from_dict
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.run_folder import RunFolder
from iclevr_diffusion.training import checkpoints as ckpt


def resume_candidates(run_dir: Path, resume: Path | None) -> list[Path]:
    """--resume PATH (a named checkpoint is used as is; a folder falls back to older ones), else run_dir's."""
    if resume is not None:
        return ckpt.find_resume_source(Path(resume))[0]
    return list(reversed(ckpt.list_checkpoints(RunFolder(run_dir).checkpoints)))


def check_compatible(cfg: Config, source: dict) -> None:
    """The model must be the one the checkpoint holds; other keys (budget, lr...) may change."""
    if not source.get("config"):
        return
    old = config_from_dict(yaml.safe_load(source["config"]))
    for section in ("model", "schedule"):
        a, b = getattr(old, section), getattr(cfg, section)
        # sigma_data left to be measured (None) takes the checkpoint's measured value
        diff = [k for k in vars(a)
                if getattr(a, k) != getattr(b, k) and not (k == "sigma_data" and getattr(b, k) is None)]
        if diff:
            k = diff[0]
            raise IclevrError(
                f"{section}.{k} is {getattr(b, k)!r} but the checkpoint {source['path']} was trained with "
                f"{getattr(a, k)!r}; use the same config to resume, or a new --name to start another run."
            )
    if old.data.image_size != cfg.data.image_size:
        raise IclevrError(
            f"data.image_size is {cfg.data.image_size} but the checkpoint {source['path']} was trained at "
            f"{old.data.image_size}; use a new --name to start another run."
        )


def with_sigma_data(cfg: Config, source: dict | None, data, note: Callable[[str], None]) -> Config:
    """EDM and rectified flow need sigma_data, the std of the training pixels: the config's, else the
    checkpoint's (a resumed run), else measured on the dataset now. Returned in a copy of the config, which
    every run file records."""
    sch = cfg.schedule
    if sch.formulation == "ddpm" or sch.sigma_data is not None:
        return cfg
    from iclevr_diffusion.diffusion.edm import measure_sigma_data

    value = None
    if source is not None and source.get("config"):
        value = config_from_dict(yaml.safe_load(source["config"])).schedule.sigma_data
    if value is None:
        value = measure_sigma_data(data)
        note(f"sigma_data {value} (std of the training pixels, measured on up to 1,024 images)")
    cfg = copy.deepcopy(cfg)
    cfg.schedule.sigma_data = value
    return cfg


def resume_extra_emas(extras: dict, source: dict, note: Callable[[str], None]) -> None:
    """Load each extra EMA (train.extra_ema_lengths, by share "0.25") from the checkpoint; one the checkpoint
    lacks (the key was added on resuming) starts from the main EMA's weights at its step count, keeping its
    own averaging rule, with a note saying so."""
    own_rule = ("decay", "min_decay", "use_ema_warmup", "inv_gamma", "power")
    for share, extra in extras.items():
        if share in source.get("extra_ema", {}):
            extra.load_state_dict({**source["state"]["extra_ema"][share], "shadow_params": source["extra_ema"][share]})
            continue
        rule = {k: v for k, v in extra.state_dict().items() if k in own_rule}
        extra.load_state_dict({**source["state"]["ema"], "shadow_params": source["ema"], **rule})
        note(f"EMA {share} is not in checkpoint {source['path'].name}: it starts from the main EMA's weights")
