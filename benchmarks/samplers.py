"""Sampler accuracy and speed: the report's ddpm-1000 against DDIM, DPM-Solver++ and UniPC.

    python benchmarks/samplers.py --model runs/default        # the full sweep (CPU: an hour or more)
    python benchmarks/samplers.py --smoke                      # tiny model built on the fly, seconds

For one trained model: every sampler x steps (10, 25, 50) x guidance scale (1, 2, 3, 5) samples the
test and new_test conditions and is scored by the evaluator (the one `iclevr-diff evaluate` picks);
the reference, ddpm with all T steps, runs at the model's configured guidance (more with
--reference-guidance: each costs T forwards per image). Wall time counts sampling only, measured in
this one process, run after run, so speed-ups are ratios taken side by side. One extra row repeats
the default sampler in fp32 to show what the bf16 autocast default costs or saves.

Writes benchmarks/results/samplers.json (with the machine) and docs/samplers.png (accuracy against
steps, one panel per guidance scale, the reference dashed). Target: a sampler at <= 25 steps within
1 point of ddpm-1000's accuracy. Note: with 32 + 32 conditions (156 labels) one label is 0.64
points, so use --seeds 3 or more before calling a 1-point difference real.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from machine_info import machine
from scoring import benchmark_evaluator, precision_label

from iclevr_diffusion.data.iclevr import load_conditions
from iclevr_diffusion.diffusion.sampling import generate, load_pipeline
from iclevr_diffusion.evaluator.scoring import sample_and_score
from iclevr_diffusion.io import atomic_path, write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOCS = HERE.parent / "docs"


def parse_list(text: str, kind=float) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def setup(args):
    """(pipe, run config, model label, evaluator network, evaluator name)."""
    if args.smoke:
        from iclevr_diffusion.testing import tiny_config, tiny_pipeline

        cfg = tiny_config(num_train_timesteps=20)
        pipe = tiny_pipeline(cfg, train_steps=10)
        net, name = benchmark_evaluator(True)
        return pipe, cfg, "tiny (smoke)", net, name
    pipe, cfg, folder = load_pipeline(args.model, Path("runs"), args.device)
    root = Path(args.data) if args.data else (Path(cfg.data.root) if cfg.data.root else None)
    net, name = benchmark_evaluator(False, args.evaluator, root, args.device, cfg.data.synthetic_scenes)
    return pipe, cfg, str(folder), net, name


def run_one(pipe, sets, sampler, steps, guidance, seeds, batch_size, net, autocast=None) -> dict:
    """Sample every condition set with every seed; pooled accuracy, per-set accuracy, seconds/image."""
    hits = labels = images = 0
    seconds = 0.0
    per_set: dict[str, list[int]] = {}
    for seed in seeds:
        for name, conds in sets:
            done = sample_and_score(pipe, net, conds, sampler, steps, guidance, seed, batch_size, autocast=autocast)
            seconds += done.sampling_s
            score = done.score
            hits, labels, images = hits + score.hits, labels + score.labels, images + len(conds)
            h, n = per_set.get(name, [0, 0])
            per_set[name] = [h + score.hits, n + score.labels]
    return {
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": guidance,
        "precision": precision_label(pipe, autocast),
        "accuracy": hits / labels,
        "per_set": {k: h / n for k, (h, n) in per_set.items()},
        "images": images,
        "seconds_per_image": seconds / images,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="run folder or exported model (default: the newest run under runs/)")
    p.add_argument("--smoke", action="store_true", help="tiny model, random evaluator: checks the script in seconds")
    p.add_argument("--splits", default="test,new_test")
    p.add_argument("--limit", type=int, default=None, help="use only the first N conditions of each split")
    p.add_argument("--samplers", default="ddim,dpm++,unipc")
    p.add_argument("--steps", default="10,25,50")
    p.add_argument("--guidance", default="1,2,3,5")
    p.add_argument("--reference-steps", type=int, default=None, help="ddpm reference steps (default: T)")
    p.add_argument(
        "--reference-guidance", default=None, help="guidance scales for the reference (default: the model's)"
    )
    p.add_argument("--seeds", type=int, default=1, help="repeat every row with seeds 0..N-1 and pool the hits")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--evaluator", default=None, help="evaluator checkpoint (default: as `iclevr-diff evaluate`)")
    p.add_argument("--data", default=None, help="dataset root whose evaluator to use (default: the model's)")
    p.add_argument("--json", default=None, help="output JSON (default: benchmarks/results/samplers[-smoke].json)")
    p.add_argument("--plot", default=None, help="output PNG (default: docs/samplers.png; smoke: results/)")
    args = p.parse_args(argv)
    if args.smoke:
        args.limit = args.limit or 8
        args.steps, args.guidance = "2,4", "1,2"
    suffix = "-smoke" if args.smoke else ""
    json_path = Path(args.json) if args.json else RESULTS / f"samplers{suffix}.json"
    default_plot = RESULTS / "samplers-smoke.png" if args.smoke else DOCS / "samplers.png"
    plot_path = Path(args.plot) if args.plot else default_plot

    pipe, cfg, model_name, net, evaluator_name = setup(args)
    sets = [(s, load_conditions(split=s)[: args.limit]) for s in parse_list(args.splits, str)]
    seeds = list(range(args.seeds))
    T = int(pipe.scheduler.config.num_train_timesteps)
    ref_steps = args.reference_steps or T
    default_w = cfg.sample.guidance_scale
    ref_ws = parse_list(args.reference_guidance) if args.reference_guidance else [default_w]
    plan = [("ddpm", ref_steps, w, None) for w in ref_ws]
    plan += [
        (s, n, w, None)
        for w in parse_list(args.guidance)
        for s in parse_list(args.samplers, str)
        for n in parse_list(args.steps, int)
    ]
    # The autocast default, checked on the real model: the configured sampler again in fp32.
    plan.append((cfg.sample.sampler, cfg.sample.steps, default_w, False))

    # Warm-up (oneDNN picks kernels on first use in each precision) so the first timed row is not penalised.
    for autocast in (None, False):
        generate(pipe, sets[0][1][:2], "ddim", 2, 2.0, 0, args.batch_size, autocast=autocast)
    rows = []
    for i, (sampler, steps, w, autocast) in enumerate(plan, 1):
        row = run_one(pipe, sets, sampler, steps, w, seeds, args.batch_size, net, autocast)
        rows.append(row)
        print(
            f"[{i}/{len(plan)}] {sampler}-{steps} w={w:g} {row['precision']}: accuracy {row['accuracy']:.3f}, "
            f"{row['seconds_per_image']:.3f} s/image",
            file=sys.stderr,
            flush=True,
        )

    refs = {r["guidance_scale"]: r for r in rows[: len(ref_ws)]}
    for r in rows:
        ref = refs.get(r["guidance_scale"], refs[default_w] if default_w in refs else rows[0])
        r["reference_guidance"] = ref["guidance_scale"]
        r["delta_vs_reference"] = r["accuracy"] - ref["accuracy"]
        r["speedup_vs_reference"] = ref["seconds_per_image"] / r["seconds_per_image"]
    fast = [r for r in rows[len(ref_ws) :] if r["steps"] <= 25 and r["precision"] == rows[0]["precision"]]
    within = [r for r in fast if r["delta_vs_reference"] >= -0.01]
    best = max(fast, key=lambda r: (r["accuracy"], -r["seconds_per_image"])) if fast else None
    fastest = min(within, key=lambda r: r["seconds_per_image"]) if within else None
    result = {
        "benchmark": "samplers",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(str(pipe.unet.device)),
        "model": model_name,
        "evaluator": evaluator_name,
        "splits": {name: len(conds) for name, conds in sets},
        "seeds": len(seeds),
        "num_train_timesteps": T,
        "rows": rows,
        "target": {
            "rule": "a sampler at <= 25 steps within 1 point of the ddpm reference",
            "met": bool(within),
            "best": summary(best) if best else None,  # most accurate at <= 25 steps
            "fastest_within": summary(fastest) if fastest else None,  # fastest that meets the rule
        },
    }
    print_table(result)
    write_json(json_path, result)
    plot(result, plot_path)
    print(f"wrote {json_path} and {plot_path}", file=sys.stderr)
    return result


def summary(row: dict) -> dict:
    keys = ("sampler", "steps", "guidance_scale", "accuracy", "delta_vs_reference", "speedup_vs_reference")
    return {k: row[k] for k in keys}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(result["splits"])
    t = Table(title=f"samplers on {result['model']} ({result['evaluator']}, seeds {result['seeds']})")
    for col in ["sampler", "steps", "w", "prec", "accuracy", *names, "vs ref", "s/image", "speed-up"]:
        t.add_column(col, justify="right")
    for r in result["rows"]:
        t.add_row(
            r["sampler"],
            str(r["steps"]),
            f"{r['guidance_scale']:g}",
            r["precision"],
            f"{r['accuracy']:.1%}",
            *[f"{r['per_set'][n]:.1%}" for n in names],
            f"{100 * r['delta_vs_reference']:+.1f}",
            f"{r['seconds_per_image']:.3f}",
            f"{r['speedup_vs_reference']:.1f}x",
        )
    Console(width=max(Console().width, 130)).print(t)
    target = result["target"]
    for label, b in (("most accurate", target["best"]), ("fastest within 1 point", target["fastest_within"])):
        if b is not None:
            Console().print(
                f"{label} at <= 25 steps: {b['sampler']}-{b['steps']} w={b['guidance_scale']:g} "
                f"({100 * b['delta_vs_reference']:+.1f} points vs ddpm, {b['speedup_vs_reference']:.0f}x faster)"
            )
    Console().print(f"target {'met' if target['met'] else 'NOT met'}: {target['rule']}")


def plot(result: dict, path: Path) -> None:
    """Accuracy against steps per sampler, one panel per guidance scale; the ddpm reference dashed."""
    from matplotlib.figure import Figure  # not pyplot: no process-wide backend switch

    rows = result["rows"]
    refs = [r for r in rows if r["sampler"] == "ddpm" and r["precision"] == rows[0]["precision"]]
    fast = [r for r in rows if r not in refs and r["precision"] == rows[0]["precision"]]
    scales = sorted({r["guidance_scale"] for r in fast})
    fig = Figure(figsize=(3.6 * len(scales), 3.4))
    axes = fig.subplots(1, len(scales), sharey=True, squeeze=False)
    for ax, w in zip(axes[0], scales, strict=True):
        for name in dict.fromkeys(r["sampler"] for r in fast):
            pts = sorted((r["steps"], r["accuracy"]) for r in fast if r["sampler"] == name and r["guidance_scale"] == w)
            ax.plot([s for s, _ in pts], [100 * a for _, a in pts], marker="o", label=name)
        ref = next((r for r in refs if r["guidance_scale"] == w), None)
        if ref is not None:
            ax.axhline(100 * ref["accuracy"], color="k", ls="--", lw=1, label=f"ddpm-{ref['steps']}")
        elif refs:  # no reference at this scale: show the one at the model's scale, fainter
            ref = refs[0]
            ax.axhline(
                100 * ref["accuracy"],
                color="gray",
                ls=":",
                lw=1,
                label=f"ddpm-{ref['steps']} (w={ref['guidance_scale']:g})",
            )
        ax.set_title(f"guidance {w:g}")
        ax.set_xscale("log")
        ticks = sorted({r["steps"] for r in fast})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize=7)
        ax.set_xlabel("steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    fig.suptitle(f"Sampler accuracy vs steps ({result['evaluator']})", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


if __name__ == "__main__":
    main()
