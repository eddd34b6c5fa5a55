"""The learning-rate horizon of a training run, and when a run stops.

AdamW with diffusers' cosine schedule with warm-up. With max_steps or epochs the horizon is known. With
only a wall-clock budget (train.max_minutes) it is planned after the first few optimizer steps
(PROBE_SKIP + PROBE_STEPS) from the measured speed: the steps that fit in the remaining budget, less a
reserve of 10% of the budget for the final sample grid and export. It is then re-planned about REPLANS
times from the speed since the last plan, so a run that started on a busy CPU (too few steps planned)
or that loses time to grids and checkpoints (too many) still ends on time with its learning rate
annealed. The run stops at the horizon or when the budget runs out, whichever comes first. The horizon
is stored in the checkpoints; a resumed run re-plans it from its own speed. With max_steps or epochs
set as well, those fix the horizon and the budget only cuts the run short.
"""

from __future__ import annotations

from collections.abc import Callable

from iclevr_diffusion.config import Config
from iclevr_diffusion.errors import IclevrError

PROBE_SKIP, PROBE_STEPS = 3, 20  # a wall-clock-only run times steps 4..23 to plan its lr horizon
REPLANS = 10  # ... and re-plans it about this often, from the speed since the last plan
BUDGET_RESERVE = 0.10  # share of the budget kept for sample grids, checkpoints and the final export


def known_horizon(cfg: Config, steps_per_epoch: int) -> int | None:
    """The horizon max_steps or epochs fix (the smaller), or None for a wall-clock-only run."""
    limits = [x for x in (cfg.train.max_steps, cfg.train.epochs and cfg.train.epochs * steps_per_epoch) if x]
    if limits:
        return min(limits)
    if not cfg.train.max_minutes:
        raise IclevrError("Set at least one of train.max_steps, train.epochs or train.max_minutes.")
    return None


def planned_horizon(step: int, steps_per_s: float, budget_s: float, elapsed_s: float) -> int:
    """The step at which a wall-clock run should end: the steps that fit in the time left at this speed,
    less the reserve kept for the final grid and export; always at least one more step."""
    left = budget_s * (1 - BUDGET_RESERVE) - elapsed_s
    return step + max(1, int(steps_per_s * left))


class HorizonPlanner:
    """Plans and re-plans the horizon of a wall-clock-only run from the speed it measures.

    The first plan comes PROBE_STEPS after the probe starts (PROBE_SKIP steps in: the first steps are
    slow, lazy init); later ones about REPLANS times per run, spaced by the first (agreed) plan, so every
    process re-plans at the same step; the speed is then measured over the last interval.
    """

    def __init__(self, active: bool, start_step: int, budget_s: float | None):
        self.active = active  # budget_s given and no horizon fixed by max_steps / epochs
        self.start_step = start_step
        self.budget_s = budget_s
        self.probe: tuple[int, float] | None = None  # (step, time) the speed is measured from
        self.replan_at = 0
        self.spacing = 0

    def watch(self, step: int, clock: Callable[[], float]) -> None:
        if step - self.start_step == PROBE_SKIP:
            self.probe = (step, clock())

    def due(self, step: int) -> bool:
        return bool(self.active and self.probe and step >= self.probe[0] + PROBE_STEPS and step >= self.replan_at)

    def plan(self, step: int, now: float, elapsed_s: float) -> int:
        return planned_horizon(step, (step - self.probe[0]) / (now - self.probe[1]), self.budget_s, elapsed_s)

    def planned(self, step: int, now: float, horizon: int) -> None:
        """Record the plan every process agreed on."""
        self.spacing = self.spacing or max(PROBE_STEPS, (horizon - step) // REPLANS)
        self.replan_at, self.probe = step + self.spacing, (step, now)


def stop_reason(
    state: dict, cfg: Config, steps_per_epoch: int, budget_s: float | None, reserve_s: float = 0.0
) -> str | None:
    """Which limit, if any, is reached; `reserve_s` of the time budget is kept for the final sample grid."""
    t = cfg.train
    if t.max_steps and state["step"] >= t.max_steps:
        return "max_steps"
    if t.epochs and state["epoch"] >= t.epochs:
        return "epochs"
    out_of_time = budget_s and state["elapsed_s"] + reserve_s >= budget_s
    # A horizon planned from the time budget; one fixed by max_steps or epochs ends the run as those.
    planned = budget_s and not (t.max_steps or t.epochs) and state["horizon"]
    if out_of_time or (planned and state["step"] >= state["horizon"]):
        return "max_minutes"
    return None


def eta(state, budget_s, steps_done, seconds) -> float | None:
    """Seconds left: from the step horizon at the current speed, capped by the wall-clock budget."""
    left = []
    if state["horizon"] and steps_done:
        left.append((state["horizon"] - state["step"]) * seconds / steps_done)
    if budget_s:
        left.append(budget_s - state["elapsed_s"])
    return max(0.0, min(left)) if left else None


def apply_lr(lr_sched, opt) -> None:
    """Set the optimizer's lr to what the schedule says for its current step (after a state load)."""
    for group, base, fn in zip(opt.param_groups, lr_sched.base_lrs, lr_sched.lr_lambdas):
        group["lr"] = base * fn(lr_sched.last_epoch)


def with_horizon(lr_sched, opt, warmup: int, horizon: int):
    """The cosine schedule re-made for a new horizon, at the step `lr_sched` had reached."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    state = lr_sched.state_dict()
    new = get_cosine_schedule_with_warmup(getattr(opt, "optimizer", opt), warmup, horizon)
    new.load_state_dict(state)
    apply_lr(new, getattr(opt, "optimizer", opt))
    return new
