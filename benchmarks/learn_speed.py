"""Which CPU architecture learns fastest per wall-clock second: train each candidate for the same
number of seconds on the same synthetic data, then compare a fixed validation loss and the sample grids.

    python benchmarks/learn_speed.py --data /path/to/synthetic --seconds 150
    python benchmarks/learn_speed.py --smoke          # tiny, seconds: checks the script works

Validation loss: the MSE of the EMA model (what gets exported) and of the raw weights on held-out
images (heldout.json, else the first train images) at fixed timesteps and noise, so every
candidate is scored on exactly the same problem. Writes benchmarks/results/learn_speed.json and
leaves each run folder (with its sample grid) under --runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from machine_info import machine

from iclevr_diffusion.config import load_config
from iclevr_diffusion.data.iclevr import ICLEVRDataset
from iclevr_diffusion.losses import diffusion_loss
from iclevr_diffusion.model import ConditionalUNet, count_parameters
from iclevr_diffusion.schedule import make_train_scheduler
from iclevr_diffusion.training import train

RESULTS = Path(__file__).resolve().parent / "results" / "learn_speed.json"
CANDIDATES = {
    "A 64-128-128, attn 16+mid": ["model.block_out_channels=[64, 128, 128]", "model.attention=[false, false, true]"],
    "B 32-64-128, attn 16+mid": ["model.block_out_channels=[32, 64, 128]", "model.attention=[false, false, true]"],
    "A1 64-128-128, 1 layer/block, attn 16+mid": ["model.block_out_channels=[64, 128, 128]",
                                                  "model.attention=[false, false, true]", "model.layers_per_block=1"],
    "S 32-64-96-128, attn 16+8+mid (seed w/o 32x32 attn)": ["model.block_out_channels=[32, 64, 96, 128]",
                                                            "model.attention=[false, false, true, true]",
                                                            "model.attention_head_dim=8"],
}


@torch.no_grad()
def validation_loss(model, cfg, images, labels, batch: int = 32) -> float:
    sched = make_train_scheduler(cfg.schedule)
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    total = 0.0
    for i in range(0, len(images), batch):
        total += diffusion_loss(model, sched, images[i : i + batch], labels[i : i + batch], gen).item() * len(
            images[i : i + batch])
    return total / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="i-CLEVR-layout folder (e.g. made by make-data)")
    parser.add_argument("--seconds", type=float, default=150.0, help="training budget per candidate")
    parser.add_argument("--runs", type=Path, default=None, help="where the run folders go (default: a temp dir)")
    parser.add_argument("--only", default="", help="comma-separated candidate letters")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every candidate")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = parser.parse_args()
    # A smoke run must not overwrite the real figures.
    args.out = args.out or (RESULTS.with_name(RESULTS.stem + "_smoke.json") if args.smoke else RESULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = args.runs or Path(tempfile.mkdtemp(prefix="learn_speed_"))
    candidates = dict(CANDIDATES)
    extra = list(args.set)
    if args.smoke:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_data import TINY_MODEL, make_tiny_dataset

        args.data = make_tiny_dataset(runs / "data", n=16)
        candidates = {"tiny": []}
        extra = [*TINY_MODEL, *extra]
        args.seconds = 3.0
    picks = [p.strip() for p in args.only.split(",") if p.strip()]
    held = "heldout.json" if (args.data / "heldout.json").is_file() else "train.json"
    rows = []
    for name, sets in candidates.items():
        if picks and name.split()[0] not in picks:
            continue
        cfg = load_config("default", [*extra, *sets, f"data.root={args.data}", f"name=cand-{name.split()[0]}",
                                      f"train.max_minutes={args.seconds / 60}", "train.sample_every=0",
                                      "train.checkpoint_every=0"])
        val = ICLEVRDataset(args.data, cfg.data.image_size, labels_file=held)
        n = min(len(val), 128)
        items = [val[i] for i in range(n)]
        images, labels = torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
        result = train(cfg, runs / cfg.name)
        ema_model = ConditionalUNet.from_pretrained(runs / cfg.name / "model" / "unet")
        row = {"name": name, "params": count_parameters(ema_model), "steps": result.step,
               "images_seen": result.step * cfg.train.batch_size, "images_per_s": result.images_per_s,
               "mixed_precision": result.mixed_precision, "train_loss": result.loss,
               "val_loss_ema": validation_loss(ema_model, cfg, images, labels),
               "samples": str(sorted((runs / cfg.name / "samples").glob("*.png"))[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'candidate':52s} {'steps':>6s} {'img/s':>7s} {'train loss':>10s} {'val (EMA)':>10s}")
    for r in rows:
        print(f"{r['name']:52s} {r['steps']:6d} {r['images_per_s'] or 0:7.1f} {r['train_loss'] or 0:10.4f} "
              f"{r['val_loss_ema']:10.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "seconds": args.seconds, "data": str(args.data), "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}; run folders in {runs}")


if __name__ == "__main__":
    main()
