"""train() options with no other test: grad_accum, data.num_workers, train.epochs as the stop reason and
v-prediction, on a tiny real UNet and a tiny PIL-drawn dataset.

The loop is observed, never replaced: a global forward hook records what the real model is given and
returns, a global optimizer pre-step hook records the gradients each real AdamW update applies, and a
dataset wrapper records which images were read. The tests then recompute the loss or the gradient the
loop should have used from those records.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from iclevr_diffusion.diffusion.losses import snr_weights
from iclevr_diffusion.diffusion.model import ConditionalUNet
from iclevr_diffusion.diffusion.schedule import make_train_scheduler
from iclevr_diffusion.training.batches import build_dataset
from iclevr_diffusion.training.loop import train
from tiny_data import final_weights, make_tiny_dataset, tiny_cfg


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "iclevr_data", n=12)



def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Recording(torch.utils.data.Dataset):
    """The real dataset, recording the index of every image read (in this process)."""

    def __init__(self, dataset, pid_dir=None):
        self.dataset, self.root, self.read, self.pid_dir = dataset, dataset.root, [], pid_dir

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.read.append(i)
        if self.pid_dir is not None:  # DataLoader workers are other processes: they leave a file each
            (self.pid_dir / str(os.getpid())).touch()
        return self.dataset[i]


@contextmanager
def observe_training():
    """Yields (forwards, updates): every training forward of a ConditionalUNet as (noisy, t, labels, output)
    and every optimizer update as (parameters, gradients) just before it is applied (all cloned)."""
    forwards, updates = [], []

    def on_forward(module, args, output):
        if isinstance(module, ConditionalUNet) and module.training and torch.is_grad_enabled():
            forwards.append(tuple(a.detach().clone() for a in args) + (output.detach().clone(),))

    def on_step(optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        updates.append(([p.detach().clone() for p in params], [p.grad.detach().clone() for p in params]))

    handles = [register_module_forward_hook(on_forward), register_optimizer_step_pre_hook(on_step)]
    try:
        yield forwards, updates
    finally:
        for h in handles:
            h.remove()


def clean_images(data: Recording, n_forwards: int, micro: int) -> list[torch.Tensor]:
    """The clean images of each recorded forward, in the order the loop read them."""
    return [torch.stack([data.dataset[i][0] for i in data.read[k * micro:(k + 1) * micro]])
            for k in range(n_forwards)]


def recovered_noise(sched, x0, noisy, t):
    """noisy = sqrt(a) x0 + sqrt(1 - a) noise, solved for the noise."""
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return (noisy - a.sqrt() * x0) / (1 - a).sqrt()


def test_grad_accum_applies_the_mean_gradient_of_the_whole_batch(data_root, tmp_path):
    """grad_accum 2 x micro-batches of 2 = one update per 4 images, whose gradient is that of the mean
    loss over those 4 images (what batch 4 without accumulation applies), gradients reset between updates."""
    sets = ("train.max_steps=2", "train.grad_accum=2", "train.batch_size=4", "train.grad_clip=0",
            "train.warmup_steps=0", "train.min_snr_gamma=null", "train.label_dropout=0.5")
    cfg = tiny_cfg(data_root, *sets)
    data = Recording(build_dataset(cfg))
    with observe_training() as (forwards, updates):
        result = train(cfg, tmp_path / "run", dataset=data)
    assert result.step == 2 and len(updates) == 2  # two real AdamW updates ...
    assert [f[0].shape[0] for f in forwards] == [2, 2, 2, 2]  # ... from four forwards of two images
    assert len(data.read) == 8 and len(set(data.read)) == 8  # eight different images, none read twice
    sched = make_train_scheduler(cfg.schedule)
    x0s = clean_images(data, 4, 2)
    model = ConditionalUNet.from_run_config(cfg)
    for u, (params, grads) in enumerate(updates):
        with torch.no_grad():
            for p, value in zip(model.parameters(), params):
                p.copy_(value)
        model.zero_grad()
        noisy = torch.cat([forwards[2 * u + k][0] for k in (0, 1)])
        t = torch.cat([forwards[2 * u + k][1] for k in (0, 1)])
        labels = torch.cat([forwards[2 * u + k][2] for k in (0, 1)])
        x0 = torch.cat([x0s[2 * u], x0s[2 * u + 1]])
        target = recovered_noise(sched, x0, noisy, t)
        # The whole batch of 4 in one forward: the update batch 4 without accumulation would apply.
        torch.nn.functional.mse_loss(model(noisy, t, labels), target).backward()
        for (name, p), g in zip(model.named_parameters(), grads):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6, msg=f"{name}, update {u}")
    # Weights after the first update differ from before it: the captured updates are real ones.
    assert any(not torch.equal(a, b) for a, b in zip(updates[0][0], updates[1][0]))


def test_num_workers_loads_in_worker_processes_and_trains_identically(data_root, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    sets = ("train.max_steps=4", "data.hflip=true")
    cfg = tiny_cfg(data_root, *sets)
    inline = train(cfg, tmp_path / "inline", dataset=Recording(build_dataset(cfg), pids))
    assert {p.name for p in pids.iterdir()} == {str(os.getpid())}
    for p in pids.iterdir():
        p.unlink()
    workers_cfg = tiny_cfg(data_root, *sets, "data.num_workers=2")
    loaded = train(workers_cfg, tmp_path / "workers", dataset=Recording(build_dataset(workers_cfg), pids))
    seen = {int(p.name) for p in pids.iterdir()}
    assert len(seen) >= 2 and os.getpid() not in seen  # worker processes (two an epoch) read every image
    assert inline.step == loaded.step == 4
    a, b = final_weights(tmp_path / "inline"), final_weights(tmp_path / "workers")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same batches in the same order


def test_epochs_stop_the_run_and_fix_the_lr_horizon(data_root, tmp_path):
    # 12 images, batch 4: 3 optimizer steps per epoch; max_steps and a time budget far away.
    cfg = tiny_cfg(data_root, "train.epochs=2", "train.max_steps=100", "train.max_minutes=60")
    horizons = []
    result = train(cfg, tmp_path / "run", progress=lambda e, **i: horizons.append(i["total"]) if e == "start" else None)
    assert result.stopped_by == "epochs" and result.step == 6 and result.epoch == 2
    assert horizons == [6]  # the horizon is known from the epochs, not planned from the speed
    rows = metrics(tmp_path / "run")
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1)]
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # annealed at the end of the last epoch
    # With grad_accum the epoch counts micro-batches: 12 images, batch 4 = 2 x 2, still 3 steps an epoch.
    accum = train(tiny_cfg(data_root, "train.epochs=1", "train.grad_accum=2"), tmp_path / "accum")
    assert accum.stopped_by == "epochs" and accum.step == 3


def test_v_prediction_trains_on_the_velocity_and_exports_a_v_model(data_root, tmp_path):
    sets = ("schedule.prediction_type=v_prediction", "train.max_steps=2", "train.min_snr_gamma=5.0",
            "train.sample_every=2")
    cfg = tiny_cfg(data_root, *sets)
    data = Recording(build_dataset(cfg))
    with observe_training() as (forwards, _):
        result = train(cfg, tmp_path / "run", dataset=data)
    assert result.step == 2 and len(forwards) == 2
    sched = make_train_scheduler(cfg.schedule)
    noisy, t, _, out = forwards[0]
    x0 = clean_images(data, 1, 4)[0]
    noise = recovered_noise(sched, x0, noisy, t)
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    velocity = a.sqrt() * noise - (1 - a).sqrt() * x0

    def weighted(target):  # min-SNR-5 weights for v: min(SNR, 5) / (SNR + 1)
        per_image = (out - target).pow(2).mean(dim=(1, 2, 3))
        return float((per_image * snr_weights(sched, t, 5.0)).mean())

    logged = metrics(tmp_path / "run")[0]["loss"]
    assert logged == pytest.approx(weighted(velocity), rel=1e-4)
    assert logged != pytest.approx(weighted(noise), rel=1e-2)  # not the epsilon loss
    # The export is a v-prediction model that loads and samples.
    from iclevr_diffusion.diffusion.sampling import generate, load_pipeline

    pipe, loaded, _ = load_pipeline(tmp_path / "run", device="cpu")
    assert pipe.scheduler.config.prediction_type == "v_prediction" == loaded.schedule.prediction_type
    images = generate(pipe, [["red cube"]], "ddim", 2, 2.0, seed=0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert (tmp_path / "run" / "samples" / "step_000002.png").is_file()


def test_adam_beta2_reaches_the_optimizer_and_changes_the_updates(data_root, tmp_path):
    betas, finals = [], {}
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: betas.append(opt.param_groups[0]["betas"]))
    try:
        for beta2 in (0.99, 0.999):
            train(tiny_cfg(data_root, "train.max_steps=3", f"train.adam_beta2={beta2}"), tmp_path / str(beta2))
            finals[beta2] = final_weights(tmp_path / str(beta2))
    finally:
        hook.remove()
    assert betas == [(0.9, 0.99)] * 3 + [(0.9, 0.999)] * 3
    assert any(not torch.equal(a, b) for a, b in zip(finals[0.99].values(), finals[0.999].values()))
