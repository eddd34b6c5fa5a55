"""Workflow for `iclevr-diff train`: a progress bar on stderr around `training.train`, a summary table at the end.

`train_progress` is shared with compare-timesteps, which trains several runs in a row.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from iclevr_diffusion.config import Config
from iclevr_diffusion.run_folder import RunFolder
from iclevr_diffusion.workflows import console


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


@contextmanager
def train_progress(name: str, quiet: bool = False) -> Iterator:
    """A progress(event, **info) callback for `training.train` that drives one bar on stderr:
    data rendering on first use, then steps with loss, images/s and time left; notes are printed.
    Where stderr is no terminal the bar is a plain line "train: STEP/TOTAL, RATE/s, loss L  I img/s  T left"
    every console.LOG_EVERY seconds and at the end."""
    extra = "loss {task.fields[loss]}  {task.fields[ips]} img/s  {task.fields[left]} left"
    # No terminal (nohup, a batch scheduler, CI): a plain line every console.LOG_EVERY seconds instead of the bar.
    with console.progress_bar(name, None, quiet=quiet, extra=extra, log_every=console.LOG_EVERY) as advance:
        done = {"step": 0}

        def progress(event: str, **info) -> None:
            if event == "render":  # first use of the built-in dataset: the same bar shows the rendering
                advance(0, completed=info["done"], total=info["total"], description="render data")
            elif event == "start":
                done["step"] = info["step"]
                advance(0, completed=info["step"], total=info["total"], description=name)
                if not quiet:
                    where = f", resumed from {info['resumed_from']}" if info.get("resumed_from") else ""
                    precision = "fp32" if info["mixed_precision"] == "no" else info["mixed_precision"]
                    console.err.print(f"mixed precision: {precision}, {info['world']} process(es){where}")
            elif event == "horizon":
                advance(0, total=info["total"])
            elif event == "step":
                ips = info["images_per_s"]
                advance(info["step"] - done["step"], loss=f"{info['loss']:.4f}",
                        ips=f"{ips:.1f}" if ips else "?", left=_duration(info["eta_s"]))
                done["step"] = info["step"]
            elif event == "note" and not quiet:
                console.err.print(info["message"])

        yield progress


def run(cfg: Config, runs_dir: Path = Path("runs"), resume: Path | None = None, quiet: bool = False,
        as_json: bool = False) -> None:
    from iclevr_diffusion.diffusion.model import ConditionalUNet, count_parameters
    from iclevr_diffusion.training.loop import train

    run_dir = Path(runs_dir) / cfg.name
    # Under torchrun / accelerate launch every process runs this; only rank 0 talks to the user, or
    # each line and the summary table (with that rank's own loss) would appear once per process.
    main = int(os.environ.get("RANK", "0")) == 0
    quiet = quiet or not main
    params = count_parameters(ConditionalUNet.from_run_config(cfg))
    if not quiet:
        console.err.print(
            f"training [bold]{cfg.name}[/]: {params / 1e6:.2f}M parameters, "
            f"{cfg.data.root or 'built-in synthetic data'}, run folder {run_dir}"
        )
    with warnings.catch_warnings(), train_progress("train", quiet) as progress:
        warnings.filterwarnings("ignore", category=FutureWarning)
        result = train(cfg, run_dir, resume=resume, progress=progress)
    if not main:
        return
    samples = RunFolder(run_dir).sample_grids()
    if as_json:
        console.print_json({
            "run_dir": str(run_dir), "step": result.step, "epoch": result.epoch, "stopped_by": result.stopped_by,
            "loss": result.loss, "images_per_s": result.images_per_s, "elapsed_s": round(result.elapsed_s, 3),
            "mixed_precision": result.mixed_precision, "parameters": params,
            "resumed_from": str(result.resumed_from) if result.resumed_from else None,
            "model_dir": str(result.model_dir), "latest_samples": str(samples[-1]) if samples else None,
        })
        return
    rows = [
        ("run folder", str(run_dir)),
        ("steps", result.step),
        ("epochs completed", result.epoch),
        ("stopped by", result.stopped_by),
        ("last logged loss", result.loss if result.loss is not None else "-"),
        ("images/s", result.images_per_s if result.images_per_s is not None else "-"),
        ("training time", _duration(result.elapsed_s)),
        ("mixed precision", "fp32" if result.mixed_precision == "no" else result.mixed_precision),
        ("exported model", str(result.model_dir)),
        ("latest samples", str(samples[-1]) if samples else "-"),
    ]
    console.out.print(console.table(f"train: {cfg.name}", ["", "value"], rows))
