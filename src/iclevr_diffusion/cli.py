"""The `iclevr-diff` command: parses options and hands them to a workflow.

Nothing heavy is imported at module level, so `iclevr-diff --help` answers at once; each command
imports its workflow (and with it torch) only when it runs.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from iclevr_diffusion import __version__
from iclevr_diffusion.config import CHOICES, PRESETS, SAMPLERS_BY_FORMULATION, SPLITS
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.evaluator.archs import ARCHS

app = typer.Typer(
    name="iclevr-diff",
    help="Label-conditional diffusion for i-CLEVR scenes: train, sample, evaluate.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _debug_on() -> bool:
    """ICLEVR_DEBUG set to anything but empty, 0, false, no or off."""
    return os.environ.get("ICLEVR_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def friendly_errors(command):
    """Turn IclevrError into `error: ...` + exit 1 and Ctrl-C into exit 130 (ICLEVR_DEBUG=1: traceback too)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        warnings.formatwarning = _format_warning
        try:
            return command(*args, **kwargs)
        except IclevrError as e:
            if _debug_on():
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if _debug_on():
                # Not re-raised: click would turn it into "Aborted!" and exit 1, hiding both.
                traceback.print_exc()
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as e:
            # Disk full, read-only or permission problems met where no IclevrError explains them yet
            # (e.g. a run folder whose parent is a file): still one line, not a traceback.
            if _debug_on():
                raise
            what = f" {e.filename}" if e.filename else ""
            reason = " ".join(str(e.strerror or e).split())
            typer.echo(f"error: Cannot write or read{what}: {reason}. Check free space and permissions, "
                       "or choose another folder.", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"iclevr-diffusion {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Label-conditional diffusion for i-CLEVR scenes: train, sample, evaluate."""


# Fixed choices are click choices: listed in --help, completed by the shell, a bad one is a usage error (exit 2).
# The names live in config.py (one home); an Enum is how typer spells a choice.
SamplerName = Enum("SamplerName", {n: n for n in CHOICES["sample.sampler"]}, type=str)
SplitName = Enum("SplitName", {n: n for n in SPLITS}, type=str)
ArchName = Enum("ArchName", {n: n for n in ARCHS}, type=str)


def _config_choice(value: str | None) -> str | None:
    """--config: a preset name or a YAML file; anything else is a usage error naming the presets."""
    if value is None or value in PRESETS or Path(value).is_file():
        return value
    what = "is a folder, not a YAML file" if Path(value).is_dir() else "is neither a preset nor an existing YAML file"
    raise typer.BadParameter(f"'{value}' {what}; choose a preset ({', '.join(PRESETS)}) or give a YAML path.")


def _complete_preset(incomplete: str) -> list[str]:
    return [p for p in PRESETS if p.startswith(incomplete)]


def _value(choice: Enum | None) -> str | None:
    return None if choice is None else choice.value


# Options shared by several commands.
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", metavar="PRESET|FILE", callback=_config_choice, autocompletion=_complete_preset,
                 help=f"YAML config file or preset name ({', '.join(PRESETS)})."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one config key, e.g. --set train.lr=1e-4 (repeatable)."),
]
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", help="i-CLEVR folder with train.json and the images (default: built-in synthetic set)."),
]
ImagesDirOpt = Annotated[
    Path | None, typer.Option("--images", help="Folder of the PNGs, if not ROOT/iclevr.")
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: auto).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (same seed, same result).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print results as JSON on stdout.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")]
ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Run folder or exported model folder (default: the newest run)."),
]
SplitOpt = Annotated[
    list[SplitName] | None,
    typer.Option(
        "--split",
        help="Packaged condition file: test or new_test (the course's), or val (ours, for choosing recipes); "
        "repeatable.",
    ),
]
ConditionsOpt = Annotated[
    Path | None, typer.Option("--conditions", help="Your own condition file (JSON list of label lists).")
]
SamplerOpt = Annotated[
    SamplerName | None,
    typer.Option(
        "--sampler",
        help="; ".join(f"{f.upper()} models: {', '.join(names)}" for f, names in SAMPLERS_BY_FORMULATION.items())
        + " (default: the model's own).",
    ),
]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Sampling steps.")]
GuidanceOpt = Annotated[
    float | None, typer.Option("--guidance-scale", "-g", help="Classifier-free guidance scale (1 = off).")
]
ChurnOpt = Annotated[
    float | None,
    typer.Option("--churn", help="EDM's S_churn for the heun and euler samplers of EDM and flow models: fresh "
                 "noise at each step (0 = deterministic; default: the model's own)."),
]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Images per forward pass.")]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Folder that holds the run folders.")]


