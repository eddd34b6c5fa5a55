"""Workflow for `iclevr-diff evaluate`: accuracy of a model, or of a folder of images, per condition set.

Model mode samples each condition set with the run's configured sampler/steps/guidance (flags
override) for one or more seeds; `--images DIR` scores existing PNGs 0.png ... N-1.png instead.
Every number is printed next to the name of the evaluator that produced it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.workflows.console import out as stdout
from iclevr_diffusion.workflows.console import plain_line, print_json, progress_bar, table
from iclevr_diffusion.workflows.train_evaluator import LOG_EVERY, evaluator_progress, synthetic_root


def condition_sets(splits: list[str], conditions: Path | None, default: list[str]) -> list[tuple[str, list]]:
    from iclevr_diffusion.data.iclevr import load_conditions

    sets = [(s, load_conditions(split=s)) for s in dict.fromkeys(splits)]
    if conditions is not None:
        sets.append((Path(conditions).stem, load_conditions(file=conditions)))
    if not sets:
        sets = [(s, load_conditions(split=s)) for s in default]
    return sets


def images_folder(images: Path, name: str, several: bool) -> Path:
    """DIR itself for one condition set; DIR/<split>/ when several sets are scored (or DIR has it)."""
    sub = Path(images) / name
    if several or (not (Path(images) / "0.png").exists() and (sub / "0.png").exists()):
        if not sub.is_dir():
            raise IclevrError(
                f"--images {images}: scoring several sets needs a subfolder per set ({sub} is missing); "
                "or pick one with --split test|new_test or --conditions."
            )
        return sub
    return Path(images)


def choose_evaluator(evaluator, root: Path | None, device, quiet: bool, scenes: int | None = None):
    """(network, EvaluatorChoice) as evaluator_choice.resolve_evaluator picks it, with progress bars for the
    first-use rendering of the built-in set and training of its evaluator."""
    from iclevr_diffusion.evaluator.choice import resolve_evaluator

    if evaluator is None and root is None:
        synthetic_root(quiet, scenes)  # renders the built-in set on first use, with a bar
    with evaluator_progress(quiet) as report:
        return resolve_evaluator(evaluator, root, device, train_progress=report,
                                 note=None if quiet else plain_line, synthetic_scenes=scenes or 6003)


def run(
    splits: list[str] | None = None,
    conditions: Path | None = None,
    model: Path | None = None,
    runs_dir: Path = Path("runs"),
    images: Path | None = None,
    evaluator: Path | None = None,
    data: Path | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seeds: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    out: Path | None = None,
    as_json: bool = False,
    quiet: bool = False,
    churn: float | None = None,
) -> dict:
    from iclevr_diffusion.config import Config
    from iclevr_diffusion.devices import resolve_device
    from iclevr_diffusion.evaluator.metric import load_image_folder, score_images, scored_grid
    from iclevr_diffusion.evaluator.scoring import sample_and_score
    from iclevr_diffusion.io import save_image, write_json
    from iclevr_diffusion.labels import multi_hot_batch

    dev = resolve_device(device)
    pipe = model_dir = None
    if images is not None:
        if model is not None:
            raise IclevrError("Give either --model (sample and score) or --images (score existing images), not both.")
        cfg = Config()
        out_dir = Path(out) if out is not None else Path(images)
    else:
        from iclevr_diffusion.diffusion import sampling as sampling

        pipe, cfg, model_dir = sampling.load_pipeline(model, runs_dir, device)
        from iclevr_diffusion.run_folder import RunFolder

        out_dir = Path(out) if out is not None else RunFolder.of_model(model_dir).root / "eval"
    batch = batch_size or cfg.sample.batch_size
    n_seeds = seeds or cfg.eval.seeds
    first_seed = cfg.seed if seed is None else seed
    if n_seeds < 1 or batch < 1:
        raise IclevrError("--seeds and --batch-size must be at least 1.")
    sets = condition_sets(splits or [], conditions, cfg.eval.splits)
    loaded = {}
    if pipe is None:
        if seeds is not None and seeds > 1:
            raise IclevrError("--seeds repeats sampling; with --images the images are fixed, so leave it out.")
        if churn is not None:
            raise IclevrError("--churn is a sampling setting; with --images the images are fixed, so leave it out.")
        # Read every image before choosing (perhaps training) an evaluator: a missing file fails at once.
        loaded = {name: load_image_folder(images_folder(images, name, len(sets) > 1), len(c)) for name, c in sets}
    else:
        from iclevr_diffusion.diffusion import sampling as sampling

        sampler, steps, guidance = sampling.resolve_sampling(cfg, pipe, sampler, steps, guidance_scale)
        churn = pipe.sampling_churn(sampler, churn)
    root = Path(data) if data is not None else (Path(cfg.data.root) if cfg.data.root else None)
    net, choice = choose_evaluator(evaluator or cfg.eval.evaluator, root, dev, quiet, cfg.data.synthetic_scenes)

    results = []
    for name, conds in sets:
        targets = multi_hot_batch(conds)
        accs, secs, pooled = [], [], None
        for s in range(first_seed, first_seed + (1 if pipe is None else n_seeds)):
            started = time.perf_counter()
            if pipe is None:
                imgs = loaded[name]
                score = score_images(net, imgs, targets)
            else:
                with progress_bar(f"{name} seed {s}", len(conds) * steps, quiet, log_every=LOG_EVERY) as advance:
                    done = sample_and_score(pipe, net, conds, sampler, steps, guidance, s, batch, progress=advance,
                                            churn=churn)
                imgs, score = done.images, done.score
            secs.append(time.perf_counter() - started)  # sampling + scoring
            accs.append(score.accuracy)
            pooled = score if pooled is None else _pool(pooled, score)
            grid = out_dir / (f"{name}.png" if pipe is None else f"{name}_seed{s}.png")
            save_image(scored_grid(imgs, score.per_image), grid)
        row = {
            "split": name,
            "images": len(conds),
            "labels": int(targets.sum()),
            "accuracy": statistics.fmean(accs),
            # the project's one spread convention: population standard deviation over seeds
            "accuracy_std": statistics.pstdev(accs),
            "accuracies": accs,
            "seeds": list(range(first_seed, first_seed + len(accs))) if pipe is not None else None,
            "evaluator": choice.name,
            "sampler": sampler if pipe is not None else None,
            "steps": steps if pipe is not None else None,
            "guidance_scale": guidance if pipe is not None else None,
            "churn": churn if pipe is not None else None,
            "seconds": statistics.fmean(secs),
            "source": str(images_folder(images, name, len(sets) > 1)) if pipe is None else str(model_dir),
            "grid": str(grid),
        }
        row.update({k: v for k, v in pooled.to_dict().items() if k.startswith("per_")})
        results.append(row)
    report = {"evaluator": choice.to_dict(), "results": results}
    write_json(out_dir / "evaluation.json", report)
    if as_json:
        print_json(report)
    else:
        print_tables(report)
    return report


def _pool(a, b):
    """Scores of several seeds summed into one, for per-class rates over all of them."""
    from iclevr_diffusion.evaluator.metric import Score

    per_class = {k: (a.per_class[k][0] + b.per_class[k][0], a.per_class[k][1] + b.per_class[k][1]) for k in a.per_class}
    hits, labels = a.hits + b.hits, a.labels + b.labels
    return Score(hits / labels, hits, labels, a.images + b.images, a.per_image + b.per_image, per_class)


def print_tables(report: dict) -> None:
    def acc(r):
        if len(r["accuracies"]) > 1:
            return f"{r['accuracy']:.2%} ± {r['accuracy_std']:.2%} (population SD, {len(r['accuracies'])} seeds)"
        return f"{r['accuracy']:.2%}"

    from iclevr_diffusion.evaluator.metric import ARCH_NAMES

    ev = report["evaluator"]
    arch = ARCH_NAMES.get(ev.get("arch") or "", "ResNet18")
    kind = {"own": f"own {arch}", "official": "official"}.get(ev["kind"]) or Path(ev["path"]).name
    cols = ["split", "images", "labels", "accuracy", "evaluator", "sampler", "steps", "guidance", "seconds"]
    rows = [
        [r["split"], r["images"], r["labels"], acc(r), kind, r["sampler"] or "-", r["steps"] or "-",
         "-" if r["guidance_scale"] is None else r["guidance_scale"], round(r["seconds"], 1)]
        for r in report["results"]
    ]
    stdout.print(table("Accuracy (hits in each image's top-k / all labels)", cols, rows))
    stdout.print(f"evaluator: {report['evaluator']['name']}", markup=False)
    for r in report["results"]:
        worst = sorted(r["per_class"].items(), key=lambda kv: (kv[1]["rate"], -kv[1]["total"]))[:5]
        colors = ", ".join(f"{c} {v:.0%}" for c, v in sorted(r["per_color"].items(), key=lambda kv: kv[1]))
        shapes = ", ".join(f"{c} {v:.0%}" for c, v in sorted(r["per_shape"].items(), key=lambda kv: kv[1]))
        stdout.print(
            table(
                f"{r['split']}: hit rate per class (worst 5), colour and shape",
                ["class", "hits", "asked", "rate"],
                [[k, v["hits"], v["total"], f"{v['rate']:.0%}"] for k, v in worst],
            )
        )
        stdout.print(f"  colours: {colors}\n  shapes:  {shapes}\n  grid: {r['grid']}", markup=False)

