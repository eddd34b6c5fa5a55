"""Inference samplers by name, each made `from_config` of the training DDPMScheduler.

Because every sampler is built from the training scheduler's config, it uses the exact betas and
prediction type the model was trained with; only the stepping rule differs.

Choices that hold for every sampler here (probed on every schedule the trainer offers - linear,
scaled_linear, cosine; epsilon and v_prediction; T = 100 and 1000 - in tests/test_pipeline.py):

- timestep_spacing="trailing": the first step is at t = T-1, where the model was trained on (almost)
  pure noise. diffusers' DDPM config says "leading", which starts a 10-step DDIM at t = 900 and a short
  schedule (T = 100) at a point far from noise (Lin et al. 2023, "Common diffusion noise schedules
  and sample steps are flawed", recommend trailing).
- The predicted clean image is clipped to [-1, 1] whenever the training scheduler clips
  (clip_sample=True, as DDPM and DDIM do). DPM-Solver++ and UniPC have no clip_sample; their
  `thresholding` with sample_max_value = 1 is exactly that clip. Without it an epsilon model's x0
  estimate at t = T-1 (x0 = (x - sqrt(1 - a) eps) / sqrt(a), sqrt(a) ~ 0.006 on the linear
  schedule) amplifies any error in eps ~160 times, and a briefly trained model came out with pixel
  std ~80 (cosine + UniPC: ~10,000) instead of ~0.5.
"""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from iclevr_diffusion.config import SAMPLERS_BY_FORMULATION
from iclevr_diffusion.errors import IclevrError

SAMPLERS = SAMPLERS_BY_FORMULATION["ddpm"]
TIMESTEP_SPACING = "trailing"  # every DDPM-model sampler's (see the module docstring)


def samplers_for(train_scheduler: SchedulerMixin) -> tuple[str, ...]:
    """The sampler names a model trained with `train_scheduler` offers (DDPM, or EDM and rectified flow)."""
    from iclevr_diffusion.diffusion.edm import EDM_SAMPLERS, is_edm

    return EDM_SAMPLERS if is_edm(train_scheduler) else SAMPLERS


def make_sampler(name: str, train_scheduler: SchedulerMixin, churn: float = 0.0) -> SchedulerMixin:
    """A fresh scheduler of kind `name` sharing `train_scheduler`'s noise schedule; `churn`: EDM's S_churn
    for an EDM or flow model's heun and euler (edm.EDMHeunScheduler), ignored by the others."""
    from iclevr_diffusion.diffusion.edm import is_edm, make_edm_sampler

    check_sampler_name(name, train_scheduler)
    if is_edm(train_scheduler):
        return make_edm_sampler(name, train_scheduler, churn)
    config = train_scheduler.config
    common = {"timestep_spacing": TIMESTEP_SPACING}
    clip = bool(config.get("clip_sample", True))
    clip_range = float(config.get("clip_sample_range", 1.0))
    solver_clip = {"thresholding": clip, "sample_max_value": clip_range, "dynamic_thresholding_ratio": 0.995}
    if name == "ddpm":
        return DDPMScheduler.from_config(config, **common)
    if name == "ddim":
        return DDIMScheduler.from_config(config, set_alpha_to_one=True, **common)
    if name == "dpm++":
        # With the cosine schedule, log-SNR near t = T is hugely negative and DPM-Solver's first step
        # explodes; clipping lambda (diffusers' documented remedy for cosine) drops those steps.
        cosine = config.get("beta_schedule") == "squaredcos_cap_v2"
        return DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            lambda_min_clipped=-5.1 if cosine else -float("inf"),
            **solver_clip,
            **common,
        )
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config, **solver_clip, **common)
    raise IclevrError(f"Unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}.")


def with_sampling_settings(train_scheduler: SchedulerMixin) -> SchedulerMixin:
    """The training DDPMScheduler with the timestep spacing every sampler here uses written into its config.

    Saved with a model, it lets plain diffusers code make a sampler the usual way and get the toolkit's:
    DDIMScheduler.from_config(pipe.scheduler.config) is `--sampler ddim` (DDIM's set_alpha_to_one defaults
    to True, and clip_sample comes from the DDPM config), DDPMScheduler the same for `--sampler ddpm`.
    Training ignores the spacing (it only matters to set_timesteps). Other schedulers are returned as they are.
    """
    if type(train_scheduler) is not DDPMScheduler or train_scheduler.config.timestep_spacing == TIMESTEP_SPACING:
        return train_scheduler
    return DDPMScheduler.from_config(train_scheduler.config, timestep_spacing=TIMESTEP_SPACING)


def check_sampler_name(name: str, train_scheduler: SchedulerMixin) -> str:
    """`name` if the model's noise schedule offers that sampler, else IclevrError listing those it offers."""
    from iclevr_diffusion.diffusion.edm import is_edm
    from iclevr_diffusion.diffusion.flow import is_flow

    offered = samplers_for(train_scheduler)
    if name not in offered:
        kind = "rectified-flow" if is_flow(train_scheduler) else "EDM" if is_edm(train_scheduler) else "DDPM"
        raise IclevrError(f"Unknown sampler '{name}' for this {kind} model; choose one of: {', '.join(offered)}.")
    return name


