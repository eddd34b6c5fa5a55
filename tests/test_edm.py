"""The EDM formulation (Karras et al. 2022): preconditioning, loss, Heun sampler, training and export.

Expected values are computed from the paper's formulas written out here (Table 1 and Algorithm 1 of
"Elucidating the design space of diffusion-based generative models"), never from the code under test.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from PIL import Image

from iclevr_diffusion.config import load_config
from iclevr_diffusion.diffusion.edm import (
    CHURN_RANGE,
    EDM_SAMPLERS,
    EDM_TIMESTEP_SCALE,
    EDMHeunScheduler,
    EDMStochasticEulerScheduler,
    c_in,
    c_noise,
    c_out,
    c_skip,
    denoise,
    edm_loss,
    loss_weight,
    make_edm_sampler,
    make_edm_scheduler,
    sample_sigmas,
)
from iclevr_diffusion.diffusion.losses import diffusion_loss, foreground_weights
from iclevr_diffusion.diffusion.model import ConditionalUNet
from iclevr_diffusion.diffusion.sampling import generate, load_pipeline
from iclevr_diffusion.diffusion.schedule import make_train_scheduler
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.training.loop import train
from tiny_data import TINY_MODEL, make_tiny_dataset

EDM = ["schedule.formulation=edm", "train.min_snr_gamma=null", "sample.sampler=heun", "sample.steps=3"]
CONDS = [["red sphere", "cyan cube"], ["gray cylinder"], ["blue cube", "green sphere", "yellow cylinder"]]


# --- the paper's formulas, written out (Karras et al. 2022, Table 1 and Algorithm 1) ---------------------

def paper_c_skip(s, sd):
    return sd**2 / (s**2 + sd**2)


def paper_c_out(s, sd):
    return s * sd / math.sqrt(s**2 + sd**2)


def paper_c_in(s, sd):
    return 1 / math.sqrt(s**2 + sd**2)


def paper_c_noise(s):
    return math.log(s) / 4


def paper_lambda(s, sd):
    return (s**2 + sd**2) / (s * sd) ** 2


def paper_karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """Eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then sigma_N = 0."""
    if n == 1:
        return [sigma_max, 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)] + [0.0]


def paper_heun(x, sigmas, D, second_order=True, churn=0.0, s_tmin=0.05, s_tmax=50.0, noise=None):
    """Algorithm 2 (stochastic sampler); with churn 0 Algorithm 1 (deterministic, Heun's 2nd-order method);
    Euler when second_order is False. `noise()`: the next eps ~ N(0, I) (S_noise = 1)."""
    evals = 0
    n = len(sigmas) - 1
    for i in range(n):
        t, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn / n, math.sqrt(2) - 1) if s_tmin <= t <= s_tmax else 0.0
        if gamma > 0:
            t_hat = t * (1 + gamma)
            x = x + math.sqrt(t_hat**2 - t**2) * noise()
            t = t_hat
        d = (x - D(x, t)) / t
        evals += 1
        x_next = x + (t_next - t) * d
        if second_order and t_next != 0:
            d2 = (x_next - D(x_next, t_next)) / t_next
            evals += 1
            x_next = x + (t_next - t) * (d + d2) / 2
        x = x_next
    return x, evals


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("edm") / "iclevr_data", n=12)


def edm_cfg(root, *sets):
    return load_config("default", [*TINY_MODEL, f"data.root={root}", *EDM, *sets])


TRAIN_STEPS = 60


@pytest.fixture(scope="module")
def edm_run(data_root, tmp_path_factory):
    """A tiny EDM model trained for 60 steps (loss logged every step); its run folder and progress events."""
    run = tmp_path_factory.mktemp("edm_run") / "run"
    events = []
    cfg = edm_cfg(data_root, f"train.max_steps={TRAIN_STEPS}", "train.lr=1e-3", "train.ema_decay=0.9")
    result = train(cfg, run, progress=lambda e, **i: events.append((e, i)))
    assert result.step == TRAIN_STEPS
    return run, events


def dataset_pixel_std(root, size=16) -> float:
    """The std of every pixel value of the training set, from the PNGs: squashed to size x size
    (bilinear, as torchvision's Resize does on PIL images) and mapped from bytes to [-1, 1]."""
    names = sorted(json.loads((root / "train.json").read_text()))
    values = []
    for name in names:
        with Image.open(root / "iclevr" / name) as img:
            pixels = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float64)
        values.append(pixels / 127.5 - 1)
    return float(np.concatenate([v.ravel() for v in values]).std())


def tiny_edm_model(root, *sets, seed=0):
    torch.manual_seed(seed)
    return ConditionalUNet.from_run_config(edm_cfg(root, *sets))


def some_labels(batch):
    labels = torch.zeros(batch, 24)
    labels[torch.arange(batch), torch.arange(batch) % 24] = 1
    return labels


# --- 1. preconditioning -------------------------------------------------------------------------------

SIGMAS = (0.002, 0.2, 1.0, 80.0)


@pytest.mark.parametrize("sd", [0.2, 0.5])
@pytest.mark.parametrize("s", SIGMAS)
def test_preconditioning_is_edms_table_1(s, sd):
    sigma = torch.tensor(s, dtype=torch.float64)
    assert float(c_skip(sigma, sd)) == pytest.approx(paper_c_skip(s, sd), rel=1e-12)
    assert float(c_out(sigma, sd)) == pytest.approx(paper_c_out(s, sd), rel=1e-12)
    assert float(c_in(sigma, sd)) == pytest.approx(paper_c_in(s, sd), rel=1e-12)
    assert float(c_noise(sigma)) == pytest.approx(paper_c_noise(s), rel=1e-12)
    assert float(loss_weight(sigma, sd)) == pytest.approx(paper_lambda(s, sd), rel=1e-12)
    assert float(loss_weight(sigma, sd) * c_out(sigma, sd) ** 2) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("sd", [0.2, 0.5])
def test_the_saved_diffusers_scheduler_applies_the_same_preconditioning(sd):
    sched = make_edm_scheduler(sd)
    assert isinstance(sched, EDMEulerScheduler) and sched.config.sigma_data == sd
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for s in SIGMAS:
        torch.testing.assert_close(sched.precondition_inputs(x, s), paper_c_in(s, sd) * x, rtol=1e-12, atol=0)
        expected_d = paper_c_skip(s, sd) * x + paper_c_out(s, sd) * f
        torch.testing.assert_close(sched.precondition_outputs(x, f, s), expected_d, rtol=1e-12, atol=1e-15)
        assert float(sched.precondition_noise(torch.tensor(s))) == pytest.approx(paper_c_noise(s), rel=1e-6)
    # In the sampling loop: scale_model_input applies c_in at each step's sigma, the timesteps are c_noise.
    sched.set_timesteps(5)
    sigmas = paper_karras_sigmas(5, 0.002, 80.0)
    torch.testing.assert_close(sched.sigmas.double(), torch.tensor(sigmas, dtype=torch.float64), rtol=1e-5, atol=0)
    for i, t in enumerate(sched.timesteps):
        assert float(t) == pytest.approx(paper_c_noise(sigmas[i]), rel=1e-5, abs=1e-6)
        scaled = sched.scale_model_input(x.float(), t)
        torch.testing.assert_close(scaled, (paper_c_in(sigmas[i], sd) * x).float(), rtol=1e-5, atol=1e-7)
        sched.step(torch.zeros_like(x.float()), t, x.float())  # advance the step index


# --- 2. the denoiser at sigma -> 0 ----------------------------------------------------------------------


def test_denoiser_is_the_identity_as_sigma_goes_to_zero(data_root):
    model = tiny_edm_model(data_root).eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = some_labels(3)
    with torch.no_grad():
        d0 = denoise(model, x, torch.full((3,), 1e-6), labels, 0.2)
        d1 = denoise(model, x, torch.full((3,), 1.0), labels, 0.2)
    torch.testing.assert_close(d0, x, rtol=0, atol=1e-4)
    # ... while at sigma = 1 the network's output counts (the check above is not vacuous).
    assert (d1 - x).abs().max() > 0.05


def test_training_and_sampling_use_the_same_denoiser(data_root):
    """denoise() (what edm_loss trains) and the saved scheduler's loop (scale_model_input, the network at
    the scheduler's timestep, precondition_outputs) must be one D(x; sigma) for the same network."""
    model = tiny_edm_model(data_root).eval()
    sd = 0.2
    sched = make_edm_scheduler(sd)
    sched.set_timesteps(5)
    labels = some_labels(2)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            sigma = sched.sigmas[i]
            y = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1
            x = y + sigma * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(100 + i))
            out = model(sched.scale_model_input(x, t), t, labels)
            sampled = sched.precondition_outputs(x, out, sigma)
            trained = denoise(model, x, sigma.repeat(2), labels, sd)
            torch.testing.assert_close(trained, sampled, rtol=1e-4, atol=1e-4)
            sched.step(out, t, x)  # advance the step index


