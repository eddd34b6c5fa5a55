"""Atomic file writes: a temp file in the same folder, fsync, then rename.

A crash or Ctrl-C in the middle of a write leaves the old file (or no file), never half of one.
The file gets the permissions an ordinary `open(path, "w")` would give (0666 less the umask, so
usually 0644), not mkstemp's private 0600.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from iclevr_diffusion.errors import IclevrError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
    except OSError as e:
        raise IclevrError(f"Cannot write to {path.parent}: {e.strerror}. Choose another output folder.") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise IclevrError(f"Cannot write {path}: {e.strerror}. Free some space or choose another folder.") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_permissions(folder: str | Path) -> None:
    """Give every file under `folder` the mode open(path, "w") would (0666 less the umask): some writers
    (safetensors) create their files 0600, which other users of a shared model folder cannot read."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def save_image(image, path: str | Path, **kwargs) -> None:
    """Save a PIL image atomically (format from the suffix)."""
    path = Path(path)
    fmt = kwargs.pop("format", None) or path.suffix.lstrip(".").upper().replace("JPG", "JPEG")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **kwargs)