def check_sampling(name: str | None, steps: int, guidance_scale: float, train_scheduler: SchedulerMixin) -> None:
    """The one check of a sampling request (sampler name, steps, guidance) against a model's noise schedule:
    the pipeline runs it on every call, the commands before any work starts (sampling.resolve_sampling).
    name None: a scheduler the caller put in place runs as it is, so there is no name to check."""
    if name is not None:
        check_sampler_name(name, train_scheduler)
    check_steps(steps, train_scheduler)
    if guidance_scale < 0:
        raise IclevrError(f"--guidance-scale must be 0 or more (1 = off), got {guidance_scale}.")


def check_steps(steps: int, train_scheduler: SchedulerMixin) -> int:
    """`steps` if every sampler can take it (1..T; all four were tried at 1, 2 and T), else IclevrError.
    EDM models have continuous noise levels; their schedulers' num_train_timesteps (1000) is the cap."""
    total = int(train_scheduler.config.num_train_timesteps)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise IclevrError(f"--steps must be a positive whole number, got {steps!r}.")
    if steps > total:
        raise IclevrError(f"--steps {steps} is more than the model's {total} training timesteps; use at most {total}.")
    return steps


def clean_estimate_rms(unet, train_scheduler: SchedulerMixin, images: int = 4, seed: int = 0) -> float:
    """RMS of the model's clean-image estimate x0 at t = T-1, from pure noise with the null label.

    Needs no data: at t = T-1 the input is (almost) pure noise, and the best estimate of x0 there is
    about the mean training image. A mean of images in [-1, 1] lies in [-1, 1] pixel by pixel, so its
    RMS is at most 1; well above 1 means the model's x0 is off by more than the data range.
    For an EDM or rectified-flow model: D(x; sigma_max) with x = sigma_max * noise.
    """
    from iclevr_diffusion.diffusion.edm import is_edm, scheduler_denoise

    if is_edm(train_scheduler):
        size, sigma = int(unet.config.sample_size), float(train_scheduler.config.sigma_max)
        noise = torch.randn((images, 3, size, size), generator=torch.Generator().manual_seed(seed))
        x = (noise * sigma).to(unet.device)
        labels = torch.zeros(images, int(unet.config.num_classes), device=unet.device)
        with torch.no_grad():
            d = scheduler_denoise(train_scheduler, unet, x, torch.full((images,), sigma, device=unet.device),
                                  labels).float()
        return float(d.pow(2).mean().sqrt())
    t = int(train_scheduler.config.num_train_timesteps) - 1
    size = int(unet.config.sample_size)
    x = torch.randn((images, 3, size, size), generator=torch.Generator().manual_seed(seed)).to(unet.device)
    labels = torch.zeros(images, int(unet.config.num_classes), device=unet.device)
    with torch.no_grad():
        out = unet(x, torch.full((images,), t, device=unet.device), labels).float()
    return float(clean_estimate(out, x, t, train_scheduler).pow(2).mean().sqrt())


def clean_estimate(out: torch.Tensor, x: torch.Tensor, t: int, train_scheduler: SchedulerMixin) -> torch.Tensor:
    """The clean image x0 that model output `out` at noisy input `x` and timestep t implies (unclipped)."""
    alpha_bar = train_scheduler.alphas_cumprod[t]
    a, s = float(alpha_bar.sqrt()), float((1 - alpha_bar).sqrt())
    kind = train_scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - s * out) / a
    if kind == "v_prediction":
        return a * x - s * out
    return out


def unreliable_sampler_message(sampler: str, unet, train_scheduler: SchedulerMixin) -> str | None:
    """A one-line warning when `sampler` is likely to give saturated, off-colour images with this model.

    Why only DDIM is spared (measured in BENCHMARKS.md, "Why only DDIM"): a briefly trained epsilon
    model predicts the noise at t ~ T to about 1e-3, and x0 = (x - sqrt(1 - a) eps) / sqrt(a) multiplies
    that error by ~160 on the linear schedule. DDPM, DPM-Solver++ and UniPC step with that x0 (clipped)
    and re-derive the noise from it, so the error accumulates into coloured floors and a 2x2 checkerboard;
    DDIM clips x0 but keeps the model's own noise estimate, which pulls over-range predictions back.
    """
    from iclevr_diffusion.diffusion.edm import is_edm

    if sampler == "ddim":  # (a DDPM-only name: EDM models are probed with every sampler)
        return None
    rms = clean_estimate_rms(unet, train_scheduler)
    if rms <= 1.0:
        return None
    if is_edm(train_scheduler):  # bounded by construction: far off means an untrained or broken model
        return (  # rectified flow divides its pixels by sigma_data too (flow.py)
            f"this model's clean-image estimate at the noisiest step has RMS {rms:.1f} (a trained one is at "
            "most 1): expect poor images from any sampler; train it longer, or check schedule.sigma_data."
        )
    return (
        f"{sampler} is likely to give saturated, off-colour images with this model: its clean-image estimate "
        f"at the noisiest step has RMS {rms:.1f} (a good one is at most 1). Use --sampler ddim, which copes "
        "with that, or a model trained longer or with schedule.prediction_type=v_prediction."
    )
