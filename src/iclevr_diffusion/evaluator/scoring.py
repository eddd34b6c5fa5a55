"""Sample a set of conditions and score the images: the one route from a pipeline to an accuracy.

Used by `evaluate`, the evaluations during training (train.eval_every), compare-timesteps and the
benchmarks, so every reported accuracy is sampled and scored the same way: image i seeded from
(seed, i) (sampling.generate), scored by the course's top-k metric (evaluation.score_images).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from iclevr_diffusion.diffusion.sampling import generate
from iclevr_diffusion.evaluator.metric import Score, score_images
from iclevr_diffusion.labels import multi_hot_batch


@dataclass
class SampledScore:
    images: torch.Tensor  # (N, 3, S, S) in [-1, 1]
    score: Score
    sampling_s: float  # sampling alone
    scoring_s: float

    @property
    def accuracy(self) -> float:
        return self.score.accuracy


def sample_and_score(
    pipe,  # a ConditionalDDPMPipeline
    net: torch.nn.Module,  # the evaluator, in eval mode
    conditions: Sequence[Sequence[str]],  # one label list per image
    sampler: str | None = None,  # None: the pipeline's saved defaults (the run's `sample` section)
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    autocast: bool | None = None,  # None: the precision policy's default for the device
    progress: Callable[[int], None] | None = None,  # as sampling.generate
    churn: float | None = None,  # None: the model's saved churn for heun and euler
) -> SampledScore:
    """Draw one image per condition and score them against the conditions."""
    started = time.perf_counter()
    images = generate(pipe, conditions, sampler, steps, guidance_scale, seed, batch_size, progress=progress,
                      autocast=autocast, churn=churn)
    sampled = time.perf_counter()
    score = score_images(net, images, multi_hot_batch(conditions))
    return SampledScore(images, score, sampled - started, time.perf_counter() - sampled)