# --- 3. the F-form loss equals the weighted D-form ----------------------------------------------------


def test_edm_loss_equals_lambda_weighted_denoiser_error(data_root):
    model = tiny_edm_model(data_root).eval()
    sd, p_mean, p_std = 0.3, -0.5, 0.8  # not the defaults: the loss must use what it is given
    sched = make_edm_scheduler(sd)
    y = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    labels = some_labels(4)
    with torch.no_grad():
        loss = edm_loss(model, sched, y, labels, torch.Generator().manual_seed(11), p_mean, p_std)
        via_dispatch = diffusion_loss(model, sched, y, labels, torch.Generator().manual_seed(11), None, p_mean, p_std)
        # The same draws: ln(sigma) ~ N(p_mean, p_std^2) first, then the noise n.
        g = torch.Generator().manual_seed(11)
        sigma = (torch.randn(4, generator=g) * p_std + p_mean).exp()
        n = torch.randn(y.shape, generator=g)
        d = denoise(model, y + sigma.view(-1, 1, 1, 1) * n, sigma, labels, sd)
        lam = torch.tensor([paper_lambda(float(s), sd) for s in sigma]).view(-1, 1, 1, 1)
        expected = (lam * (d - y) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert float(via_dispatch) == float(loss)
    # The draws really were those (another seed gives another loss).
    with torch.no_grad():
        other = edm_loss(model, sched, y, labels, torch.Generator().manual_seed(12), p_mean, p_std)
    assert abs(float(other) - float(loss)) > 1e-3


def test_training_noise_levels_are_log_normal():
    sigma = sample_sigmas(200_000, -1.2, 1.2, torch.Generator().manual_seed(0))
    log = sigma.log()
    assert float(log.mean()) == pytest.approx(-1.2, abs=0.01)
    assert float(log.std()) == pytest.approx(1.2, abs=0.01)


def test_preconditioning_gives_the_network_unit_variance_input_and_target():
    """EDM's point (Appendix B.6): for data of std sigma_data, c_in x and the training target
    (y - c_skip x) / c_out have unit variance at every noise level, so a network that outputs zeros
    scores a loss of 1."""
    sd = 0.3
    y = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * sd
    seen = []

    def zero_model(model_in, t, labels):
        seen.append(model_in)
        return torch.zeros_like(model_in)

    for p_mean in (-3.0, 0.0, 3.0):  # mostly tiny, medium and huge noise levels
        seen.clear()
        loss = edm_loss(zero_model, make_edm_scheduler(sd), y, some_labels(64), torch.Generator().manual_seed(1),
                        p_mean=p_mean, p_std=0.5)
        assert float(loss) == pytest.approx(1.0, abs=0.03)
        assert float(seen[0].var()) == pytest.approx(1.0, abs=0.03)


# --- 4. training lowers the loss ------------------------------------------------------------------------


def test_tiny_edm_model_loss_falls(edm_run):
    run, _ = edm_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, TRAIN_STEPS + 1))
    assert all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.9 * first, f"mean loss of the first 10 steps {first:.3f}, of the last 10 {last:.3f}"


