"""Which CPU recipe learns fastest per wall-clock second: train each candidate for the same number
of seconds on the same data, then score the accuracy its EMA model reaches (the number users care
about) and a fixed validation loss.

    python benchmarks/learn_speed.py --seconds 720           # the preset choice: 12 minutes each
    python benchmarks/learn_speed.py --only P2,P1 --threads 1
    python benchmarks/learn_speed.py --smoke                 # tiny, seconds: checks the script works

Data: the built-in synthetic set (or --data, an i-CLEVR-layout folder such as make-data writes).
Accuracy: test + new_test sampled with each run's configured sampler (DDIM 25 steps, guidance 3
for the default) and scored by the evaluator `iclevr-diff evaluate` picks (seed 0; one label is
0.64 points). Validation loss: the MSE of the EMA model on held-out images (heldout.json, else the
first train images) at fixed timesteps and noise, so every candidate is scored on the same problem;
early validation loss turned out to be a poor guide to accuracy. Writes
benchmarks/results/learn_speed.json and leaves each run folder (with its sample grids) under --runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from machine_info import machine
from scoring import benchmark_evaluator, smoke_dataset, split_accuracy

from iclevr_diffusion.config import load_config
from iclevr_diffusion.data.iclevr import ICLEVRDataset, load_conditions
from iclevr_diffusion.diffusion.losses import diffusion_loss
from iclevr_diffusion.diffusion.model import ConditionalUNet, count_parameters
from iclevr_diffusion.diffusion.sampling import load_pipeline
from iclevr_diffusion.diffusion.schedule import make_train_scheduler
from iclevr_diffusion.run_folder import RunFolder
from iclevr_diffusion.training.loop import train

RESULTS = Path(__file__).resolve().parent / "results" / "learn_speed.json"
A3 = "model.block_out_channels=[64, 128, 128]"
OLD = ["train.lr=0.0002", "train.min_snr_gamma=null"]  # the previous default's optimisation
CANDIDATES = {  # overrides of the default preset
    "P2 default: 32-64-128, patch 2, lr 1e-3, min-SNR 5": [],
    "P1 64-128-128, patch 2, lr 1e-3, min-SNR 5": [A3],
    "A2 64-128-128, patch 2, lr 5e-4, no min-SNR": [A3, "train.lr=0.0005", "train.min_snr_gamma=null"],
    "O previous default: 64-128-128, no patching, lr 2e-4": [A3, "model.patch_size=1", *OLD],
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


def accuracy(run: Path, net) -> dict[str, float]:
    """Accuracy per split of the run's exported EMA model with its configured sampler, seed 0."""
    pipe, cfg, _ = load_pipeline(run, device="cpu")
    sets = [(split, load_conditions(split=split)) for split in ("test", "new_test")]
    return split_accuracy(pipe, net, sets, cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance_scale)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="i-CLEVR-layout folder (default: the built-in synthetic set)")
    parser.add_argument("--seconds", type=float, default=720.0, help="training budget per candidate")
    parser.add_argument("--runs", type=Path, default=None, help="where the run folders go (default: a temp dir)")
    parser.add_argument("--only", default="", help="comma-separated candidate letters (P2, P1, A2, O)")
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
        args.data, tiny = smoke_dataset(runs / "data")
        candidates = {"tiny": []}
        extra = [*tiny, *extra]
        args.seconds = 3.0
    if args.data is None:
        from iclevr_diffusion.data.synthetic import default_dataset_root

        args.data = default_dataset_root()
    net, net_name = benchmark_evaluator(args.smoke, None, args.data)
    picks = [p.strip() for p in args.only.split(",") if p.strip()]
    held = "heldout.json" if (args.data / "heldout.json").is_file() else "train.json"
    rows = []
    for name, sets in candidates.items():
        if picks and name.split()[0] not in picks:
            continue
        cfg = load_config("default", [*extra, *sets, f"data.root={args.data}", f"name=cand-{name.split()[0]}",
                                      f"train.max_minutes={args.seconds / 60}", "train.checkpoint_every=0"])
        val = ICLEVRDataset(args.data, cfg.data.image_size, labels_file=held)
        n = min(len(val), 128)
        items = [val[i] for i in range(n)]
        images, labels = torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
        result = train(cfg, runs / cfg.name)
        folder = RunFolder(runs / cfg.name)
        ema_model = ConditionalUNet.from_pretrained(folder.model / "unet")
        row = {"name": name, "params": count_parameters(ema_model), "steps": result.step,
               "images_seen": result.step * cfg.train.batch_size, "images_per_s": result.images_per_s,
               "mixed_precision": result.mixed_precision, "train_loss": result.loss,
               "val_loss_ema": validation_loss(ema_model, cfg, images, labels),
               "sampler": f"{cfg.sample.sampler}-{cfg.sample.steps} w={cfg.sample.guidance_scale:g}",
               "accuracy": accuracy(runs / cfg.name, net),
               "samples": str(folder.sample_grids()[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'candidate':56s} {'steps':>6s} {'img/s':>7s} {'val (EMA)':>10s} {'test':>6s} {'new_test':>8s}")
    for r in rows:
        print(f"{r['name']:56s} {r['steps']:6d} {r['images_per_s'] or 0:7.1f} {r['val_loss_ema']:10.4f} "
              f"{r['accuracy']['test']:6.1%} {r['accuracy']['new_test']:8.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "seconds": args.seconds, "data": str(args.data), "evaluator": net_name,
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}; run folders in {runs}")


if __name__ == "__main__":
    main()
