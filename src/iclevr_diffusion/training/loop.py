"""The training loop: one `train(cfg, run_dir)` driven by HF accelerate.

accelerate does device placement, mixed precision (bf16 autocast on CPU, fp16/bf16 on CUDA),
gradient accumulation and data parallelism: `accelerate launch` / torchrun run this same code on
several processes, each taking its slice of every global batch. Data order, noise, timesteps and
label dropout come from seeded CPU generators whose states go into every checkpoint, so a run that
is interrupted and resumed ends with the same weights as one that never stopped.

Around the loop: horizon.py plans the learning-rate horizon and says when to stop, agreement.py keeps
several processes in step, resume.py finds what a run continues from, batches.py feeds it,
run_outputs.py writes grids, exports and evaluations into the run folder (run_folder.py names them),
checkpoints.py saves the training state, precision.py picks bf16 or fp32.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iclevr_diffusion import precision
from iclevr_diffusion.config import Config
from iclevr_diffusion.devices import resolve_device
from iclevr_diffusion.diffusion.losses import diffusion_loss, drop_labels
from iclevr_diffusion.diffusion.model import ConditionalUNet
from iclevr_diffusion.diffusion.schedule import make_train_scheduler
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.training import checkpoints as ckpt
from iclevr_diffusion.training.agreement import DeferredSigint, agree, agree_stop, all_finite, clip_gradients
from iclevr_diffusion.training.batches import BatchOrder, augment, batches, build_dataset, micro_batch
from iclevr_diffusion.training.horizon import HorizonPlanner, apply_lr, eta, known_horizon, stop_reason, with_horizon
from iclevr_diffusion.training.resume import check_compatible, resume_candidates, resume_extra_emas, with_sigma_data
from iclevr_diffusion.training.run_outputs import (
    RunFiles,
    due_snapshots,
    ema_counters,
    ema_weights,
    evaluate_hook,
    export_model,
    growing_ema,
    sample_images,
)

Progress = Callable[..., None]  # progress(event, **info): events start, step, note, end
MAX_SKIPS_IN_A_ROW = 20  # train.nan_policy=skip: more non-finite batches in a row than this stop the run


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    loss: float | None
    images_per_s: float | None
    elapsed_s: float
    stopped_by: str  # max_steps | epochs | max_minutes | complete
    mixed_precision: str
    resumed_from: Path | None
    model_dir: Path


def resolve_mixed_precision(
    cfg: Config,
    device: torch.device,
    model: torch.nn.Module,
    micro_batch: int,
    note: Callable[[str], None] | None = None,  # told the measured figures
) -> str:
    """'auto' -> fp16/bf16 on CUDA; on a CPU with native bf16, bf16 only if timed steps of *this* model
    say it is faster (precision.py: it helps the large convolutions of a real-size UNet but slows tiny
    models down, measured in benchmarks/train_speed.py); fp32 elsewhere."""
    mp = cfg.train.mixed_precision
    if mp != "auto":
        return mp
    if device.type == "cuda":
        return "bf16" if precision.native_bf16(device) else "fp16"
    use_bf16, timing = precision.measured_bf16(device, lambda: _time_precisions(model, cfg, micro_batch),
                                               lambda t: t[1] < t[0])
    if timing is None:
        return "no"
    fp32_s, bf16_s = timing
    choice = "bf16" if use_bf16 else "no"
    if note:
        picked = "bf16" if choice == "bf16" else "fp32"
        note(f"mixed_precision auto: fp32 {micro_batch / fp32_s:.1f} images/s, bf16 autocast "
             f"{micro_batch / bf16_s:.1f} images/s (forward+backward) -> {picked}")
    return choice


def _time_precisions(model: torch.nn.Module, cfg: Config, batch: int, rounds: int = 3) -> tuple[float, float]:
    """Seconds of the fastest fp32 and bf16 training pass of this model (precision.time_passes)."""
    rng = torch.get_rng_state()  # dropout draws from the global stream: leave it as it was
    gen = torch.Generator().manual_seed(0)
    size = cfg.data.image_size
    x = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.zeros(batch, cfg.model.num_classes)
    sched = make_train_scheduler(cfg.schedule)
    try:
        return precision.time_passes(lambda: diffusion_loss(model, sched, x, labels, generator=gen), model, "cpu",
                                     rounds)
    finally:
        torch.set_rng_state(rng)


def train(
    cfg: Config,  # resolved config; written to run_dir/config.yaml
    run_dir: Path,  # runs/<name>/: checkpoints, model/, samples/, metrics.jsonl, loss.png
    resume: Path | None = None,  # checkpoint or run folder; None: newest checkpoint in run_dir, if any
    progress: Progress | None = None,  # progress(event, **info) callback for a bar; None: silent
    dataset: Any = None,  # a Dataset of (image in [-1, 1], multi-hot) pairs instead of cfg.data
    on_log: Callable[[int, torch.nn.Module], dict] | None = None,  # extra metrics.jsonl fields per log line
    interrupt_after: int | None = None,  # tests: raise KeyboardInterrupt after this step
    clock: Callable[[], float] = time.perf_counter,  # seconds; tests drive the time budget with their own
) -> TrainResult:
    """Train a label-conditional DDPM and leave a resumable, exportable run folder behind."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    emit = progress or (lambda event, **info: None)
    note = lambda message: emit("note", message=message)  # noqa: E731
    run_dir = Path(run_dir)
    t_cfg = cfg.train
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device.index)  # single process on cuda:N: accelerate uses the current device

    # -- What the run continues from: the newest readable checkpoint, which must fit the config.
    candidates = resume_candidates(run_dir, resume)
    source = ckpt.load_newest(candidates, warn=note) if candidates else None
    if source is not None:
        check_compatible(cfg, source)

    # -- Model, precision and processes.
    set_seed(cfg.seed)  # model init (and python/numpy, which we do not otherwise use)
    model = ConditionalUNet.from_run_config(cfg)
    if t_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mp, accelerator = _accelerator(cfg, source, device, model, note)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    micro = micro_batch(t_cfg.batch_size, t_cfg.grad_accum, world)

    # -- Data: each process takes its slice of every global batch, in a seeded, resumable order.
    data = dataset
    if data is None:
        render = lambda done, total: emit("render", done=done, total=total)  # noqa: E731
        data = build_dataset(cfg, note=note, render=render)
    order = BatchOrder(len(data), micro * world, seed=cfg.seed)
    steps_per_epoch = order.batches_per_epoch // t_cfg.grad_accum
    if steps_per_epoch == 0:
        raise IclevrError(
            f"The dataset has {len(data)} images, fewer than one optimizer step of train.batch_size="
            f"{t_cfg.batch_size} x train.grad_accum; lower train.batch_size."
        )

    # -- Optimizer, EMA, lr schedule and random states: fresh, or as the checkpoint left them.
    opt = torch.optim.AdamW(
        model.parameters(), lr=t_cfg.lr, betas=(0.9, t_cfg.adam_beta2), weight_decay=t_cfg.weight_decay
    )
    horizon = known_horizon(cfg, steps_per_epoch)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "elapsed_s": 0.0, "horizon": horizon, "skipped": 0}
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # noise, timesteps, label dropout, flips
    ema = EMAModel(model.parameters(), decay=t_cfg.ema_decay, model_cls=ConditionalUNet, model_config=model.config)
    # Further EMAs (train.extra_ema_lengths), by share as written in folder names: "0.25".
    extras = {f"{s:g}": growing_ema(model, s) for s in t_cfg.extra_ema_lengths}
    if source is not None:
        model.load_state_dict(source["model"])
        opt.load_state_dict(source["optimizer"])
        ema.load_state_dict({**source["state"]["ema"], "shadow_params": source["ema"]})
        resume_extra_emas(extras, source, note)
        state.update({k: source["state"][k] for k in ("step", "epoch", "batch", "elapsed_s", "horizon")})
        state["skipped"] = source["state"].get("skipped", 0)  # absent in checkpoints of earlier versions
        # A longer run resumed (raised max_steps/epochs) gets the new horizon.
        state["horizon"] = horizon if horizon is not None else state["horizon"]
        ckpt.restore_rng(source["rng"], gen)
    lr_sched = get_cosine_schedule_with_warmup(opt, t_cfg.warmup_steps, state["horizon"] or 10**9)
    if source is not None:
        lr_sched.load_state_dict(source["state"]["lr_scheduler"])
        apply_lr(lr_sched, opt)
    model, opt = accelerator.prepare(model, opt)
    ema.to(accelerator.device)
    for extra in extras.values():
        extra.to(accelerator.device)
    cfg = with_sigma_data(cfg, source, data, note)  # EDM: measured once, then kept in config and checkpoints
    noise_sched = make_train_scheduler(cfg.schedule)
    unwrapped = accelerator.unwrap_model(model)

    # -- The run folder, and what is written into it along the way.
    paths = RunFiles(run_dir)
    if main:
        paths.start(cfg, state["step"])
    accelerator.wait_for_everyone()

    def save_all(reason: str) -> Path:
        name = ckpt.step_dir_name(state["step"])
        tmp = ckpt.begin(paths.checkpoints, state["step"]) if main else paths.checkpoints / f".tmp-{name}"
        accelerator.wait_for_everyone()
        ckpt.write_rng(tmp, rank, at_step["rng"])
        accelerator.wait_for_everyone()
        path = tmp
        if main:
            full_state = {**state, **at_step["pos"], "mixed_precision": mp, "lr_scheduler": lr_sched.state_dict(),
                          "ema": ema_counters(ema), "extra_ema": {d: ema_counters(e) for d, e in extras.items()}}
            path = ckpt.finish(tmp, state["step"], unwrapped.state_dict(), list(ema.shadow_params),
                               opt.state_dict(), full_state, cfg.to_yaml(), t_cfg.keep_checkpoints,
                               {d: list(e.shadow_params) for d, e in extras.items()})
            export_models()
            note(f"checkpoint {path.name} ({reason})")
        accelerator.wait_for_everyone()
        return path

    def export_models() -> None:
        """model/ (the main EMA) and ema/<share>/ for every extra EMA."""
        export_model(unwrapped, ema, noise_sched, cfg, paths.model)
        for share, extra in extras.items():
            export_model(unwrapped, extra, noise_sched, cfg, paths.extra_ema(float(share)))

    grid_s = [0.0]  # how long the last sample grid took: the final one is kept inside the budget

    def sample_grid() -> None:
        if main:
            from iclevr_diffusion.images import save_grid
            from iclevr_diffusion.report import plot_loss

            start = clock()
            with ema_weights(unwrapped, ema):
                images = sample_images(unwrapped, noise_sched, cfg)
            save_grid(images, paths.sample_grid(state["step"]))
            plot_loss(paths.metrics, paths.loss_plot)
            grid_s[0] = clock() - start
        accelerator.wait_for_everyone()

    def scheduled_outputs(step: int) -> None:
        """The checkpoint, sample grid, snapshots and evaluation due at this step."""
        nonlocal saved_step
        if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0:
            save_all("scheduled")
            saved_step = step
        if t_cfg.sample_every and step % t_cfg.sample_every == 0:
            sample_grid()
        for mark in due_snapshots(t_cfg.snapshot_minutes, state["elapsed_s"], paths) if main else ():
            export_model(unwrapped, ema, noise_sched, cfg, paths.snapshot(mark))
            note(f"snapshot {paths.snapshot(mark).name} at step {step}")
        if t_cfg.eval_every and step % t_cfg.eval_every == 0:
            root = getattr(data, "root", cfg.data.root)
            evaluate_hook(unwrapped, ema, noise_sched, cfg, run_dir, step, emit, main, root)
            accelerator.wait_for_everyone()

    # -- The loop.
    budget_s = t_cfg.max_minutes * 60 if t_cfg.max_minutes else None
    start_step, start_time = state["step"], clock()
    elapsed0 = state["elapsed_s"]
    planner = HorizonPlanner(budget_s is not None and horizon is None, start_step, budget_s)
    emit("start", step=state["step"], total=state["horizon"], budget_s=budget_s, mixed_precision=mp,
         world=world, resumed_from=str(source["path"]) if source else None)
    window = _Window(clock)
    last_loss, last_ips = None, None
    skipped_in_a_row = 0  # batches skipped for a non-finite loss or gradient since the last optimizer step
    saved_step = state["step"] if source else -1
    stopped_by = stop_reason(state, cfg, steps_per_epoch, budget_s)
    model.train()
    # Position and random states as of the last optimizer step: what a checkpoint records, so a
    # Ctrl-C in the middle of gradient accumulation still resumes exactly.
    at_step = {"pos": {"epoch": state["epoch"], "batch": state["batch"]}, "rng": ckpt.capture_rng(gen)}
    if stopped_by and source is not None:
        note(f"the run already reached its {stopped_by} limit at step {state['step']}; "
             "raise it (e.g. --max-steps, --max-minutes) to train on, or use a new --name")
    sigint = DeferredSigint()
    try:
        while stopped_by is None:
            feed = batches(data, order, state["epoch"], state["batch"], rank, world, cfg.data.num_workers)
            for images, labels in feed:
                # A forward and backward pass on this process's slice; an optimizer step once accumulated.
                images, labels = augment(images, labels, cfg, gen, accelerator.device)
                state["batch"] += 1
                with accelerator.accumulate(model):
                    labels = drop_labels(labels, t_cfg.label_dropout, gen)
                    loss = diffusion_loss(model, noise_sched, images, labels, gen, t_cfg.min_snr_gamma,
                                          cfg.schedule.p_mean, cfg.schedule.p_std, cfg.schedule.p_uniform,
                                          t_cfg.foreground_weight)
                    bad = None if all_finite(accelerator, loss) else ("loss", loss)
                    if bad is None:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            norm = clip_gradients(accelerator, model.parameters(), t_cfg.grad_clip)
                            bad = None if all_finite(accelerator, norm) else ("gradient norm", norm)
                    if bad is not None:
                        skipped_in_a_row += 1
                        state["skipped"] += 1
                        _non_finite(*bad, state["step"] + 1, t_cfg.nan_policy, paths, note, skipped_in_a_row)
                        opt.zero_grad(set_to_none=True)
                        continue
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                # Several processes: log the loss of the whole global batch, not rank 0's share of it.
                window.add((accelerator.reduce(loss.detach(), "mean") if world > 1 else loss).item(),
                           images.shape[0] * world)
                if not accelerator.sync_gradients:
                    continue

                # An optimizer step is done: count it, and record where it leaves data and randomness.
                skipped_in_a_row = 0
                lr_sched.step()
                ema.step(unwrapped.parameters())
                for extra in extras.values():
                    extra.step(unwrapped.parameters())
                state["step"] += 1
                step = state["step"]
                at_step = {"pos": {"epoch": state["epoch"], "batch": state["batch"]}, "rng": ckpt.capture_rng(gen)}
                state["elapsed_s"] = elapsed0 + clock() - start_time

                # Wall-clock runs: (re-)plan the lr horizon from the speed measured so far.
                planner.watch(step, clock)
                if planner.due(step):
                    now = clock()
                    state["horizon"] = agree(accelerator, planner.plan(step, now, state["elapsed_s"]))
                    planner.planned(step, now, state["horizon"])
                    lr_sched = with_horizon(lr_sched, opt, t_cfg.warmup_steps, state["horizon"])
                    emit("horizon", total=state["horizon"])

                # Progress: a metrics.jsonl line every log_every steps, the bar every step.
                if step % t_cfg.log_every == 0 or step == 1:
                    last_loss, last_ips = window.read()
                    if main:
                        row = {"step": step, "epoch": state["epoch"], "loss": last_loss,
                               "lr": lr_sched.get_last_lr()[0], "images_per_s": last_ips,
                               "elapsed_s": round(state["elapsed_s"], 3)}
                        if state["skipped"]:  # batches skipped for a non-finite loss or gradient so far
                            row["skipped"] = state["skipped"]
                        if on_log is not None:  # e.g. compare-timesteps' fixed-noise-level probe (raw weights)
                            row.update(on_log(step, unwrapped) or {})
                        paths.log(row)
                    window.reset()
                left = eta(state, budget_s, step - start_step, clock() - start_time)
                emit("step", step=step, loss=loss.item(), images_per_s=last_ips, elapsed_s=state["elapsed_s"],
                     eta_s=left)

                # Checkpoints, grids, snapshots and evaluations (their time does not count in images/s).
                busy = clock()
                scheduled_outputs(step)
                window.pause(clock() - busy)

                # Stop? Every process stops after the same step.
                if interrupt_after is not None and step >= interrupt_after:
                    raise KeyboardInterrupt
                reason = "interrupted" if sigint.hit else stop_reason(state, cfg, steps_per_epoch, budget_s, grid_s[0])
                stopped_by = agree_stop(accelerator, reason)
                if stopped_by == "interrupted":
                    raise KeyboardInterrupt
                if stopped_by is not None:
                    break
            else:  # the epoch ran out
                state["epoch"] += 1
                state["batch"] = 0
                stopped_by = stop_reason(state, cfg, steps_per_epoch, budget_s)
    except KeyboardInterrupt:
        if state["step"] != saved_step and state["step"] > 0:
            note("interrupted: saving a checkpoint")
            save_all("interrupted")
        raise
    finally:
        sigint.restore()

    # -- The end: a last checkpoint and export, and the final sample grid.
    if state["step"] != saved_step:
        save_all("end")
    elif main:
        export_models()
    if state["step"] > start_step or not paths.sample_grid(state["step"]).exists():
        sample_grid()
    result = TrainResult(
        run_dir=run_dir, step=state["step"], epoch=state["epoch"], loss=last_loss, images_per_s=last_ips,
        elapsed_s=state["elapsed_s"], stopped_by=stopped_by if state["step"] > start_step else "complete",
        mixed_precision=mp, resumed_from=source["path"] if source else None, model_dir=paths.model,
    )
    emit("end", result=result)
    accelerator.end_training()
    return result


