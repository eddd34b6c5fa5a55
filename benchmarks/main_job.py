"""The README's newcomer path, timed end to end: the main job, then the first `evaluate`.

    python benchmarks/main_job.py                 # fresh cache: renders the data, trains, trains the evaluator
    python benchmarks/main_job.py --smoke         # the same commands on a tiny budget: seconds
    python benchmarks/main_job.py --out benchmarks/results/main_job-avx2.json --grid docs/default_main_job_avx2.png

It runs exactly the README's commands as subprocesses, `iclevr-diff train` (the default preset, 14
minutes) and `iclevr-diff evaluate --seeds 4 --json` (its first use on the built-in data trains the
own small-CNN evaluator), with ICLEVR_CACHE_DIR pointed at an empty folder so that the first-use
costs (rendering the built-in set, training the evaluator) are included, and records their wall
times, the run's steps and speed, and the accuracy per split (mean ± population SD over 4 seeds) in
benchmarks/results/main_job.json with the machine. The grid of the run goes to docs/default_main_job.png.
"""

from __future__ import annotations

import argparse
import datetime
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
from iclevr_diffusion.run_folder import RunFolder
from iclevr_diffusion.training.checkpoints import list_checkpoints

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, str]:
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(log, "w") as err:
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, check=True).stdout
    return time.perf_counter() - started, out


def first_use(card: dict) -> dict:
    """What the first `evaluate` did to get its evaluator: installed the shipped one (its card records
    the seconds that took here) or trained one (the card's seconds are that training)."""
    shipped = card.get("source") == "shipped"
    return {"arch": card.get("arch"), "source": "shipped" if shipped else "trained",
            "seconds": card.get("seconds_installing" if shipped else "seconds"),
            "heldout_accuracy": card.get("heldout_accuracy")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/main-job"), help="--runs-dir of the main job")
    p.add_argument("--smoke", action="store_true", help="a tiny budget and 2 seeds: checks the script")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/main_job.json)")
    p.add_argument("--grid", type=Path, default=HERE.parent / "docs" / "default_main_job.png",
                   help="where the run's last sample grid is copied (not with --smoke)")
    args = p.parse_args(argv)
    exe = str(Path(sys.executable).with_name("iclevr-diff"))
    cache = Path(tempfile.mkdtemp(prefix="iclevr-cache-"))
    env = {**os.environ, "ICLEVR_CACHE_DIR": str(cache)}
    shutil.rmtree(args.runs, ignore_errors=True)
    train_cmd = [exe, "train", "--runs-dir", str(args.runs)]
    evaluate_cmd = [exe, "evaluate", "--runs-dir", str(args.runs), "--seeds", "4", "--json"]
    if args.smoke:
        train_cmd += ["--max-steps", "2", "--set", "data.synthetic_scenes=8", "--set", "sample.steps=2"]
        evaluate_cmd = [*evaluate_cmd[:-3], "--seeds", "2", "--json", "--steps", "2"]
    logs = args.runs.parent / f"{args.runs.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        train_s, _ = timed(train_cmd, env, logs / "train.log")
        evaluate_s, evaluate_out = timed(evaluate_cmd, env, logs / "evaluate.log")
        card = next(cache.glob("*/evaluator/card.json"), None)
        evaluator_card = json.loads(card.read_text()) if card else None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    run = RunFolder(args.runs / "default")
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    scores = json.loads(evaluate_out)
    result = {
        "benchmark": "main_job",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine("cpu"),
        "commands": [" ".join(train_cmd), " ".join(evaluate_cmd)],
        "fresh_cache": True,
        "train_wall_s": round(train_s, 1),
        "evaluate_wall_s": round(evaluate_s, 1),
        "steps": int(list_checkpoints(run.checkpoints)[-1].name.split("_")[1]),
        "train_elapsed_s": rows[-1]["elapsed_s"],
        "images_per_s_last": round(rows[-1]["images_per_s"], 1),
        "evaluator_first_use": first_use(evaluator_card) if evaluator_card else None,
        "evaluate": scores,
        "spread": "population standard deviation over seeds",
    }
    out = args.out or RESULTS / f"main_job{'-smoke' if args.smoke else ''}.json"
    write_json(out, result)
    grid = run.sample_grids()[-1]
    if not args.smoke:
        shutil.copy(grid, args.grid)
    print(json.dumps({k: result[k] for k in ("train_wall_s", "evaluate_wall_s", "steps")}), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
