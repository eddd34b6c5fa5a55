"""ConditionalDDPMPipeline: a diffusers DiffusionPipeline that draws images for multi-hot labels.

diffusers' DDPMPipeline cannot pass labels to the UNet, so this pipeline registers the conditional
UNet and a scheduler itself; `save_pretrained` / `from_pretrained` give the usual diffusers folder
(model_index.json, unet/, scheduler/), loadable from plain Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DiffusionPipeline

from iclevr_diffusion.labels import multi_hot_batch


class ConditionalDDPMPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _labels_tensor(self, labels) -> torch.Tensor:
        if isinstance(labels, torch.Tensor):
            return labels.float()
        return multi_hot_batch(labels)

    @torch.no_grad()
    def __call__(
        self,
        labels: torch.Tensor | Sequence[Sequence[str]],
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        frames: int = 0,
        callback: Callable[[int], None] | None = None,
        autocast: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] of shape (B, 3, S, S) for the label rows (multi-hot tensor or name lists).

        guidance_scale w: eps = eps_null + w * (eps_cond - eps_null), both halves in one batched
        forward; w = 1 skips the null half entirely. `frames` > 0 also returns (frames, B, 3, S, S)
        snapshots of x_t spread evenly from pure noise to the final image.
        """
        device = self.unet.device
        cond = self._labels_tensor(labels).to(device)
        batch = cond.shape[0]
        size = self.unet.config.sample_size
        # Noise drawn on the CPU generator so a seed gives the same images on any device.
        x = torch.randn((batch, 3, size, size), generator=generator, dtype=torch.float32)
        x = (x * self.scheduler.init_noise_sigma).to(device)
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        guided = guidance_scale != 1.0
        labels_in = torch.cat([cond, torch.zeros_like(cond)]) if guided else cond
        keep = set()
        if frames > 0:
            n = len(timesteps)
            keep = {round(i * (n - 1) / max(frames - 1, 1)) for i in range(frames)}
        snapshots = []
        step_kwargs = _step_kwargs(self.scheduler, generator)
        for i, t in enumerate(timesteps):
            model_in = torch.cat([x, x]) if guided else x
            model_in = self.scheduler.scale_model_input(model_in, t)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = self.unet(model_in, t, labels_in).float()
            if guided:
                eps_cond, eps_null = out.chunk(2)
                out = eps_null + guidance_scale * (eps_cond - eps_null)
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
            if i in keep:
                snapshots.append(x.clamp(-1, 1).cpu())
            if callback is not None:
                callback(1)
        images = x.clamp(-1, 1).cpu()
        if frames > 0:
            return images, torch.stack(snapshots)
        return images


def _step_kwargs(scheduler, generator) -> dict:
    """Ancestral schedulers (DDPM) draw fresh noise each step: pass them the seeded generator."""
    import inspect

    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generator}
    return {}
