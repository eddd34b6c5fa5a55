"""The old import path of ConditionalDDPMPipeline (the README, model folders' model_index.json and
iclevr_pipeline.py name it): see diffusion/pipeline.py."""

# Folders exported before diffusion/ name the UNet's module iclevr_diffusion.model; diffusers' generic
# loader (through their iclevr_pipeline.py, which imports this module) takes components only from
# modules already imported.
from iclevr_diffusion import model as _model  # noqa: F401
from iclevr_diffusion.diffusion.pipeline import ConditionalDDPMPipeline, ConditionalPipelineOutput

__all__ = ["ConditionalDDPMPipeline", "ConditionalPipelineOutput"]
