"""Score every EMA length one training run kept (train.extra_ema_lengths), and its raw weights, on one split.

    python benchmarks/quality_at_steps.py --recipes noise06-emas --steps 5200 --splits val --seeds 2 \\
        --out benchmarks/results/recipe_choice-5200-noise06-emas.json          # trains the run
    python benchmarks/ema_lengths.py --run runs/quality-at-steps/noise06-emas-5200 \\
        --out benchmarks/results/ema_lengths-5200.json                          # scores its EMAs

The run's model/ (its train.ema_decay), each ema/<share>/ and the raw weights of its last checkpoint are
sampled with the run's own sampler, steps and guidance for --seeds seeds and scored with the toolkit's
evaluator, as quality_at_steps.py scores a run. The EMA length is then chosen on val, after training:
one run instead of one per length. Spread: population standard deviation over seeds.
--smoke trains a tiny run with two extra EMAs and scores 4 conditions with a random evaluator (seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml
from machine_info import machine
from scoring import benchmark_evaluator, smoke_dataset, split_accuracy

from iclevr_diffusion.config import config_from_dict
from iclevr_diffusion.data.iclevr import load_conditions
from iclevr_diffusion.diffusion.sampling import load_pipeline
from iclevr_diffusion.io import write_json
from iclevr_diffusion.run_folder import EXTRA_EMAS, RunFolder
from iclevr_diffusion.training import checkpoints as ckpt


def weights_to_score(run: Path) -> list[tuple[str, str, Path]]:
    """(label, kind, model folder to load) for every model the run kept; kind: "ema_decay 0.999" for model/,
    "share 0.25" for an extra EMA, "raw" for the last checkpoint's raw weights."""
    folder = RunFolder(run)
    d = config_from_dict(yaml.safe_load(folder.config.read_text())).train.ema_decay
    found = [(f"EMA {d:g}, warmed up (model/: the last ~11% of the steps, at most {1 / (1 - d):,.0f} steps)",
              f"ema_decay {d:g}", folder.model)]
    extra = sorted((run / EXTRA_EMAS).iterdir(), key=lambda p: float(p.name)) if (run / EXTRA_EMAS).is_dir() else []
    for sub in extra:
        found.append((f"EMA over the last {100 * float(sub.name):g}% of the steps", f"share {sub.name}", sub))
    found.append(("raw weights (last checkpoint)", "raw", folder.model))
    return found


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a run folder trained with train.extra_ema_lengths")
    p.add_argument("--split", default="val")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="sampling batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="a tiny run with two extra EMAs, random evaluator: seconds")
    args = p.parse_args(argv)
    conditions = load_conditions(split=args.split)
    if args.smoke:
        from iclevr_diffusion.config import load_config
        from iclevr_diffusion.training.loop import train

        data, tiny = smoke_dataset(args.out.parent / "smoke-data")
        args.run = args.out.parent / "smoke-run"
        train(load_config("default", [*tiny, f"data.root={data}", "train.max_steps=3", "train.max_minutes=null",
                                      "train.extra_ema_lengths=[0.25,0.5]", "sample.steps=2"]), args.run)
        conditions = conditions[:4]
    elif args.run is None:
        sys.exit("error: give --run RUN (a run folder trained with train.extra_ema_lengths), or --smoke.")
    net, evaluator_name = None, None
    last = ckpt.list_checkpoints(RunFolder(args.run).checkpoints)[-1]
    rows = []
    for label, kind, folder in weights_to_score(args.run):
        pipe, cfg, _ = load_pipeline(folder, device=args.device)
        if kind == "raw":  # the raw weights: the exported model's UNet with the checkpoint's weights
            pipe.unet.load_state_dict(ckpt.load(last)["model"])
        if net is None:
            root = Path(cfg.data.root) if cfg.data.root else None
            net, evaluator_name = benchmark_evaluator(args.smoke, None, root, args.device, cfg.data.synthetic_scenes)
        s = cfg.sample
        values = [100 * split_accuracy(pipe, net, [(args.split, conditions)], s.sampler, s.steps, s.guidance_scale,
                                       seed, args.batch_size)["accuracy"][args.split] for seed in range(args.seeds)]
        rows.append({"weights": label, "kind": kind, "split": args.split, "conditions": len(conditions),
                     "mean": round(statistics.mean(values), 2), "spread": round(statistics.pstdev(values), 2),
                     "seeds": [round(v, 2) for v in values], "sampler": s.sampler, "sampler_steps": s.steps,
                     "guidance": s.guidance_scale})
        print(f"{label}: {args.split} {rows[-1]['mean']:.1f} ± {rows[-1]['spread']:.1f}", file=sys.stderr, flush=True)
        result = {"benchmark": "ema_lengths", "machine": machine(args.device), "run": str(args.run),
                  "steps": int(last.name.split("_")[1]), "checkpoint": str(last), "seeds": args.seeds,
                  "spread": "population standard deviation over seeds, percentage points",
                  "evaluator": evaluator_name, "rows": rows}
        write_json(args.out, result)  # after every row: a long scoring run keeps what it has
    return result


if __name__ == "__main__":
    main()
