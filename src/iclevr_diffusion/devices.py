"""Device choice: CUDA when present, else CPU; `--device` overrides."""

from __future__ import annotations

import torch

from iclevr_diffusion.errors import IclevrError


def resolve_device(spec: str | None = "auto") -> torch.device:
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise IclevrError(f"--device '{spec}' is not a device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise IclevrError(f"--device {spec} asked for CUDA, but no CUDA GPU is available; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise IclevrError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are present."
            )
    elif device.type != "cpu":
        raise IclevrError(f"--device '{spec}' is not supported; use cpu, cuda or cuda:N.")
    return device
