"""How saturated are a run's attention layers, and what does each SDPA kernel's backward make of them?

    python benchmarks/attention_check.py --run runs/quality-at-steps/flow-scaled-22700 \
        --out benchmarks/results/attention_check.json
    python benchmarks/attention_check.py --out benchmarks/results/attention_check-kernels.json
    python benchmarks/attention_check.py --smoke --out /tmp/a.json   # a tiny model trained 4 steps: seconds

With `--run`: for every checkpoint of the run (and the exported EMA model), on one fixed batch of
16 training images at noise levels and noise drawn from seed 0, each self-attention layer's largest
|logit| and how much of each query's attention goes to its single largest key (1.0: every position
copies one other), then the gradient norm of the training loss with every attention on PyTorch's
fused kernel (diffusers' default) and with the unnormalised middle-block attention on its math kernel
(what training does since this check: model.ExactGradientAttnProcessor), in fp32 and in bf16
autocast. Always: the kernel sweep, one attention call of the default's middle block shape (batch 16,
4 heads, 8 x 8 positions, 32 channels each) with random queries and keys scaled until the largest
|logit| reaches 1e1 ... 1e9, and the gradient norm of each kernel's backward, fp32; then the time of a
training pass (forward + backward, bf16 autocast only on a CPU with native bf16) on each kernel,
alternated so other load hits both alike, on the run's model or the default preset's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import machine_info  # noqa: E402
from scoring import smoke_dataset  # noqa: E402


def attention_layers(model) -> dict[str, torch.nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {name.removeprefix("unet."): m for name, m in model.named_modules() if isinstance(m, Attention)}


def saturation(model, run_pass) -> dict[str, dict]:
    """Largest |logit| and mean top attention weight of every attention layer in one forward pass."""
    layers, captured, hooks = attention_layers(model), {}, []
    for name, layer in layers.items():
        for part in ("to_q", "to_k"):
            hooks.append(getattr(layer, part).register_forward_hook(
                lambda m, i, o, key=(name, part): captured.__setitem__(key, o.detach().float())))
    try:
        with torch.no_grad():
            run_pass()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, layer in layers.items():
        q, k = captured[(name, "to_q")], captured[(name, "to_k")]
        b, heads = q.shape[0], layer.heads
        q = q.reshape(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.reshape(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) * layer.scale
        out[name] = {"max_abs_logit": logits.abs().max().item(),
                     "mean_top_weight": logits.softmax(-1).amax(-1).mean().item(),
                     "normalised_input": layer.group_norm is not None}
    return out


def _norm(tensors) -> float:
    """The L2 norm over all tensors, inf where it overflows or any entry is not finite."""
    squares = sum(t.double().square().sum() for t in tensors).item()
    return math.sqrt(squares) if math.isfinite(squares) else float("inf")


def gradient_norm(model, run_pass, fused: bool, bf16: bool) -> float:
    from iclevr_diffusion.diffusion import model as model_module

    kernel = contextlib.nullcontext if fused else model_module.exact_attention_gradients
    saved, model_module.exact_attention_gradients = model_module.exact_attention_gradients, kernel
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = run_pass()
        loss.float().backward()
        return _norm(p.grad for p in model.parameters() if p.grad is not None)
    finally:
        model_module.exact_attention_gradients = saved
        model.zero_grad(set_to_none=True)


def kernel_sweep(shape=(16, 4, 64, 32), logits=(1e1, 1e3, 1e5, 1e6, 1e7, 1e8, 1e9)) -> list[dict]:
    """Gradient norm of one attention call's backward on the fused and the math kernel, fp32, as the
    largest |logit| grows (random q, k, v from seed 0; q and k scaled alike)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    q, k, v, w = (torch.randn(shape, generator=gen) for _ in range(4))
    base = (q @ k.transpose(-1, -2) / math.sqrt(shape[-1])).abs().max().item()
    rows = []
    for target in logits:
        factor = math.sqrt(target / base)
        row = {"max_abs_logit": target}
        for name, backend in (("fused", None), ("math", SDPBackend.MATH)):
            leaves = [t.clone().requires_grad_() for t in (q * factor, k * factor, v)]
            with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                out = torch.nn.functional.scaled_dot_product_attention(*leaves)
            (out * w).sum().backward()
            row[name] = _norm(t.grad for t in leaves)
        rows.append(row)
    return rows


