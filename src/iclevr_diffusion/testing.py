"""A tiny, briefly trained model in the real run-folder layout, for tests, `--smoke` benchmarks and docs.

It is a real ConditionalUNet (about 40k parameters, 16x16 images) given a few AdamW steps of the
DDPM loss on random coloured blocks, so its outputs depend on labels, timesteps and the schedule,
unlike a freshly initialised network; it draws nothing recognisable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from iclevr_diffusion.config import Config, config_from_dict
from iclevr_diffusion.diffusion.edm import edm_loss
from iclevr_diffusion.diffusion.model import ConditionalUNet
from iclevr_diffusion.diffusion.pipeline import ConditionalDDPMPipeline
from iclevr_diffusion.diffusion.schedule import make_train_scheduler
from iclevr_diffusion.io import write_text
from iclevr_diffusion.run_folder import RUN_CONFIG, RunFolder


def tiny_config(
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
    num_train_timesteps: int = 100,
    image_size: int = 16,
    formulation: str = "ddpm",
    **sample,
) -> Config:
    """The run config of the tiny model; `sample` overrides keys of the `sample` section.
    DDPM unless `formulation="edm"` or "flow" (then sigma_data 0.5); all sample with dpm++ as DDPM does."""
    return config_from_dict(
        {
            "name": "tiny",
            "data": {"image_size": image_size},
            "model": {
                "block_out_channels": [8, 16],
                "attention": [False, False],
                "layers_per_block": 1,
                "attention_head_dim": 8,
                "norm_num_groups": 8,
                "mid_attention": False,
                "time_scale_shift": "default",
            },
            "schedule": {
                "formulation": formulation,
                "sigma_data": None if formulation == "ddpm" else 0.5,
                "num_train_timesteps": num_train_timesteps,
                "beta_schedule": beta_schedule,
                "prediction_type": prediction_type,
            },
            "sample": {"sampler": "dpm++", "steps": 5, "guidance_scale": 2.0, "batch_size": 8, **sample},
        }
    )


def tiny_pipeline(cfg: Config | None = None, train_steps: int = 20, seed: int = 0) -> ConditionalDDPMPipeline:
    """A ConditionalDDPMPipeline (UNet in eval mode + training scheduler) after `train_steps` steps."""
    cfg = cfg or tiny_config()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = ConditionalUNet.from_run_config(cfg)
    scheduler = make_train_scheduler(cfg.schedule)
    size, batch = cfg.data.image_size, 16
    # Random "scenes": a gray floor with one block whose colour follows the label index.
    labels = torch.zeros(batch, cfg.model.num_classes)
    labels[torch.arange(batch), torch.randint(0, cfg.model.num_classes, (batch,), generator=gen)] = 1
    colours = torch.rand(cfg.model.num_classes, 3, generator=gen) * 2 - 1
    x0 = torch.full((batch, 3, size, size), -0.2)
    x0[:, :, size // 4 : size // 2, size // 4 : size // 2] = (labels @ colours)[:, :, None, None]
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    unet.train()
    for _ in range(train_steps):
        if cfg.schedule.formulation != "ddpm":
            loss = edm_loss(unet, scheduler, x0, labels, gen, cfg.schedule.p_mean, cfg.schedule.p_std,
                            cfg.schedule.p_uniform)
            opt.zero_grad()
            loss.backward()
            opt.step()
            continue
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        target = noise if cfg.schedule.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(xt, t, labels), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    return ConditionalDDPMPipeline(unet=unet, scheduler=scheduler)


def write_tiny_run(run_dir: str | Path, cfg: Config | None = None, train_steps: int = 20, seed: int = 0) -> Path:
    """A run folder RUN/{config.yaml, model/{model_index.json, unet/, scheduler/, run_config.yaml}}."""
    cfg = cfg or tiny_config()
    run_dir = Path(run_dir)
    pipe = tiny_pipeline(cfg, train_steps, seed)
    folder = RunFolder(run_dir)
    pipe.save_pretrained(folder.model)
    write_text(folder.model / RUN_CONFIG, cfg.to_yaml())
    write_text(folder.config, cfg.to_yaml())
    return run_dir


@contextmanager
def one_thread() -> Iterator[None]:
    """Run tiny models on one intra-op thread, then restore the setting.

    On a 2-core machine shared with other work, torch's two OpenMP threads wait on each other: a
    0.03 s tiny sampling run took 4-8 s with 2 threads and 0.03 s with 1 (measured side by side).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
