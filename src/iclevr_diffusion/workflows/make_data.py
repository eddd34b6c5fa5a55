"""Workflow for `iclevr-diff make-data` (not built yet)."""

from iclevr_diffusion.errors import NotImplementedYet


def run(*args, **kwargs) -> None:
    raise NotImplementedYet("iclevr-diff make-data")
