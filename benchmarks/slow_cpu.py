"""The newcomer's path on an AVX2-only CPU, simulated on this one: each step timed natively and as AVX2-only.

    python benchmarks/slow_cpu.py --model runs/main-job/default   # ~15 minutes on 2 cores
    python benchmarks/slow_cpu.py --smoke                         # tiny model and data: seconds

This machine kind also comes with an AVX2-only CPU (no AVX-512, no native bf16), about 4x slower at
training our UNet. Where it cannot be measured, this script makes the CPU at hand behave like one:
every step runs in a child process with ATEN_CPU_CAPABILITY=avx2 (torch's own kernels) and
ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN's convolutions and matmuls; it then reports no native bf16, so the
toolkit's precision choice falls to fp32 as it would there). Same clock speed, cache and memory, so it
is an optimistic bound for a CPU that is also older; the training speed of the previous default
(its UNet without AdaGN) is measured too, to set beside what was seen on a real AVX2-only CPU.

Steps, each natively and simulated:
- rendering the built-in synthetic set (what the first `iclevr-diff train` does before training);
- training images/s of the default preset (best of interleaved rounds, batch 16, the toolkit's
  precision choice) -> optimizer steps in the main job's 14 minutes;
- the first `iclevr-diff evaluate` of a trained model on a fresh evaluator cache: installing the
  shipped evaluator, then sampling and scoring test + new_test (1 seed).
Writes benchmarks/results/slow_cpu.json with the machine and the exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine

from iclevr_diffusion.io import write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
MAIN_JOB_MINUTES = 14


def child_env(simulated: bool, cache: Path | None = None) -> dict:
    env = {**os.environ, **(AVX2_ONLY if simulated else {})}
    if not simulated:
        for key in AVX2_ONLY:
            env.pop(key, None)
    if cache is not None:
        env["ICLEVR_CACHE_DIR"] = str(cache)
    return env


def run_child(args: list[str], simulated: bool, cache: Path | None = None) -> tuple[float, str]:
    """(wall seconds, stdout) of `python THIS --child ...` or a console command, in its own process."""
    start = time.perf_counter()
    out = subprocess.run(args, env=child_env(simulated, cache), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if out.returncode:
        sys.exit(f"error: {' '.join(args)} failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    return seconds, out.stdout


def train_speed_child(preset_overrides: list[str], seconds: float, smoke: bool) -> None:
    """Print training images/s of the default preset (+ overrides) on random batches, as `train` steps."""
    import torch

    from iclevr_diffusion.config import load_config
    from iclevr_diffusion.diffusion.edm import edm_loss, make_edm_scheduler
    from iclevr_diffusion.diffusion.model import ConditionalUNet
    from iclevr_diffusion.precision import sampling_autocast

    sets = [*preset_overrides, *(["model.block_out_channels=[32,32]", "model.attention=[false,false]"] if smoke
                                 else [])]
    cfg = load_config("default", sets)
    torch.manual_seed(0)
    model = ConditionalUNet.from_run_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    bf16 = sampling_autocast(torch.device("cpu"))
    scheduler = make_edm_scheduler(0.2)
    x = torch.rand(16, 3, 64, 64) * 2 - 1
    labels = (torch.rand(16, 24) < 0.08).float()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = edm_loss(model, scheduler, x, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += 1
    print(json.dumps({"images_per_s": 16 * done / (time.perf_counter() - start), "bf16": bf16,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}))


def speeds(recipes: dict, rounds: int, seconds: float, smoke: bool) -> dict:
    """Best images/s per (recipe, native|simulated) over interleaved rounds (load comes and goes)."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, overrides in recipes.items():
            for simulated in (False, True):
                args = [sys.executable, __file__, "--child", "train-speed", "--seconds", str(seconds),
                        *(["--smoke"] if smoke else []), "--", *overrides]
                _, out = run_child(args, simulated)
                row = json.loads(out.strip().splitlines()[-1])
                key = f"{name} {'simulated AVX2-only' if simulated else 'native'}"
                if key not in best or row["images_per_s"] > best[key]["images_per_s"]:
                    best[key] = {**row, "images_per_s": round(row["images_per_s"], 1)}
    return best