@pytest.mark.parametrize("formulation", ["edm", "flow"])  # rectified flow shares the loss (flow.py)
def test_loss_falls_on_a_fixed_batch(data_root, formulation):
    cfg = edm_cfg(data_root, f"schedule.formulation={formulation}")
    torch.manual_seed(0)
    model = ConditionalUNet.from_run_config(cfg)
    y = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sched = make_train_scheduler(cfg.schedule, sigma_data=float(y.std()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    labels = some_labels(4)
    losses = []
    for _ in range(40):
        loss = diffusion_loss(model, sched, y, labels, torch.Generator().manual_seed(1))  # same sigmas and noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- 5. every EDM sampler through sampling.generate ---------------------------------------------------


@pytest.fixture(scope="module")
def edm_pipe(edm_run):
    pipe, _, _ = load_pipeline(edm_run[0], device="cpu")
    return pipe


@pytest.mark.parametrize("sampler", EDM_SAMPLERS)
def test_every_edm_sampler_gives_sane_images_and_counts_steps(edm_pipe, sampler):
    steps = 4
    seen, evals = [], [0]
    hook = edm_pipe.unet.register_forward_hook(lambda *_: evals.__setitem__(0, evals[0] + 1))
    try:
        images = generate(edm_pipe, CONDS, sampler, steps, 2.0, seed=1, batch_size=2, progress=seen.append,
                          autocast=False)
    finally:
        hook.remove()
    assert images.shape == (3, 3, 16, 16)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert images.std() > 0.01
    assert seen == [2] * steps + [1] * steps and sum(seen) == len(CONDS) * steps
    per_batch = 2 * steps - 1 if sampler == "heun" else steps  # Heun: an Euler step, then a correction but the last
    assert evals[0] == 2 * per_batch  # two batches (2 + 1 images), guided in one forward each
    assert isinstance(edm_pipe.scheduler, EDMEulerScheduler) and not isinstance(edm_pipe.scheduler, EDMHeunScheduler)


def test_make_edm_sampler_keeps_sigma_data_and_the_noise_range():
    train_sched = make_edm_scheduler(0.23, sigma_min=0.01, sigma_max=40.0)
    kinds = {"heun": EDMHeunScheduler, "euler": EDMStochasticEulerScheduler, "dpm++": EDMDPMSolverMultistepScheduler,
             "dpm++sde": EDMDPMSolverMultistepScheduler}
    for name in EDM_SAMPLERS:
        s = make_edm_sampler(name, train_sched)
        assert type(s) is kinds[name]
        assert (s.config.sigma_data, s.config.sigma_min, s.config.sigma_max) == (0.23, 0.01, 40.0)
    assert make_edm_sampler("dpm++sde", train_sched).config.algorithm_type == "sde-dpmsolver++"
    assert make_edm_sampler("dpm++", train_sched).config.algorithm_type == "dpmsolver++"


@pytest.mark.parametrize("sampler", EDM_SAMPLERS)
def test_every_edm_sampler_feeds_the_network_what_it_was_trained_on(sampler):
    """At every evaluation the network must get c_in(sigma) x with timestep c_noise(sigma) for one and
    the same sigma, a Karras sigma of the run: the preconditioning edm_loss trained it with."""
    sd, steps = 0.3, 5
    sched = make_edm_sampler(sampler, make_edm_scheduler(sd))
    sched.set_timesteps(steps)
    karras = paper_karras_sigmas(steps, 0.002, 80.0)[:-1]
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 80.0
    kwargs = {"generator": torch.Generator().manual_seed(1)} if sampler == "dpm++sde" else {}
    used = []
    for t in sched.timesteps:
        sigma = math.exp(4 * float(t))  # the sigma the timestep stands for, c_noise = ln(sigma) / 4
        assert min(abs(sigma / k - 1) for k in karras) < 1e-5, (sigma, karras)
        torch.testing.assert_close(sched.scale_model_input(x, t), x * paper_c_in(sigma, sd), rtol=1e-5, atol=0)
        used.append(sigma)
        x = sched.step(torch.zeros_like(x), t, x, **kwargs).prev_sample
    assert used[0] == pytest.approx(80.0, rel=1e-5)


# --- 6. EDMHeunScheduler is Algorithm 1 ---------------------------------------------------------------


def run_scheduler(sched, x, fake_model, steps, states=None):
    """The ordinary diffusers loop the pipeline runs (scale_model_input, network, step); `states`
    collects x after every whole step (for Heun: after its correction)."""
    sched.set_timesteps(steps)
    calls = 0
    for t in sched.timesteps:
        out = fake_model(sched.scale_model_input(x, t), t)
        calls += 1
        x = sched.step(out, t, x).prev_sample
        if states is not None and getattr(sched, "state_in_first_order", True):
            states.append(x)
    return x, calls


# Not 2 or 3 steps: their last correction follows a jump to sigma 0.002 from 80 or 2.5, and with a D that
# ignores x it multiplies the float32 rounding of the Euler half by (s_i - s_i+1) / (2 s_i+1), 2e4 or 600.
# (A real denoiser tracks x at small sigma, so x - D does not carry that rounding: measured 1e-3 at most.)
@pytest.mark.parametrize("steps", [1, 5, 10, 18])
def test_heun_lands_exactly_on_a_known_denoisers_target(steps):
    """With D(x; sigma) = y for every x and sigma, the ODE dx/dsigma = (x - y) / sigma is solved by the
    straight line x(sigma) = y + (x_0 - y) sigma / sigma_0, on which Heun is exact: every whole step
    lands on that line, and the last one (to sigma = 0) on y."""
    sd = 0.3
    sched = make_edm_sampler("heun", make_edm_scheduler(sd))
    y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def fake_model(model_in, t):
        # The network output F for which D(x; sigma) = c_skip x + c_out F = y, sigma read from c_noise.
        s = math.exp(4 * float(t))
        x = model_in / paper_c_in(s, sd)
        return (y - paper_c_skip(s, sd) * x) / paper_c_out(s, sd)

    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 80.0
    states = []
    out, calls = run_scheduler(sched, x0, fake_model, steps, states)
    assert calls == 2 * steps - 1 == len(sched.timesteps)
    sigmas = paper_karras_sigmas(steps, 0.002, 80.0)
    assert len(states) == steps
    for x, s in zip(states, sigmas[1:], strict=True):
        torch.testing.assert_close(x, y + (x0 - y) * (s / sigmas[0]), rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(out, y, rtol=0, atol=2e-4)  # float32 steps from |x| ~ 300


def test_heun_matches_a_hand_written_algorithm_1_on_a_linear_denoiser():
    sd, steps = 0.4, 6
    sched = make_edm_sampler("heun", make_edm_scheduler(sd))
    pattern = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def F(model_in, t):  # a network linear in its input, depending on the noise level
        return 0.5 * model_in + 0.3 * t * pattern

    def D(x, s):  # the denoiser it makes, from the paper's preconditioning
        return paper_c_skip(s, sd) * x + paper_c_out(s, sd) * F(paper_c_in(s, sd) * x, paper_c_noise(s))

    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 80.0
    ours, calls = run_scheduler(sched, x0.float(), lambda m, t: F(m.double(), float(t)).float(), steps)
    # The same Karras sigmas as diffusers' EDMEulerScheduler.set_timesteps, which are eq. 5 of the paper.
    euler = make_edm_scheduler(sd)
    euler.set_timesteps(steps)
    sigmas = [float(s) for s in euler.sigmas]
    assert sigmas == pytest.approx(paper_karras_sigmas(steps, 0.002, 80.0), rel=1e-5)
    expected, evals = paper_heun(x0, sigmas, D)
    assert calls == evals == 2 * steps - 1
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)
    # The reference is second order: it differs from Euler's result far beyond the tolerance above.
    euler_result, _ = paper_heun(x0, sigmas, D, second_order=False)
    assert (euler_result - expected).abs().max() > 0.05


def test_heun_is_second_order_on_the_exact_gaussian_ode():
    """Data y ~ N(0, sd^2) has the exact denoiser D = c_skip x (F = 0); the probability-flow ODE
    dx/dsigma = (x - D) / sigma then solves to x(sigma) = x0 sqrt(sigma^2 + sd^2) / sqrt(sigma0^2 + sd^2).
    2.5x the steps must cut Heun's error about 2.5^2 = 6.25x, Euler's only about 2.5x."""
    sd = 0.5
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 80.0
    exact = x0 * sd / math.sqrt(80.0**2 + sd**2)
    errors = {}
    for name in ("heun", "euler"):
        for steps in (40, 100):
            sched = make_edm_sampler(name, make_edm_scheduler(sd))
            out, _ = run_scheduler(sched, x0, lambda m, t: torch.zeros_like(m), steps)
            errors[name, steps] = float((out - exact).abs().max() / exact.abs().max())
    assert errors["heun", 40] / errors["heun", 100] > 5, errors
    assert 2 < errors["euler", 40] / errors["euler", 100] < 3.5, errors
    assert errors["heun", 100] < errors["euler", 100] / 10, errors


@pytest.mark.parametrize("second_order", [True, False])
def test_churn_matches_a_hand_written_algorithm_2_on_a_linear_denoiser(second_order):
    """EDM's stochastic sampler: noise raised from s_i to s_i (1 + gamma) where S_tmin <= s_i <= S_tmax, the
    network evaluated there. The same eps in the same order as the scheduler draws them (one generator)."""
    sd, steps, churn = 0.4, 8, 4.0
    name = "heun" if second_order else "euler"
    sched = make_edm_sampler(name, make_edm_scheduler(sd), churn=churn)
    pattern = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def F(model_in, t):
        return 0.5 * model_in + 0.3 * t * pattern

    def D(x, s):
        return paper_c_skip(s, sd) * x + paper_c_out(s, sd) * F(paper_c_in(s, sd) * x, paper_c_noise(s))

    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 80.0
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(7)
    x = x0
    for t in sched.timesteps:
        out = F(sched.scale_model_input(x, t).double(), float(t)).float()
        x = sched.step(out, t, x, generator=gen).prev_sample
    sigmas = paper_karras_sigmas(steps, 0.002, 80.0)
    assert sum(CHURN_RANGE[0] <= s <= CHURN_RANGE[1] for s in sigmas[1:-1]) >= 3  # the test churns
    ref_gen = torch.Generator().manual_seed(7)
    expected, evals = paper_heun(x0.double(), sigmas, D, second_order, churn, *CHURN_RANGE,
                                 noise=lambda: torch.randn(2, 3, 8, 8, generator=ref_gen).double())
    assert len(sched.timesteps) == evals
    torch.testing.assert_close(x.double(), expected, rtol=1e-4, atol=1e-4)
    deterministic, _ = paper_heun(x0.double(), sigmas, D, second_order)
    assert (deterministic - expected).abs().max() > 0.05  # the churn changed the result


def test_euler_without_churn_steps_as_diffusers_edm_euler():
    sd, steps = 0.3, 6
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 80.0

    def fake_model(m, t):
        return 0.7 * m + 0.1 * float(t)

    ours, _ = run_scheduler(make_edm_sampler("euler", make_edm_scheduler(sd)), x0, fake_model, steps)
    theirs, _ = run_scheduler(make_edm_scheduler(sd), x0, fake_model, steps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_churn_draws_from_the_seed_and_zero_churn_from_nothing(edm_pipe):
    def draw(churn, seed):
        return generate(edm_pipe, CONDS, "heun", 6, 2.0, seed=seed, batch_size=3, autocast=False, churn=churn)

    assert torch.equal(draw(0.0, 1), draw(0.0, 1))
    churned = draw(20.0, 1)
    assert torch.isfinite(churned).all() and churned.min() >= -1 and churned.max() <= 1
    assert torch.equal(churned, draw(20.0, 1))  # the same seed, the same images
    assert not torch.equal(churned, draw(0.0, 1))
    # Image i depends only on its own seed (its own generator draws its churn), not on the batch.
    second = generate(edm_pipe, CONDS, "heun", 6, 2.0, seed=1, batch_size=1, autocast=False, churn=20.0)
    torch.testing.assert_close(second, churned, rtol=0, atol=1e-4)  # (batched convolutions round alike to 1e-4)


@pytest.mark.parametrize(("sampler", "churn", "words"), [
    ("dpm++", 5.0, "--churn applies to the heun and euler"),
    ("dpm++sde", 1.0, "not to dpm++sde"),
    ("heun", -1.0, "--churn must be 0 or more"),
])
def test_a_churn_a_sampler_cannot_take_is_a_one_line_error(edm_pipe, sampler, churn, words):
    with pytest.raises(IclevrError, match=re.escape(words)):
        edm_pipe(["red sphere"], 2, sampler=sampler, churn=churn, output_type="pt")


def test_the_runs_churn_is_saved_with_the_model_and_used(data_root, tmp_path):
    run = tmp_path / "run"
    train(edm_cfg(data_root, "train.max_steps=2", "sample.churn=7.5"), run)
    pipe, cfg, _ = load_pipeline(run, device="cpu")
    assert cfg.sample.churn == 7.5 and pipe.config.default_churn == 7.5
    assert pipe.sampling_churn("heun") == 7.5 and pipe.sampling_churn("euler", 0.0) == 0.0
    assert pipe.sampling_churn("dpm++") == 0.0  # the DPM-Solvers take none
    def draw(**churn):
        return pipe(["red sphere", "gray cube"], 4, sampler="heun", output_type="pt", autocast=False,
                    generator=[torch.Generator().manual_seed(i) for i in range(2)], **churn).images

    saved = draw()
    assert torch.equal(saved, draw(churn=7.5)) and not torch.equal(saved, draw(churn=0.0))


# --- 7. sigma_data is measured, recorded and kept -------------------------------------------------------


def test_training_measures_sigma_data_and_records_it(edm_run, data_root):
    run, events = edm_run
    std = dataset_pixel_std(data_root)
    notes = [i["message"] for e, i in events if e == "note" and i["message"].startswith("sigma_data ")]
    assert len(notes) == 1
    measured = float(notes[0].split()[1])
    assert measured == pytest.approx(std, abs=1e-4)
    assert yaml.safe_load((run / "config.yaml").read_text())["schedule"]["sigma_data"] == measured
    assert yaml.safe_load((run / "model" / "run_config.yaml").read_text())["schedule"]["sigma_data"] == measured
    scheduler_cfg = json.loads((run / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_cfg["_class_name"] == "EDMEulerScheduler" and scheduler_cfg["sigma_data"] == measured


def test_a_resumed_run_keeps_its_sigma_data(edm_run, data_root, tmp_path):
    run, events = edm_run
    first = yaml.safe_load((run / "config.yaml").read_text())["schedule"]["sigma_data"]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # Resume on other images, whose std differs: the model was trained with the first value.
    other = make_tiny_dataset(tmp_path / "other", n=12, seed=5)
    assert abs(dataset_pixel_std(other) - first) > 1e-3
    notes = []
    result = train(edm_cfg(other, f"train.max_steps={TRAIN_STEPS + 2}"), copy,
                   progress=lambda e, **i: notes.append(i.get("message", "")) if e == "note" else None)
    assert result.resumed_from is not None and result.step == TRAIN_STEPS + 2
    assert not any(n.startswith("sigma_data ") for n in notes)
    assert yaml.safe_load((copy / "config.yaml").read_text())["schedule"]["sigma_data"] == first
    scheduler_cfg = json.loads((copy / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_cfg["sigma_data"] == first


# --- 8. export and reload -------------------------------------------------------------------------------


def test_exported_edm_model_reloads_and_samples_identically(edm_run):
    run, _ = edm_run
    sigma_data = yaml.safe_load((run / "config.yaml").read_text())["schedule"]["sigma_data"]
    a, cfg_a, _ = load_pipeline(run, device="cpu")
    b, _, _ = load_pipeline(run, device="cpu")
    assert a.unet is not b.unet
    assert type(a.scheduler) is EDMEulerScheduler and a.scheduler.config.sigma_data == sigma_data
    assert a.unet.config.timestep_scale == EDM_TIMESTEP_SCALE
    assert cfg_a.schedule.formulation == "edm" and cfg_a.schedule.sigma_data == sigma_data
    for sampler in ("heun", "dpm++", "dpm++sde"):  # churn (the default), the ODE, and the SDE: all seeded
        x = generate(a, CONDS, sampler, 3, 2.0, seed=5, autocast=False)
        y = generate(b, CONDS, sampler, 3, 2.0, seed=5, autocast=False)
        assert torch.equal(x, y)
        z = generate(b, CONDS, sampler, 3, 2.0, seed=6, autocast=False)
        assert not torch.equal(x, z)


def test_p_uniform_zero_draws_the_log_normal_exactly_as_before():
    plain = (torch.randn(64, generator=torch.Generator().manual_seed(3)) * 0.9 - 0.6).exp()
    assert torch.equal(sample_sigmas(64, -0.6, 0.9, torch.Generator().manual_seed(3), p_uniform=0.0), plain)


def test_p_uniform_puts_its_share_uniformly_in_log_sigma_over_the_range():
    lo, hi = math.log(0.002), math.log(80.0)
    flat = sample_sigmas(200_000, -0.6, 0.9, torch.Generator().manual_seed(0), 1.0, (0.002, 80.0)).log()
    assert flat.min() >= lo and flat.max() <= hi
    for q in (0.25, 0.5, 0.75):  # uniform in ln(sigma): its quantiles are evenly spaced
        assert float(flat.quantile(q)) == pytest.approx(lo + q * (hi - lo), abs=0.05)
    # A 20% share: below sigma 0.1 go 80% of the log-normal's 3.1% plus 20% of the uniform's 36.9%.
    mixed = sample_sigmas(200_000, -0.6, 0.9, torch.Generator().manual_seed(1), 0.2, (0.002, 80.0))
    normal_below = 0.5 * (1 + math.erf((math.log(0.1) + 0.6) / (0.9 * math.sqrt(2))))
    expected = 0.8 * normal_below + 0.2 * (math.log(0.1) - lo) / (hi - lo)
    assert float((mixed < 0.1).float().mean()) == pytest.approx(expected, abs=0.004)


def test_the_training_loss_uses_p_uniform_and_the_schedulers_range(data_root):
    """edm_loss draws with the scheduler's sigma range: at p_uniform 1 and a range far above the data,
    the loss differs from the log-normal's under the same generator."""
    model = tiny_edm_model(data_root)
    y, labels = torch.zeros(4, 3, 16, 16), some_labels(4)
    losses = [edm_loss(model, make_edm_scheduler(0.3, 10.0, 80.0), y, labels, torch.Generator().manual_seed(5),
                       -0.6, 0.9, p) for p in (0.0, 1.0)]
    assert torch.isfinite(losses[1]) and float(losses[0]) != float(losses[1])


def test_foreground_weights_put_more_of_the_loss_on_pixels_off_the_floor(data_root):
    """train.foreground_weight: per pixel 1 + w * |pixel - median colour|, averaging 1 per image; at 0 the
    loss is the plain one, above 0 the same draws give another, finite loss."""
    y = torch.full((2, 3, 16, 16), -0.2)
    y[:, 0, 4:8, 4:8] = 0.9  # a red block on a gray floor
    w = foreground_weights(y, 3.0)
    assert w.shape == (2, 1, 16, 16) and torch.allclose(w.mean(dim=(2, 3)), torch.ones(2, 1))
    assert float(w[0, 0, 5, 5]) == pytest.approx(float(w[0, 0, 0, 0]) * (1 + 3 * 1.1), rel=1e-5)
    model = tiny_edm_model(data_root).eval()
    sched, labels = make_edm_scheduler(0.3), some_labels(2)
    with torch.no_grad():
        plain, zero, weighted = (
            edm_loss(model, sched, y, labels, torch.Generator().manual_seed(4), -0.6, 0.9,
                     **({} if fw is None else {"foreground_weight": fw})) for fw in (None, 0.0, 3.0))
    assert float(zero) == float(plain) and torch.isfinite(weighted) and float(weighted) != float(plain)
    with pytest.raises(IclevrError, match=r"train\.foreground_weight"):
        load_config("default", ["train.foreground_weight=-1"])


# --- 9. config validation and the seed preset -----------------------------------------------------------


@pytest.mark.parametrize(
    "sets,key",
    [
        (["schedule.formulation=edm", "train.min_snr_gamma=null", "sample.sampler=ddim"], "sample.sampler"),
        (["schedule.formulation=edm", "train.min_snr_gamma=5", "sample.sampler=heun"], "train.min_snr_gamma"),
        ([*EDM, "schedule.sigma_min=80", "schedule.sigma_max=80"], "schedule.sigma_min"),
        ([*EDM, "schedule.sigma_min=10", "schedule.sigma_max=1"], "schedule.sigma_max"),
        (["schedule.formulation=ddpm", "sample.sampler=heun"], "sample.sampler"),  # DDPM has no Heun sampler
        ([*EDM, "schedule.p_uniform=1.5"], "schedule.p_uniform"),
        ([*EDM, "schedule.p_uniform=-0.1"], "schedule.p_uniform"),
    ],
)
def test_inconsistent_edm_configs_are_errors_naming_the_key(sets, key):
    with pytest.raises(IclevrError, match=key.replace(".", r"\.")):
        load_config("default", sets)


def test_min_snr_gamma_is_refused_with_edm():
    load_config("default")  # the default preset is EDM without min-SNR
    load_config("seed", ["schedule.formulation=edm", "sample.sampler=heun"])  # its gamma is null: fine
    with pytest.raises(IclevrError, match=r"train\.min_snr_gamma"):
        load_config("default", ["train.min_snr_gamma=5"])


def test_seed_preset_is_still_the_reports_ddpm():
    cfg = load_config("seed")
    assert cfg.schedule.formulation == "ddpm"
    sched = make_train_scheduler(cfg.schedule)
    assert type(sched) is DDPMScheduler and sched.config.num_train_timesteps == 1000
    torch.testing.assert_close(sched.betas, torch.linspace(1e-4, 0.02, 1000), rtol=1e-6, atol=0)
    model = ConditionalUNet.from_run_config(cfg)
    c = model.unet.config
    assert tuple(c.block_out_channels) == (32, 64, 96, 128)
    assert tuple(c.down_block_types) == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert (model.label_proj.in_features, model.label_proj.out_features) == (24, 128)
    assert model.config.timestep_scale == 1.0 and c.resnet_time_scale_shift == "default"


# --- 10. AdaGN ------------------------------------------------------------------------------------------


def resnets(unet):
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [r for b in blocks for r in b.resnets]


def test_scale_shift_gives_adagn_resnets_that_train(data_root):
    plain = tiny_edm_model(data_root)
    ada = tiny_edm_model(data_root, "model.time_scale_shift=scale_shift")
    assert ada.unet.config.resnet_time_scale_shift == "scale_shift"
    for p, a in zip(resnets(plain.unet), resnets(ada.unet), strict=True):
        channels = a.conv1.out_channels
        assert p.time_emb_proj.out_features == channels
        assert a.time_emb_proj.out_features == 2 * channels  # a scale and a shift per channel
    sched = make_edm_scheduler(0.25)
    opt = torch.optim.AdamW(ada.parameters(), lr=1e-3)
    y = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = [p.detach().clone() for p in ada.parameters()]
    loss = diffusion_loss(ada, sched, y, some_labels(4), torch.Generator().manual_seed(0))
    loss.backward()
    proj_grads = [r.time_emb_proj.weight.grad for r in resnets(ada.unet)]
    assert math.isfinite(loss.item())
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in proj_grads)
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, ada.parameters()))


def test_an_adagn_edm_run_trains_exports_and_reloads(data_root, tmp_path):
    cfg = edm_cfg(data_root, "model.time_scale_shift=scale_shift", "train.max_steps=2", "schedule.sigma_data=0.25")
    result = train(cfg, tmp_path / "run")
    assert result.step == 2 and math.isfinite(result.loss)
    pipe, loaded, _ = load_pipeline(tmp_path / "run", device="cpu")
    assert pipe.unet.unet.config.resnet_time_scale_shift == "scale_shift"
    assert loaded.model.time_scale_shift == "scale_shift"
    assert pipe.scheduler.config.sigma_data == 0.25  # given in the config: not measured
    images = generate(pipe, CONDS[:1], "heun", 2, 2.0, seed=0, autocast=False)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_a_model_folder_without_its_run_config_samples_with_its_own_formulations_sampler(tmp_path):
    """The defaults are rectified flow now: a DDPM model exported without run_config.yaml must still pick a DDPM
    sampler (ddim) instead of failing on the default 'heun'."""
    from iclevr_diffusion.diffusion.sampling import resolve_sampling
    from iclevr_diffusion.testing import write_tiny_run

    run = write_tiny_run(tmp_path / "run", train_steps=2)
    (run / "model" / "run_config.yaml").unlink()
    pipe, cfg, _ = load_pipeline(run, device="cpu")
    assert cfg.schedule.formulation == "flow" and isinstance(pipe.scheduler, DDPMScheduler)
    sampler, steps, _ = resolve_sampling(cfg, pipe)
    assert sampler == "ddim" and steps == cfg.sample.steps
    with pytest.raises(IclevrError, match="Unknown sampler 'heun'"):
        resolve_sampling(cfg, pipe, sampler="heun")
