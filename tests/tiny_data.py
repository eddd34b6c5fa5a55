"""A tiny i-CLEVR-layout dataset drawn with PIL (coloured squares and discs on gray), for training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from iclevr_diffusion.labels import COLORS, LABEL_INDEX, packaged_file

# Tiny models run 10-20x faster on one thread when the CPU is shared (OpenMP threads spin and wait
# on each other); this module is imported by the training tests, so it sets that for them.
torch.set_num_threads(1)

RGB = {"gray": (128, 128, 128), "red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 160, 30),
       "brown": (120, 70, 20), "purple": (130, 30, 160), "cyan": (30, 200, 200), "yellow": (220, 220, 30)}

# The DDPM formulation as the default preset had it until EDM replaced it: most tests exercise DDPM
# code paths; tests/test_edm.py covers EDM (the default).
DDPM = ["schedule.formulation=ddpm", "train.min_snr_gamma=5.0", "model.time_scale_shift=default", "train.lr=0.001",
        "sample.sampler=ddim", "sample.steps=25"]

TINY_MODEL = [
    *DDPM,
    "data.image_size=16", "model.block_out_channels=[8, 16]", "model.attention=[false, true]",
    "model.norm_num_groups=4", "model.attention_head_dim=8", "model.layers_per_block=1",
    "schedule.num_train_timesteps=50", "train.batch_size=4", 'train.mixed_precision="no"',
    "train.warmup_steps=2", "train.max_minutes=null", "train.log_every=1", "train.sample_every=0",
    "train.checkpoint_every=1000", "sample.sampler=ddim", "sample.steps=2", "sample.guidance_scale=2.0",
]


def make_tiny_dataset(root: Path, n: int = 12, seed: int = 0) -> Path:
    rng = random.Random(seed)
    images = root / "iclevr"
    images.mkdir(parents=True, exist_ok=True)
    meta = {}
    shapes = ("cube", "sphere", "cylinder")
    for i in range(n):
        img = Image.new("RGB", (32, 24), (150, 150, 150))
        draw = ImageDraw.Draw(img)
        labels = []
        for _ in range(rng.randint(1, 3)):
            color, shape = rng.choice(COLORS), rng.choice(shapes)
            x, y = rng.randint(0, 24), rng.randint(0, 16)
            box = (x, y, x + 7, y + 7)
            (draw.ellipse if shape == "sphere" else draw.rectangle)(box, fill=RGB[color])
            labels.append(f"{color} {shape}")
        name = f"CLEVR_train_{i:06d}_0.png"
        img.save(images / name)
        meta[name] = sorted(set(labels), key=LABEL_INDEX.__getitem__)
    (root / "train.json").write_text(json.dumps(meta))
    (root / "objects.json").write_text(packaged_file("objects.json").read_text())
    return root


def write_ranked_evaluator(path: Path) -> Path:
    """An official-format evaluator checkpoint whose outputs ignore the image and rank the classes by
    index (fc weights zero, bias decreasing), so its score on any condition list is known in advance."""
    from iclevr_diffusion.evaluator.metric import build_evaluator

    model = build_evaluator()
    with torch.no_grad():
        model.fc[0].weight.zero_()
        model.fc[0].bias.copy_(-torch.arange(24, dtype=torch.float32) / 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def expected_ranked_accuracy(conditions: list[list[str]]) -> float:
    """The ranked evaluator's top-k are classes 0..k-1: count the true ones by hand."""
    hits = sum(sum(LABEL_INDEX[n] < len(c) for n in c) for c in conditions)
    return hits / sum(len(c) for c in conditions)


def tiny_cfg(root, *sets):
    """The default preset with the tiny model (TINY_MODEL) on the tiny dataset at ROOT, plus SETS."""
    from iclevr_diffusion.config import load_config

    return load_config("default", [*TINY_MODEL, f"data.root={root}", *sets])


def final_weights(run_dir):
    """The raw model weights of a run's newest checkpoint."""
    from safetensors.torch import load_file

    from iclevr_diffusion.training import checkpoints as ckpt

    return load_file(str(ckpt.list_checkpoints(run_dir / "checkpoints")[-1] / "model.safetensors"))
