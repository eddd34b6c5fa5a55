"""The run folder: every file name a training run writes, and finding the newest run, in one place.

    runs/NAME/
        config.yaml           the resolved config of the run
        metrics.jsonl         one line per train.log_every steps (step, loss, lr, images/s, ...)
        loss.png              the learning curve
        checkpoints/step_N/   resumable training state (see checkpoints.py)
        samples/step_N.png    the fixed-seed sample grid
        model/                the exported EMA model (diffusers folder + run_config.yaml)
        snapshots/<M>min/     exports at train.snapshot_minutes
        ema/<share>/          exports of the train.extra_ema_lengths EMAs (the same run, other averaging lengths)
        eval.jsonl, best/     accuracy during training (train.eval_every) and the best export so far
        DONE.json             written by compare-timesteps when a run has finished

Only names and paths live here (no torch): the writers are training/ (loop, run_outputs, checkpoints);
the readers are diffusion/sampling.py, the workflows, compare-timesteps and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from iclevr_diffusion.errors import IclevrError

MODEL_DIR = "model"  # the exported model inside a run folder
RUN_CONFIG = "run_config.yaml"  # the resolved run config inside an exported model folder
MODEL_INDEX = "model_index.json"  # what makes a folder an exported (diffusers) model
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
EVAL_LOG = "eval.jsonl"
BEST_DIR = "best"
BEST_FILE = "best.json"
SNAPSHOTS = "snapshots"
EXTRA_EMAS = "ema"
DONE = "DONE.json"


def step_name(step: int) -> str:
    """step_000042: the name of a step's checkpoint folder and sample grid."""
    return f"step_{step:06d}"


def snapshot_name(minutes: float) -> str:
    return f"{minutes:g}min"


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (nothing is created or read here)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_model(cls, model_dir: Path) -> RunFolder:
        """The run folder an exported model sits in (RUN/model), or the model folder itself when it
        stands alone."""
        model_dir = Path(model_dir)
        return cls(model_dir.parent if model_dir.name == MODEL_DIR else model_dir)

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def loss_plot(self) -> Path:
        return self.root / LOSS_PLOT

    @property
    def eval_log(self) -> Path:
        return self.root / EVAL_LOG

    @property
    def best(self) -> Path:
        return self.root / BEST_DIR

    @property
    def best_file(self) -> Path:
        return self.best / BEST_FILE

    @property
    def snapshots(self) -> Path:
        return self.root / SNAPSHOTS

    @property
    def done(self) -> Path:
        return self.root / DONE

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"{step_name(step)}.png"

    def sample_grids(self) -> list[Path]:
        """The sample grids written so far, oldest first."""
        return sorted(self.samples.glob("step_*.png"))

    def snapshot(self, minutes: float) -> Path:
        return self.snapshots / snapshot_name(minutes)

    def extra_ema(self, share: float) -> Path:
        """The export of the run's EMA over this share of the steps (train.extra_ema_lengths)."""
        return self.root / EXTRA_EMAS / f"{share:g}"

    def has_model(self) -> bool:
        return (self.model / MODEL_INDEX).is_file()


def newest_model(runs_dir: Path) -> Path:
    """The exported model of the most recently trained run under `runs_dir`."""
    found = sorted(Path(runs_dir).glob(f"*/{MODEL_DIR}/{MODEL_INDEX}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise IclevrError(
            f"No trained model found under {runs_dir}/. Train one with 'iclevr-diff train' or pass --model."
        )
    return found[-1].parent


def find_model_dir(model: Path | None, runs_dir: Path = Path("runs")) -> Path:
    """Accept an exported model folder or a run folder (which holds model/); None: the newest run's."""
    if model is None:
        return newest_model(runs_dir)
    model = Path(model)
    if (model / MODEL_INDEX).is_file():
        return model
    if RunFolder(model).has_model():
        return RunFolder(model).model
    if not model.exists():
        raise IclevrError(f"--model {model} does not exist.")
    raise IclevrError(
        f"--model {model} holds no exported model ({MODEL_INDEX}); give a run folder or its model/ folder."
    )
