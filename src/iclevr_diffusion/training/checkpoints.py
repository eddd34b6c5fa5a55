"""Training-state checkpoints: everything needed to continue a run exactly where it stopped.

    checkpoints/step_000500/
        model.safetensors   raw (non-EMA) weights
        ema.safetensors     EMA shadow weights, in parameter order
        ema-<share>.safetensors   the same for each of train.extra_ema_lengths
        optimizer.pt        AdamW state            (tensors and numbers only)
        state.pt            step, epoch, data position, lr schedule, EMA counters, elapsed time
        rng_0.pt ...        each process's random states
        config.yaml         the resolved config of the run

A checkpoint is written into a hidden temp folder and renamed into place, so a crash leaves either a
complete checkpoint or none. Loading never unpickles code: safetensors for weights and
`torch.load(weights_only=True)` for the rest. If the newest checkpoint is unreadable, the previous one
is used, with a warning.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.io import usual_permissions
from iclevr_diffusion.run_folder import CHECKPOINTS as CHECKPOINTS  # the run folder names them
from iclevr_diffusion.run_folder import CONFIG, step_name

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
REQUIRED = ("model.safetensors", "ema.safetensors", "optimizer.pt", "state.pt")


def step_dir_name(step: int) -> str:
    return step_name(step)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root` (a checkpoints/ folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _save_in_order(params: list[torch.Tensor], path: Path) -> None:
    """EMA shadow weights, keyed by their position in the parameter order."""
    _save_tensors({str(i): p for i, p in enumerate(params)}, path)


def _load_in_order(path: Path) -> list[torch.Tensor]:
    tensors = load_file(str(path))
    return [tensors[str(i)] for i in range(len(tensors))]


def begin(root: Path, step: int) -> Path:
    """Create (empty) the temp folder a checkpoint is assembled in; every process then writes into it."""
    tmp = Path(root) / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int, rng: dict[str, Any]) -> None:
    torch.save(rng, tmp / f"rng_{rank}.pt")


def finish(
    tmp: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_params: list[torch.Tensor],
    optimizer_state: dict,
    state: dict[str, Any],
    config_yaml: str,
    keep: int,
    extra_emas: dict[str, list[torch.Tensor]] | None = None,  # share ("0.25") -> shadow weights
) -> Path:
    """Write the main process's files into `tmp`, rename it to step_XXXXXX and prune to the last `keep`."""
    final = tmp.parent / step_dir_name(step)
    try:
        _save_tensors(model_state, tmp / "model.safetensors")
        _save_in_order(ema_params, tmp / "ema.safetensors")
        for share, params in (extra_emas or {}).items():
            _save_in_order(params, tmp / f"ema-{share}.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(state, tmp / "state.pt")
        (tmp / CONFIG).write_text(config_yaml)
        usual_permissions(tmp)  # safetensors writes 0600
        for f in tmp.iterdir():  # flush file contents before the rename makes the folder visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except Exception as e:  # a full disk is an OSError here, a RuntimeError from torch.save, a SafetensorError
        raise write_failed(tmp, final, e) from None
    if final.exists():  # the same step written again (e.g. interrupt right after a scheduled save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(tmp.parent, keep)
    return final


def write_failed(tmp: Path, final: Path, e: Exception, what: str = "checkpoint",
                 kept: str = "The older checkpoints are kept") -> IclevrError:
    """Drop the half-written temp folder (what was there before stays) and say why in one line."""
    try:
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or shutil.disk_usage(tmp.parent).free < 2**20
    except OSError:
        full = False
    shutil.rmtree(tmp, ignore_errors=True)
    reason = "No space left on device" if full else (getattr(e, "strerror", None) or str(e).strip().splitlines()[0])
    return IclevrError(
        f"Cannot write {what} {final}: {reason}. {kept}; free some space "
        "and run the same command again to resume."
    )


def remove_stale_temps(root: Path) -> None:
    """Temp folders of checkpoints a killed run never finished: never loaded, only taking space."""
    for tmp in Path(root).glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)


def load(path: Path, rank: int = 0) -> dict[str, Any]:
    """Read one checkpoint folder; raises on any missing or corrupt file."""
    path = Path(path)
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise IclevrError(f"Checkpoint {path} is incomplete: {', '.join(missing)} missing.")
    extra = {f.stem[len("ema-"):]: _load_in_order(f) for f in sorted(path.glob("ema-*.safetensors"))}  # by share
    rng_file = path / f"rng_{rank}.pt"
    return {
        "path": path,
        "model": load_file(str(path / "model.safetensors")),
        "ema": _load_in_order(path / "ema.safetensors"),
        "extra_ema": extra,
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "state": torch.load(path / "state.pt", weights_only=True, map_location="cpu"),
        # A run resumed with more processes than it was saved with gets fresh RNG on the new ranks.
        "rng": torch.load(rng_file, weights_only=True) if rng_file.is_file() else None,
        "config": (path / CONFIG).read_text() if (path / CONFIG).is_file() else None,
    }


def find_resume_source(path: Path) -> tuple[list[Path], bool]:
    """Checkpoint folders to try for `--resume PATH` (newest first) and whether PATH named one exactly."""
    path = Path(path)
    if (path / "state.pt").is_file() or _STEP_DIR.match(path.name):
        if not path.is_dir():
            raise IclevrError(f"--resume {path} does not exist.")
        return [path], True
    for root in (path / CHECKPOINTS, path):
        found = list_checkpoints(root)
        if found:
            return list(reversed(found)), False
    if not path.exists():
        raise IclevrError(f"--resume {path} does not exist; give a run folder or a checkpoints/step_XXXXXX folder.")
    raise IclevrError(
        f"--resume {path} holds no checkpoints (checkpoints/step_XXXXXX); give a run folder or a checkpoint."
    )


def load_newest(
    candidates: list[Path], rank: int = 0, warn: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Load the first readable checkpoint of `candidates` (newest first), warning about each bad one."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    errors = []
    for path in candidates:
        try:
            return load(path, rank)
        except Exception as e:  # safetensors / torch raise many types for a truncated or garbled file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            errors.append(f"{path.name}: {reason}")
            if len(candidates) > 1 and path != candidates[-1]:
                warn(f"checkpoint {path} is unreadable ({reason}); falling back to the previous one.")
    raise IclevrError(f"No readable checkpoint: {'; '.join(errors)}. Delete the folder to start over.")


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """This process's random states: the loss/data generator and torch's global (dropout) streams."""
    rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any] | None, generator: torch.Generator) -> None:
    if not rng:
        return
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
