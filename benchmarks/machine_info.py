"""The machine a benchmark ran on, written into every results JSON so a figure always says where it came from."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from iclevr_diffusion.devices import cpu_model


def cpu_flags() -> list[str]:
    """The CPU features that decide our speed: AVX-512 and native bf16 (see FIELD-NOTES: a 4x difference)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]
    except OSError:
        pass
    return []


def git_commit() -> str | None:
    """The checkout's commit (+changes when tracked files differ); in a copy without .git (a GPU
    machine's working tree, whose .git may be stale), the commit it was made from: $BENCH_COMMIT."""
    import subprocess

    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        if out.returncode == 0:
            return out.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def machine(device: str = "cpu") -> dict:
    import sys

    import torch

    return {
        "command": " ".join(["python", *sys.argv]),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
