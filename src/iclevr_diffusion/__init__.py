"""iclevr-diffusion: a label-conditional DDPM toolkit for i-CLEVR scenes."""

__version__ = "0.1.0"
