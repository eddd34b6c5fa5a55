"""Workflow for `iclevr-diff compare-timesteps` (not built yet)."""

from iclevr_diffusion.errors import NotImplementedYet


def run(*args, **kwargs) -> None:
    raise NotImplementedYet("iclevr-diff compare-timesteps")
