"""Device choice: CUDA when present, else CPU; `--device` overrides."""

from __future__ import annotations

import platform
from pathlib import Path

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


def cpu_model() -> str:
    """The CPU's model name (results and evaluator cards record it: speeds differ 4x between the CPUs
    one machine kind comes with)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
