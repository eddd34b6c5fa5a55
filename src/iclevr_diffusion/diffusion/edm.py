"""The EDM formulation (Karras et al. 2022, "Elucidating the design space of diffusion models").

The image is noised as x = y + sigma * n and the network F never predicts the noise itself: the
denoiser is

    D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x; c_noise(sigma))

with c_skip, c_out and c_in chosen so that F's input and training target have unit variance at every
sigma (sigma_data is the standard deviation of the training pixels). The clean-image estimate D is
therefore bounded at every noise level, unlike an epsilon model's x0 = (x - sqrt(1 - a) eps) /
sqrt(a), which multiplies the noise error by ~160 at t = T on the linear DDPM schedule: every
sampler, not only DDIM with its clip, gets a sane estimate to step with.

Training draws ln(sigma) ~ N(P_mean, P_std^2), which puts most samples at the middle noise levels
where objects are decided, and weights the loss by (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2,
which makes the loss on F a plain MSE.

diffusers' EDM schedulers (EDMEulerScheduler, EDMDPMSolverMultistepScheduler) apply c_in in
`scale_model_input`, hand the network timestep c_noise = ln(sigma) / 4 and apply c_skip / c_out in
`step`, so the sampling loop is the usual diffusers one. EDM's own 2nd-order Heun sampler with its
churn (Algorithm 2; deterministic, Algorithm 1, at churn 0), which diffusers lacks for EDM sigmas, is
`EDMHeunScheduler` below, in the same protocol; `EDMStochasticEulerScheduler` is its 1st-order twin.
"""

from __future__ import annotations

import math

import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from diffusers.schedulers.scheduling_edm_euler import EDMEulerSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from iclevr_diffusion.config import SAMPLERS_BY_FORMULATION
from iclevr_diffusion.diffusion.losses import weighted_mse

# ConditionalUNet multiplies its timestep by this for EDM models: c_noise = ln(sigma) / 4 spans about
# [-1.6, 1.1] for sigma in [0.002, 80], which would leave all but the highest frequencies of the UNet's
# sinusoidal time embedding (periods up to 10,000) constant; x250 spreads it over ~660 units, the
# same order as the 1,000 DDPM timesteps the embedding was designed for.
EDM_TIMESTEP_SCALE = 250.0

# The samplers an EDM model offers (make_edm_sampler); DDPM models have their own (samplers.py).
EDM_SAMPLERS = SAMPLERS_BY_FORMULATION["edm"]
# Their step counts when --steps is not given for a sampler other than the config's: Heun 18 steps is 35
# network evaluations (EDM's choice at 32x32-64x64); the first-order Euler and the stochastic DPM-Solver++
# SDE get the same 35, the 2nd-order multistep DPM-Solver++ (one evaluation a step) 25.
EDM_DEFAULT_STEPS = {"heun": 18, "euler": 35, "dpm++": 25, "dpm++sde": 35}
# The samplers that take EDM's churn (`--churn`, sample.churn), and the noise levels where they churn:
# S_tmin, S_tmax of EDM's ImageNet-64 setting (its S_noise, 1.003, is left at 1).
CHURN_SAMPLERS = ("heun", "euler")
CHURN_RANGE = (0.05, 50.0)


def c_skip(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return 1 / (sigma**2 + sigma_data**2).sqrt()


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log() / 4


def clean_estimate(x: torch.Tensor, network_output: torch.Tensor, timestep, sigma_data: float) -> torch.Tensor:
    """D from the network's output at the timestep a sampler handed it (c_noise(sigma), so sigma = e^(4t)):
    what a self-conditioned model is fed at its next evaluation."""
    sigma = torch.exp(4 * torch.as_tensor(timestep, dtype=torch.float32, device=x.device))
    return c_skip(sigma, sigma_data) * x + c_out(sigma, sigma_data) * network_output


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's lambda(sigma) on ||D - y||^2; it equals 1 / c_out^2, so the loss on F is unweighted."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoise(model, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, sigma_data: float,
            previous: torch.Tensor | None = None) -> torch.Tensor:
    """D(x; sigma): the clean image the model estimates from noisy `x` at noise levels `sigma` (B,);
    `previous`: a self-conditioned model's last estimate (None: none yet)."""
    extra = {"previous_estimate": previous / sigma_data} if previous is not None else {}
    return _denoise(model, x, sigma, labels, lambda s: _edm_coefficients(s, sigma_data), extra)


