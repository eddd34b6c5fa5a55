"""Self-conditioning (model.self_condition, EDM models): the network sees its previous clean-image estimate."""

from __future__ import annotations

import math

import pytest
import torch

from iclevr_diffusion.config import load_config
from iclevr_diffusion.diffusion.edm import denoise, edm_loss, make_edm_scheduler
from iclevr_diffusion.diffusion.model import ConditionalUNet
from iclevr_diffusion.diffusion.sampling import generate, load_pipeline
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.training.loop import train
from tiny_data import TINY_MODEL, make_tiny_dataset

EDM = ["schedule.formulation=edm", "train.min_snr_gamma=null", "sample.sampler=heun", "sample.steps=3"]
SELF = "model.self_condition=true"
CONDS = [["red sphere"], ["cyan cube", "gray cylinder"]]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("selfcond") / "iclevr_data", n=12)


@pytest.fixture(scope="module")
def self_run(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("selfcond_run") / "run"
    cfg = load_config("default", [*TINY_MODEL, f"data.root={data_root}", *EDM, SELF, "train.max_steps=40",
                                  "train.lr=1e-3", "train.ema_decay=0.9"])
    result = train(cfg, run)
    assert result.step == 40 and math.isfinite(result.loss)
    return run


def tiny_model(*sets, seed=0):
    torch.manual_seed(seed)
    model = ConditionalUNet.from_run_config(load_config("default", [*TINY_MODEL, *EDM, *sets])).eval()
    with torch.no_grad():  # diffusers zero-initialises conv_out: give the output a dependence on the input
        model.unet.conv_out.weight.normal_(0, 0.1)
    return model


def test_the_network_reads_its_previous_estimate():
    model = tiny_model(SELF)  # the default 2x2 pixel patches
    assert model.self_conditioned and model.unet.config.in_channels == 6 * 4  # two images in 2x2 patches
    x, t, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.1, -0.3]), torch.zeros(2, 24)
    with torch.no_grad():
        none = model(x, t, labels)
        assert torch.equal(none, model(x, t, labels, previous_estimate=torch.zeros_like(x)))
        assert not torch.allclose(none, model(x, t, labels, previous_estimate=torch.randn_like(x)))
    plain = tiny_model()
    assert not plain.self_conditioned and plain.unet.config.in_channels == 3 * 4


def test_training_feeds_a_gradient_free_first_estimate_in_half_of_the_steps():
    model = tiny_model(SELF).train()
    sched = make_edm_scheduler(0.25)
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        (torch.is_grad_enabled(), kwargs.get("previous_estimate"))), with_kwargs=True)
    x, labels = torch.rand(4, 3, 16, 16) * 2 - 1, torch.zeros(4, 24)
    helped = 0
    for seed in range(20):
        calls.clear()
        loss = edm_loss(model, sched, x, labels, torch.Generator().manual_seed(seed))
        assert math.isfinite(loss.item())
        if len(calls) == 2:  # first pass without gradients, then the trained pass fed its estimate / sigma_data
            helped += 1
            (grad_first, prev_first), (grad_second, prev_second) = calls
            assert not grad_first and prev_first is None and grad_second
            assert prev_second.shape == x.shape and not prev_second.requires_grad
        else:
            assert len(calls) == 1 and calls[0][1] is None
    assert 4 <= helped <= 16  # a fair coin over 20 steps


def test_sampling_feeds_each_evaluation_the_last_clean_estimate(self_run):
    """The pipeline's Heun run equals EDM's Algorithm 1 written out here, with D fed its own last output."""
    pipe, _, _ = load_pipeline(self_run, device="cpu")
    sd = float(pipe.scheduler.config.sigma_data)
    labels = torch.zeros(2, 24)
    labels[0, 3] = labels[1, [5, 9]] = 1
    steps = 4
    sampler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sampler.set_timesteps(steps)
    sigmas = [float(s) for s in sampler.sigmas]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x = torch.cat([torch.randn(1, 3, 16, 16, generator=g) for g in gens]) * sigmas[0]
    previous = [None]

    def D(x, s):
        with torch.no_grad():
            out = denoise(pipe.unet, x, torch.full((2,), s), labels, sd, previous[0])
        previous[0] = out
        return out

    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - D(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            x_next = x + (s_next - s) * (d + (x_next - D(x_next, s_next)) / s_next) / 2
        x = x_next
    ours = pipe(labels, num_inference_steps=steps, guidance_scale=1.0, generator=[torch.Generator().manual_seed(i)
                for i in range(2)], output_type="pt", autocast=False, churn=0.0).images  # Algorithm 1: no churn
    # float32 rounding only (1e-4 here); without the feeding the two differ by about 0.2
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("sampler", ["heun", "euler", "dpm++", "dpm++sde"])
def test_a_self_conditioned_export_reloads_and_samples_identically(self_run, sampler):
    a, cfg, _ = load_pipeline(self_run, device="cpu")
    b, _, _ = load_pipeline(self_run, device="cpu")
    assert cfg.model.self_condition and a.unet.self_conditioned
    x = generate(a, CONDS, sampler, 3, 2.0, seed=5, autocast=False)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1
    assert torch.equal(x, generate(b, CONDS, sampler, 3, 2.0, seed=5, autocast=False))


def test_self_conditioning_is_refused_for_a_ddpm_model():
    with pytest.raises(IclevrError, match="model.self_condition needs schedule.formulation=edm"):
        load_config("default", [*TINY_MODEL, SELF])
