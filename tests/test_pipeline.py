"""ConditionalDDPMPipeline, the samplers and sampling.generate on a tiny, briefly trained real UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iclevr_diffusion.diffusion.pipeline import ConditionalDDPMPipeline, labels_to_tensor
from iclevr_diffusion.diffusion.samplers import SAMPLERS, clean_estimate_rms, make_sampler, unreliable_sampler_message
from iclevr_diffusion.diffusion.sampling import generate, image_generators, load_pipeline, resolve_sampling
from iclevr_diffusion.diffusion.schedule import make_train_scheduler
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.images import to_uint8
from iclevr_diffusion.labels import LABEL_INDEX
from iclevr_diffusion.testing import one_thread, tiny_config, tiny_pipeline, write_tiny_run

PREDICTIONS = ("epsilon", "v_prediction")
CONDS = [["red sphere", "cyan cube"], ["gray cylinder"], ["blue cube", "green sphere", "yellow cylinder"]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def unets():
    """One briefly trained tiny UNet per prediction type (trained on the linear schedule, T = 1000)."""
    with one_thread():
        return {p: tiny_pipeline(tiny_config(prediction_type=p, num_train_timesteps=1000)).unet for p in PREDICTIONS}


def pipe_for(unets, schedule, prediction, T) -> ConditionalDDPMPipeline:
    """The trained UNet under another training schedule: a harsher test of the solvers than a matched
    model, since its noise estimates are worse, and the divergences come from the schedule's ends."""
    cfg = tiny_config(schedule, prediction, num_train_timesteps=T)
    return ConditionalDDPMPipeline(unet=unets[prediction], scheduler=make_train_scheduler(cfg.schedule))


@pytest.fixture(scope="session")
def pipe(unets):
    return pipe_for(unets, "linear", "epsilon", 1000)


# scaled_linear at T = 1000 is the linear schedule itself, so it is tried at T = 100 only.
SCHEDULE_T = [("linear", 1000), ("linear", 100), ("scaled_linear", 100), ("cosine", 1000), ("cosine", 100)]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule,T", SCHEDULE_T)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_sampler_on_every_schedule_gives_sane_images(unets, sampler, schedule, prediction, T):
    pipe = pipe_for(unets, schedule, prediction, T)
    images = generate(pipe, CONDS, sampler, steps=6, guidance_scale=2.0, seed=1)
    assert images.shape == (3, 3, 16, 16)
    assert torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    assert images.std() > 0.05
    # The pipeline clamps its output, so look at the raw end state for divergence: before x0 was
    # clipped inside DPM-Solver++ / UniPC it reached |x| ~ 80 (cosine + UniPC ~ 10^4) here.
    raw = _manual(pipe, CONDS, sampler, 6, seed=1, guidance_scale=2.0, clamp=False)
    assert torch.isfinite(raw).all() and raw.abs().max() < 1.5, f"raw |x| up to {raw.abs().max():.3g}"


