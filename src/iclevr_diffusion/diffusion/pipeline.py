"""ConditionalDDPMPipeline: a diffusers DiffusionPipeline that draws images for multi-hot labels.

diffusers' DDPMPipeline cannot pass labels to the UNet, so this pipeline registers the conditional
UNet and a scheduler itself. It behaves like a diffusers pipeline: it returns an ImagePipelineOutput
(`return_dict=False`: a tuple), shows a tqdm bar (`set_progress_bar_config(disable=True)`), calls
`callback_on_step_end`, and takes the sampler, steps and guidance the model was exported with when
a call does not name them. `save_pretrained` writes the usual folder (model_index.json, unet/,
scheduler/) with the class named as diffusers names custom pipelines, so both loaders work:

    from iclevr_diffusion.diffusion.pipeline import ConditionalDDPMPipeline
    pipe = ConditionalDDPMPipeline.from_pretrained("runs/default/model")
    # or, with the package installed: DiffusionPipeline.from_pretrained("runs/default/model", trust_remote_code=True)
    images = pipe(["red sphere,cyan cube", "gray cube"], generator=torch.Generator().manual_seed(0)).images
    images = pipe(["gray cube"], num_inference_steps=25, guidance_scale=3.0, sampler="dpm++").images
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from iclevr_diffusion.config import SampleConfig
from iclevr_diffusion.diffusion.edm import clean_estimate

# diffusers >= 0.42 loads a component class named in model_index.json (iclevr_diffusion.diffusion.model:
# ConditionalUNet) only from modules already imported; importing it here means importing the
# pipeline is all a user needs before from_pretrained.
from iclevr_diffusion.diffusion.model import ConditionalUNet  # noqa: F401
from iclevr_diffusion.diffusion.samplers import check_sampling, make_sampler, samplers_for, with_sampling_settings
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.io import usual_permissions, write_json, write_text
from iclevr_diffusion.labels import MAX_OBJECTS, multi_hot_batch, parse_labels
from iclevr_diffusion.precision import sampling_autocast

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


@dataclass
class ConditionalPipelineOutput(ImagePipelineOutput):
    """`images` as diffusers' ImagePipelineOutput; `frames` the denoising-process states when asked for."""

    frames: torch.Tensor | None = None  # (frames, B, 3, S, S) in [-1, 1]


# A folder written by save_pretrained names its pipeline class as [LOADER_MODULE, class] in model_index.json,
# diffusers' form for a pipeline that is not part of diffusers: DiffusionPipeline.from_pretrained(folder,
# trust_remote_code=True) imports LOADER_MODULE.py from the folder, a one-line import from the installed package.
LOADER_MODULE = "iclevr_pipeline"
LOADER_SOURCE = """\"\"\"Lets diffusers' generic loader find this pipeline class; it lives in the installed package:
    pip install iclevr-diffusion, then DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True).\"\"\"

from {module} import {name}  # noqa: F401
"""
DEFAULT_KEYS = ("default_sampler", "default_steps", "default_guidance_scale", "default_churn")


