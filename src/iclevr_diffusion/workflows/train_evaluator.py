"""Workflow for `iclevr-diff train-evaluator` (not built yet)."""

from iclevr_diffusion.errors import NotImplementedYet


def run(*args, **kwargs) -> None:
    raise NotImplementedYet("iclevr-diff train-evaluator")
