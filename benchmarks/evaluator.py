"""The toolkit's own evaluators of the built-in synthetic set: first-use cost, held-out accuracy, agreement.

    python benchmarks/evaluator.py --model runs/RUN   # the first `evaluate`'s evaluator cost on the built-in
                                                      # set (installing the shipped small CNN, timed), the
                                                      # ResNet18 it replaces (reused from
                                                      # benchmarks/work/evaluator/resnet18 when there, else
                                                      # trained: ~20 min on 2 cores); both score 64 images
                                                      # RUN generates (test + new_test)
    python benchmarks/evaluator.py --train-small --ship   # retrain the small CNN (the toolkit's defaults) and
                                                      # ship it as package data (data/files/evaluator/)
    python benchmarks/evaluator.py --resnet18 PATH    # take that ResNet18 checkpoint (and its card)
    python benchmarks/evaluator.py --speed            # training images/s of both: fp32 / bf16 / channels_last
    python benchmarks/evaluator.py --smoke            # a tiny rendered set, 1 epoch each: seconds

First use = what `iclevr-diff evaluate` does on the built-in data when no evaluator is cached. Today
that is installing the small CNN shipped with the toolkit (evaluator_shipped.py: score the held-out
images with it, copy it into the cache), timed here on a fresh mirror of the built-in set; with
--train-small (and in --smoke) it is training one with the defaults, as for data the shipped one does
not fit. Its cost is reported as wall seconds (`first_use_s`, with the `cpu`) and as compute
(`first_use_gflop`: FlopCounterMode FLOPs of forward+backward per training image x images seen, plus
the held-out forward passes). The one-time training of the shipped network is reported beside it.
Accuracy is the course's metric (top-k hits / all labels, `heldout_accuracy` in percent) on the
renderer's heldout.json, images never trained on; the target is >= 99%. On generated images both
evaluators should agree within 3 points. The speed rows run one after the other in rounds
(A B C D A B C D ...) and report the best round and the median, because the machine may be shared.
Writes benchmarks/results/evaluator.json (evaluator-smoke.json for --smoke) with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import machine  # noqa: E402

from iclevr_diffusion.evaluator.metric import (  # noqa: E402
    ARCHS,
    RESNET18,
    SMALL_CNN,
    build_evaluator,
    load_evaluator,
    read_card,
    score_images,
)
from iclevr_diffusion.evaluator.training import (  # noqa: E402
    HELDOUT_FILE,
    load_labelled,
    pixels_to_float,
    train_evaluator,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / "work" / "evaluator"  # trained checkpoints (git-ignored)
AGREEMENT_POINTS = 3.0  # the two evaluators' accuracies on the same generated images: at most this far apart


def speed(batch: int, steps: int, rounds: int, archs=ARCHS) -> list[dict]:
    """Training images/s of each architecture x precision/layout variant, interleaved in rounds."""
    variants = [("fp32", False, False), ("bf16 autocast", True, False),
                ("fp32 channels_last", False, True), ("bf16 channels_last", True, True)]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 64, 64, generator=gen) * 2 - 1
    y = (torch.rand(batch, 24, generator=gen) < 0.08).float()
    setups = []
    for arch in archs:
        for name, bf16, cl in variants:
            torch.manual_seed(0)
            model = build_evaluator(arch)
            model.fc[1] = nn.Identity()
            if cl:
                model = model.to(memory_format=torch.channels_last)
            setups.append((f"{arch} {name}", bf16, cl, model, torch.optim.AdamW(model.parameters(), 1e-3)))
    times: dict[str, list[float]] = {name: [] for name, *_ in setups}
    for r in range(rounds + 1):  # round 0 is warm-up
        for name, bf16, cl, model, opt in setups:
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            start = time.perf_counter()
            for _ in range(steps):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = nn.functional.binary_cross_entropy_with_logits(model(xx).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if r:
                times[name].append(steps * batch / (time.perf_counter() - start))
    # Best round = least disturbed by other work on a shared machine (as timeit takes the minimum).
    return [{"variant": n, "images_per_s": max(v), "median": statistics.median(v), "rounds": v}
            for n, v in times.items()]


def rescore(root: Path, checkpoint: Path) -> dict:
    """Load the saved checkpoint as `evaluate` would and score the held-out images again.

    Also at lower resolutions (downscaled with antialiasing, upscaled back by the evaluator's own
    resize): what a generator that works at 48x48 or 32x32 and upscales could score at best.
    """
    _, pics, targets = load_labelled(root, HELDOUT_FILE)
    net = load_evaluator(checkpoint)
    images = pixels_to_float(pics)
    start = time.perf_counter()
    score = score_images(net, images, targets)
    seconds = round(time.perf_counter() - start, 2)
    upscaled = {}
    for size in (48, 32):
        small = nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        upscaled[str(size)] = score_images(net, small, targets).accuracy
    return {**score.to_dict(), "score_seconds": seconds, "accuracy_from_smaller_images": upscaled}


def progress_printer(arch: str):
    """Plain progress lines: each epoch, and every 30 s within one."""
    last = [time.perf_counter()]

    def progress(stage, done, total, **info):
        if stage == "epoch done":
            print(f"  [{arch}] epoch {done}/{total}: loss {info['loss']:.4f}, held-out {info['heldout_accuracy']:.2%}, "
                  f"{info['images_per_s']:.0f} images/s, {info['seconds']:.0f} s so far, "
                  f"~{info['eta_s']:.0f} s left", flush=True)
        elif stage == "precision":
            print(f"  [{arch}] fp32 {info['fp32_images_per_s']:.0f} images/s, bf16 {info['bf16_images_per_s']:.0f} "
                  f"images/s -> {info['choice']}", flush=True)
        elif stage == "training":
            if time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                print(f"  [{arch}] epoch {info['epoch']}/{info['epochs']} step {done}/{total} loss {info['loss']:.4f} "
                      f"{info['images_per_s']:.0f} images/s ~{info['eta_s']:.0f} s left", flush=True)
        else:
            print(f"  [{arch}] {stage}", flush=True)

    return progress


def summary(card: dict, heldout: dict, trained_now: bool) -> dict:
    """The side-by-side figures of one evaluator (first-use cost, accuracy) and its details."""
    return {
        "arch": card.get("arch", RESNET18),
        "first_use": "installing the shipped network" if card.get("source") == "shipped" else "training",
        "first_use_s": card.get("seconds"),
        "first_use_gflop": card.get("gflop_total"),
        "heldout_accuracy": round(100 * heldout["accuracy"], 2),  # percent
        "cpu": card.get("cpu", "unknown (card written before cards named the CPU)"),
        "threads": card.get("threads"),
        "trained_in_this_run": trained_now,
        "parameters": card.get("parameters"),
        "gflop_per_image": card.get("gflop_per_image"),
        "train_gflop_per_image": card.get("train_gflop_per_image"),
        "epochs": card.get("epochs"),
        "batch_size": card.get("batch_size"),
        "lr": card.get("lr"),
        "images": card.get("images"),
        "precision": card.get("precision"),
        "precision_timing": card.get("precision_timing"),
        "images_per_s": card.get("images_per_s"),
        "checkpoint": card.get("checkpoint"),
        "training_once": card.get("training_once"),  # the shipped network's one-time training
        "card": card,
        "heldout": heldout,
    }


def install_shipped_fresh(root: Path) -> tuple[dict, bool]:
    """(card, True): the first `evaluate`'s evaluator step on a mirror of ROOT with no evaluator cached
    (its label files copied, its images linked), timed (as ensure_evaluator installs it); the one-time
    training of the shipped network is kept in the card as `training_once`."""
    import shutil

    from iclevr_diffusion.evaluator.metric import flops_per_image
    from iclevr_diffusion.evaluator.shipped import install_shipped, shipped_evaluator

    with tempfile.TemporaryDirectory() as tmp:
        mirror = Path(tmp) / root.name
        mirror.mkdir()
        for f in root.glob("*.json"):
            shutil.copyfile(f, mirror / f.name)
        (mirror / "iclevr").symlink_to((root / "iclevr").resolve())
        start = time.perf_counter()
        card = install_shipped(mirror, progress=progress_printer(SMALL_CNN))
        seconds = time.perf_counter() - start
    if card is None:
        sys.exit("error: the shipped evaluator does not fit this data or scores below the bar (evaluator_shipped.py)")
    checkpoint, packaged = shipped_evaluator()
    held = card["heldout_images"]
    return {**card, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
            "gflop_total": round(flops_per_image(SMALL_CNN) * held / 1e9, 1),  # one forward per held-out image
            "cpu": machine()["cpu"], "checkpoint": str(checkpoint),
            "training_once": {k: packaged.get(k) for k in ("seconds", "gflop_total", "epochs", "cpu", "threads",
                                                           "precision", "date")}}, True


def ship(card: dict) -> None:
    """Copy a trained small CNN and its card into the package data (what install_shipped uses)."""
    import shutil

    from iclevr_diffusion.evaluator.shipped import SHIPPED_CARD, SHIPPED_CHECKPOINT
    from iclevr_diffusion.labels import packaged_file

    target = Path(str(packaged_file(SHIPPED_CHECKPOINT)))
    shutil.copyfile(card["checkpoint"], target)
    shipped = {k: v for k, v in card.items() if k not in ("root", "checkpoint")}
    shipped["shipped"] = ("trained once with `iclevr-diff train-evaluator` (the defaults) on the built-in synthetic "
                          "set and shipped with the toolkit; used only for data with this fingerprint, after scoring "
                          "the held-out images there")
    Path(str(packaged_file(SHIPPED_CARD))).write_text(json.dumps(shipped, indent=2) + "\n")
    print(f"shipped {card['checkpoint']} as {target}")


def get_evaluator(arch: str, root: Path, out: Path, retrain: bool, given: Path | None, smoke: bool,
                  epochs: int | None, lr: float | None) -> tuple[dict, bool]:
    """(card, trained in this run): the given checkpoint, the one in OUT, or a new one trained into OUT."""
    if given is not None:
        card = read_card(given) or {"arch": arch, "dataset": str(root)}
        return {**card, "checkpoint": str(given)}, False
    checkpoint = out / "checkpoint.pth"
    card = read_card(checkpoint) if checkpoint.is_file() and not retrain else None
    if card is not None:
        return {**card, "checkpoint": str(checkpoint)}, False
    print(f"training the {arch} evaluator into {out}", flush=True)
    card = train_evaluator(root, out=checkpoint, arch=arch, epochs=1 if smoke else epochs, lr=lr,
                           batch_size=8 if smoke else None, progress=progress_printer(arch))
    return card, True


def agreement(nets: dict, sets: list[tuple[str, torch.Tensor, list]], source: dict) -> dict:
    """Accuracy (percent) of each evaluator on the same images, per split and over all of them."""
    from iclevr_diffusion.evaluator.metric import predict, score_outputs
    from iclevr_diffusion.labels import multi_hot_batch

    splits, pooled = {}, {arch: [0, 0] for arch in nets}
    same_hits = total = 0
    for name, images, conds in sets:
        targets = multi_hot_batch(conds)
        scores = {arch: score_outputs(predict(net, images), targets) for arch, net in nets.items()}
        splits[name] = {arch: round(100 * s.accuracy, 2) for arch, s in scores.items()}
        for arch, s in scores.items():
            pooled[arch][0] += s.hits
            pooled[arch][1] += s.labels
        a, b = (scores[arch].per_image for arch in nets)
        same_hits += sum(x == y for x, y in zip(a, b, strict=True))
        total += len(a)
    accuracy = {arch: round(100 * h / n, 2) for arch, (h, n) in pooled.items()}
    gap = abs(accuracy[SMALL_CNN] - accuracy[RESNET18])
    return {**source, "images": total, "splits": splits, "accuracy": accuracy, "difference_points": round(gap, 2),
            "within_3_points": gap <= AGREEMENT_POINTS,
            "images_scored_alike": round(same_hits / total, 4)}  # same hits per image under both


def generated_sets(model: Path, device: str, seed: int) -> tuple[list, dict]:
    """[(split, images, conditions)] of the run's test and new_test conditions (64 images), sampled with the
    run's configured sampler, steps and guidance, and a description of how."""
    from iclevr_diffusion.data.iclevr import load_conditions
    from iclevr_diffusion.diffusion import sampling as sampling

    pipe, cfg, model_dir = sampling.load_pipeline(model, Path("runs"), device)
    sampler, steps, guidance = sampling.resolve_sampling(cfg, pipe)
    sets = []
    for split in ("test", "new_test"):
        conds = load_conditions(split)
        print(f"sampling {len(conds)} {split} images ({sampler}, {steps} steps, guidance {guidance})", flush=True)
        images = sampling.generate(pipe, conds, sampler, steps, guidance, seed, cfg.sample.batch_size)
        sets.append((split, images, conds))
    return sets, {"source": str(model_dir), "sampler": sampler, "steps": steps, "guidance_scale": guidance,
                  "seed": seed}


