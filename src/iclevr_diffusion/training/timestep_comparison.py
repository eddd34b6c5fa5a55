"""compare-timesteps: the same model trained with several total timesteps T, compared fairly.

Every run shares the base config (seed, data order, model init, step or wall-clock budget); only the
schedule differs. Two things make the comparison mean something:

- Raw training losses of different T are averages over different sets of noise levels, so each run
  also measures its loss on one fixed held-out batch at a fixed set of noise levels (alpha_bar
  values that every compared schedule reaches), mapped to each run's nearest timestep.
- With fixed linear betas a short schedule never reaches pure noise (alpha_bar_T ~ 0.05 at T = 300),
  yet sampling starts from pure noise; the table reports alpha_bar_T and the SNR there, and the
  `scaled_linear` / `cosine` schedules are offered as the fair variant.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from iclevr_diffusion.config import Config, validate
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.io import atomic_path, write_json, write_text
from iclevr_diffusion.report import read_metrics
from iclevr_diffusion.run_folder import DONE as DONE  # re-exported: workflows/compare.py writes it
from iclevr_diffusion.run_folder import RunFolder

# alpha_bar values every compared schedule reaches (linear 1e-4..0.02 at T = 300 ends at ~0.05).
FIXED_LEVELS = (0.95, 0.8, 0.6, 0.4, 0.2, 0.08)
PROBE_IMAGES = 32


def parse_timesteps(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise IclevrError(f"--timesteps '{text}' must be comma-separated integers, e.g. 300,1000.") from None
    if len(values) < 1 or any(v < 2 for v in values) or len(set(values)) != len(values):
        raise IclevrError(f"--timesteps '{text}' needs distinct integers >= 2, e.g. 300,1000.")
    return values


def parse_schedules(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    valid = ("linear", "scaled_linear", "cosine")
    bad = [s for s in names if s not in valid]
    if not names or bad:
        raise IclevrError(f"--schedules '{text}': choose from {', '.join(valid)} (comma-separated).")
    return names


class FixedLevelProbe:
    """Loss on a fixed batch at fixed noise levels: the same quantity for every T, so curves compare."""

    def __init__(self, dataset, scheduler, every: int, images: int = PROBE_IMAGES, seed: int = 1234):
        gen = torch.Generator().manual_seed(seed)
        # The last images of the set: the same ones for every run (the data order never matters here).
        idx = range(max(0, len(dataset) - images), len(dataset))
        pairs = [dataset[i] for i in idx]
        self.x0 = torch.stack([p[0] for p in pairs])
        self.labels = torch.stack([p[1] for p in pairs])
        self.noise = torch.randn(self.x0.shape, generator=gen)
        bars = scheduler.alphas_cumprod
        self.timesteps = [int((bars - level).abs().argmin()) for level in FIXED_LEVELS]
        self.scheduler = scheduler
        self.every = every

    @torch.no_grad()
    def __call__(self, step: int, model: torch.nn.Module) -> dict[str, float]:
        if self.every <= 0 or (step % self.every and step != 1):  # step 1: where every curve starts
            return {}
        from iclevr_diffusion.diffusion.losses import target_for

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        losses = []
        for t in self.timesteps:
            tt = torch.full((len(self.x0),), t, dtype=torch.long)
            noisy = self.scheduler.add_noise(self.x0, self.noise, tt)
            pred = model(noisy.to(device), tt.to(device), self.labels.to(device)).float().cpu()
            target = target_for(self.scheduler, self.x0, self.noise, tt)
            losses.append(float(torch.nn.functional.mse_loss(pred, target)))
        model.train(was_training)
        return {"fixed_level_loss": sum(losses) / len(losses)}


@dataclass
class RunResult:
    T: int
    schedule: str
    run: str
    steps: int
    train_minutes: float
    final_loss: float | None
    fixed_level_loss: float | None
    alpha_bar_T: float
    snr_T: float
    accuracy_test: float | None
    accuracy_new_test: float | None
    evaluator: str | None
    fast_sampler: str
    fast_s_per_image: float | None
    ddpm_s_per_image: float | None


def run_configs(base: Config, timesteps: list[int], schedules: list[str]) -> list[tuple[str, Config]]:
    runs = []
    for schedule in schedules:
        for T in timesteps:
            cfg = copy.deepcopy(base)
            cfg.schedule.num_train_timesteps = T
            cfg.schedule.beta_schedule = schedule
            cfg.name = f"T{T}-{schedule}"
            runs.append((cfg.name, validate(cfg)))  # e.g. sample.steps above a small T: refused before training
    return runs


def _tail_mean(values: list[float], share: float = 0.1) -> float | None:
    if not values:
        return None
    n = max(1, int(len(values) * share))
    return sum(values[-n:]) / n


def _sampling_seconds(pipe, sampler: str, steps: int, images: int, seed: int) -> float:
    from iclevr_diffusion.diffusion.sampling import generate

    conditions = [["red sphere", "cyan cylinder", "cyan cube"]] * images
    start = time.perf_counter()
    generate(pipe, conditions, sampler=sampler, steps=steps, guidance_scale=1.0, seed=seed, batch_size=images)
    return (time.perf_counter() - start) / images


def accuracy_on_splits(
    pipe, cfg: Config, data_root: str | None, note: Callable[[str], None]
) -> tuple[dict[str, float | None], str]:
    """Accuracy on test and new_test with the run's fast sampler, and the evaluator's name."""
    from iclevr_diffusion.data.iclevr import SPLITS, load_conditions
    from iclevr_diffusion.evaluator.choice import resolve_evaluator
    from iclevr_diffusion.evaluator.scoring import sample_and_score

    net, choice = resolve_evaluator(
        cfg.eval.evaluator, data_root, pipe.device, note=note, synthetic_scenes=cfg.data.synthetic_scenes
    )
    s = cfg.sample
    acc: dict[str, float | None] = {}
    for split in SPLITS:
        acc[split] = sample_and_score(pipe, net, load_conditions(split), s.sampler, s.steps, s.guidance_scale,
                                      cfg.seed, s.batch_size).accuracy
    return acc, choice.name


def summarize_run(
    run_dir: Path,
    cfg: Config,
    data_root: str | None,
    timing_images: int,
    evaluate: bool,
    note: Callable[[str], None],
) -> RunResult:
    """Loss, accuracy and sampling time of one finished run."""
    from iclevr_diffusion.diffusion.sampling import load_pipeline

    rows = read_metrics(RunFolder(run_dir).metrics)
    losses = [r["loss"] for r in rows if "loss" in r]
    fixed = [r["fixed_level_loss"] for r in rows if "fixed_level_loss" in r]
    bar = final_alpha_bar_of(cfg)
    pipe, run_cfg, _ = load_pipeline(run_dir, device=cfg.device)
    s = run_cfg.sample
    acc: dict[str, float | None] = {"test": None, "new_test": None}
    evaluator_name = None
    if evaluate:
        acc, evaluator_name = accuracy_on_splits(pipe, run_cfg, data_root, note)
    fast = _sampling_seconds(pipe, s.sampler, s.steps, timing_images, cfg.seed) if timing_images else None
    T = cfg.schedule.num_train_timesteps
    ddpm = _sampling_seconds(pipe, "ddpm", T, timing_images, cfg.seed) if timing_images else None
    return RunResult(
        T=T, schedule=cfg.schedule.beta_schedule, run=run_dir.name,
        steps=_steps_done(run_dir, rows),
        train_minutes=round(rows[-1].get("elapsed_s", 0.0) / 60, 2) if rows else 0.0,
        final_loss=_tail_mean(losses), fixed_level_loss=fixed[-1] if fixed else None,
        alpha_bar_T=bar, snr_T=bar / (1 - bar),
        accuracy_test=acc["test"], accuracy_new_test=acc["new_test"], evaluator=evaluator_name,
        fast_sampler=f"{s.sampler}-{s.steps}", fast_s_per_image=fast, ddpm_s_per_image=ddpm,
    )


def _steps_done(run_dir: Path, rows: list[dict]) -> int:
    """Optimizer steps of a finished run (DONE.json), else the last logged one."""
    import json

    try:
        return int(json.loads(RunFolder(run_dir).done.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return rows[-1]["step"] if rows else 0


def plot_learning_curves(runs: list[tuple[str, Path]], out: Path) -> None:
    """Loss against step and wall-clock (raw, faint, with a smoothed line), and the fixed-level loss."""
    from matplotlib.figure import Figure  # not pyplot: the caller's matplotlib backend stays as it is

    fig = Figure(figsize=(15, 4.2), dpi=110)
    axes = fig.subplots(1, 3)
    for i, (name, run_dir) in enumerate(runs):
        metrics = read_metrics(RunFolder(run_dir).metrics)
        rows = [r for r in metrics if "loss" in r]
        if not rows:
            continue
        color = f"C{i}"
        steps = [r["step"] for r in rows]
        minutes = [r.get("elapsed_s", 0) / 60 for r in rows]
        loss = [r["loss"] for r in rows]
        smooth = _rolling_mean(loss)
        for ax, x in ((axes[0], steps), (axes[1], minutes)):
            ax.plot(x, loss, color=color, alpha=0.25, lw=0.8)
            ax.plot(x, smooth, color=color, lw=1.8, label=name)
        fixed = [(r["step"], r["fixed_level_loss"]) for r in metrics if "fixed_level_loss" in r]
        if fixed:
            axes[2].plot(*zip(*fixed), color=color, lw=1.8, marker="o", ms=3, label=name)
    titles = ("training loss vs step", "training loss vs wall-clock", "loss at fixed noise levels (comparable)")
    xlabels = ("optimizer step", "minutes", "optimizer step")
    for ax, title, xlabel in zip(axes, titles, xlabels):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("MSE")
    fig.suptitle("compare-timesteps: alpha_bar levels " + ", ".join(str(v) for v in FIXED_LEVELS), fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")


def _rolling_mean(values: list[float]) -> list[float]:
    """Centred moving average over ~1/10 of the points: smooths without the lag of an EMA."""
    half = len(values) // 20
    return [sum(values[max(0, i - half) : i + half + 1]) / len(values[max(0, i - half) : i + half + 1])
            for i in range(len(values))]


def write_results(results: list[RunResult], out: Path) -> list[dict[str, Any]]:
    rows = [to_row(r) for r in results]
    write_json(out / "results.json", rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "results.csv", buf.getvalue())
    return rows


def is_done(run_dir: Path) -> bool:
    folder = RunFolder(run_dir)
    return folder.done.is_file() and folder.has_model()


def to_row(r: RunResult) -> dict[str, Any]:
    """A result as a flat dict, with the SNR at T in decibels (easier to read than 0.05 vs 4e-5)."""
    return {**asdict(r), "snr_db": round(10 * math.log10(r.snr_T), 2) if r.snr_T > 0 else None}


def probe_every(cfg: Config) -> int:
    """Fixed-level loss every 4th metrics line: often enough for a curve, cheap enough to ignore."""
    return max(1, cfg.train.log_every) * 4


def final_alpha_bar_of(cfg: Config) -> float:
    from iclevr_diffusion.diffusion.schedule import final_alpha_bar, make_train_scheduler

    return final_alpha_bar(make_train_scheduler(cfg.schedule))
