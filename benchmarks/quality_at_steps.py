"""Quality at a number of optimizer steps (machine-independent): recipes side by side, one script run.

    python benchmarks/quality_at_steps.py                                   # the issue's table
    python benchmarks/quality_at_steps.py --splits val --seeds 2 --steps 1150 \\
        --recipes ddpm-minsnr,edm,edm-adagn --out benchmarks/results/recipe_choice.json   # choose a recipe
    python benchmarks/quality_at_steps.py --smoke                           # tiny model and data, seconds

Each recipe is the `default` preset with a few overrides (RECIPES below; "default" is the preset as
shipped). For every step count it trains its own run of exactly that many optimizer steps (batch 16
unless the recipe says otherwise)
on the built-in synthetic data (train.max_steps, no time budget, so the learning rate anneals at that
step as it would in a run of that length; runs/quality-at-steps/<recipe>-<steps>/, resumed if there),
then samples every condition of each split with the recipe's own sampler, steps and guidance for
--seeds seeds and scores them with the toolkit's evaluator (the one `iclevr-diff evaluate` picks).
Spread is the population standard deviation over seeds, as everywhere in BENCHMARKS.md.

Steps are the machine-independent measure: 1,150 / 5,200 / 22,700 steps are what the 14-minute main
job does on the slow (AVX2) CPU, on the fast (AVX-512 bf16) one, and 60 minutes on the fast one.
Wall-clock figures of the machine it ran on are recorded beside them. Choose recipes on `val` (our
validation conditions, none in test/new_test); report test and new_test.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import machine_info
from scoring import benchmark_evaluator, is_default_recipe, smoke_dataset, split_accuracy

from iclevr_diffusion.config import load_config
from iclevr_diffusion.data.iclevr import load_conditions
from iclevr_diffusion.diffusion.sampling import load_pipeline
from iclevr_diffusion.io import write_json
from iclevr_diffusion.run_folder import RunFolder
from iclevr_diffusion.training.loop import train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

_DDPM = ["schedule.formulation=ddpm", "train.min_snr_gamma=5.0", "sample.sampler=ddim", "sample.steps=25",
         "sample.guidance_scale=3.0"]
_EDM = ["schedule.formulation=edm", "train.min_snr_gamma=null", "sample.sampler=heun", "sample.steps=18",
        "sample.guidance_scale=3.0", "schedule.p_mean=-1.2", "schedule.p_std=1.2"]  # EDM's own noise levels
# The default before its noise levels moved to N(-0.6, 0.9^2): the "default-..." recipes below vary it.
_BEFORE = [*_EDM, "model.time_scale_shift=scale_shift", "train.lr=0.002"]
_NOISE06 = [*_BEFORE, "schedule.p_mean=-0.6", "schedule.p_std=0.9"]  # the default since then
RECIPES: dict[str, list[str]] = {
    "default": [],  # the shipped preset, whatever it is
    # the default until this change: epsilon DDPM, min-SNR 5, lr 1e-3, DDIM 25
    "ddpm-minsnr": [*_DDPM, "model.time_scale_shift=default", "train.lr=0.001"],
    "edm": [*_EDM, "model.time_scale_shift=default", "train.lr=0.001"],
    "edm-adagn": [*_EDM, "model.time_scale_shift=scale_shift", "train.lr=0.001"],
    "edm-adagn-lr2e-3": _BEFORE,  # the default before this release's noise levels
    "edm-adagn-lr4e-3": [*_BEFORE, "train.lr=0.004"],
    "edm-adagn-lr2e-3-p08": [*_BEFORE, "schedule.p_mean=-0.8", "schedule.p_std=1.6"],
    # capacity on the default recipe: a second resnet layer per level (1.7x the time per step), or
    # 1.5x the width (1.9x the time per step)
    "default-lpb2": [*_BEFORE, "model.layers_per_block=2"],
    # the same 18,400 training images as 1,150 steps of batch 16, in larger or smaller batches
    "default-b32": [*_BEFORE, "train.batch_size=32"],
    "default-b8": [*_BEFORE, "train.batch_size=8"],
    # cross-attention to one token per class (model.py): at 8x8 (1.2x the time per step), or at 16x16 and
    # 8x8 (1.7x)
    "default-xattn8": [*_BEFORE, "model.cross_attention=[false,false,true]"],
    "default-xattn16": [*_BEFORE, "model.cross_attention=[false,true,true]"],
    # AdamW's second-moment decay 0.99 (EDM2's) instead of 0.999: a shorter memory of early gradients
    "default-beta099": [*_BEFORE, "train.adam_beta2=0.99"],
    # training noise levels centred lower: EDM's P_mean -1.2 assumes sigma_data 0.5, ours is about 0.2;
    # -2.1 = -1.2 + ln(0.2 / 0.5)
    "default-pm21": [*_BEFORE, "schedule.p_mean=-2.1"],
    # ... and centred higher
    "default-pm06": [*_BEFORE, "schedule.p_mean=-0.6"],
    "default-pm0": [*_BEFORE, "schedule.p_mean=0.0"],
    "default-pm06-s09": _NOISE06,  # the default since this change
    "default-pm06-s06": [*_BEFORE, "schedule.p_mean=-0.6", "schedule.p_std=0.6"],
    # 4x4 pixel patches and twice the channels: the UNet runs at 16x16, about the same time per step
    "default-p4w": [*_BEFORE, "model.patch_size=4", "model.block_out_channels=[64,128,256]"],
    # self-conditioning (model.py): the network also sees its previous clean estimate
    "default-selfcond": [*_BEFORE, "model.self_condition=true"],
    "default-w48": [*_BEFORE, "model.block_out_channels=[48,96,192]", "model.norm_num_groups=16",
                    "model.attention_head_dim=48"],
    # Probes on the default since the noise levels moved (pinned, so they keep training what they measured):
    # no pixel patches, the UNet at 64x64 (3.3x the time per step), for shapes decided at a few pixels
    "noise06-p1": [*_NOISE06, "model.patch_size=1"],
    # ... or with a cheap 16-channel level at 64x64 in front of the default's three (1.5x)
    "noise06-p1-16": [*_NOISE06, "model.patch_size=1", "model.block_out_channels=[16,32,64,128]",
                      "model.attention=[false,false,false,true]", "model.norm_num_groups=8"],
    # self-attention at 16x16 as well as 8x8 (1.4x)
    "noise06-attn16": [*_NOISE06, "model.attention=[false,true,true]"],
    # random horizontal flips of the training images (labels name no left or right)
    "noise06-hflip": [*_NOISE06, "data.hflip=true"],
    # the same recipe from another training seed (init, data order, noise): the spread between runs
    "noise06-seed1": [*_NOISE06, "seed=1"],
    # a share of the training noise levels uniform in ln(sigma) over the sampler's range: the lowest
    # levels, where the last sampling steps remove the grain, get training the log-normal gives them not
    "noise06-uniform02": [*_NOISE06, "schedule.p_uniform=0.2"],
    # a 32-channel residual conv head at full resolution after the 2x2 patches unfold (model.patch_head)
    "noise06-head32": [*_NOISE06, "model.patch_head=32"],
    # the unpatched UNet from another training seed: is its per-step gain more than a second run's spread?
    "noise06-p1-seed1": [*_NOISE06, "model.patch_size=1", "seed=1"],
    # fp32 training instead of the bf16 autocast "auto" picks on a bf16 CPU: does bf16 cost learning per step?
    "noise06-fp32": [*_NOISE06, "train.mixed_precision=no"],
    # 2x2 patches in and out by a strided 4x4 convolution and its transpose instead of folding: each
    # pixel is drawn from the four UNet positions around it, not one (against the patches' grain)
    "noise06-overlap": [*_NOISE06, "model.patch_embed=overlap"],
    # the loss weighted per pixel by how far it stands out of the floor (train.foreground_weight)
    "noise06-fg3": [*_NOISE06, "train.foreground_weight=3"],
    # a 1.5x higher peak learning rate (2e-3 was chosen on EDM's noise levels, before they moved)
    "noise06-lr3e-3": [*_NOISE06, "train.lr=0.003"],
    # the default trained once with three more averages beside its own EMA, over the last 5%, 25% and 50%
    # of the steps (benchmarks/ema_lengths.py scores them)
    "noise06-emas": [*_NOISE06, "train.extra_ema_lengths=[0.05,0.25,0.5]"],
    # rectified flow (diffusion/flow.py) in place of EDM, everything else the default's: on the raw pixels
    # (sigma_data 1) at the default's noise levels; on pixels scaled to unit variance (sigma_data measured,
    # as SD3 scales its latents) at the default's noise levels, and at SD3's logit-normal(0, 1) for t, which
    # is ln(sigma) ~ N(ln(sigma_data), 1) with the built-in set's sigma_data 0.197
    "flow": [*_NOISE06, "schedule.formulation=flow", "schedule.sigma_data=1.0"],
    "flow-scaled": [*_NOISE06, "schedule.formulation=flow"],
    "flow-scaled-sd3": [*_NOISE06, "schedule.formulation=flow", "schedule.p_mean=-1.62", "schedule.p_std=1.0"],
    # the spread between training runs: two more seeds of rectified flow, a third of the EDM default
    "flow-scaled-seed1": [*_NOISE06, "schedule.formulation=flow", "seed=1"],
    "flow-scaled-seed2": [*_NOISE06, "schedule.formulation=flow", "seed=2"],
    "flow-midnorm": [*_NOISE06, "schedule.formulation=flow", "model.mid_attention_norm=true"],
    "flow-midnorm-seed1": [*_NOISE06, "schedule.formulation=flow", "model.mid_attention_norm=true", "seed=1"],
    "flow-midnorm-seed2": [*_NOISE06, "schedule.formulation=flow", "model.mid_attention_norm=true", "seed=2"],
    "noise06-seed2": [*_NOISE06, "seed=2"],
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="ddpm-minsnr,default", help=f"comma-separated, of: {', '.join(RECIPES)}")
    p.add_argument("--steps", default="1150,5200", help="optimizer steps per run (each its own run)")
    p.add_argument("--splits", default="test,new_test", help="test, new_test and/or val")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--runs", type=Path, default=Path("runs/quality-at-steps"), help="where the runs go")
    p.add_argument("--set", action="append", default=[], help="extra section.key=value for every recipe")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64, help="sampling batch")
    p.add_argument("--train-only", action="store_true", help="train the runs, score nothing (score in a later call)")
    p.add_argument("--smoke", action="store_true", help="tiny model and data, random evaluator: seconds")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = p.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        sys.exit(f"error: unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}.")
    steps_list = [int(s) for s in args.steps.split(",") if s.strip()]
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    base, limit = [], None  # overrides under the recipe's (--set goes over both)
    if args.smoke:
        data, tiny = smoke_dataset(args.runs.parent / "smoke-data")
        base = [*tiny, f"data.root={data}"]
        steps_list, args.seeds, limit = [2, 4], 2, 4
    out = args.out or RESULTS / f"quality_at_steps{'-smoke' if args.smoke else ''}.json"

    net, evaluator_name, rows, trained, earlier_calls = None, None, [], [], []
    if out.is_file() and not args.smoke:  # rows an earlier call scored with the same seeds are kept, not redone
        import json

        earlier = json.loads(out.read_text())
        if earlier.get("seeds") == args.seeds:
            rows, trained = earlier.get("rows", []), earlier.get("trained", [])
            # the file's machine block is the latest call's: keep every earlier call's (command, commit, CPU)
            earlier_calls = [*earlier.get("earlier_calls", []), earlier["machine"]]
    for recipe in recipes:
        for steps in steps_list:
            overrides = [*base, *RECIPES[recipe], *args.set, f"train.max_steps={steps}", "train.max_minutes=null",
                         f"name={recipe}-{steps}"]
            if args.smoke:  # the tiny model samples with few steps
                overrides.append("sample.steps=2")
            cfg = load_config("default", overrides)
            if args.device != "auto":
                cfg.device = args.device
            run = args.runs / f"{recipe}-{steps}"
            result = train(cfg, run)
            trained = [t for t in trained if (t["recipe"], t["steps"]) != (recipe, result.step)]
            trained.append({"recipe": recipe, "steps": result.step, "elapsed_s": round(result.elapsed_s, 1),
                            "images_per_s_overall": round(result.step * cfg.train.batch_size / result.elapsed_s, 1),
                            "images_per_s_last": _last_logged(run, "images_per_s"),
                            "mixed_precision": result.mixed_precision, "run": str(run), "overrides": RECIPES[recipe],
                            "cpu": machine_info.cpu_model(), "cpu_flags": machine_info.cpu_flags()})
            print(f"trained {recipe} {steps} steps in {result.elapsed_s:.0f} s", file=sys.stderr, flush=True)
            if args.train_only:
                continue
            if net is None:
                root = Path(cfg.data.root) if cfg.data.root else None
                net, evaluator_name = benchmark_evaluator(args.smoke, None, root, args.device,
                                                          cfg.data.synthetic_scenes)
            pipe, run_cfg, _ = load_pipeline(run, device=args.device)
            s = run_cfg.sample
            done = {r["split"] for r in rows
                    if (r.get("recipe_name", r["recipe"]), r["steps"]) == (recipe, result.step)}
            sets = [(name, load_conditions(split=name)[:limit]) for name in splits if name not in done]
            if not sets:
                continue
            per_seed = [split_accuracy(pipe, net, sets, s.sampler, s.steps, s.guidance_scale, seed, args.batch_size)
                        for seed in range(args.seeds)]
            for name, conds in sets:
                values = [100 * r["accuracy"][name] for r in per_seed]
                rows.append({"recipe": recipe, "steps": result.step, "split": name, "conditions": len(conds),
                             "mean": round(statistics.mean(values), 2), "spread": round(statistics.pstdev(values), 2),
                             "seeds": [round(v, 2) for v in values], "sampler": s.sampler, "sampler_steps": s.steps,
                             "guidance": s.guidance_scale, "churn": pipe.sampling_churn(s.sampler),
                             "cpu": machine_info.cpu_model()})
                print(f"{recipe} {steps}: {name} {rows[-1]['mean']:.1f} ± {rows[-1]['spread']:.1f}",
                      file=sys.stderr, flush=True)
            write_json(out, _result(args, recipes, steps_list, splits, evaluator_name, trained, rows, pipe,
                                    earlier_calls))
    if args.train_only:
        return {"trained": trained}
    result = _result(args, recipes, steps_list, splits, evaluator_name, trained, rows, pipe, earlier_calls)
    print_table(result)
    write_json(out, result)
    print(f"wrote {out}", file=sys.stderr)
    return result


def _last_logged(run: Path, key: str):
    """The last metrics.jsonl value of `key` (a finished run that is only reused reports no speed itself)."""
    import json

    lines = RunFolder(run).metrics.read_text().splitlines()
    value = json.loads(lines[-1]).get(key) if lines else None
    return round(value, 1) if isinstance(value, (int, float)) else None


def is_shipped_default(recipe: str) -> bool:
    """Whether a recipe trains exactly what the shipped `default` preset does (then its rows say "default")."""
    return is_default_recipe(load_config("default", RECIPES[recipe]))


def _batch_size(recipes) -> int | None:
    """The recipes' batch size (16 unless a recipe sets train.batch_size); None when they differ."""
    sizes = {load_config("default", RECIPES[r]).train.batch_size for r in recipes}
    return sizes.pop() if len(sizes) == 1 else None