def scheduler_denoise(scheduler, model, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """D(x; sigma) with the preconditioning `scheduler` was saved with (EDM or rectified flow)."""
    return _denoise(model, x, sigma, labels, lambda s: coefficients(scheduler, s))


def _denoise(model, x, sigma, labels, coefficients_at, extra: dict | None = None) -> torch.Tensor:
    """c_skip x + c_out F(c_in x; c_noise) with the (c_skip, c_out, c_in, c_noise) that `coefficients_at` gives."""
    skip, out_scale, scale_in, noise_cond = coefficients_at(sigma.reshape(-1, 1, 1, 1).to(x.dtype))
    out = model(scale_in * x, noise_cond.flatten(), labels, **(extra or {})).to(x.dtype)
    return skip * x + out_scale * out


def sample_sigmas(
    batch: int,
    p_mean: float,
    p_std: float,
    generator: torch.Generator | None = None,
    p_uniform: float = 0.0,  # share drawn uniformly in ln(sigma) over sigma_range instead
    sigma_range: tuple[float, float] = (0.002, 80.0),
) -> torch.Tensor:
    """Training noise levels: ln(sigma) ~ N(p_mean, p_std^2), or with probability p_uniform uniform in
    ln(sigma) over sigma_range (the sampler's range). The log-normal alone gives the lowest noise levels,
    where the sampler's last steps remove the remaining grain, almost no training: 3% of N(-0.6, 0.9^2)
    falls below sigma 0.1. With p_uniform 0 no extra random numbers are drawn (runs reproduce)."""
    ln_sigma = torch.randn(batch, generator=generator) * p_std + p_mean
    if p_uniform > 0:
        lo, hi = math.log(sigma_range[0]), math.log(sigma_range[1])
        flat = torch.rand(batch, generator=generator) * (hi - lo) + lo
        ln_sigma = torch.where(torch.rand(batch, generator=generator) < p_uniform, flat, ln_sigma)
    return ln_sigma.exp()


def edm_loss(
    model: torch.nn.Module,
    scheduler: EDMEulerScheduler,  # carries sigma_data
    images: torch.Tensor,  # clean images in [-1, 1], (B, 3, S, S)
    labels: torch.Tensor,  # multi-hot (B, num_classes), already label-dropped if wanted
    generator: torch.Generator | None = None,  # CPU generator for noise levels and noise
    p_mean: float = -1.2,  # mean of ln(sigma)
    p_std: float = 1.2,  # standard deviation of ln(sigma)
    p_uniform: float = 0.0,  # share of noise levels uniform in ln(sigma) over the scheduler's range
    foreground_weight: float = 0.0,  # extra weight of pixels that stand out of the floor (losses.py)
) -> torch.Tensor:
    """lambda(sigma) * ||D(y + sigma n; sigma) - y||^2, computed as the equal, better-conditioned
    ||F - (y - c_skip x) / c_out||^2 (lambda * c_out^2 = 1)."""
    sd = float(scheduler.config.sigma_data)
    device = images.device
    sigma_range = (float(scheduler.config.sigma_min), float(scheduler.config.sigma_max))
    sigma = sample_sigmas(images.shape[0], p_mean, p_std, generator, p_uniform, sigma_range).to(device)
    noise = torch.randn(images.shape, generator=generator).to(device, images.dtype)
    s = sigma.reshape(-1, 1, 1, 1)
    noisy = images + s * noise
    skip, out_scale, scale_in, noise_cond = coefficients(scheduler, s)
    extra = {}
    # Self-conditioning: in half of the steps (a coin from the same generator) the network first
    # estimates without help, and learns to improve on that estimate (no gradient through it).
    if _self_conditioned(model) and torch.rand((), generator=generator) < 0.5:
        with torch.no_grad():
            first = denoise(model, noisy, sigma, labels, sd)
        extra = {"previous_estimate": first / sd}
    out = model(scale_in * noisy, noise_cond.flatten(), labels, **extra).float()
    target = (images - skip * noisy) / out_scale
    return weighted_mse(out, target.float(), images, foreground_weight)


def coefficients(scheduler, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) at `sigma` of the preconditioning `scheduler` was saved with: EDM's
    with its sigma_data, or the scheduler's own (rectified flow, flow.py)."""
    own = getattr(scheduler, "coefficients", None)
    return own(sigma) if own is not None else _edm_coefficients(sigma, float(scheduler.config.sigma_data))


def _edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    return c_skip(sigma, sigma_data), c_out(sigma, sigma_data), c_in(sigma, sigma_data), c_noise(sigma)


def _self_conditioned(model) -> bool:
    model = getattr(model, "module", model)  # accelerate's DistributedDataParallel wrapper
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    return bool(getattr(model, "self_conditioned", False))


def measure_sigma_data(dataset, images: int = 1024) -> float:
    """Standard deviation of the training pixels (in [-1, 1]) over the first `images` of the dataset.

    i-CLEVR scenes are mostly gray floor: about 0.2 for the built-in set, far from the 0.5 EDM assumes
    for natural images; with the wrong value c_in and c_out no longer give unit variances."""
    n = min(images, len(dataset))
    total, total_sq, count = 0.0, 0.0, 0
    for i in range(n):
        x = dataset[i][0].double()
        total += float(x.sum())
        total_sq += float((x * x).sum())
        count += x.numel()
    mean = total / count
    return round(math.sqrt(max(total_sq / count - mean * mean, 1e-12)), 4)


def make_edm_scheduler(sigma_data: float, sigma_min: float = 0.002, sigma_max: float = 80.0,
                       rho: float = 7.0) -> EDMEulerScheduler:
    """The scheduler saved with an EDM model: it carries sigma_data and the sampling noise range."""
    return EDMEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=rho,
                             sigma_schedule="karras", prediction_type="epsilon", final_sigmas_type="zero")


