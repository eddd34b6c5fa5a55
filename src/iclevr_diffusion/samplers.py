"""Inference samplers by name, each made `from_config` of the training DDPMScheduler.

Because every sampler is built from the training scheduler's config, it uses the exact betas the
model was trained with; only the stepping rule differs.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from iclevr_diffusion.errors import IclevrError

SAMPLERS = ("ddpm", "ddim", "dpm++", "unipc")


def make_sampler(name: str, train_scheduler: SchedulerMixin) -> SchedulerMixin:
    """A fresh scheduler of kind `name` sharing `train_scheduler`'s noise schedule."""
    config = train_scheduler.config
    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config, set_alpha_to_one=True)
    # With the cosine schedule, log-SNR at t = T is -inf-like and DPM-Solver's first step explodes;
    # clipping lambda (documented remedy, value from diffusers' docs) keeps it finite.
    clip = -5.1 if config.get("beta_schedule") == "squaredcos_cap_v2" else -float("inf")
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, lambda_min_clipped=clip
        )
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config)
    raise IclevrError(f"Unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}.")