@app.command()
@friendly_errors
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: DataOpt = None,
    images: ImagesDirOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Run name: the run folder is RUNS_DIR/NAME.")] = None,
    runs_dir: RunsDirOpt = Path("runs"),
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Resume from this checkpoint or run folder.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after N optimizer steps.")] = None,
    max_minutes: Annotated[
        float | None, typer.Option("--max-minutes", help="Stop after this much wall-clock time.")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Stop after N passes over the data.")] = None,
    batch_size: BatchOpt = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    dry_run: DryRunOpt = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a label-conditional DDPM (default: the CPU preset on the built-in synthetic data)."""
    from iclevr_diffusion.config import load_config, require_stop
    from iclevr_diffusion.workflows import train as workflow

    flags = {
        "name": name,
        "data.root": str(data) if data else None,
        "data.images": str(images) if images else None,
        "train.max_steps": max_steps,
        "train.max_minutes": max_minutes,
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "device": device,
        "seed": seed,
    }
    cfg = require_stop(load_config(config or "default", set_ or [], flags))
    if dry_run:
        typer.echo(cfg.to_yaml())
        return
    workflow.run(cfg, runs_dir=runs_dir, resume=resume, quiet=quiet, as_json=json_)


@app.command()
@friendly_errors
def sample(
    labels: Annotated[
        list[str] | None,
        typer.Option("--labels", "-l", help='Objects to draw, e.g. "red sphere,cyan cube" (repeatable).'),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Images per --labels entry.")] = 1,
    split: SplitOpt = None,
    conditions: ConditionsOpt = None,
    model: ModelOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: inside the run).")] = None,
    sampler: SamplerOpt = None,
    steps: StepsOpt = None,
    guidance_scale: GuidanceOpt = None,
    churn: ChurnOpt = None,
    seed: SeedOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    process: Annotated[
        str | None,
        typer.Option("--process", help='Also save the denoising-process strip for these labels, e.g. "red sphere".'),
    ] = None,
    frames: Annotated[int, typer.Option("--frames", help="Frames in the denoising-process strip.")] = 10,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output folder.")] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Draw images for label lists, a split, or a condition file."""
    from iclevr_diffusion.workflows import sample as workflow

    workflow.run(
        labels=labels or [], n=n, splits=[s.value for s in split or []], conditions=conditions, model=model,
        runs_dir=runs_dir, out=out, sampler=_value(sampler), steps=steps, guidance_scale=guidance_scale, seed=seed,
        batch_size=batch_size, device=device, process=process, frames=frames, force=force,
        as_json=json_, quiet=quiet, churn=churn,
    )


@app.command()
@friendly_errors
def evaluate(
    split: SplitOpt = None,
    conditions: ConditionsOpt = None,
    model: ModelOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    images: Annotated[
        Path | None, typer.Option("--images", help="Score a folder of existing images 0.png, 1.png, ...")
    ] = None,
    evaluator: Annotated[
        Path | None, typer.Option("--evaluator", help="Official-format evaluator checkpoint.pth.")
    ] = None,
    data: DataOpt = None,
    sampler: SamplerOpt = None,
    steps: StepsOpt = None,
    guidance_scale: GuidanceOpt = None,
    churn: ChurnOpt = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Repeat with this many seeds: mean and spread.")] = None,
    seed: SeedOpt = None,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the scored grids.")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Accuracy of a model (or of a folder of images) with a multi-label evaluator."""
    from iclevr_diffusion.workflows import evaluate as workflow

    workflow.run(
        splits=[s.value for s in split or []], conditions=conditions, model=model, runs_dir=runs_dir, images=images,
        evaluator=evaluator, data=data, sampler=_value(sampler), steps=steps, guidance_scale=guidance_scale,
        seeds=seeds, seed=seed, batch_size=batch_size, device=device, out=out, as_json=json_, quiet=quiet,
        churn=churn,
    )


@app.command("compare-timesteps")
@friendly_errors
def compare_timesteps(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    timesteps: Annotated[str, typer.Option("--timesteps", help="Comma-separated T values.")] = "300,1000",
    schedules: Annotated[
        str, typer.Option("--schedules", help="Comma-separated beta schedules: linear, scaled_linear, cosine.")
    ] = "linear",
    max_minutes: Annotated[
        float | None, typer.Option("--max-minutes", help="Wall-clock training budget of each run.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps of each run.")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the accuracy columns (no evaluator).")] = False,
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Experiment folder.")] = Path("runs/compare-timesteps"),
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the same model with several total timesteps T and compare loss, accuracy and speed."""
    from iclevr_diffusion.config import load_config, require_stop
    from iclevr_diffusion.workflows import compare as workflow

    flags = {"data.root": str(data) if data else None, "device": device, "seed": seed,
             "train.max_minutes": max_minutes, "train.max_steps": max_steps}
    cfg = require_stop(load_config(config or "compare-timesteps", set_ or [], flags))
    if dry_run:
        typer.echo(cfg.to_yaml())
        return
    workflow.run(cfg, timesteps=timesteps, schedules=schedules, out=out, evaluate=not no_eval, as_json=json_,
                 quiet=quiet)


@app.command("make-data")
@friendly_errors
def make_data(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the dataset into.")],
    scenes: Annotated[int, typer.Option("--scenes", help="Scenes (3 images each: 1, 2, 3 objects).")] = 6003,
    size: Annotated[str, typer.Option("--size", help="64 (square) or WxH such as 320x240.")] = "64",
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes).")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="Rendering processes.")] = max(1, os.cpu_count() or 1),
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty folder.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Render a synthetic i-CLEVR dataset in the real on-disk format."""
    from iclevr_diffusion.workflows import make_data as workflow

    workflow.run(out=out, scenes=scenes, size=size, seed=seed, workers=workers, force=force, quiet=quiet,
                 as_json=json_)


@app.command("train-evaluator")
@friendly_errors
def train_evaluator(
    data: DataOpt = None,
    images: ImagesDirOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where to save checkpoint.pth (default: next to the data).")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Training epochs.")] = None,
    batch_size: BatchOpt = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default: the architecture's).")] = None,
    arch: Annotated[
        ArchName | None,
        typer.Option("--arch", help="small-cnn (default for the built-in synthetic data: minutes on a CPU) or "
                     "resnet18 (the course's architecture; default for --data)."),
    ] = None,
    device: DeviceOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if a checkpoint exists.")] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the multi-label evaluator where the official checkpoint is absent."""
    from iclevr_diffusion.workflows import train_evaluator as workflow

    workflow.run(
        data=data, images=images, out=out, epochs=epochs, batch_size=batch_size, device=device, seed=seed,
        force=force, as_json=json_, quiet=quiet, arch=_value(arch), lr=lr,
    )


@app.command("export-unet")
@friendly_errors
def export_unet(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write unet/ and label_projection.* into.")],
    model: ModelOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUT/unet.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Write a model (e.g. the seed preset's) as a plain diffusers UNet2DModel folder + the label projection."""
    from iclevr_diffusion.workflows import export_unet as workflow

    workflow.run(model=model, runs_dir=runs_dir, out=out, force=force, as_json=json_)


@app.command()
@friendly_errors
def labels(json_: JsonOpt = False) -> None:
    """List the 24 label names with their indices."""
    from iclevr_diffusion.workflows.labels import run

    run(as_json=json_)


def main() -> None:
    app(prog_name="iclevr-diff")


if __name__ == "__main__":
    sys.exit(main())
