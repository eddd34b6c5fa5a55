"""The training noise schedule built from the `schedule` config section: a diffusers DDPMScheduler for
the DDPM formulation, an EDMEulerScheduler (carrying sigma_data and the noise range) for EDM, and
its rectified-flow twin (flow.py: the same keys, flow's preconditioning) for rectified flow.

Samplers for inference are made from this scheduler's config (see samplers.py), so the betas (or
sigma_data) a model was trained with are the ones it is sampled with.
"""

from __future__ import annotations

from diffusers import DDPMScheduler

from iclevr_diffusion.config import ScheduleConfig

# diffusers' own "scaled_linear" is the latent-diffusion sqrt schedule; ours is the DDPM-sense one
# (Nichol & Dhariwal): the linear betas scaled by 1000/T, so a short schedule still ends in noise.
_DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "linear", "cosine": "squaredcos_cap_v2"}


def make_train_scheduler(cfg: ScheduleConfig, sigma_data: float | None = None):
    """`sigma_data` (EDM) overrides cfg.sigma_data, e.g. with the value measured on the training set;
    with neither, EDM's natural-image 0.5 (only tools that do not train, like speed benchmarks)."""
    if cfg.formulation in ("edm", "flow"):
        from iclevr_diffusion.diffusion.edm import make_edm_scheduler
        from iclevr_diffusion.diffusion.flow import make_flow_scheduler

        sd = sigma_data if sigma_data is not None else cfg.sigma_data
        make = make_edm_scheduler if cfg.formulation == "edm" else make_flow_scheduler
        return make(0.5 if sd is None else sd, cfg.sigma_min, cfg.sigma_max)
    scale = 1000.0 / cfg.num_train_timesteps if cfg.beta_schedule == "scaled_linear" else 1.0
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=_DIFFUSERS_NAME[cfg.beta_schedule],
        beta_start=cfg.beta_start * scale,
        beta_end=cfg.beta_end * scale,
        prediction_type=cfg.prediction_type,
        clip_sample=True,
    )


def final_alpha_bar(scheduler: DDPMScheduler) -> float:
    """alpha_bar at t = T: how much signal is left where sampling starts from pure noise."""
    return float(scheduler.alphas_cumprod[-1])