def image_sets(folder: Path) -> tuple[list, dict]:
    """[(split, images, conditions)] of FOLDER/test/0.png... and FOLDER/new_test/0.png... (any generator)."""
    from iclevr_diffusion.data.iclevr import load_conditions
    from iclevr_diffusion.evaluator.metric import load_image_folder

    sets = []
    for split in ("test", "new_test"):
        conds = load_conditions(split)
        sets.append((split, load_image_folder(folder / split, len(conds)), conds))
    return sets, {"source": str(folder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny rendered set, one epoch each: seconds")
    parser.add_argument("--speed", action="store_true", help="only the training-speed comparison")
    parser.add_argument("--data", type=Path, help="dataset root (default: the built-in synthetic set)")
    parser.add_argument("--model", type=Path, help="run (or model) folder whose generated images both evaluators "
                        "score: test + new_test, 64 images, the run's sampler")
    parser.add_argument("--images", type=Path, help="instead of --model: FOLDER/test/*.png and FOLDER/new_test/*.png")
    parser.add_argument("--resnet18", type=Path, help="ResNet18 checkpoint to compare with (default: "
                        "benchmarks/work/evaluator/resnet18, trained there if missing)")
    parser.add_argument("--no-resnet18", action="store_true", help="only the small CNN (no comparison)")
    parser.add_argument("--small-cnn", type=Path, help="reuse this small-CNN checkpoint instead of training "
                        "one (first_use_s then comes from its card)")
    parser.add_argument("--retrain", action="store_true", help="retrain the ResNet18 in benchmarks/work too")
    parser.add_argument("--train-small", action="store_true",
                        help="train the small CNN (as for data the shipped one does not fit) instead of installing it")
    parser.add_argument("--ship", action="store_true", help="with --train-small: ship the trained small CNN")
    parser.add_argument("--epochs", type=int, help="small CNN epochs (default: the toolkit's)")
    parser.add_argument("--lr", type=float, help="small CNN peak learning rate (default: the toolkit's)")
    parser.add_argument("--device", default="auto", help="where generated images are sampled (evaluators: CPU)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the generated images")
    parser.add_argument("--threads", type=int, help="torch threads (1 is far faster on a CPU shared with others)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.speed or args.smoke:
        rows = speed(batch=8 if args.smoke else 64, steps=1 if args.smoke else 2, rounds=1 if args.smoke else 8)
        for r in rows:
            print(f"{r['variant']:<30} best {r['images_per_s']:7.1f}  median {r['median']:7.1f} images/s  "
                  f"rounds {[round(v) for v in r['rounds']]}")
        if args.speed:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "evaluator-speed.json").write_text(json.dumps({"machine": machine(), "speed": rows}, indent=2))
            return

    tmp = None
    work = WORK
    if args.smoke:
        from iclevr_diffusion.data.synthetic import make_dataset

        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name) / "tiny"
        work = Path(tmp.name) / "work"
        make_dataset(root, scenes=8, size="64", seed=0, workers=1, force=True, progress=None)
    elif args.data:
        root = args.data
    else:
        from iclevr_diffusion.data.synthetic import default_dataset_root

        root = Path(default_dataset_root())

    # The small CNN: installed from the package data as the first `evaluate` does (timed), or trained
    # (--train-small, --smoke), or given (--small-cnn).
    if args.ship and not args.train_small:
        sys.exit("error: --ship ships a small CNN trained in this run; add --train-small.")
    evaluators = {}
    archs = [SMALL_CNN] + ([] if args.no_resnet18 else [RESNET18])
    for arch in archs:
        given = args.small_cnn if arch == SMALL_CNN else args.resnet18
        if arch == SMALL_CNN and given is None and not (args.train_small or args.smoke):
            card, trained = install_shipped_fresh(root)
        else:
            retrain = arch == SMALL_CNN or args.retrain
            card, trained = get_evaluator(arch, root, work / arch, retrain, given, args.smoke,
                                          args.epochs if arch == SMALL_CNN else None,
                                          args.lr if arch == SMALL_CNN else None)
            if arch == SMALL_CNN and args.ship:
                ship(card)
        heldout = rescore(root, Path(card["checkpoint"]))
        evaluators[arch] = summary(card, heldout, trained)
        e = evaluators[arch]
        print(f"{arch}: held-out accuracy {e['heldout_accuracy']:.2f}% ({heldout['hits']}/{heldout['labels']} labels, "
              f"{heldout['images']} images); first use {e['first_use_s']} s, {e['first_use_gflop']} GFLOP "
              f"({e['epochs']} epochs, {e['precision']}, {e['cpu']}){'' if trained else ' [reused]'}")
        print("  per shape:", {k: round(v, 4) for k, v in heldout["per_shape"].items()})
        print("  per colour:", {k: round(v, 4) for k, v in heldout["per_color"].items()})

    small = evaluators[SMALL_CNN]
    result = {
        "machine": machine(),
        "dataset": str(root),
        "cpu": small["cpu"],
        "first_use_s": small["first_use_s"],
        "first_use_gflop": small["first_use_gflop"],
        "heldout_accuracy": small["heldout_accuracy"],
        "evaluators": evaluators,
    }
    if RESNET18 in evaluators:
        big = evaluators[RESNET18]
        if big["first_use_s"] and small["first_use_s"]:
            result["first_use_s_ratio"] = round(big["first_use_s"] / small["first_use_s"], 1)
        if big["first_use_gflop"] and small["first_use_gflop"]:
            result["first_use_gflop_ratio"] = round(big["first_use_gflop"] / small["first_use_gflop"], 1)
        nets = {arch: load_evaluator(e["checkpoint"]) for arch, e in evaluators.items()}
        sets = source = None
        if args.model is not None:
            sets, source = generated_sets(args.model, args.device, args.seed)
        elif args.images is not None:
            sets, source = image_sets(args.images)
        elif args.smoke:  # the code path only: rendered images of the tiny set, labelled with their truth
            from iclevr_diffusion.labels import LABELS

            _, pics, targets = load_labelled(root, "train.json")

            conds = [[LABELS[i] for i in t.nonzero().flatten().tolist()] for t in targets[:16]]
            sets, source = [("smoke", pixels_to_float(pics[:16]), conds)], {"source": "tiny rendered set (smoke)"}
        if sets is not None:
            agree = agreement(nets, sets, source)
            result["generated"] = agree
            print(f"generated images ({agree['images']}): small CNN {agree['accuracy'][SMALL_CNN]:.2f}%, ResNet18 "
                  f"{agree['accuracy'][RESNET18]:.2f}% -> {agree['difference_points']:.2f} points apart "
                  f"({'within' if agree['within_3_points'] else 'NOT within'} {AGREEMENT_POINTS:g}); per split "
                  f"{agree['splits']}")
        else:
            print("no --model or --images: the agreement on generated images is not measured")
    RESULTS.mkdir(exist_ok=True)
    name = "evaluator-smoke.json" if args.smoke else "evaluator.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
