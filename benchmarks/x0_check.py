"""Why a briefly trained epsilon model samples well only with DDIM: its clean-image estimate at high noise.

    python benchmarks/x0_check.py --model runs/default --model runs/quality-at-budget
    python benchmarks/x0_check.py --smoke          # tiny models built on the fly, seconds

For each model:
- `probe`: the data-free check that `iclevr-diff sample` / `evaluate` warn with
  (samplers.clean_estimate_rms: RMS of the x0 estimate at t = T-1 from pure noise; at most 1 for a
  good model, since a mean of images in [-1, 1] lies in [-1, 1]);
- on held-out rendered images of the built-in set (64; smoke: the tiny dataset) noised to t: the
  noise-prediction MSE and the RMS error of the implied x0 at several t;
- accuracy (the evaluator `iclevr-diff evaluate` picks; test + new_test, seed 0, the model's guidance,
  25 steps) of DDIM as diffusers runs it (x0 clipped to [-1, 1], the model's own noise estimate kept
  for the next step), the same DDIM without the clip, and DPM-Solver++ / UniPC (x0 clipped, noise
  re-derived from it). If only the clipped DDIM scores well, the model's x0 at high noise is the cause.

Writes benchmarks/results/x0_check.json (with the machine).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from machine_info import machine
from scoring import benchmark_evaluator, smoke_dataset

from iclevr_diffusion.data.iclevr import ICLEVRDataset, load_conditions
from iclevr_diffusion.diffusion.samplers import clean_estimate, clean_estimate_rms, make_sampler
from iclevr_diffusion.diffusion.sampling import image_generators, load_pipeline
from iclevr_diffusion.evaluator.metric import score_images
from iclevr_diffusion.io import write_json
from iclevr_diffusion.labels import multi_hot_batch

RESULTS = Path(__file__).resolve().parent / "results"
TIMESTEP_FRACTIONS = (1.0, 0.9, 0.6, 0.4, 0.1)  # of T; t = round(f * T) - 1


def held_out(smoke: bool, tmp: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], multi-hot labels) of n rendered images the models were not trained on."""
    if smoke:
        root, _ = smoke_dataset(tmp)
        data = ICLEVRDataset(root, image_size=16)
    else:
        from iclevr_diffusion.evaluator.training import HELDOUT_FILE
        from iclevr_diffusion.workflows.make_data import ensure_default_data

        data = ICLEVRDataset(ensure_default_data(quiet=True), labels_file=HELDOUT_FILE)
    picks = torch.linspace(0, len(data) - 1, min(n, len(data))).long().tolist()
    pairs = [data[i] for i in picks]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


@torch.no_grad()
def noise_errors(pipe, images, labels) -> list[dict]:
    """Per t: the model's noise-prediction MSE and the RMS error of the x0 it implies (fp32)."""
    sched, T = pipe.scheduler, int(pipe.scheduler.config.num_train_timesteps)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    rows = []
    for f in TIMESTEP_FRACTIONS:
        t = max(0, round(f * T) - 1)
        ts = torch.full((len(images),), t)
        noisy = sched.add_noise(images, noise, ts)
        x0 = clean_estimate(pipe.unet(noisy, ts, labels).float(), noisy, t, sched)
        a, s = sched.alphas_cumprod[t].sqrt(), (1 - sched.alphas_cumprod[t]).sqrt()
        eps = (noisy - a * x0) / s
        rows.append({"t": t, "sqrt_alpha_bar": float(a), "noise_mse": float((eps - noise).pow(2).mean()),
                     "x0_rms_error": float((x0 - images).pow(2).mean().sqrt())})
    return rows


def accuracy(pipe, scheduler, sets, steps: int, guidance: float, net) -> dict[str, float]:
    """Accuracy per split with `scheduler` as the sampler (seed 0, one generator per image)."""
    own, pipe.scheduler = pipe.scheduler, scheduler
    try:
        result = {}
        for name, conds in sets:
            images = pipe(multi_hot_batch(conds), steps, guidance, generator=image_generators(0, 0, len(conds)),
                          output_type="pt").images
            result[name] = score_images(net, images, multi_hot_batch(conds)).accuracy
        return result
    finally:
        pipe.scheduler = own


def check_model(pipe, cfg, sets, net, images, labels, steps: int) -> dict:
    train = pipe.scheduler
    samplers = {
        "ddim (clip x0, keep eps)": make_sampler("ddim", train),
        "ddim without the clip": DDIMScheduler.from_config(
            make_sampler("ddim", train).config, clip_sample=False),
        "dpm++ (clip x0)": make_sampler("dpm++", train),
        "unipc (clip x0)": make_sampler("unipc", train),
    }
    w = cfg.sample.guidance_scale
    rows = {}
    for name, sampler in samplers.items():
        rows[name] = accuracy(pipe, sampler, sets, steps, w, net)
        print(f"  {name}: " + ", ".join(f"{k} {v:.1%}" for k, v in rows[name].items()), file=sys.stderr, flush=True)
    return {
        "prediction_type": train.config.prediction_type,
        "probe_x0_rms": clean_estimate_rms(pipe.unet, train),
        "noise_errors": noise_errors(pipe, images, labels),
        "guidance_scale": w,
        "steps": steps,
        "accuracy": rows,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], help="run folder or exported model (repeatable)")
    p.add_argument("--smoke", action="store_true", help="two tiny models (epsilon, v), random evaluator")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--images", type=int, default=64, help="held-out images for the noise errors")
    p.add_argument("--out", default=None, help="output JSON (default: benchmarks/results/x0_check[-smoke].json)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else RESULTS / f"x0_check{'-smoke' if args.smoke else ''}.json"
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = held_out(args.smoke, Path(tmp), args.images)
    net, evaluator = benchmark_evaluator(args.smoke)
    sets = [(s, load_conditions(s)[: 4 if args.smoke else None]) for s in ("test", "new_test")]
    if args.smoke:
        from iclevr_diffusion.testing import tiny_config, tiny_pipeline

        models = {f"tiny {p}": (tiny_pipeline(c, train_steps=5), c)
                  for p in ("epsilon", "v_prediction") for c in [tiny_config(prediction_type=p)]}
        args.steps = 4
    else:
        models = {}
        for m in args.model or [None]:
            pipe, cfg, folder = load_pipeline(Path(m) if m else None, Path("runs"), "cpu")
            models[str(folder)] = (pipe, cfg)
    result = {
        "benchmark": "x0_check",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine("cpu"),
        "evaluator": evaluator,
        "models": {},
    }
    for name, (pipe, cfg) in models.items():
        print(name, file=sys.stderr, flush=True)
        result["models"][name] = check_model(pipe, cfg, sets, net, images, labels, args.steps)
    write_json(out, result)
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