def test_clean_estimate_probe_matches_the_schedulers_own_x0(unets):
    """The probe's x0 at t = T-1 is the one diffusers' DDIM computes from the same model output."""
    from diffusers import DDIMScheduler

    for prediction in PREDICTIONS:
        pipe = pipe_for(unets, "linear", prediction, 1000)
        x = torch.randn((4, 3, 16, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = pipe.unet(x, torch.full((4,), 999), torch.zeros(4, 24))
        ddim = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        ddim.set_timesteps(10)
        x0 = ddim.step(out, 999, x).pred_original_sample
        assert clean_estimate_rms(pipe.unet, pipe.scheduler) == pytest.approx(float(x0.pow(2).mean().sqrt()), rel=1e-4)


def test_samplers_that_need_an_accurate_x0_are_flagged_on_a_briefly_trained_epsilon_model(unets):
    eps = pipe_for(unets, "linear", "epsilon", 1000)
    rms = clean_estimate_rms(eps.unet, eps.scheduler)
    assert rms > 1  # a few steps of training: x0 at t = 999 is far outside [-1, 1]
    assert unreliable_sampler_message("ddim", eps.unet, eps.scheduler) is None
    for sampler in ("ddpm", "dpm++", "unipc"):
        message = unreliable_sampler_message(sampler, eps.unet, eps.scheduler)
        assert message.startswith(sampler) and f"RMS {rms:.1f}" in message and "--sampler ddim" in message
    # The same training as v-prediction estimates x0 at t = 999 directly: nothing to flag.
    v = pipe_for(unets, "linear", "v_prediction", 1000)
    assert clean_estimate_rms(v.unet, v.scheduler) < 1
    assert unreliable_sampler_message("dpm++", v.unet, v.scheduler) is None
    with pytest.warns(UserWarning, match="dpm\\+\\+ is likely"):
        resolve_sampling(tiny_config(), eps, "dpm++", 5, 2.0)


@pytest.mark.parametrize("schedule,T", SCHEDULE_T)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_timesteps_each_sampler_evaluates_the_model_at(unets, sampler, schedule, T):
    """Recorded from the model's own calls: one per step, from the noisiest end down. Every sampler starts
    at t = T-1, (almost) pure noise, where the model was trained on it ("trailing" spacing; diffusers'
    default "leading" starts a 6-step run at t = 834 of 1000), except DPM-Solver++ on the cosine schedule:
    its first step from log-SNR below -5.1 explodes (diffusers' documented remedy clips it), so it starts
    at the noisiest t above that."""
    pipe = pipe_for(unets, schedule, "epsilon", T)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(int(torch.as_tensor(args[1]).max())))
    try:
        generate(pipe, CONDS, sampler, steps=6, guidance_scale=2.0, seed=0)
    finally:
        hook.remove()
    assert len(seen) == 6 and seen == sorted(set(seen), reverse=True) and seen[-1] >= 0, seen
    ab = pipe.scheduler.alphas_cumprod.double()
    log_snr = 0.5 * (ab / (1 - ab)).log()
    if sampler == "dpm++" and schedule == "cosine":
        assert seen[0] < T - 1 and log_snr[seen[0]] >= -5.1 > log_snr[seen[0] + 1], seen
    else:
        assert seen[0] == T - 1, seen


def test_same_seed_same_images_other_seed_other_images(pipe):
    a = generate(pipe, CONDS, "dpm++", 5, 2.0, seed=7)
    b = generate(pipe, CONDS, "dpm++", 5, 2.0, seed=7)
    c = generate(pipe, CONDS, "dpm++", 5, 2.0, seed=8)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


def test_ddpm_is_reproducible_although_it_draws_noise_every_step(pipe):
    a = generate(pipe, CONDS, "ddpm", 8, 1.0, seed=3)
    b = generate(pipe, CONDS, "ddpm", 8, 1.0, seed=3)
    assert torch.equal(a, b)


def test_an_image_does_not_depend_on_the_batch_it_was_drawn_in(pipe):
    one = generate(pipe, CONDS, "ddpm", 6, 2.0, seed=5, batch_size=1, autocast=False)
    all_ = generate(pipe, CONDS, "ddpm", 6, 2.0, seed=5, batch_size=3, autocast=False)
    torch.testing.assert_close(one, all_, atol=1e-4, rtol=0)


def _manual(pipe, labels, sampler, steps, seed, guidance_scale=1.0, clamp=True):
    """A hand-written sampling loop with two separate forwards (conditional, null) per step."""
    scheduler = make_sampler(sampler, pipe.scheduler)
    scheduler.set_timesteps(steps)
    gens = image_generators(seed, 0, len(labels))
    x = torch.cat([torch.randn((1, 3, 16, 16), generator=g) for g in gens])
    cond = labels_to_tensor(labels)
    kwargs = {"generator": gens} if sampler == "ddpm" else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = pipe.unet(x, t, cond)
            if guidance_scale != 1.0:
                null = pipe.unet(x, t, torch.zeros_like(cond))
                out = null + guidance_scale * (out - null)
            x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x.clamp(-1, 1) if clamp else x


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++"])
def test_guidance_one_is_the_unguided_output(pipe, sampler):
    ours = generate(pipe, CONDS, sampler, 5, guidance_scale=1.0, seed=2, autocast=False)
    assert torch.equal(ours, _manual(pipe, CONDS, sampler, 5, seed=2))
    # The batched guided path with w -> 1 converges to the same images (cond and null in one forward).
    guided = generate(pipe, CONDS, sampler, 5, guidance_scale=1.0 + 1e-6, seed=2, autocast=False)
    torch.testing.assert_close(guided, ours, atol=1e-4, rtol=0)


def test_guidance_zero_samples_with_the_null_label(pipe):
    unconditional = generate(pipe, CONDS, "ddim", 5, guidance_scale=0.0, seed=4, autocast=False)
    manual = _manual_null(pipe, len(CONDS), 5, seed=4)
    torch.testing.assert_close(unconditional, manual, atol=1e-4, rtol=0)
    assert not torch.allclose(unconditional, generate(pipe, CONDS, "ddim", 5, 3.0, seed=4, autocast=False))


def _manual_null(pipe, n, steps, seed):
    scheduler = make_sampler("ddim", pipe.scheduler)
    scheduler.set_timesteps(steps)
    gens = image_generators(seed, 0, n)
    x = torch.cat([torch.randn((1, 3, 16, 16), generator=g) for g in gens])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.unet(x, t, torch.zeros(n, 24)), t, x).prev_sample
    return x.clamp(-1, 1)


def test_save_and_from_pretrained_reproduce_the_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    loaded = ConditionalDDPMPipeline.from_pretrained(tmp_path / "model")
    assert type(loaded.scheduler).__name__ == "DDPMScheduler"  # the training scheduler is what is saved
    for sampler in ("ddpm", "dpm++"):
        assert torch.equal(generate(loaded, CONDS, sampler, 5, 2.0, 9), generate(pipe, CONDS, sampler, 5, 2.0, 9))


