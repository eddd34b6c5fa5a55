"""The diffusion training loss, kept out of the model and the loop so it can be read and tested alone.

Noise, timesteps and the classifier-free-guidance label dropout are drawn from an explicit CPU
`torch.Generator`, so a run is reproducible on any device and its random stream can be saved in a
checkpoint and resumed exactly.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def drop_labels(labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace whole label rows by the null label (zeros) with probability p (classifier-free guidance)."""
    if p <= 0:
        return labels
    keep = torch.rand(labels.shape[0], generator=generator) >= p
    return labels * keep.to(labels.device, labels.dtype).unsqueeze(1)


def target_for(scheduler: DDPMScheduler, images: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: the noise (epsilon) or the velocity v (Salimans & Ho)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(images, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
    snr = compute_snr(scheduler, t)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,  # clean images in [-1, 1], (B, 3, S, S)
    labels: torch.Tensor,  # multi-hot (B, num_classes), already label-dropped if wanted
    generator: torch.Generator | None = None,  # CPU generator for noise and timesteps
    min_snr_gamma: float | None = None,  # None: plain MSE (DDPM only)
    p_mean: float = -1.2,  # EDM only: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2,
    p_uniform: float = 0.0,  # EDM only: that share of ln(sigma) uniform over the sampler's range instead
    foreground_weight: float = 0.0,  # extra weight of pixels that stand out of the floor (weighted_mse)
) -> torch.Tensor:
    """DDPM: mean squared error between the model output and the target at uniformly drawn timesteps.
    EDM and rectified flow (an EDM-family scheduler): edm.edm_loss at log-normal noise levels."""
    from iclevr_diffusion.diffusion.edm import edm_loss, is_edm

    if is_edm(scheduler):
        return edm_loss(model, scheduler, images, labels, generator, p_mean, p_std, p_uniform, foreground_weight)
    b = images.shape[0]
    device = images.device
    noise = torch.randn(images.shape, generator=generator).to(device, images.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    noisy = scheduler.add_noise(images, noise, t)
    pred = model(noisy, t, labels).float()
    target = target_for(scheduler, images, noise, t).float()
    if min_snr_gamma is None:
        return weighted_mse(pred, target, images, foreground_weight)
    per_image = weighted_mse(pred, target, images, foreground_weight, per_image=True)
    return (per_image * snr_weights(scheduler, t, min_snr_gamma).to(device)).mean()


def foreground_weights(images: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, S, S) per-pixel loss weights 1 + weight * |pixel - the image's median colour| (summed over
    R, G, B): an i-CLEVR scene is mostly gray floor, its median; objects stand out by 1-2 (in [-1, 1]),
    the floor's shading by about 0.1. Every image's weights average 1, so only their balance changes."""
    median = images.flatten(2).median(dim=2).values[:, :, None, None]
    w = 1 + weight * (images - median).abs().sum(dim=1, keepdim=True)
    return w / w.mean(dim=(2, 3), keepdim=True)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, images: torch.Tensor, foreground_weight: float = 0.0,
                 per_image: bool = False) -> torch.Tensor:
    """Mean squared error, with foreground_weight > 0 weighted per pixel by foreground_weights(images);
    per_image: one value per image (B,) instead of the batch mean."""
    err = (pred - target) ** 2
    if foreground_weight > 0:
        err = err * foreground_weights(images.float(), foreground_weight)
    return err.mean(dim=(1, 2, 3)) if per_image else err.mean()