def _result(args, recipes, steps_list, splits, evaluator_name, trained, rows, pipe, earlier_calls) -> dict:
    for row in rows:  # label by what the recipe is today: the shipped default or not
        row["recipe_name"] = row.get("recipe_name", row["recipe"])
        row["recipe"] = "default" if is_shipped_default(row["recipe_name"]) else row["recipe_name"]
    return {
        "benchmark": "quality_at_steps",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info.machine(str(pipe.unet.device)),
        "earlier_calls": earlier_calls,  # rows and runs that an earlier call added (their own "cpu" when recorded)
        "recipes": {r: RECIPES[r] for r in dict.fromkeys([*(t["recipe"] for t in trained), *recipes])},
        "steps": sorted({t["steps"] for t in trained} | set(steps_list)),
        "batch_size": _batch_size(recipes),
        "splits": list(dict.fromkeys([*(r["split"] for r in rows), *splits])),
        "seeds": args.seeds,
        "spread": "population standard deviation over seeds, percentage points",
        "evaluator": evaluator_name,
        "trained": trained,
        "rows": rows,
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"quality at steps ({result['seeds']} seeds, mean ± population SD, {result['evaluator']})")
    for col in ("recipe", "steps", *result["splits"]):
        t.add_column(col, justify="right")
    keys = dict.fromkeys((r["recipe"], r["steps"]) for r in result["rows"])
    for recipe, steps in keys:
        cells = []
        for split in result["splits"]:
            row = next((r for r in result["rows"] if (r["recipe"], r["steps"], r["split"]) == (recipe, steps, split)),
                       None)
            cells.append(f"{row['mean']:.1f}% ± {row['spread']:.1f}" if row else "-")
        t.add_row(recipe, f"{steps:,}", *cells)
    Console(width=120).print(t)


if __name__ == "__main__":
    main()