def test_load_pipeline_reads_a_run_folder_and_its_config(tmp_path):
    write_tiny_run(tmp_path / "runs" / "tiny", tiny_config(num_train_timesteps=50, steps=7), train_steps=2)
    pipe, cfg, folder = load_pipeline(tmp_path / "runs" / "tiny", device="cpu")
    assert folder == tmp_path / "runs" / "tiny" / "model"
    assert cfg.sample.steps == 7 and cfg.schedule.num_train_timesteps == 50
    _, _, newest = load_pipeline(None, runs_dir=tmp_path / "runs", device="cpu")
    assert newest == folder
    with pytest.raises(IclevrError, match="does not exist"):
        load_pipeline(tmp_path / "nope", device="cpu")
    with pytest.raises(IclevrError, match="No trained model found"):
        load_pipeline(None, runs_dir=tmp_path / "empty", device="cpu")


def test_pipeline_called_directly_with_names_and_pil_output(pipe):
    gen = torch.Generator().manual_seed(0)
    images = pipe(["red sphere,cyan cube", "gray cube"], 3, 2.0, gen, sampler="dpm++", output_type="pil").images
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "RGB"
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"  # the pipeline's own scheduler is restored
    tensor = pipe(["red sphere,cyan cube", "gray cube"], 3, 2.0, torch.Generator().manual_seed(0), sampler="dpm++",
                  output_type="pt").images
    assert torch.equal(to_uint8(tensor[0]).permute(1, 2, 0), torch.from_numpy(np.asarray(images[0])))


def test_frames_run_from_the_initial_noise_to_the_final_image(pipe):
    pipe.scheduler, train = make_sampler("ddim", pipe.scheduler), pipe.scheduler
    try:
        images, strip = pipe(CONDS, 8, 2.0, generator=image_generators(0, 0, 3), frames=5, output_type="pt",
                             return_dict=False)
    finally:
        pipe.scheduler = train
    assert strip.shape == (5, 3, 3, 16, 16)
    noise = torch.cat([torch.randn((1, 3, 16, 16), generator=g) for g in image_generators(0, 0, 3)])
    assert torch.equal(strip[0], noise.clamp(-1, 1))
    assert torch.equal(strip[-1], images)


def test_progress_counts_images_times_steps(pipe):
    seen = []
    generate(pipe, CONDS, "unipc", 4, 2.0, seed=0, batch_size=2, progress=seen.append)
    assert seen == [2] * 4 + [1] * 4 and sum(seen) == len(CONDS) * 4


def test_labels_are_parsed_and_checked():
    t = labels_to_tensor(["red sphere, cyan cube", ["Gray  Cube"]])
    assert t.shape == (2, 24)
    assert t[0, LABEL_INDEX["red sphere"]] == 1 and t[0, LABEL_INDEX["cyan cube"]] == 1 and t[0].sum() == 2
    assert t[1, LABEL_INDEX["gray cube"]] == 1 and t[1].sum() == 1
    assert torch.equal(labels_to_tensor("red sphere"), labels_to_tensor([["red sphere"]]))
    with pytest.raises(IclevrError, match="Did you mean 'red cube'"):
        labels_to_tensor(["red cub"])


def test_resolve_sampling_defaults_and_limits(pipe):
    cfg = tiny_config(sampler="unipc", steps=12, guidance_scale=3.0)
    assert resolve_sampling(cfg, pipe) == ("unipc", 12, 3.0)
    assert resolve_sampling(cfg, pipe, "ddpm") == ("ddpm", 1000, 3.0)  # ddpm: all T steps unless --steps
    assert resolve_sampling(cfg, pipe, "ddpm", 50, 1.0) == ("ddpm", 50, 1.0)
    with pytest.raises(IclevrError, match="at most 1000"):
        resolve_sampling(cfg, pipe, "ddim", 1001)
    with pytest.raises(IclevrError, match="Unknown sampler 'euler'"):
        resolve_sampling(cfg, pipe, "euler")
    with pytest.raises(IclevrError, match="guidance"):
        resolve_sampling(cfg, pipe, "ddim", 10, -1.0)


@pytest.mark.parametrize("sampler,steps,guidance", [("euler", 5, 1.0), ("ddim", 1001, 1.0), ("ddim", 0, 1.0),
                                                    ("ddim", 5, -1.0)])
def test_the_commands_and_the_pipeline_check_a_sampling_request_by_one_route(pipe, sampler, steps, guidance):
    """One check (samplers.check_sampling) for the sampler name, steps and guidance: the commands'
    early check (resolve_sampling, before any work) and the pipeline's own refuse with the same words."""
    with pytest.raises(IclevrError) as early:
        resolve_sampling(tiny_config(), pipe, sampler, steps, guidance)
    with pytest.raises(IclevrError) as in_pipe:
        pipe(["red cube"], steps, guidance, sampler=sampler, output_type="pt")
    assert str(early.value) == str(in_pipe.value)
