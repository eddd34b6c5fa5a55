"""ConditionalDDPMPipeline: a diffusers DiffusionPipeline that draws images for multi-hot labels.

diffusers' DDPMPipeline cannot pass labels to the UNet, so this pipeline registers the conditional
UNet and a scheduler itself; `save_pretrained` / `from_pretrained` give the usual diffusers folder
(model_index.json, unet/, scheduler/), loadable from plain Python:

    from iclevr_diffusion.pipeline import ConditionalDDPMPipeline
    pipe = ConditionalDDPMPipeline.from_pretrained("runs/default/model")
    images = pipe(["red sphere,cyan cube", "gray cube"], num_inference_steps=25, guidance_scale=3.0,
                  sampler="ddim", generator=torch.Generator().manual_seed(0), output_type="pil")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.labels import MAX_OBJECTS, multi_hot_batch, parse_labels

# diffusers >= 0.42 loads a component class named in model_index.json (iclevr_diffusion.model:
# ConditionalUNet) only from modules already imported; importing it here means importing the
# pipeline is all a user needs before from_pretrained.
from iclevr_diffusion.model import ConditionalUNet  # noqa: F401
from iclevr_diffusion.samplers import check_steps, make_sampler

LabelsArg = torch.Tensor | str | Sequence[str | Sequence[str]]
Generator = torch.Generator | list[torch.Generator] | None


def labels_to_tensor(labels: LabelsArg, num_classes: int = 24, warn: bool = True) -> torch.Tensor:
    """(B, num_classes) multi-hot rows from a tensor, "red sphere,cyan cube", or a list of such entries.

    Each entry of a list is one image: a comma-separated string or a list of names. Unknown labels
    raise; more than 3 objects warn unless `warn` is False (callers that validated their input).
    """
    if isinstance(labels, torch.Tensor):
        cond = labels.float()
        if cond.ndim == 1:
            cond = cond[None]
    else:
        entries = [labels] if isinstance(labels, str) else list(labels)
        if not entries:
            raise IclevrError('No labels given: pass at least one label list, e.g. ["red sphere,cyan cube"].')
        cond = multi_hot_batch([parse_labels(e, max_objects=MAX_OBJECTS if warn else 99) for e in entries])
    if cond.ndim != 2 or cond.shape[1] != num_classes:
        raise IclevrError(f"labels must have shape (B, {num_classes}), got {tuple(cond.shape)}.")
    return cond


def autocast_default(device: torch.device) -> bool:
    """bf16 autocast where it is measured to be faster without changing the images noticeably.

    On this project's 2-core AMD EPYC (avx512_bf16), UNet forwards at 64x64, batch 64, fp32 vs bf16
    side by side on a machine shared with other jobs: default preset 10.9 -> 24.6 images/s (1 thread)
    and 6.5 -> 13.3 (2 threads); the report's seed preset 5.8 -> 7.2 and 3.7 -> 5.5. The UNet output
    moves by 1.2% (relative L2); the final images of 25 DPM-Solver++ steps by 0.002 on average
    (random-weight model). `benchmarks/samplers.py` scores an fp32 row beside the bf16 ones on a
    trained model. On CUDA the default stays fp32 until measured there.
    """
    return device.type == "cpu" and _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 dot products (avx512_bf16 or AMX); elsewhere bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: stay in fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class ConditionalDDPMPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        labels: LabelsArg,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        generator: Generator = None,
        frames: int = 0,
        callback: Callable[[int], None] | None = None,
        autocast: bool | None = None,
        output_type: str = "pt",
        sampler: str | None = None,
    ):
        """Images for the label rows: a (B, 3, S, S) tensor in [-1, 1] (output_type="pt") or PIL images.

        guidance_scale w: eps = eps_null + w * (eps_cond - eps_null), both halves in one batched
        forward; w = 1 skips the null half entirely. `generator` is one CPU generator or one per image
        (then every image depends only on its own seed, not on the batch it was drawn in).
        `frames` > 0 also returns (frames, B, 3, S, S) states x_t spread evenly from the initial pure
        noise to the final image. `callback(n)` is called after every step with n = images stepped.
        `autocast`: bf16 forwards (None = the measured default for the device). `sampler` ("ddpm",
        "ddim", "dpm++", "unipc") samples with that scheduler made from the pipeline's own for this call;
        None uses `self.scheduler` as it is (after from_pretrained: the training DDPMScheduler).
        """
        if sampler is not None:
            own = self.scheduler
            self.scheduler = make_sampler(sampler, own)
            try:
                return self(
                    labels, num_inference_steps, guidance_scale, generator, frames, callback, autocast, output_type
                )
            finally:
                self.scheduler = own
        if output_type not in ("pt", "pil"):
            raise IclevrError(f"output_type must be 'pt' or 'pil', got {output_type!r}.")
        if guidance_scale < 0:
            raise IclevrError(f"--guidance-scale must be 0 or more (1 = off), got {guidance_scale}.")
        device = self.unet.device
        if autocast is None:
            autocast = autocast_default(device)
        cond = labels_to_tensor(labels, self.unet.config.num_classes).to(device)
        batch = cond.shape[0]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images; give one per image.")
        size = self.unet.config.sample_size
        check_steps(num_inference_steps, self.scheduler)
        # Noise drawn with CPU generators and moved, so a seed gives the same start on any device.
        x = randn_tensor((batch, 3, size, size), generator=generator, device=device, dtype=torch.float32)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        guided = guidance_scale != 1.0
        labels_in = torch.cat([cond, torch.zeros_like(cond)]) if guided else cond
        # Whole steps: a 2nd-order sampler (Heun) evaluates twice per step, and its halfway states are
        # neither counted for progress nor drawn in the process strip.
        whole_steps = num_inference_steps if getattr(self.scheduler, "order", 1) == 2 else len(timesteps)
        keep = _frame_indices(whole_steps, frames)
        snapshots = [x.clamp(-1, 1).cpu()] if 0 in keep else []
        done = 0
        step_kwargs = _step_kwargs(self.scheduler, generator)
        for t in timesteps:
            model_in = torch.cat([x, x]) if guided else x
            model_in = self.scheduler.scale_model_input(model_in, t)
            # Only the UNet runs in bf16; guidance and the solver's arithmetic stay in fp32.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(autocast)):
                out = self.unet(model_in, t, labels_in)
            out = out.float()
            if guided:
                eps_cond, eps_null = out.chunk(2)
                out = eps_null + guidance_scale * (eps_cond - eps_null)
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
            if not getattr(self.scheduler, "state_in_first_order", True):
                continue  # halfway through a Heun step
            done += 1
            if done in keep:
                snapshots.append(x.clamp(-1, 1).cpu())
            if callback is not None:
                callback(batch)
        images = x.clamp(-1, 1).cpu()
        if output_type == "pil":
            from iclevr_diffusion.images import to_pil

            images = [to_pil(img) for img in images]
        if frames > 0:
            return images, torch.stack(snapshots)
        return images


def _frame_indices(steps: int, frames: int) -> set[int]:
    """Which of the steps + 1 states (0 = initial noise, steps = final image) make the strip."""
    if frames <= 0:
        return set()
    if frames == 1:
        return {steps}
    return {round(i * steps / (frames - 1)) for i in range(frames)}


def _step_kwargs(scheduler, generator) -> dict:
    """Ancestral schedulers (DDPM) draw fresh noise each step: pass them the seeded generator(s)."""
    import inspect

    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generator}
    return {}