def _accelerator(cfg: Config, source: dict | None, device: torch.device, model, note):
    """(mixed precision, Accelerator). 'auto' is measured once; a resumed run keeps what was measured so
    it continues identically."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    t_cfg = cfg.train
    mp = source["state"]["mixed_precision"] if source and t_cfg.mixed_precision == "auto" else None
    if mp is None:
        # The process count is only known once Accelerator exists, but mixed precision must be given to
        # its constructor: read the world size from the launcher's environment.
        micro = micro_batch(t_cfg.batch_size, t_cfg.grad_accum, int(os.environ.get("WORLD_SIZE", "1")))
        mp = resolve_mixed_precision(cfg, device, model, micro, note=note)
    # accelerate keeps mixed precision in a process-wide singleton; reset it so several runs can
    # follow each other in one process (tests, compare-timesteps). The process group is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mp, gradient_accumulation_steps=t_cfg.grad_accum, cpu=device.type == "cpu"
    )
    return mp, accelerator


class _Window:
    """Loss and images/s since the last metrics line; time spent on checkpoints and grids left out."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.loss, self.n, self.t, self.images = 0.0, 0, self.clock(), 0

    def add(self, loss: float, images: int) -> None:
        self.loss += loss
        self.n += 1
        self.images += images

    def read(self) -> tuple[float, float]:
        now = self.clock()
        return self.loss / max(self.n, 1), self.images / max(now - self.t, 1e-9)

    def pause(self, seconds: float) -> None:
        self.t += seconds


def _non_finite(what: str, value: torch.Tensor, step: int, policy: str, paths: RunFiles, note, in_a_row: int) -> None:
    """train.nan_policy: skip the batch with a note, or stop with the last good checkpoint named (at
    once with stop; with skip after MAX_SKIPS_IN_A_ROW batches in a row, when skipping does not help)."""
    if policy == "stop" or in_a_row >= MAX_SKIPS_IN_A_ROW:
        last = ckpt.list_checkpoints(paths.checkpoints)
        kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint yet"
        if policy == "stop":
            raise IclevrError(f"The {what} became {value.item()} at step {step}; {kept}. Lower train.lr, "
                              "or set train.nan_policy=skip to skip such batches.")
        raise IclevrError(f"The {what} was non-finite in {in_a_row} batches in a row at step {step} "
                          f"(train.nan_policy=skip skips only isolated ones); {kept}. Lower train.lr, "
                          "or check the training images.")
    note(f"non-finite {what} at step {step}: batch skipped")
