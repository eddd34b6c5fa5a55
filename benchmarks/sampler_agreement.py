"""Do the samplers agree on one model? Every offered sampler at its default step count, a long stochastic
reference, fp32 against bf16, and accuracy against guidance 1-5 (a PNG).

    python benchmarks/sampler_agreement.py --model runs/quality-at-steps/default-5200
    python benchmarks/sampler_agreement.py --part samplers --samplers heun,euler,dpm++ --seeds 16 & \
    python benchmarks/sampler_agreement.py --part samplers,precision --samplers dpm++sde --seeds 16 & wait
    python benchmarks/sampler_agreement.py --part reference,guidance --seeds 2
    python benchmarks/sampler_agreement.py --merge
    python benchmarks/sampler_agreement.py --smoke            # tiny model and data, seconds

--part runs a share of the work (samplers: every sampler, or those --samplers names; precision: the
default sampler in the other precision than the device's sampling default, i.e. fp32 on a CPU with
native bf16 and bf16 autocast elsewhere, where it is emulated and slow; reference; guidance) into
results/sampler_agreement.<part>.json, so
one-thread processes can share a 2-core CPU (two one-thread processes do more work than one two-thread
process); --merge joins the parts into sampler_agreement.json and checks the targets (a part not run
leaves its row and its check null: not measured).

Seeds: the sampler rows are compared against a 3-point threshold, so they take 16 seeds. With 4 (256
images) the seed-to-seed SD of the pooled accuracy is about 3.5 points, the standard error of a
difference between two samplers about 2.5: a 3-point check at 4 seeds mostly measures which seeds were
drawn. 16 seeds halve that.

Accuracy is pooled over test and new_test (all hits over all 156 asked-for objects) per seed, then
mean and spread (population standard deviation) over --seeds seeds, scored with the toolkit's
evaluator. Writes benchmarks/results/sampler_agreement.json and docs/guidance.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

from machine_info import machine
from scoring import benchmark_evaluator, is_default_recipe, precision_label, smoke_dataset, split_accuracy

from iclevr_diffusion.data.iclevr import load_conditions
from iclevr_diffusion.diffusion.samplers import samplers_for
from iclevr_diffusion.diffusion.sampling import default_steps, load_pipeline
from iclevr_diffusion.io import write_json
from iclevr_diffusion.precision import sampling_autocast

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PARTS = ["samplers", "precision", "reference", "guidance"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("runs/quality-at-steps/default-5200"))
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--reference", default="dpm++sde:250", help="stochastic reference sampler:steps")
    p.add_argument("--guidance", default="1,1.5,2,3,4,5", help="guidance scales for the curve")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="train a tiny model first; random evaluator")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--part", default=",".join(PARTS), help="which rows to run (comma-separated)")
    p.add_argument("--samplers", default=None, help="with --part samplers: only these (comma-separated; default all)")
    p.add_argument("--merge", action="store_true", help="join the --part files into the results file")
    p.add_argument("--plot", type=Path, default=None, help="guidance curve PNG (default docs/guidance.png)")
    p.add_argument("--churn", type=float, default=None,
                   help="EDM's S_churn for heun and euler (default: the model's saved churn; 0 = deterministic)")
    p.add_argument("--splits", default="test,new_test",
                   help="condition sets pooled (val: for choosing settings; needs --out)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.part.split(",") if x.strip()]
    if set(parts) - set(PARTS):
        sys.exit(f"error: --part {sorted(set(parts) - set(PARTS))} unknown; choose from {', '.join(PARTS)}.")
    limit = None
    splits = [x.strip() for x in args.splits.split(",") if x.strip()]
    if splits != ["test", "new_test"] and args.out is None:
        sys.exit("error: --splits other than test,new_test need --out (the results file is for those two).")
    if args.smoke:
        args.model = _smoke_model(args.model.parent / "smoke-agreement")
        args.seeds, args.reference, args.guidance, limit = 2, "dpm++sde:4", "1,3", 4
    out = args.out or RESULTS / f"sampler_agreement{'-smoke' if args.smoke else ''}.json"
    plot = args.plot or (RESULTS / "guidance-smoke.png" if args.smoke else HERE.parent / "docs" / "guidance.png")

    pipe, cfg, folder = load_pipeline(args.model, device=args.device)
    root = Path(cfg.data.root) if cfg.data.root else None
    net, evaluator_name = benchmark_evaluator(args.smoke, None, root, args.device, cfg.data.synthetic_scenes)
    sets = [(s, load_conditions(split=s)[:limit]) for s in splits]
    labels = {name: sum(len(c) for c in conds) for name, conds in sets}
    smoke_steps = 2 if args.smoke else None

    def pooled(sampler: str, steps: int, guidance: float, autocast: bool | None = None) -> dict:
        values, seconds = [], []
        for seed in range(args.seeds):
            r = split_accuracy(pipe, net, sets, sampler, steps, guidance, seed, args.batch_size, autocast,
                               args.churn)
            hits = sum(r["accuracy"][name] * labels[name] for name in labels)
            values.append(100 * hits / sum(labels.values()))
            seconds.append(r["seconds_per_image"])
        row = {"name": sampler, "steps": steps, "guidance": guidance,
               "churn": pipe.sampling_churn(sampler, args.churn),
               "precision": precision_label(pipe, autocast),
               "accuracy": round(statistics.mean(values), 2), "spread": round(statistics.pstdev(values), 2),
               "seeds": [round(v, 2) for v in values], "seconds_per_image": round(statistics.mean(seconds), 4)}
        print(f"{sampler}-{steps} w{guidance:g} churn {row['churn']:g} {row['precision']}: "
              f"{row['accuracy']:.1f} ± {row['spread']:.1f}",
              file=sys.stderr, flush=True)
        return row

    w = cfg.sample.guidance_scale
    got: dict = {"seeds": {}}
    offered = samplers_for(pipe.scheduler)
    if args.merge:
        rows_by_key = {}
        for path in sorted(out.parent.glob(f"{out.stem}.*.json")):  # the --part files
            part = json.loads(path.read_text())
            got["seeds"].update(part.pop("seeds"))
            rows_by_key.update({(r["name"], r.get("churn", 0.0)): r for r in part.pop("samplers", [])})
            got.update(part)
        got["samplers"] = sorted(rows_by_key.values(), key=lambda r: (offered.index(r["name"]), r.get("churn", 0.0)))
    default_steps_ = smoke_steps or default_steps(cfg.sample.sampler, cfg, pipe.scheduler)
    if "samplers" in parts and not args.merge:
        names = [s.strip() for s in args.samplers.split(",")] if args.samplers else offered
        unknown = [s for s in names if s not in offered]
        if unknown:
            sys.exit(f"error: --samplers {unknown} not offered by this model; choose from {', '.join(offered)}.")
        got["samplers"] = [pooled(s, smoke_steps or default_steps(s, cfg, pipe.scheduler), w) for s in names]
        got["seeds"]["samplers"] = args.seeds
    if "precision" in parts and not args.merge:
        other = not sampling_autocast(pipe.unet.device)  # the precision the device does not sample in by default
        got["other_precision"] = pooled(cfg.sample.sampler, default_steps_, w, autocast=other)
        got["seeds"]["precision"] = args.seeds
    if "reference" in parts and not args.merge:
        ref_name, ref_steps = args.reference.split(":")
        got["reference"] = pooled(ref_name, int(ref_steps), w)
        got["seeds"]["reference"] = args.seeds
    if "guidance" in parts and not args.merge:
        got["guidance_curve"] = [pooled(cfg.sample.sampler, default_steps_, float(g)) for g in args.guidance.split(",")]
        got["seeds"]["guidance"] = args.seeds
    if not args.merge and parts != PARTS:
        named = f"-{args.samplers.replace(',', '-')}" if args.samplers and "samplers" in parts else ""
        named += f"-churn{args.churn:g}" if args.churn is not None else ""
        stem = "-".join(parts) + named
        write_json(out.with_suffix(f".{stem}.json"), got)
        print(f"wrote {out.with_suffix(f'.{stem}.json')}", file=sys.stderr)
        return got
    # --merge of parts that were not all run: the rows missing are null, and so are the checks they decide
    rows, reference, other, curve = (got.get(k) for k in ("samplers", "reference", "other_precision",
                                                          "guidance_curve"))
    if not rows or all(r["name"] != cfg.sample.sampler for r in rows):
        sys.exit(f"error: no samplers row for the default sampler {cfg.sample.sampler}; run --part samplers first.")
    own = [r for r in rows if r["name"] == cfg.sample.sampler]  # (with --churn rows: the one at the model's churn)
    default = next((r for r in own if r.get("churn", 0.0) == pipe.sampling_churn(cfg.sample.sampler)), own[0])
    if curve and all(c["guidance"] != default["guidance"] for c in curve):  # the default row is its point there
        curve = sorted([*curve, default], key=lambda c: c["guidance"])
    # The check is over each sampler at the churn the model gives it by default; rows at another churn
    # (--churn) are shown beside them.
    at_default = [r for r in rows if r.get("churn", 0.0) == pipe.sampling_churn(r["name"])]
    best = max(r["accuracy"] for r in at_default)

    def within(row, points: float, worse_only: bool = False):
        if row is None:
            return None
        gap = default["accuracy"] - row["accuracy"]
        return (gap if worse_only else abs(gap)) <= points

    is_default = is_default_recipe(cfg)
    result = {
        "benchmark": "sampler_agreement",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(str(pipe.unet.device)),
        "model": "default" if is_default else cfg.name,  # the preset the model was trained with
        "model_dir": str(folder),
        "evaluator": evaluator_name,
        "seeds": got["seeds"] if args.merge else args.seeds,
        "accuracy": f"pooled {' + '.join(splits)} (hits / asked-for objects), percent; "
                    "spread: population SD over seeds",
        "samplers": rows,
        "reference": reference,
        "other_precision": other,
        "guidance_curve": curve,
        "checks": {
            "every sampler within 3 points of the best": all(best - r["accuracy"] <= 3 for r in at_default),
            "reference not worse than the default by more than 3 points": within(reference, 3, worse_only=True),
            "fp32 and bf16 within 3 points": within(other, 3),
        },
    }
    seeds = got["seeds"] if args.merge else {}
    if curve:
        sampler = cfg.sample.sampler + (f" churn {default['churn']:g}" if default.get("churn") else "")
        _plot(curve, plot, sampler, default["steps"], seeds.get("guidance", args.seeds),
              seeds.get("samplers", args.seeds))
        result["plot"] = str(plot)
    write_json(out, result)
    print(f"wrote {out}{f' and {plot}' if curve else ''}", file=sys.stderr)
    return result


def _plot(curve: list[dict], path: Path, sampler: str, steps: int, seeds: int, default_seeds: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4), dpi=120)
    ax = fig.add_subplot()
    xs = [r["guidance"] for r in curve]
    ax.errorbar(xs, [r["accuracy"] for r in curve], yerr=[r["spread"] for r in curve], marker="o", capsize=3)
    ax.set_xlabel("classifier-free guidance scale")
    ax.set_ylabel("accuracy, test + new_test (%)")
    ax.set_title(f"{sampler} {steps} steps, mean ± population SD over {seeds} seeds "
                 f"({default_seeds} at the default)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _smoke_model(run: Path) -> Path:
    from iclevr_diffusion.config import load_config
    from iclevr_diffusion.training.loop import train

    data, tiny = smoke_dataset(run.parent / "smoke-data")
    cfg = load_config("default", [*tiny, f"data.root={data}", "schedule.formulation=edm", "train.min_snr_gamma=null",
                                  "sample.sampler=heun", "sample.steps=2", "train.max_steps=4"])
    train(cfg, run)
    return run


if __name__ == "__main__":
    main()
