"""The toolkit's own ResNet18 evaluator: training speed per precision, and held-out accuracy.

    python benchmarks/evaluator.py            # train (or reuse the cached) evaluator of the built-in
                                              # synthetic set, re-score its held-out images (~10 CPU min)
    python benchmarks/evaluator.py --speed    # training images/s: fp32 / bf16 autocast / channels_last
    python benchmarks/evaluator.py --smoke    # a tiny rendered set, 1 epoch: seconds, checks the script

Accuracy is the course's metric (top-k hits / all labels) on the renderer's heldout.json, images
that were never trained on; the target is >= 99%. The speed rows run one after the other in rounds
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

from iclevr_diffusion.evaluation import build_evaluator, load_evaluator, own_evaluator_path, score_images  # noqa: E402
from iclevr_diffusion.evaluator_training import (  # noqa: E402
    HELDOUT_FILE,
    cached_card,
    load_labelled,
    train_evaluator,
)

RESULTS = Path(__file__).resolve().parent / "results"


def speed(batch: int, steps: int, rounds: int) -> list[dict]:
    """Training images/s of the four precision/layout variants, interleaved in rounds."""
    variants = [("fp32", False, False), ("bf16 autocast", True, False),
                ("fp32 channels_last", False, True), ("bf16 channels_last", True, True)]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 64, 64, generator=gen) * 2 - 1
    y = (torch.rand(batch, 24, generator=gen) < 0.08).float()
    setups = []
    for name, bf16, cl in variants:
        torch.manual_seed(0)
        model = build_evaluator()
        model.fc[1] = nn.Identity()
        if cl:
            model = model.to(memory_format=torch.channels_last)
        setups.append((name, bf16, cl, model, torch.optim.AdamW(model.parameters(), 1e-3)))
    times: dict[str, list[float]] = {name: [] for name, *_ in variants}
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
    """Load the saved checkpoint as the official loader would and score the held-out images again.

    Also at lower resolutions (downscaled with antialiasing, upscaled back by the evaluator's own
    resize): what a generator that works at 48x48 or 32x32 and upscales could score at best.
    """
    _, pics, targets = load_labelled(root, HELDOUT_FILE)
    net = load_evaluator(checkpoint)
    images = pics.float() / 127.5 - 1
    start = time.perf_counter()
    score = score_images(net, images, targets)
    seconds = round(time.perf_counter() - start, 2)
    upscaled = {}
    for size in (48, 32):
        small = nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        upscaled[str(size)] = score_images(net, small, targets).accuracy
    return {**score.to_dict(), "score_seconds": seconds, "accuracy_from_smaller_images": upscaled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny rendered set, one epoch: seconds")
    parser.add_argument("--speed", action="store_true", help="only the training-speed comparison")
    parser.add_argument("--data", type=Path, help="dataset root (default: the built-in synthetic set)")
    parser.add_argument("--retrain", action="store_true", help="train even if a cached evaluator exists")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the toolkit's)")
    parser.add_argument("--continue-from", type=Path, help="start from this checkpoint instead of random init")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--threads", type=int, help="torch threads (1 is far faster on a CPU shared with others)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.speed or args.smoke:
        rows = speed(batch=8 if args.smoke else 64, steps=1 if args.smoke else 2, rounds=1 if args.smoke else 8)
        for r in rows:
            print(f"{r['variant']:<20} best {r['images_per_s']:6.1f}  median {r['median']:6.1f} images/s  "
                  f"rounds {[round(v) for v in r['rounds']]}")
        if args.speed:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "evaluator-speed.json").write_text(json.dumps({"machine": machine(), "speed": rows}, indent=2))
            return

    tmp = None
    if args.smoke:
        from iclevr_diffusion.data.synthetic import make_dataset

        tmp = tempfile.TemporaryDirectory()
        root = Path(tmp.name) / "tiny"
        make_dataset(root, scenes=8, size="64", seed=0, workers=1, force=True, progress=None)
    elif args.data:
        root = args.data
    else:
        from iclevr_diffusion.data.synthetic import default_dataset_root

        root = Path(default_dataset_root())

    card = None if args.retrain or args.smoke or args.epochs or args.continue_from else cached_card(root)
    cached = card is not None
    if card is None:
        last = [0.0]

        def progress(stage, done, total, **info):
            if stage == "epoch done":
                print(f"  epoch {done}/{total}: held-out {info['heldout_accuracy']:.2%}", flush=True)
            elif time.perf_counter() - last[0] > 30 or (total and done == total):
                last[0] = time.perf_counter()
                extra = f" epoch {info['epoch']} loss {info['loss']:.4f}" if "loss" in info else ""
                print(f"  {stage} {done}/{total or '?'}{extra}", flush=True)

        card = train_evaluator(root, epochs=1 if args.smoke else args.epochs, lr=args.lr, progress=progress,
                               init=args.continue_from)
    checkpoint = Path(card.get("checkpoint") or own_evaluator_path(root))
    heldout = rescore(root, checkpoint)
    result = {"machine": machine(), "dataset": str(root), "cached": cached, "card": card, "heldout": heldout}
    print(f"held-out accuracy {heldout['accuracy']:.2%} ({heldout['hits']}/{heldout['labels']} labels, "
          f"{heldout['images']} images); trained {card['epochs']} epochs on {card['images']} images "
          f"in {card['seconds']} s ({card['precision']}){' [cached]' if cached else ''}")
    print("from 48x48 / 32x32 images upscaled:", heldout["accuracy_from_smaller_images"])
    print("per shape:", {k: round(v, 4) for k, v in heldout["per_shape"].items()})
    print("per colour:", {k: round(v, 4) for k, v in heldout["per_color"].items()})
    RESULTS.mkdir(exist_ok=True)
    name = "evaluator-smoke.json" if args.smoke else "evaluator.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