class ConditionalDDPMPipeline(DiffusionPipeline):
    """UNet + noise schedule; the sampler is chosen per call (`sampler=`) or by swapping `pipe.scheduler`.

    `default_sampler`, `default_steps`, `default_guidance_scale` and `default_churn` (saved in
    model_index.json; the exporting run's `sample` section) are what a call without them uses.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet, scheduler, default_sampler: str | None = None, default_steps: int | None = None,
                 default_guidance_scale: float | None = None, default_churn: float | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=with_sampling_settings(scheduler))
        self.register_to_config(default_sampler=default_sampler, default_steps=default_steps,
                                default_guidance_scale=default_guidance_scale, default_churn=default_churn)
        # The noise schedule the model was trained with. A scheduler a caller puts in its place (diffusers'
        # `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`) runs as it is.
        self._noise_scheduler = self.scheduler

    @property
    def guidance_scale(self) -> float | None:  # for diffusers-style step callbacks
        return getattr(self, "_guidance_scale", None)

    @property
    def num_timesteps(self) -> int | None:
        return getattr(self, "_num_timesteps", None)

    def sampling_defaults(
        self, sampler: str | None = None, steps: int | None = None, guidance_scale: float | None = None
    ) -> tuple[str, int, float]:
        """(sampler, steps, guidance) with what is not given taken from the saved defaults (see default_steps)."""
        configured = preferred_sampler(self.config.get("default_sampler"), self._noise_scheduler)
        sampler = sampler or configured
        if steps is None:
            steps = default_steps(sampler, configured, self.config.get("default_steps"), self._noise_scheduler)
        if guidance_scale is None:
            guidance_scale = self.config.get("default_guidance_scale")
        if guidance_scale is None:
            guidance_scale = SampleConfig().guidance_scale
        return sampler, steps, float(guidance_scale)

    def sampling_churn(self, sampler: str, churn: float | None = None) -> float:
        """EDM's S_churn for `sampler`: `churn` where given (checked), else the saved default for the
        samplers that take it (heun and euler of EDM and flow models), else 0."""
        return resolve_churn(sampler, churn, self.config.get("default_churn"), self._noise_scheduler)

    @torch.no_grad()
    def __call__(
        self,
        labels: LabelsArg,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: Generator = None,
        frames: int = 0,
        callback: Callable[[int], None] | None = None,
        autocast: bool | None = None,
        output_type: str = "pil",
        sampler: str | None = None,
        churn: float | None = None,
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        """Images for the label rows, as `ConditionalPipelineOutput(images=...)` or, with return_dict=False,
        the tuple (images,) - (images, frames) when `frames` > 0.

        output_type: "pil" (a list of PIL images), "np" ((B, S, S, 3) floats in [0, 1], as diffusers) or "pt"
        (a (B, 3, S, S) tensor in [-1, 1], the range every tensor of this toolkit uses).
        sampler ("ddpm", "ddim", "dpm++", "unipc"; EDM models "heun", "euler", "dpm++", "dpm++sde"): a sampler
        made from the pipeline's noise schedule for this call. None: the saved default sampler - or, when
        `pipe.scheduler` was replaced, that scheduler as it is. churn: EDM's S_churn for heun and euler
        (0 = the deterministic ODE; None = the saved default). num_inference_steps and guidance_scale: None
        takes the saved defaults (ddpm: all T steps). guidance w: eps = eps_null + w * (eps_cond - eps_null),
        both halves in one batched forward; w = 1 skips the null half. `generator`: one CPU generator or one
        per image (then every image depends only on its own seed). `frames` > 0 also returns (frames, B, 3,
        S, S) states x_t spread evenly from the initial noise to the final image. `autocast`: bf16 forwards
        (None = the measured default for the device).
        After every whole step (a 2nd-order Heun step counts once): `callback_on_step_end(pipe, step_index,
        timestep, {"latents": x})` as in diffusers, whose returned "latents" replace x, and the older
        `callback(n)` with n = images stepped. A tqdm bar counts the steps unless
        `pipe.set_progress_bar_config(disable=True)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown}: this pipeline offers "
                             f"{self._callback_tensor_inputs}.")
        if output_type not in ("pil", "np", "pt"):
            raise IclevrError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        swapped = self.scheduler is not self._noise_scheduler
        sampler_name, steps, guidance_scale = self.sampling_defaults(sampler, num_inference_steps, guidance_scale)
        own = self.scheduler
        as_it_is = sampler is None and swapped  # diffusers' way: the scheduler put in place runs as it is
        check_sampling(None if as_it_is else sampler_name, steps, guidance_scale, own)  # the one check
        scheduler = own if as_it_is else make_sampler(sampler_name, own, self.sampling_churn(sampler_name, churn))
        device = self.unet.device
        if autocast is None:
            autocast = sampling_autocast(device)
        cond = labels_to_tensor(labels, self.unet.config.num_classes).to(device)
        batch = cond.shape[0]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images; give one per image.")
        size = self.unet.config.sample_size
        self.scheduler = scheduler  # callbacks see the sampler in use
        try:
            images, snapshots = self._denoise(cond, steps, guidance_scale, generator, frames, callback, autocast,
                                              callback_on_step_end, callback_on_step_end_tensor_inputs, size)
        finally:
            self.scheduler = own
        strip = torch.stack(snapshots) if frames > 0 else None
        if output_type == "pil":
            from iclevr_diffusion.images import to_pil

            images = [to_pil(img) for img in images]
        elif output_type == "np":
            images = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, strip) if frames > 0 else (images,)
        return ConditionalPipelineOutput(images=images, frames=strip)

    def _denoise(self, cond, steps, guidance_scale, generator, frames, callback, autocast, on_step_end,
                 tensor_inputs, size):
        """The sampling loop with self.scheduler; returns the final images and the kept states (CPU)."""
        device, batch = cond.device, cond.shape[0]
        # Noise drawn with CPU generators and moved, so a seed gives the same start on any device.
        x = randn_tensor((batch, 3, size, size), generator=generator, device=device, dtype=torch.float32)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(steps, device=device)
        timesteps = self.scheduler.timesteps
        guided = guidance_scale != 1.0
        labels_in = torch.cat([cond, torch.zeros_like(cond)]) if guided else cond
        # Whole steps: a 2nd-order sampler (Heun) evaluates twice per step, and its halfway states are
        # neither counted for progress nor drawn in the process strip.
        whole_steps = steps if getattr(self.scheduler, "order", 1) == 2 else len(timesteps)
        self._guidance_scale, self._num_timesteps = guidance_scale, whole_steps
        keep = _frame_indices(whole_steps, frames)
        snapshots = [x.clamp(-1, 1).cpu()] if 0 in keep else []
        done = 0
        step_kwargs = _step_kwargs(self.scheduler, generator)
        # A self-conditioned (EDM) model gets its previous clean estimate, per half of a guided batch.
        sigma_data = float(self.scheduler.config.sigma_data) if getattr(self.unet, "self_conditioned", False) else None
        previous = None
        with self.progress_bar(total=whole_steps) as bar:
            for t in timesteps:
                unscaled = torch.cat([x, x]) if guided else x
                model_in = self.scheduler.scale_model_input(unscaled, t)
                extra = {} if previous is None else {"previous_estimate": previous / sigma_data}
                # Only the UNet runs in bf16; guidance and the solver's arithmetic stay in fp32.
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(autocast)):
                    out = self.unet(model_in, t, labels_in, **extra)
                out = out.float()
                if sigma_data is not None:
                    previous = clean_estimate(unscaled, out, t, sigma_data)
                if guided:
                    eps_cond, eps_null = out.chunk(2)
                    out = eps_null + guidance_scale * (eps_cond - eps_null)
                x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
                if not getattr(self.scheduler, "state_in_first_order", True):
                    continue  # halfway through a Heun step
                if on_step_end is not None:
                    tensors = {"latents": x}
                    x = on_step_end(self, done, t, {k: tensors[k] for k in tensor_inputs}).pop("latents", x)
                done += 1
                if done in keep:
                    snapshots.append(x.clamp(-1, 1).cpu())
                if callback is not None:
                    callback(batch)
                bar.update()
        return x.clamp(-1, 1).cpu(), snapshots

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """diffusers' folder, with the class named as [LOADER_MODULE, class] and LOADER_MODULE.py beside it."""
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = [LOADER_MODULE, type(self).__name__]
        write_text(folder / f"{LOADER_MODULE}.py", LOADER_SOURCE.format(module=type(self).__module__,
                                                                         name=type(self).__name__))
        write_json(folder / "model_index.json", index)
        usual_permissions(folder)  # safetensors writes its files 0600

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder written by save_pretrained, by this class's name: its components are loaded from
        the libraries model_index.json names (diffusers, this package), never with the folder's own code,
        so no trust_remote_code is needed. Keyword arguments: components (unet=..., scheduler=...), the
        DEFAULT_KEYS and torch_dtype. Folders of older versions (a plain class name) load as before."""
        folder = Path(pretrained_model_name_or_path)
        index = folder / "model_index.json"
        config = json.loads(index.read_text()) if index.is_file() else {}
        if not isinstance(config.get("_class_name"), list):
            # diffusers loads a component only from a module already imported: an older folder names
            # the UNet's module as it was then (iclevr_diffusion.model, now a re-export).
            for value in config.values():
                if isinstance(value, list) and str(value[0]).split(".")[0] == "iclevr_diffusion":
                    importlib.import_module(value[0])
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        dtype = kwargs.pop("torch_dtype", None)
        parts = {}
        for name in ("unet", "scheduler"):
            if name in kwargs:
                parts[name] = kwargs.pop(name)
                continue
            component = _component_class(*config[name])
            extra = {"torch_dtype": dtype} if dtype is not None and issubclass(component, torch.nn.Module) else {}
            parts[name] = component.from_pretrained(folder / name, **extra)
        defaults = {k: kwargs.pop(k, config.get(k)) for k in DEFAULT_KEYS}
        if kwargs:
            raise TypeError(f"Unexpected arguments for {cls.__name__}.from_pretrained: {', '.join(kwargs)}.")
        pipe = cls(**parts, **defaults)
        pipe.register_to_config(_name_or_path=str(folder))
        return pipe


def _component_class(library: str, class_name: str):
    """A component class named in model_index.json, from diffusers or this package only."""
    if library != "diffusers" and library.split(".")[0] != "iclevr_diffusion":
        raise ValueError(f"component {class_name} from '{library}' is not one this toolkit loads.")
    return getattr(importlib.import_module(library), class_name)


def preferred_sampler(configured: str | None, train_scheduler) -> str:
    """The configured sampler where the model offers it; else its formulation's usual one (a model folder
    without its run config may be of the other formulation): ddim for DDPM models, heun for EDM models."""
    offered = samplers_for(train_scheduler)
    if configured in offered:
        return configured
    fallback = SampleConfig().sampler
    return fallback if fallback in offered else ("ddim" if "ddim" in offered else offered[0])


def resolve_churn(sampler: str, churn: float | None, saved: float | None, train_scheduler) -> float:
    """The churn a call samples with (see ConditionalDDPMPipeline.sampling_churn); IclevrError for a churn
    given to a sampler that takes none, or a negative one."""
    from iclevr_diffusion.diffusion.edm import CHURN_SAMPLERS, is_edm

    takes_churn = is_edm(train_scheduler) and sampler in CHURN_SAMPLERS
    if churn is not None:
        if churn < 0:
            raise IclevrError(f"--churn must be 0 or more (0 = deterministic), got {churn:g}.")
        if churn > 0 and not takes_churn:
            raise IclevrError(f"--churn applies to the heun and euler samplers of EDM and flow models, not to "
                              f"{sampler}; leave it out.")
        return float(churn)
    if not takes_churn:
        return 0.0
    return float(SampleConfig().churn if saved is None else saved)


def default_steps(sampler: str, configured: str, configured_steps: int | None, train_scheduler) -> int:
    """Steps when none are given: the configured count for the configured sampler; ddpm the full chain of T
    (the report's ancestral sampler; the configured count is meant for the fast solvers); another EDM
    sampler its own usual count (edm.EDM_DEFAULT_STEPS: about the network evaluations of Heun 18)."""
    from iclevr_diffusion.diffusion.edm import EDM_DEFAULT_STEPS, is_edm

    if sampler == "ddpm":
        return int(train_scheduler.config.num_train_timesteps)
    if sampler != configured and is_edm(train_scheduler) and sampler in EDM_DEFAULT_STEPS:
        return EDM_DEFAULT_STEPS[sampler]
    return SampleConfig().steps if configured_steps is None else int(configured_steps)


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
