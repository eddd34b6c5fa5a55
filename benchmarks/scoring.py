"""What the benchmark scripts share: the evaluator they score with, per-split accuracy of a
pipeline, and the tiny dataset their --smoke modes train on."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from iclevr_diffusion.evaluator.scoring import sample_and_score
from iclevr_diffusion.precision import sampling_autocast


def benchmark_evaluator(smoke: bool, evaluator=None, root: Path | None = None, device="cpu", scenes=None):
    """(network in eval mode, name): the one `iclevr-diff evaluate` picks, or for --smoke a randomly
    initialised ResNet18 (its numbers mean nothing; the code path runs in seconds)."""
    if smoke:
        from iclevr_diffusion.evaluator.metric import build_evaluator

        torch.manual_seed(0)
        return build_evaluator().eval(), "random ResNet18 (smoke)"
    from iclevr_diffusion.devices import resolve_device
    from iclevr_diffusion.workflows.evaluate import choose_evaluator

    net, choice = choose_evaluator(evaluator, root, resolve_device(str(device)), False, scenes)
    return net.eval(), choice.name


def precision_label(pipe, autocast: bool | None) -> str:
    """"bf16" or "fp32": what sampling with `autocast` (None: the device's default) runs in."""
    return "bf16" if (sampling_autocast(pipe.unet.device) if autocast is None else autocast) else "fp32"


def split_accuracy(pipe, net, sets, sampler: str, steps: int, guidance: float, seed: int = 0,
                   batch_size: int = 32, autocast: bool | None = None, churn: float | None = None) -> dict:
    """{"accuracy": {split: accuracy}, "seconds_per_image": sampling time} for [(split, conditions)].
    `autocast` None: the measured default for the device (bf16 on CPUs with native bf16); `churn` None:
    the model's saved churn for heun and euler."""
    accuracy, seconds, images = {}, 0.0, 0
    for name, conds in sets:
        done = sample_and_score(pipe, net, conds, sampler, steps, guidance, seed, batch_size, autocast=autocast,
                                churn=churn)
        seconds += done.sampling_s
        images += len(conds)
        accuracy[name] = done.accuracy
    return {"accuracy": accuracy, "seconds_per_image": seconds / images}


def smoke_dataset(folder: Path, n: int = 16) -> tuple[Path, list[str]]:
    """(root of a tiny PIL-drawn i-CLEVR-layout dataset, the tests' tiny-model overrides)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_data import TINY_MODEL, make_tiny_dataset

    return make_tiny_dataset(folder, n=n), list(TINY_MODEL)


def is_default_recipe(cfg) -> bool:
    """Whether a run config trains what the shipped `default` preset does, its budget and the
    measured sigma_data aside (results files then call it "default")."""
    from iclevr_diffusion.config import load_config

    mine, shipped = cfg.to_dict(), load_config("default").to_dict()
    mine["schedule"]["sigma_data"] = shipped["schedule"]["sigma_data"]
    for d in (mine, shipped):
        for key in ("max_steps", "max_minutes", "epochs", "snapshot_minutes", "extra_ema_lengths"):
            d["train"].pop(key)
        for key in ("root", "images", "num_workers"):  # where the data is and how it is read, not what
            d["data"].pop(key)
    return all(mine[k] == shipped[k] for k in ("data", "model", "schedule", "train", "sample"))