def make_edm_sampler(name: str, train_scheduler, churn: float = 0.0):
    """A fresh EDM sampler `name` sharing `train_scheduler`'s sigma_data and noise range, and its
    preconditioning: a rectified-flow model (flow.py) gets the flow twin of each sampler.
    `churn`: EDM's S_churn for heun and euler (EDMHeunScheduler); the DPM-Solvers take none."""
    from iclevr_diffusion.diffusion.flow import FLOW_SAMPLER_CLASSES, is_flow

    edm_classes = (EDMHeunScheduler, EDMStochasticEulerScheduler, EDMDPMSolverMultistepScheduler)
    heun, euler, dpm = FLOW_SAMPLER_CLASSES if is_flow(train_scheduler) else edm_classes
    config = train_scheduler.config
    if name in ("dpm++", "dpm++sde"):
        algorithm = "dpmsolver++" if name == "dpm++" else "sde-dpmsolver++"
        return dpm.from_config(config, algorithm_type=algorithm, solver_order=2)
    if name not in CHURN_SAMPLERS:
        raise ValueError(name)
    sampler = (heun if name == "heun" else euler).from_config(config)
    sampler.churn = float(churn)
    return sampler


def is_edm(scheduler) -> bool:
    """An EDM-family noise schedule: EDM's own or rectified flow's (flow.py subclasses these schedulers)."""
    return isinstance(scheduler, (EDMEulerScheduler, EDMDPMSolverMultistepScheduler))


