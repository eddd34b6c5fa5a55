"""What a training run leaves in its folder besides checkpoints: metrics.jsonl, sample grids, the
exported model/ (EMA weights + training scheduler, diffusers format) and best/ from evaluations.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from iclevr_diffusion.config import Config
from iclevr_diffusion.run_folder import RUN_CONFIG, RunFolder
from iclevr_diffusion.training import checkpoints as ckpt

SAMPLE_CONDITIONS = 32  # the first 32 test.json conditions, 8 per row


class RunFiles(RunFolder):
    """Writing the run folder's files (main process only); the names are RunFolder's."""

    @property
    def run_dir(self) -> Path:
        return self.root

    def start(self, cfg: Config, step: int) -> None:
        from iclevr_diffusion.io import write_text

        for d in (self.root, self.checkpoints, self.samples):
            d.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temps(self.checkpoints)
        write_text(self.config, cfg.to_yaml())
        self._truncate(step)

    def _truncate(self, step: int) -> None:
        """Drop metric lines written after the step we resume from, so the curve continues seamlessly."""
        if not self.metrics.exists():
            return
        from iclevr_diffusion.io import write_text

        keep = []
        for line in self.metrics.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
        write_text(self.metrics, "".join(f"{line}\n" for line in keep))

    def log(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")


def due_snapshots(marks: list[float], elapsed_s: float, folder: RunFolder) -> list[float]:
    """train.snapshot_minutes marks passed by now and not exported yet (a resumed run does not redo them)."""
    return [m for m in marks if m * 60 <= elapsed_s and not folder.snapshot(m).is_dir()]


def ema_counters(ema) -> dict:
    """An EMAModel's state without its weights (decay, step count...): what state.pt keeps of it."""
    return {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}


def growing_ema(model, share: float):
    """An EMAModel averaging over the last `share` of the steps so far: decay 1 - 1 / (1 + share * t) at
    step t (diffusers' warm-up form 1 - (1 + t / inv_gamma)^-power with power 1, no cap), so the
    average grows with the run, as EDM2's power-function EMA, instead of stopping at a fixed window."""
    from diffusers.training_utils import EMAModel

    from iclevr_diffusion.diffusion.model import ConditionalUNet

    return EMAModel(model.parameters(), decay=1.0, min_decay=0.0, use_ema_warmup=True, inv_gamma=1 / share,
                    power=1.0, model_cls=ConditionalUNet, model_config=model.config)


class ema_weights:
    """Context: the model holds the EMA weights inside, its own weights again after."""

    def __init__(self, model, ema):
        self.model, self.ema = model, ema

    def __enter__(self):
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        return self.model

    def __exit__(self, *exc):
        self.ema.restore(self.model.parameters())
        return False


@contextmanager
def sampling_pipeline(model, noise_sched) -> Iterator:
    """The model being trained as a pipeline, in eval mode while inside (its own mode again after)."""
    from iclevr_diffusion.diffusion.pipeline import ConditionalDDPMPipeline

    pipe = ConditionalDDPMPipeline(unet=model, scheduler=noise_sched)
    pipe.set_progress_bar_config(disable=True)
    was_training = model.training
    model.eval()
    try:
        yield pipe
    finally:
        model.train(was_training)


def sampling_recipe(cfg: Config, noise_sched) -> dict:
    """The cfg.sample sampler, steps (ddpm: at most T), guidance, seed and batch size, as keywords."""
    s = cfg.sample
    steps = s.steps if s.sampler != "ddpm" else min(s.steps, noise_sched.config.num_train_timesteps)
    return {"sampler": s.sampler, "steps": steps, "guidance_scale": s.guidance_scale, "seed": cfg.seed,
            "batch_size": s.batch_size}


def sample_images(model, noise_sched, cfg: Config, conditions=None) -> torch.Tensor:
    """The fixed-seed sample grid: the first 32 test.json conditions with the cfg.sample sampler."""
    from iclevr_diffusion.data.iclevr import load_conditions
    from iclevr_diffusion.diffusion.sampling import generate

    conditions = conditions or load_conditions("test")[:SAMPLE_CONDITIONS]
    with sampling_pipeline(model, noise_sched) as pipe:
        return generate(pipe, conditions, **sampling_recipe(cfg, noise_sched))


def export_model(model, ema, noise_sched, cfg: Config, out: Path) -> None:
    """model/ = ConditionalDDPMPipeline(EMA UNet, training scheduler, the run's sampling defaults) + run_config.yaml,
    swapped in atomically. Loads with ConditionalDDPMPipeline.from_pretrained or, with the package installed,
    diffusers' DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)."""
    from iclevr_diffusion.diffusion.pipeline import ConditionalDDPMPipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    old = out.parent / f".{out.name}.old"
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    try:
        s = cfg.sample  # the run's sampler, steps, guidance, churn: what the pipeline uses when not told otherwise
        pipe = ConditionalDDPMPipeline(unet=model, scheduler=noise_sched, default_sampler=s.sampler,
                                       default_steps=s.steps, default_guidance_scale=s.guidance_scale,
                                       default_churn=s.churn)
        with ema_weights(model, ema):
            pipe.save_pretrained(tmp)
        (tmp / RUN_CONFIG).write_text(cfg.to_yaml())
    except Exception as e:  # a full disk: OSError, or SafetensorError from safetensors
        raise ckpt.write_failed(tmp, out, e, "the model export", "The previous export is kept") from None
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def evaluate_hook(model, ema, noise_sched, cfg: Config, run_dir: Path, step: int, emit, main: bool,
                  data_root: Path | None = None) -> dict | None:
    """Score the EMA model on cfg.eval.splits with the ResNet18 evaluator; keep best/ when it improves.

    The evaluator is cfg.eval.evaluator, else the data root's checkpoint.pth or its own trained one
    (`iclevr_diffusion.evaluator.choice.find_evaluator`). Without one, evaluation is skipped with a note.
    Writes eval.jsonl (step, accuracy per split, mean) and best/ (an export like model/ + best.json).
    """
    if not main:
        return None
    from iclevr_diffusion.evaluator.choice import find_evaluator
    from iclevr_diffusion.evaluator.networks import load_evaluator

    choice = find_evaluator(cfg.eval.evaluator, data_root)
    if choice is None:
        emit("note", message="evaluation skipped: no evaluator (set eval.evaluator, or 'iclevr-diff train-evaluator')")
        return None
    from iclevr_diffusion.data.iclevr import load_conditions
    from iclevr_diffusion.evaluator.scoring import sample_and_score
    from iclevr_diffusion.io import write_json

    judge = load_evaluator(choice.path, next(model.parameters()).device)
    scores = {}
    with ema_weights(model, ema), sampling_pipeline(model, noise_sched) as pipe:
        for split in cfg.eval.splits:
            scores[split] = sample_and_score(pipe, judge, load_conditions(split),
                                             **sampling_recipe(cfg, noise_sched)).accuracy
    mean = sum(scores.values()) / len(scores)
    row = {"step": step, **scores, "mean": mean}
    folder = RunFolder(run_dir)
    with open(folder.eval_log, "a") as f:
        f.write(json.dumps(row) + "\n")
    best_file = folder.best_file
    best = json.loads(best_file.read_text())["mean"] if best_file.exists() else -math.inf
    emit("note", message=f"step {step}: accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    if mean > best:
        export_model(model, ema, noise_sched, cfg, folder.best)
        write_json(best_file, row)
        emit("note", message=f"new best at step {step}: mean accuracy {mean:.3f} (saved to best/)")
    return row