def render_seconds(scenes: int, simulated: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "iclevr_diffusion", "make-data", "--out", f"{tmp}/set",
                "--scenes", str(scenes), "--quiet"]
        seconds, _ = run_child(args, simulated)
    return round(seconds, 1)


def evaluate_first_use(model: Path, data_root: Path, simulated: bool, smoke: bool) -> dict:
    """`iclevr-diff evaluate --model M --json` on a copy of the cache with no evaluator in it."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        mirror = cache / data_root.name
        mirror.mkdir(parents=True)
        for f in data_root.iterdir():  # the rendered set without its evaluator/
            if f.name == "evaluator":
                continue
            if f.is_dir():
                (mirror / f.name).symlink_to(f.resolve())
            else:
                shutil.copyfile(f, mirror / f.name)
        args = [sys.executable, "-m", "iclevr_diffusion", "evaluate", "--model", str(model), "--json", "--quiet",
                *(["--steps", "2"] if smoke else [])]
        seconds, out = run_child(args, simulated, cache)
    results = json.loads(out)["results"]
    return {"seconds": round(seconds, 1), "evaluator": json.loads(out)["evaluator"]["name"],
            "accuracy": {r["split"]: round(100 * r["accuracy"], 2) for r in results},
            "sampling_seconds": round(sum(r["seconds"] for r in results), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a trained default-preset run or model folder (for the evaluate step)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per training-speed measurement")
    p.add_argument("--smoke", action="store_true", help="tiny model and data: checks the script in seconds")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "train-speed":
        return train_speed_child(args.overrides, args.seconds, args.smoke)

    from iclevr_diffusion.data.synthetic import default_dataset_root

    smoke_tmp = None
    if args.smoke:  # a tiny set where the built-in one is looked for (evaluate then trains its own evaluator)
        from iclevr_diffusion.data.synthetic import COMPLETE, cached_root, make_dataset

        smoke_tmp = tempfile.TemporaryDirectory()
        os.environ["ICLEVR_CACHE_DIR"] = smoke_tmp.name
        args.rounds, args.seconds = 1, 1.0
        make_dataset(cached_root(), scenes=3, workers=1)
        (cached_root() / COMPLETE).write_text("{}")
    data_root = Path(default_dataset_root())
    recipes = {"default": []}
    if not args.smoke:  # beside what was seen on a real AVX2-only CPU (the formulation issue: 23 images/s)
        recipes["previous default UNet (no AdaGN)"] = ["model.time_scale_shift=default"]
    result = {"benchmark": "slow_cpu", "machine": machine(), "simulation": AVX2_ONLY,
              "training_images_per_s": speeds(recipes, args.rounds, args.seconds, args.smoke)}
    print(json.dumps(result["training_images_per_s"], indent=1), file=sys.stderr)
    scenes = 8 if args.smoke else 6003
    result["render_s"] = {"native": render_seconds(scenes, False), "simulated": render_seconds(scenes, True)}
    print(f"rendering {scenes} scenes: {result['render_s']}", file=sys.stderr)
    for mode in ("native", "simulated"):
        rate = result["training_images_per_s"][f"default {'simulated AVX2-only' if mode == 'simulated' else mode}"]
        result.setdefault("main_job_steps", {})[mode] = int(rate["images_per_s"] * MAIN_JOB_MINUTES * 60 / 16)
    if args.model is not None or args.smoke:
        model = args.model
        if args.smoke:
            from iclevr_diffusion.testing import tiny_config, write_tiny_run

            model = write_tiny_run(Path(smoke_tmp.name) / "run",
                                   tiny_config(formulation="edm", image_size=64, sampler="heun", steps=2), 2)
        result["evaluate_first_use"] = {mode: evaluate_first_use(model, data_root, mode == "simulated", args.smoke)
                                        for mode in ("native", "simulated")}
        print(json.dumps(result["evaluate_first_use"], indent=1), file=sys.stderr)
    out = args.out or RESULTS / ("slow_cpu-smoke.json" if args.smoke else "slow_cpu.json")
    write_json(out, result)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
