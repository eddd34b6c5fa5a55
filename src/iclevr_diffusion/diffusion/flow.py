"""Rectified flow (Liu et al. 2022; the recipe of Stable Diffusion 3, Esser et al. 2024) on EDM's machinery.

Rectified flow noises along a straight line, x_t = (1 - t) y' + t n with t in [0, 1], and trains the
network to predict the velocity v = n - y' with a plain MSE, at logit-normal t. Its data y' has unit
variance (SD3 scales its latents so): here y' = y / sigma_data, the pixels divided by their measured
standard deviation (about 0.2 for i-CLEVR); `schedule.sigma_data=1` trains on the raw pixels instead.

Dividing x_t by (1 - t) and multiplying by sigma_data gives EDM's x = y + sigma n with
sigma = sigma_data * t / (1 - t): the same noisy images in EDM's coordinates, with
logit(t) = ln(sigma) - ln(sigma_data). So logit-normal t is EDM's log-normal sigma: schedule.p_mean and
p_std stay EDM's ln(sigma) (SD3's logit-normal(0, 1) is p_mean = ln(sigma_data), p_std = 1). In EDM's
terms (edm.py) rectified flow is one more preconditioning, with t = s / (1 + s), s = sigma / sigma_data:

    c_in = (1 - t) / sigma_data       the network sees x_t itself
    c_noise = t                       x1000 in the UNet (diffusers' flow-matching timesteps)
    c_skip = 1 - t, c_out = -sigma_data t      D = sigma_data (x_t - t v)

and its loss, ||F - v||^2, is lambda(sigma) ||D - y||^2 with lambda = 1 / c_out^2 = ((1 + s) / sigma)^2.
What differs from EDM: the network's input and target variances vary with sigma (EDM makes both 1 at
every sigma), and the middle noise levels weigh more: lambda_flow / lambda_EDM = (1 + s)^2 / (1 + s^2),
1 at either end and 2 at sigma = sigma_data.

Both formulations transport the same noisy marginals, so the probability-flow ODE is one and the same:
every EDM sampler here (Heun, Euler, DPM-Solver++ and its SDE variant) steps a flow model once its
preconditioning is swapped, which the classes below do. They run in EDM's coordinates (start from noise
of standard deviation sigma_max), so the pipeline, guidance on the network output and the process strips
work unchanged. diffusers' FlowMatchEulerDiscreteScheduler works in x_t and has no scale_model_input or
init_noise_sigma, which the pipeline's one loop needs; its Euler step on x_t is EDM's Euler step on x.
"""

from __future__ import annotations

import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

# diffusers' generic loader (DiffusionPipeline.from_pretrained) finds a component's base class by name in the
# module model_index.json names for it, this one: SchedulerMixin must be an attribute here.
from diffusers import SchedulerMixin as SchedulerMixin

from iclevr_diffusion.diffusion.edm import EDMHeunScheduler, EDMStochasticEulerScheduler

# The UNet's timestep for a flow model is t x 1000, as diffusers' flow-matching schedulers hand it over:
# the range of the 1,000 DDPM timesteps its sinusoidal embedding was designed for.
FLOW_TIMESTEP_SCALE = 1000.0


def flow_time(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """t = s / (1 + s), s = sigma / sigma_data: where x = y + sigma n lies on rectified flow's line from the
    (scaled) image at t = 0 to the noise at t = 1."""
    s = sigma / sigma_data
    return s / (1 + s)


def flow_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) of rectified flow at EDM noise level `sigma` (module docstring)."""
    t = flow_time(sigma, sigma_data)
    return 1 - t, -sigma_data * t, (1 - t) / sigma_data, t


class FlowPreconditioning:
    """Rectified flow's coefficients in place of EDM's on a diffusers EDM scheduler (with its sigma_data)."""

    def coefficients(self, sigma):
        return flow_coefficients(torch.as_tensor(sigma), float(self.config.sigma_data))

    def precondition_inputs(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        return sample * self.coefficients(sigma)[2]

    def precondition_noise(self, sigma) -> torch.Tensor:
        sigma = sigma if isinstance(sigma, torch.Tensor) else torch.tensor([sigma])
        return flow_time(sigma, float(self.config.sigma_data))

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        skip, out, _, _ = self.coefficients(sigma)
        return skip * sample + out * model_output


class FlowEulerScheduler(FlowPreconditioning, EDMEulerScheduler):
    """The training scheduler saved with a flow model."""


class FlowHeunScheduler(FlowPreconditioning, EDMHeunScheduler):
    """EDM's Heun with its churn (edm.EDMHeunScheduler) for a flow model: `--sampler heun`."""


class FlowStochasticEulerScheduler(FlowPreconditioning, EDMStochasticEulerScheduler):
    """EDM's Euler with churn (edm.EDMStochasticEulerScheduler) for a flow model: `--sampler euler`."""


class FlowDPMSolverMultistepScheduler(FlowPreconditioning, EDMDPMSolverMultistepScheduler):
    """diffusers' EDM DPM-Solver++ (and its SDE variant) for a flow model: `--sampler dpm++` / `dpm++sde`."""


def make_flow_scheduler(sigma_data: float, sigma_min: float = 0.002, sigma_max: float = 80.0,
                        rho: float = 7.0) -> FlowEulerScheduler:
    """The scheduler saved with a flow model: the data scale and the sampling noise range (Karras sigmas)."""
    return FlowEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=rho,
                              sigma_schedule="karras", prediction_type="epsilon", final_sigmas_type="zero")


# The flow twins of EDM's (heun, euler, dpm++ / dpm++sde) samplers, for edm.make_edm_sampler.
FLOW_SAMPLER_CLASSES = (FlowHeunScheduler, FlowStochasticEulerScheduler, FlowDPMSolverMultistepScheduler)


def is_flow(scheduler) -> bool:
    return isinstance(scheduler, FlowPreconditioning)
