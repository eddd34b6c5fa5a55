"""One precision policy (bf16 autocast or fp32) for training, sampling and the evaluator.

- Where bf16 can be fast at all (`native_bf16`): CUDA with bf16 support, or a CPU where oneDNN runs
  bf16 natively (avx512_bf16 or AMX). Elsewhere bf16 is emulated, and slower than fp32.
- Sampling (`sampling_autocast`): bf16 autocast on CPUs with native bf16, fp32 elsewhere (CUDA stays
  fp32 until measured there). Measured on this project's 2-core AMD EPYC (avx512_bf16), UNet forwards
  at 64x64, batch 64, fp32 vs bf16 side by side on a machine shared with other jobs: default preset
  10.9 -> 24.6 images/s (1 thread) and 6.5 -> 13.3 (2 threads); the report's seed preset 5.8 -> 7.2
  and 3.7 -> 5.5. The UNet output moves by 1.2% (relative L2); the final images of 25 DPM-Solver++
  steps by 0.002 on average (random-weight model). `benchmarks/samplers.py` scores an fp32 row beside
  the bf16 ones on a trained model.
- Training (train.mixed_precision=auto, training/loop.py) and the evaluator's training
  (evaluator/training.py): on such a CPU bf16 is not always faster (it helps the large convolutions of
  a real-size UNet, slows tiny models down, and does nothing for ResNet18 on a Xeon with AMX), so a few
  forward+backward passes of the network itself are timed in both (`time_passes`) and the faster one
  is used (`measured_bf16`). On CUDA bf16 where supported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively (avx512_bf16 or AMX); elsewhere bf16 is emulated and slow.
    Asking oneDNN rather than /proc/cpuinfo also honours ONEDNN_MAX_CPU_ISA (e.g. AVX2: a way to make a
    CPU behave like an AVX2-only one)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast can be fast on `device` at all (see the module notes)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def sampling_autocast(device: torch.device) -> bool:
    """The sampling default: bf16 autocast on a CPU with native bf16, fp32 elsewhere."""
    return device.type == "cpu" and native_bf16(device)


def measured_bf16(
    device: torch.device, measure: Callable[[], T], faster: Callable[[T], bool]
) -> tuple[bool, T | None]:
    """(use bf16 autocast, the measurement that decided it or None) for training on `device`: on CUDA
    bf16 where supported; on a CPU with native bf16 whatever `faster(measure())` says; fp32 elsewhere."""
    if device.type != "cpu" or not native_bf16(device):
        return native_bf16(device), None
    timing = measure()
    return faster(timing), timing


def time_passes(
    one_pass: Callable[[], torch.Tensor], model: torch.nn.Module, device_type: str = "cpu", rounds: int = 2
) -> tuple[float, float]:
    """Seconds of the fastest fp32 and the fastest bf16-autocast training pass: `one_pass()` computes a
    scalar loss (under autocast), then its backward runs. Timed alternately, so other jobs' load hits
    both alike, after one untimed pass of each (lazy kernel set-up); gradients are cleared after each."""
    best = {False: math.inf, True: math.inf}
    try:
        for i in range(rounds + 1):
            for bf16 in (False, True):
                start = time.perf_counter()
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                    loss = one_pass()
                loss.float().backward()
                model.zero_grad(set_to_none=True)
                if i > 0:
                    best[bf16] = min(best[bf16], time.perf_counter() - start)
    finally:
        model.zero_grad(set_to_none=True)
    return best[False], best[True]
