"""GPU stability: does a preset train on CUDA without a non-finite loss, and what changes it?

    python benchmarks/gpu_stability.py                 # on a CUDA machine: about 3 minutes
    python benchmarks/gpu_stability.py --smoke         # CPU, tiny model: checks the script in seconds

The first GPU check stopped the default preset (bf16 autocast) with "Loss became nan at step 465";
the same preset trains 22,700 steps on CPU (bf16 autocast there too). Each variant below trains the
preset for --steps optimizer steps on the built-in data with train.nan_policy=stop and records where
it stopped, its loss curve and the largest parameter magnitude at each log line (a weight blow-up
shows there before the loss does). Writes benchmarks/results/gpu_stability.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import re
import sys
from pathlib import Path

import torch
from machine_info import machine
from scoring import smoke_dataset

from iclevr_diffusion.config import load_config
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.io import write_json
from iclevr_diffusion.report import read_metrics

RESULTS = Path(__file__).resolve().parent / "results"
# (name, config overrides, attention kernel forced to PyTorch's plain math implementation)
VARIANTS = [
    ("bf16 autocast, seed 0 (as the first check)", [], False),
    ("bf16 autocast, seed 1", ["seed=1"], False),
    ("fp32", ["train.mixed_precision=no"], False),
    ("bf16 autocast, attention by the math kernel", [], True),
    ("bf16 autocast, lr 1e-3", ["train.lr=0.001"], False),
]


def largest_weight(step: int, model: torch.nn.Module) -> dict:
    return {"max_abs_param": max(float(p.detach().abs().max()) for p in model.parameters())}


def attention_kernel(math_only: bool):
    if not math_only:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def one_run(preset: str, name: str, sets: list[str], math_only: bool, base: list[str], run_dir: Path) -> dict:
    from iclevr_diffusion.training.loop import train

    cfg = load_config(preset, [*base, *sets])
    stopped, error = None, None
    try:
        with attention_kernel(math_only):
            result = train(cfg, run_dir, on_log=largest_weight)
        stopped = result.step
    except IclevrError as e:
        error = str(e)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    nan_at = re.search(r"at step (\d+)", error) if error else None
    return {"name": name, "overrides": sets, "math_attention": math_only, "finished_steps": stopped,
            "non_finite_at_step": int(nan_at.group(1)) if nan_at else None, "error": error,
            "curve": [{k: r.get(k) for k in ("step", "loss", "max_abs_param")} for r in rows]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", default="default")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--run", type=Path, default=Path("runs/gpu-stability"))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, seconds")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.steps = "cpu", 4
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run this on a GPU machine (or --smoke to check the script on CPU).")
    base = [f"train.max_steps={args.steps}", "train.max_minutes=null", "train.eval_every=0", "train.sample_every=0",
            "train.checkpoint_every=0", "train.log_every=25", "train.nan_policy=stop", f"device={args.device}"]
    if args.smoke:
        data, tiny = smoke_dataset(args.run / "smoke-data")
        base = [*tiny, f"data.root={data}", *base, "train.log_every=1"]
    out = args.out or RESULTS / f"gpu_stability{'-smoke' if args.smoke else ''}.json"
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = {"benchmark": "gpu_stability", "date": now, "machine": machine(args.device), "preset": args.config,
              "steps": args.steps, "runs": [], "smoke": args.smoke}
    for i, (name, sets, math_only) in enumerate(VARIANTS):
        row = one_run(args.config, name, sets, math_only, base, args.run / f"variant{i}")
        result["runs"].append(row)
        print(f"{name:46s} finished {row['finished_steps']}  non-finite at {row['non_finite_at_step']}", flush=True)
        write_json(out, result)  # after every run: a run cut short keeps what it measured
    return result


if __name__ == "__main__":
    main()
