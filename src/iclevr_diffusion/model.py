"""The old import path of ConditionalUNet (model folders name it in model_index.json): see diffusion/model.py."""

# diffusers finds how to load a component by the base classes its module holds (ModelMixin: from_pretrained).
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from iclevr_diffusion.diffusion.model import ConditionalUNet, count_parameters

__all__ = ["ConditionalUNet", "count_parameters"]
