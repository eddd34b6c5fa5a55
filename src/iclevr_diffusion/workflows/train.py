"""Workflow for `iclevr-diff train` (not built yet)."""

from iclevr_diffusion.errors import NotImplementedYet


def run(*args, **kwargs) -> None:
    raise NotImplementedYet("iclevr-diff train")
