"""GPU check: training throughput of the presets on CUDA and a short real training run of the full preset.

    python benchmarks/gpu_check.py                   # on a CUDA machine: about 10 minutes
    python benchmarks/gpu_check.py --minutes 20      # a longer full-preset run
    python benchmarks/gpu_check.py --smoke           # CPU, tiny model: checks the script in seconds

1. Throughput: full optimizer steps (forward, loss, backward, AdamW) on random 64x64 batches for the
   seed preset (fp32, as the report trained; and bf16) and the default and full presets (bf16
   autocast), timed with CUDA synchronisation after warm-up; also the largest peak memory. The
   default also at its own batch of 16, and without pixel patches (model.patch_size=1), the change
   that learns most per step on CPU but costs 3.3x there per step.
2. Short runs: `train()` of each --configs preset on the built-in synthetic data (rendered on first
   use) for --minutes each, then `evaluate`-style accuracy of its EMA model on test and new_test with
   the toolkit's evaluator (installed on first use), one seed, the preset's sampler and guidance.
Writes benchmarks/results/gpu_check.json with the GPU's name after every stage, so a run cut short
keeps what it measured; exits with a one-line error when no CUDA device is present (except with --smoke).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
from machine_info import machine
from scoring import benchmark_evaluator, smoke_dataset, split_accuracy

from iclevr_diffusion.config import Config, load_config
from iclevr_diffusion.diffusion.losses import diffusion_loss
from iclevr_diffusion.diffusion.model import ConditionalUNet, count_parameters
from iclevr_diffusion.diffusion.schedule import make_train_scheduler
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
TINY = ["model.block_out_channels=[8, 16]", "model.attention=[false, true]", "model.norm_num_groups=4",
        "model.attention_head_dim=8", "data.image_size=16", "model.layers_per_block=1"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(cfg: Config, bf16: bool, batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = ConditionalUNet.from_run_config(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = make_train_scheduler(cfg.schedule)
    size = cfg.data.image_size
    x = torch.randn(batch, 3, size, size, device=device).clamp(-1, 1)
    labels = (torch.rand(batch, 24, device=device) < 0.08).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(model, sched, x, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: cuDNN autotuning, allocator, lazy init
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"params": count_parameters(model), "batch": batch, "bf16": bf16,
            "images_per_s": steps * batch / seconds, "peak_memory_gib": peak}


def short_run(args, preset: str, device: torch.device) -> dict:
    from iclevr_diffusion.data.iclevr import load_conditions
    from iclevr_diffusion.diffusion.sampling import load_pipeline
    from iclevr_diffusion.training.loop import train

    sets = [f"train.max_minutes={args.minutes}", "train.max_steps=null", "train.eval_every=0",
            "train.sample_every=0", "train.checkpoint_every=0", f"device={device}"]
    if args.smoke:
        data, tiny = smoke_dataset(args.run.parent / "smoke-data")
        sets = [*tiny, f"data.root={data}", *sets]
    cfg = load_config(preset, sets)
    run_dir = args.run / preset
    result = train(cfg, run_dir)
    pipe, cfg, _ = load_pipeline(run_dir, device=str(device))
    net, evaluator = benchmark_evaluator(args.smoke, None, None, device, cfg.data.synthetic_scenes)
    net = net.to(device)
    splits = [(s, load_conditions(split=s)[: 4 if args.smoke else None]) for s in ("test", "new_test")]
    scored = split_accuracy(pipe, net, splits, cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance_scale,
                            batch_size=64)
    return {"config": preset, "minutes": args.minutes, "steps": result.step, "images_per_s": result.images_per_s,
            "mixed_precision": result.mixed_precision, "sampler": f"{cfg.sample.sampler}-{cfg.sample.steps}",
            "guidance_scale": cfg.sample.guidance_scale, "evaluator": evaluator, "accuracy": scored["accuracy"],
            "sampling_seconds_per_image": scored["seconds_per_image"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per throughput row")
    p.add_argument("--configs", nargs="+", default=["default", "full"], help="presets trained in short runs")
    p.add_argument("--minutes", type=float, default=2.5, help="wall-clock budget of each short run")
    p.add_argument("--run", type=Path, default=Path("runs/gpu-check"))
    p.add_argument("--no-run", action="store_true", help="throughput only")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, seconds")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.batch, args.steps, args.minutes = "cpu", 4, 2, 0.05
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run this on a GPU machine (or --smoke to check the script on CPU).")
    out = args.out or RESULTS / f"gpu_check{'-smoke' if args.smoke else ''}.json"
    small = min(16, args.batch)  # the default preset's own batch
    presets = [("seed preset, fp32 (as the report)", "seed", False, args.batch, []),
               ("seed preset, bf16", "seed", True, args.batch, []),
               ("default preset, bf16", "default", True, args.batch, []),
               ("default preset, bf16", "default", True, small, []),
               ("default preset without pixel patches, bf16", "default", True, args.batch, ["model.patch_size=1"]),
               ("default preset without pixel patches, bf16", "default", True, small, ["model.patch_size=1"]),
               ("full preset, bf16", "full", True, args.batch, [])]
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = {"benchmark": "gpu_check", "date": now, "machine": machine(str(device)), "throughput": [],
              "short_runs": [], "smoke": args.smoke}
    for name, preset, bf16, batch, sets in presets:
        cfg = load_config(preset, [*(TINY if args.smoke else []), *sets])
        row = {"name": name, **throughput(cfg, bf16, batch, args.steps, device)}
        result["throughput"].append(row)
        print(f"{name:44s} batch {batch:3d} {row['params'] / 1e6:6.2f}M {row['images_per_s']:9.1f} img/s",
              flush=True)
    write_json(out, result)
    for preset in [] if args.no_run else args.configs:
        try:
            result["short_runs"].append(short_run(args, preset, device))
        except IclevrError as e:  # e.g. a non-finite loss under train.nan_policy=stop: keep it as a result
            result["short_runs"].append({"config": preset, "minutes": args.minutes, "error": str(e)})
        print(f"short run: {result['short_runs'][-1]}", flush=True)
        write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
