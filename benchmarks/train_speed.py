"""Training speed (images/s) of the presets and of each speed lever, measured side by side in one run.

    python benchmarks/train_speed.py              # full table (about 6 minutes on a 2-core CPU)
    python benchmarks/train_speed.py --threads 1  # steadier ratios when other jobs share the CPU
    python benchmarks/train_speed.py --smoke      # tiny models, seconds: checks the script works

Each variant runs full optimizer steps (forward, loss, backward, AdamW) on random 64x64 batches
with the same code path as training (`losses.diffusion_loss`); one step per variant is warm-up.
Ratios are what matter: all variants are built in one process and timed in interleaved rounds
(every variant once per round), and each keeps its best round, so load from other jobs that
comes and goes hits all of them alike.
Writes benchmarks/results/train_speed.json with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from machine_info import machine

from iclevr_diffusion.config import Config, load_config
from iclevr_diffusion.diffusion.losses import diffusion_loss
from iclevr_diffusion.diffusion.model import ConditionalUNet, count_parameters
from iclevr_diffusion.diffusion.schedule import make_train_scheduler

RESULTS = Path(__file__).resolve().parent / "results" / "train_speed.json"


def variants(smoke: bool) -> list[tuple[str, Config, bool, bool]]:
    """(name, config, bf16 autocast, channels_last) rows; presets first, then one lever at a time."""

    def preset(name: str, *sets: str) -> Config:
        return load_config(name, list(sets))

    if smoke:
        tiny = ("model.block_out_channels=[8, 16]", "model.attention=[false, true]", "model.norm_num_groups=4",
                "model.attention_head_dim=8", "data.image_size=16", "model.layers_per_block=1")  # a few seconds
        return [("tiny fp32", preset("default", *tiny), False, False),
                ("tiny bf16", preset("default", *tiny), True, False)]
    no32 = "model.attention=[false, false, true, true]"
    a3 = ("model.block_out_channels=[64, 128, 128]", "model.attention=[false, false, true]")
    rows = [
        ("seed preset, fp32 (as the report)", preset("seed"), False, False),
        ("seed + bf16 autocast", preset("seed"), True, False),
        ("seed + channels_last (fp32)", preset("seed"), False, True),
        ("seed, no 32x32 attention (fp32)", preset("seed", no32), False, False),
        ("seed, no 32x32 attention + bf16", preset("seed", no32), True, False),
        ("default preset (bf16)", preset("default"), True, False),
        ("default preset (fp32)", preset("default"), False, False),
        ("default + channels_last (bf16)", preset("default"), True, True),
        ("default without patching (patch_size 1, bf16)", preset("default", "model.patch_size=1"), True, False),
        ("previous default: 64/128/128, attn 16+mid, no patching (bf16)",
         preset("default", *a3, "model.patch_size=1"), True, False),
        ("64/128/128 with patch_size 2 (bf16)", preset("default", *a3), True, False),
        ("default with 2 layers per block", preset("default", "model.layers_per_block=2"), True, False),
        ("default at 1.5x width, 48/96/192", preset("default", "model.block_out_channels=[48, 96, 192]",
                                                     "model.norm_num_groups=16", "model.attention_head_dim=48"),
         True, False),
        ("default, middle attention only", preset("default", "model.attention=[false, false, false]"),
         True, False),
        ("default + cross-attention at 8x8", preset("default", "model.cross_attention=[false, false, true]"),
         True, False),
        ("default + cross-attention at 16x16 and 8x8",
         preset("default", "model.cross_attention=[false, true, true]"), True, False),
        ("default + self-conditioning",  # an EDM option
         preset("default", "schedule.formulation=edm", "model.self_condition=true"), True, False),
        ("default on 4x4 patches, 64/128/256",
         preset("default", "model.patch_size=4", "model.block_out_channels=[64, 128, 256]"), True, False),
        ("default without patching, a 16-channel level at 64x64 in front",
         preset("default", "model.patch_size=1", "model.block_out_channels=[16, 32, 64, 128]",
                "model.attention=[false, false, false, true]", "model.norm_num_groups=8"), True, False),
        ("default + self-attention at 16x16", preset("default", "model.attention=[false, true, true]"), True, False),
        ("default with EDM's preconditioning (bf16)", preset("default", "schedule.formulation=edm"), True, False),
        ("full preset (bf16)", preset("full"), True, False),
        (COMPILED, preset("default"), True, False),
    ]
    return rows


COMPILED = "default + torch.compile (bf16)"  # the one row whose model goes through torch.compile


class Bench:
    """One variant's model, optimizer and fixed random batch; `run(seconds)` returns images/s."""

    def __init__(self, cfg: Config, bf16: bool, channels_last: bool, batch: int, compiled: bool = False):
        torch.manual_seed(0)
        self.model = ConditionalUNet.from_run_config(cfg)
        self.forward = torch.compile(self.model) if compiled else self.model
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.sched = make_train_scheduler(cfg.schedule)
        size = cfg.data.image_size
        self.gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, size, size, generator=self.gen).clamp(-1, 1)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.labels = (torch.rand(batch, 24, generator=self.gen) < 0.08).float()
        self.bf16, self.batch = bf16, batch

    def step(self) -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with ctx:
            loss = diffusion_loss(self.forward, self.sched, self.x, self.labels, generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def run(self, seconds: float) -> float:
        steps, start = 0, time.perf_counter()
        while steps < 1 or time.perf_counter() - start < seconds:
            self.step()
            steps += 1
        return steps * self.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few seconds")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per variant per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best round counts")
    parser.add_argument("--only", default="", help="comma-separated substrings of variant names to run")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = torch's default); 1 gives steadier ratios on a shared CPU")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)")
    args = parser.parse_args()
    # A smoke run must not overwrite the real figures.
    args.out = args.out or (RESULTS.with_name(RESULTS.stem + "_smoke.json") if args.smoke else RESULTS)
    if args.threads:
        torch.set_num_threads(args.threads)
    seconds, rounds, batch = (0.5, 2, 4) if args.smoke else (args.seconds, args.rounds, args.batch)
    picks = [s.strip() for s in args.only.split(",") if s.strip()]
    chosen = [v for v in variants(args.smoke) if not picks or any(p in v[0] for p in picks)]
    benches = [Bench(cfg, bf16, cl, batch, name == COMPILED) for name, cfg, bf16, cl in chosen]
    failed = {}
    for (name, *_), b in zip(chosen, benches):  # warm-up: allocator, autocast caches, lazy init, compilation
        started = time.perf_counter()
        try:
            b.step()
            b.step()
        except Exception as e:  # torch.compile needs a working C++ toolchain; record why it could not run
            failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if name == COMPILED:
            print(f"{name}: warm-up (compilation) {time.perf_counter() - started:.0f} s", flush=True)
    keep = [i for i, (name, *_) in enumerate(chosen) if name not in failed]
    chosen, benches = [chosen[i] for i in keep], [benches[i] for i in keep]
    speeds = [[] for _ in chosen]
    for r in range(rounds):
        for i, b in enumerate(benches):
            speeds[i].append(b.run(seconds))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{s[-1]:.1f}" for s in speeds), flush=True)
    rows = []
    for (name, cfg, bf16, cl), b, sp in zip(chosen, benches, speeds):
        rows.append({"name": name, "params": count_parameters(b.model), "images_per_s": max(sp),
                     "images_per_s_rounds": sp, "bf16": bf16, "channels_last": cl,
                     "block_out_channels": cfg.model.block_out_channels, "attention": cfg.model.attention,
                     "mid_attention": cfg.model.mid_attention, "layers_per_block": cfg.model.layers_per_block})
    base = rows[0]["images_per_s"]
    print(f"\n{'variant':48s} {'params':>9s} {'images/s':>9s} {'x first row':>11s}")
    for r in rows:
        r["speedup_vs_first"] = r["images_per_s"] / base
        print(f"{r['name']:48s} {r['params'] / 1e6:8.2f}M {r['images_per_s']:9.1f} {r['speedup_vs_first']:10.1f}x")
    result = {"machine": machine(), "batch_size": batch, "image_size": 16 if args.smoke else 64,
              "seconds_per_variant_per_round": seconds, "rounds": rounds, "smoke": args.smoke,
              "method": "interleaved rounds in one process, best round per variant; full optimizer steps",
              "rows": rows, "failed": failed}
    for name, why in failed.items():
        print(f"{name}: could not run ({why})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