def pass_seconds(model, run_pass, rounds: int, bf16: bool) -> dict[str, float]:
    """Median seconds of a training pass on each kernel (fused, math), alternated."""
    from iclevr_diffusion.diffusion import model as model_module

    saved, times = model_module.exact_attention_gradients, {"fused": [], "math": []}
    try:
        for i in range(rounds + 1):
            for kind in times:
                model_module.exact_attention_gradients = contextlib.nullcontext if kind == "fused" else saved
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = run_pass()
                loss.float().backward()
                model.zero_grad(set_to_none=True)
                if i > 0:  # the first round sets kernels up
                    times[kind].append(time.perf_counter() - start)
    finally:
        model_module.exact_attention_gradients = saved
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def smoke_run(folder: Path) -> Path:
    """A run folder of the default recipe on the tests' tiny model and data: 4 steps, checkpoints at 2 and 4."""
    from iclevr_diffusion.config import load_config
    from iclevr_diffusion.training.loop import train

    data, tiny = smoke_dataset(folder / "data")
    cfg = load_config("default", [*tiny, f"data.root={data}", "train.max_steps=4", "train.max_minutes=null",
                                  "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=2"])
    train(cfg, folder / "run")
    return folder / "run"


def main(argv=None) -> dict:
    from safetensors.torch import load_file

    from iclevr_diffusion.config import load_config
    from iclevr_diffusion.diffusion.losses import diffusion_loss
    from iclevr_diffusion.diffusion.model import ConditionalUNet
    from iclevr_diffusion.diffusion.schedule import make_train_scheduler
    from iclevr_diffusion.io import write_json
    from iclevr_diffusion.precision import cpu_has_native_bf16
    from iclevr_diffusion.training.batches import build_dataset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a run folder (its checkpoints/ and model/); without it, only the "
                   "kernel sweep and the timing, on the default preset's untrained model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--timing-rounds", type=int, default=8, help="timed passes per kernel (0: no timing)")
    p.add_argument("--smoke", action="store_true", help="a tiny model trained 4 steps here, one timing round")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.smoke:
        args.run, args.timing_rounds = smoke_run(Path(tempfile.mkdtemp(prefix="attention-check-smoke-"))), 1
    cfg = load_config(str(args.run / "config.yaml") if args.run else "default")
    data = build_dataset(cfg)
    images = torch.stack([data[i][0] for i in range(args.batch)])
    labels = torch.stack([data[i][1] for i in range(args.batch)])
    sched = make_train_scheduler(cfg.schedule)
    weights = []
    if args.run:
        weights = [(int(c.name.removeprefix("step_")), "raw weights", c / "model.safetensors")
                   for c in sorted((args.run / "checkpoints").glob("step_*"))]
        exported = args.run / "model" / "unet" / "diffusion_pytorch_model.safetensors"
        if exported.is_file():
            weights.append((None, "exported EMA", exported))
    model = ConditionalUNet.from_run_config(cfg)

    def run_pass():
        gen = torch.Generator().manual_seed(0)
        return diffusion_loss(model, sched, images, labels, gen, cfg.train.min_snr_gamma, cfg.schedule.p_mean,
                              cfg.schedule.p_std, cfg.schedule.p_uniform)

    rows = []
    for step, kind, path in weights:
        model.load_state_dict(load_file(path))
        row = {"step": step, "weights": kind, "attention": saturation(model, run_pass), "gradient_norm": {
            f"{kernel} {'bf16' if bf16 else 'fp32'}": gradient_norm(model, run_pass, kernel == "fused", bf16)
            for kernel in ("fused", "math") for bf16 in (False, True)}}
        rows.append(row)
        print(json.dumps(row))
    sweep = kernel_sweep()
    for row in sweep:
        print(json.dumps(row))
    bf16 = cpu_has_native_bf16()
    result = {"benchmark": "attention_check", "machine": machine_info.machine(), "smoke": args.smoke,
              "run": str(args.run) if args.run else None, "batch": args.batch, "rows": rows, "kernel_sweep": sweep,
              "pass_precision": "bf16 autocast" if bf16 else "fp32",
              "pass_seconds": pass_seconds(model, run_pass, args.timing_rounds, bf16) if args.timing_rounds else None}
    write_json(args.out, result, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