class EDMHeunScheduler(EDMEulerScheduler):
    """EDM's 2nd-order Heun sampler (Karras et al. 2022, Algorithm 2) as a diffusers scheduler.

    For N steps over the Karras sigmas s_0 > ... > s_{N-1} > s_N = 0, step i first raises the noise
    ("churn") from s_i to s_hat = s_i (1 + gamma_i) with fresh noise of standard deviation
    sqrt(s_hat^2 - s_i^2), then takes an Euler step from s_hat to s_{i+1} and (unless s_{i+1} = 0) a
    correction with the slope at s_{i+1}, averaged with the first: 2N - 1 network evaluations.
    gamma_i = min(churn / N, sqrt(2) - 1) where CHURN_RANGE[0] <= s_i <= CHURN_RANGE[1], else 0; churn 0 is
    the deterministic Algorithm 1. The churn noise is added at the end of step i - 1 (where `step` has the
    generator), so the loop's sample is already at s_hat when the network sees it, and the network is
    evaluated at s_hat as EDM does (diffusers' EDMEulerScheduler.step adds its churn after the network
    has seen the sample, and treats that output as if it were at s_hat). Step 0 never churns.
    `timesteps` lists every evaluation, so the ordinary loop (scale_model_input, network, step) runs it.
    """

    order = 2
    second_order = True  # False: the same steps without the correction (EDMStochasticEulerScheduler)
    churn = 0.0  # EDM's S_churn; set per sampler by make_edm_sampler

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas)
        steps = self.sigmas  # s_0 .. s_{N-1}, 0
        n = len(steps) - 1
        gamma = min(float(self.churn) / n, math.sqrt(2) - 1) if n > 0 else 0.0
        low, high = CHURN_RANGE
        self._hats = steps.clone()  # s_hat_i: where step i evaluates first (s_i where there is no churn)
        for i in range(1, n):
            if gamma > 0 and low <= float(steps[i]) <= high:
                self._hats[i] = steps[i] * (1 + gamma)
        # (index i of the step an evaluation belongs to, is-correction) for every evaluation
        self._plan = []
        for i in range(n):
            self._plan.append((i, False))
            if self.second_order and float(steps[i + 1]) > 0:
                self._plan.append((i, True))
        eval_sigmas = torch.stack([steps[i + 1] if corr else self._hats[i] for i, corr in self._plan])
        self.timesteps = self.precondition_noise(eval_sigmas).to(device)
        self._eval_sigmas = eval_sigmas
        self._first = None  # (x_hat_i, slope at s_hat_i) between the two halves of a step
        self._step_index = 0

    @property
    def state_in_first_order(self) -> bool:
        """True between whole steps (diffusers' HeunDiscreteScheduler has the same flag)."""
        return self._first is None

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        self.is_scale_input_called = True
        return self.precondition_inputs(sample, self._eval_sigmas[self._step_index])

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        i, correction = self._plan[self._step_index]
        s_hat, s_next = self._hats[i], self.sigmas[i + 1]
        sigma = s_next if correction else s_hat
        sample = sample.to(torch.float32)
        denoised = self.precondition_outputs(sample, model_output.float(), sigma)
        slope = (sample - denoised) / sigma
        if correction:
            x_hat, first_slope = self._first
            prev = self._churned(x_hat + (s_next - s_hat) * (first_slope + slope) / 2, i + 1, generator)
            self._first = None
        else:
            prev = sample + (s_next - s_hat) * slope
            if self.second_order and float(s_next) > 0:  # a correction at s_next follows
                self._first = (sample, slope)
            else:  # the last step (to 0) is Euler only
                prev = self._churned(prev, i + 1, generator)
        self._step_index += 1
        if not return_dict:
            return (prev, denoised)
        return EDMEulerSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    def _churned(self, x: torch.Tensor, i: int, generator) -> torch.Tensor:
        """x (at s_i) raised to s_hat_i with fresh noise, ready for step i; x itself where step i does not churn."""
        if i >= len(self._hats) - 1 or self._hats[i] <= self.sigmas[i]:
            return x
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + noise * (self._hats[i] ** 2 - self.sigmas[i] ** 2).sqrt()


class EDMStochasticEulerScheduler(EDMHeunScheduler):
    """EDM's sampler without the 2nd-order correction: Euler steps with the same churn (`--sampler euler`).
    With churn 0 it steps exactly as diffusers' EDMEulerScheduler does without s_churn."""

    order = 1
    second_order = False
