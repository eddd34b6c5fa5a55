"""The diffusion model: ConditionalUNet (model), the DDPM and EDM formulations (schedule, edm, losses),
the samplers (diffusers schedulers by name), the pipeline and drawing images with it (sampling)."""
