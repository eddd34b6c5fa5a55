"""Rectified flow (schedule.formulation=flow): its preconditioning, loss, samplers, training and export.

Expected values come from rectified flow's own definitions written out here - data y' = y / sigma_data,
x_t = (1 - t) y' + t n, v = n - y', the plain MSE on v, and EDM's sigma = sigma_data t / (1 - t) - never
from the code under test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from iclevr_diffusion.config import load_config
from iclevr_diffusion.diffusion.edm import edm_loss, make_edm_sampler, sample_sigmas
from iclevr_diffusion.diffusion.flow import (
    FLOW_TIMESTEP_SCALE,
    FlowEulerScheduler,
    FlowHeunScheduler,
)
from iclevr_diffusion.diffusion.model import ConditionalUNet
from iclevr_diffusion.diffusion.sampling import generate, load_pipeline
from iclevr_diffusion.diffusion.schedule import make_train_scheduler
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.training.loop import train
from tiny_data import TINY_MODEL, make_tiny_dataset

FLOW = ["schedule.formulation=flow", "train.min_snr_gamma=null", "sample.sampler=heun", "sample.steps=3"]
SAMPLERS = ("heun", "euler", "dpm++", "dpm++sde")
CONDS = [["red sphere", "cyan cube"], ["gray cylinder"], ["blue cube", "green sphere", "yellow cylinder"]]
TRAIN_STEPS = 60


def flow_time(sigma: float, sigma_data: float) -> float:
    """t with sigma = sigma_data t / (1 - t), written out."""
    return sigma / (sigma + sigma_data)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("flow") / "iclevr_data", n=12)


def flow_cfg(root, *sets):
    return load_config("default", [*TINY_MODEL, f"data.root={root}", *FLOW, *sets])


@pytest.fixture(scope="module")
def flow_run(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("flow_run") / "run"
    cfg = flow_cfg(data_root, f"train.max_steps={TRAIN_STEPS}", "train.lr=1e-3", "train.ema_decay=0.9")
    assert train(cfg, run).step == TRAIN_STEPS
    return run


@pytest.mark.parametrize("sigma_data", [1.0, 0.2])
@pytest.mark.parametrize("sigma", [0.002, 0.2, 1.0, 80.0])
def test_the_network_sees_x_t_and_its_output_is_the_velocity(sigma, sigma_data):
    sched = make_train_scheduler(flow_cfg("unused").schedule, sigma_data=sigma_data)
    gen = torch.Generator().manual_seed(0)
    y, n = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1, torch.randn(2, 3, 8, 8, generator=gen)
    x, t = y + sigma * n, flow_time(sigma, sigma_data)  # EDM's noisy image
    x_t, v = (1 - t) * y / sigma_data + t * n, n - y / sigma_data
    torch.testing.assert_close(sched.precondition_inputs(x, sigma), x_t, rtol=1e-4, atol=1e-4)  # float32, |x| ~ 200
    assert float(sched.precondition_noise(torch.tensor(sigma))) == pytest.approx(t, rel=1e-6)
    # the exact velocity gives back the clean image: y' = x_t - t v, y = sigma_data y'
    torch.testing.assert_close(sched.precondition_outputs(x, v, sigma), y, rtol=1e-4, atol=1e-5)
    # logit(t) = ln(sigma) - ln(sigma_data): SD3's logit-normal t is EDM's log-normal sigma, shifted
    assert math.log(t / (1 - t)) == pytest.approx(math.log(sigma) - math.log(sigma_data), rel=1e-9, abs=1e-9)


def test_the_denoiser_returns_its_input_as_sigma_goes_to_zero():
    sched = make_train_scheduler(flow_cfg("unused").schedule, sigma_data=0.2)
    x, anything = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8) * 5
    torch.testing.assert_close(sched.precondition_outputs(x, anything, 1e-9), x, rtol=0, atol=1e-7)


def test_the_loss_is_the_plain_velocity_mse_at_logit_normal_t(data_root):
    """edm_loss with a flow scheduler equals ||F(x_t, 1000 t) - (n - y')||^2 for the same draws of sigma and n."""
    cfg = flow_cfg(data_root)
    torch.manual_seed(0)
    model = ConditionalUNet.from_run_config(cfg)
    assert model.config.timestep_scale == FLOW_TIMESTEP_SCALE == 1000.0
    sd = 0.3
    sched = make_train_scheduler(cfg.schedule, sigma_data=sd)
    y = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.eye(24)[:4]
    p_mean, p_std = cfg.schedule.p_mean, cfg.schedule.p_std
    loss = edm_loss(model, sched, y, labels, torch.Generator().manual_seed(7), p_mean, p_std)
    gen = torch.Generator().manual_seed(7)  # the same draws, in the same order
    sigma = sample_sigmas(4, p_mean, p_std, gen)
    n = torch.randn(y.shape, generator=gen)
    t = sigma / (sigma + sd)
    tt = t.view(-1, 1, 1, 1)
    expected = torch.mean((model((1 - tt) * y / sd + tt * n, t, labels) - (n - y / sd)) ** 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(("sampler", "churn"), [*((s, 0.0) for s in SAMPLERS), ("heun", 10.0), ("euler", 10.0)])
@pytest.mark.parametrize("steps", [1, 4, 18])
def test_every_sampler_lands_on_the_one_clean_image_an_exact_velocity_points_to(sampler, churn, steps):
    """For data that is one image y*, the exact velocity at x_t is (x_t - y* / sigma_data) / t: every sampler
    must end on y*, with or without churn (the exact denoiser removes the noise churn adds)."""
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    schedule = make_train_scheduler(flow_cfg("unused").schedule, sigma_data=0.2)
    sched = make_edm_sampler(sampler, schedule, churn=churn)
    sched.set_timesteps(steps)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * sched.init_noise_sigma
    gen = torch.Generator().manual_seed(4)
    for t in sched.timesteps:
        x_t = sched.scale_model_input(x, t)  # what the network sees; its timestep input is t (x1000 inside)
        velocity = (x_t - target / 0.2) / t
        kwargs = {"generator": gen} if sampler != "dpm++" else {}
        x = sched.step(velocity, t, x, **kwargs).prev_sample
    torch.testing.assert_close(x, target, rtol=1e-4, atol=1e-4)


def test_a_tiny_flow_run_trains_and_every_sampler_gives_sane_images(flow_run):
    rows = [json.loads(line) for line in (flow_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == TRAIN_STEPS and all(math.isfinite(r["loss"]) for r in rows)
    pipe, _, _ = load_pipeline(flow_run, device="cpu")
    for sampler in SAMPLERS:
        images = generate(pipe, CONDS, sampler, 4, 2.0, seed=1, autocast=False)
        assert images.shape == (3, 3, 16, 16)
        assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1 and images.std() > 0.01


def test_an_exported_flow_model_reloads_and_samples_identically(flow_run):
    a, cfg, _ = load_pipeline(flow_run, device="cpu")
    b, _, _ = load_pipeline(flow_run, device="cpu")
    assert a.unet is not b.unet
    assert type(a.scheduler) is FlowEulerScheduler and cfg.schedule.formulation == "flow"
    # sigma_data measured on the training images, as for EDM, and saved with the model
    assert 0.05 < cfg.schedule.sigma_data < 1 and a.scheduler.config.sigma_data == cfg.schedule.sigma_data
    assert a.unet.config.timestep_scale == FLOW_TIMESTEP_SCALE
    assert isinstance(make_edm_sampler("heun", a.scheduler), FlowHeunScheduler)
    for sampler in ("heun", "dpm++", "dpm++sde"):  # churn (the default), the ODE, and the SDE: all seeded
        x = generate(a, CONDS, sampler, 3, 2.0, seed=5, autocast=False)
        assert torch.equal(x, generate(b, CONDS, sampler, 3, 2.0, seed=5, autocast=False))
        assert not torch.equal(x, generate(b, CONDS, sampler, 3, 2.0, seed=6, autocast=False))


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        (["model.self_condition=true"], "model.self_condition"),
        (["sample.sampler=ddim"], "sample.sampler"),
        (["train.min_snr_gamma=5"], "train.min_snr_gamma"),
    ],
)
def test_configs_that_do_not_fit_flow_are_errors_naming_the_key(sets, key):
    with pytest.raises(IclevrError, match=key.replace(".", r"\.")):
        load_config("default", [*FLOW, *sets])


def test_diffusers_generic_loader_loads_a_flow_export(flow_run, tmp_path):
    """A fresh interpreter that imports only diffusers loads the flow model's folder (its scheduler class
    lives in this package) and draws what the toolkit draws."""
    code = (
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(flow_run / 'model')!r}, trust_remote_code=True)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = pipe(['red sphere'], num_inference_steps=3, generator=torch.Generator().manual_seed(1), "
        "output_type='pt', autocast=False)\n"
        f"torch.save(out.images, {str(tmp_path / 'images.pt')!r})\n"
        "print(type(pipe.scheduler).__name__)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["FlowEulerScheduler"]
    pipe, _, _ = load_pipeline(flow_run, device="cpu")
    want = pipe(["red sphere"], num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt",
                autocast=False).images
    assert torch.equal(torch.load(tmp_path / "images.pt"), want)


def test_sample_takes_churn_and_records_it(flow_run, tmp_path):
    from typer.testing import CliRunner

    from iclevr_diffusion.cli import app

    runner = CliRunner()

    def sample(out, *extra):
        result = runner.invoke(app, ["sample", "--model", str(flow_run), "--labels", "red sphere,cyan cube",
                                     "--n", "2", "--steps", "4", "--out", str(out), "--json", "-q", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout), (out / "labels" / "0.png").read_bytes()

    manifest, churned = sample(tmp_path / "a", "--churn", "10")
    assert (manifest["sampler"], manifest["churn"]) == ("heun", 10.0)
    assert sample(tmp_path / "b", "--churn", "10")[1] == churned  # seeded: the same PNG bytes
    manifest, plain = sample(tmp_path / "c", "--churn", "0")
    assert manifest["churn"] == 0.0 and plain != churned
    bad = runner.invoke(app, ["sample", "--model", str(flow_run), "--labels", "red cube", "--sampler", "dpm++",
                              "--churn", "3", "--out", str(tmp_path / "d")])
    assert bad.exit_code == 1 and "--churn applies to the heun and euler samplers" in bad.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was written
