"""The training loop: one `train(cfg, run_dir)` driven by HF accelerate.

accelerate does device placement, mixed precision (bf16 autocast on CPU, fp16/bf16 on CUDA),
gradient accumulation and data parallelism: `accelerate launch` / torchrun run this same code on
several processes, each taking its slice of every global batch. Data order, noise, timesteps and
label dropout come from seeded CPU generators whose states go into every checkpoint, so a run that
is interrupted and resumed ends with the same weights as one that never stopped.

Learning-rate horizon: AdamW with diffusers' cosine schedule with warm-up. With max_steps or epochs
the horizon is known. With only a wall-clock budget (train.max_minutes) it is planned after the first
few optimizer steps (PROBE_SKIP + PROBE_STEPS) from the measured speed: the steps that fit in the
remaining budget, less a reserve of 10% of the budget for the final sample grid and export. It is then
re-planned about REPLANS times from the speed since the last plan, so a run that started on a busy CPU
(too few steps planned) or that loses time to grids and checkpoints (too many) still ends on time with
its learning rate annealed. The run stops at the horizon or when the budget runs out, whichever comes
first. The horizon is stored in the checkpoints; a resumed run re-plans it from its own speed. With
max_steps or epochs set as well, those fix the horizon and the budget only cuts the run short.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iclevr_diffusion import checkpoints as ckpt
from iclevr_diffusion import precision
from iclevr_diffusion.batches import BatchOrder, batches, build_dataset
from iclevr_diffusion.config import Config, config_from_dict
from iclevr_diffusion.devices import resolve_device
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.losses import diffusion_loss, drop_labels
from iclevr_diffusion.model import ConditionalUNet
from iclevr_diffusion.run_folder import RunFolder, snapshot_name
from iclevr_diffusion.run_outputs import RunFiles, ema_weights, evaluate_hook, export_model, sample_images
from iclevr_diffusion.schedule import make_train_scheduler

PROBE_SKIP, PROBE_STEPS = 3, 20  # a wall-clock-only run times steps 4..23 to plan its lr horizon
REPLANS = 10  # ... and re-plans it about this often, from the speed since the last plan
BUDGET_RESERVE = 0.10  # share of the budget kept for sample grids, checkpoints and the final export
Progress = Callable[..., None]  # progress(event, **info): events start, step, note, end


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
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    emit = progress or (lambda event, **info: None)
    run_dir = Path(run_dir)
    t_cfg = cfg.train
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(device.index)  # single process on cuda:N: accelerate uses the current device

    candidates = _resume_candidates(run_dir, resume)
    source = ckpt.load_newest(candidates, warn=lambda m: emit("note", message=m)) if candidates else None
    if source is not None:
        _check_compatible(cfg, source, run_dir)

    set_seed(cfg.seed)  # model init (and python/numpy, which we do not otherwise use)
    model = ConditionalUNet.from_run_config(cfg)
    if t_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    grad_accum = t_cfg.grad_accum
    # 'auto' is measured once; a resumed run keeps what was measured so it continues identically.
    mp = source["state"]["mixed_precision"] if source and t_cfg.mixed_precision == "auto" else None
    # The process count is only known once Accelerator exists, but mixed precision must be given to
    # its constructor: read the world size from the launcher's environment.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = _micro_batch(t_cfg.batch_size, grad_accum, world)
    if mp is None:
        mp = resolve_mixed_precision(cfg, device, model, micro, note=lambda m: emit("note", message=m))
    # accelerate keeps mixed precision in a process-wide singleton; reset it so several runs can
    # follow each other in one process (tests, compare-timesteps). The process group is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=mp, gradient_accumulation_steps=grad_accum, cpu=device.type == "cpu"
    )
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    micro = _micro_batch(t_cfg.batch_size, grad_accum, world)

    data = dataset
    if data is None:
        render = lambda done, total: emit("render", done=done, total=total)  # noqa: E731
        data = build_dataset(cfg, note=lambda m: emit("note", message=m), render=render)
    order = BatchOrder(len(data), micro * world, seed=cfg.seed)
    steps_per_epoch = order.batches_per_epoch // grad_accum
    if steps_per_epoch == 0:
        raise IclevrError(
            f"The dataset has {len(data)} images, fewer than one optimizer step of train.batch_size="
            f"{t_cfg.batch_size} x train.grad_accum; lower train.batch_size."
        )

    opt = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    horizon = _known_horizon(cfg, steps_per_epoch)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "elapsed_s": 0.0, "horizon": horizon}
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # noise, timesteps, label dropout, flips
    ema = EMAModel(model.parameters(), decay=t_cfg.ema_decay, model_cls=ConditionalUNet, model_config=model.config)
    if source is not None:
        model.load_state_dict(source["model"])
        opt.load_state_dict(source["optimizer"])
        ema.load_state_dict({**source["state"]["ema"], "shadow_params": source["ema"]})
        state.update({k: source["state"][k] for k in ("step", "epoch", "batch", "elapsed_s", "horizon")})
        # A longer run resumed (raised max_steps/epochs) gets the new horizon.
        state["horizon"] = horizon if horizon is not None else state["horizon"]
        ckpt.restore_rng(source["rng"], gen)
    lr_sched = get_cosine_schedule_with_warmup(opt, t_cfg.warmup_steps, state["horizon"] or 10**9)
    if source is not None:
        lr_sched.load_state_dict(source["state"]["lr_scheduler"])
        _apply_lr(lr_sched, opt)
    model, opt = accelerator.prepare(model, opt)
    ema.to(accelerator.device)
    cfg = _with_sigma_data(cfg, source, data, emit)  # EDM: measured once, then kept in config and checkpoints
    noise_sched = make_train_scheduler(cfg.schedule)
    unwrapped = accelerator.unwrap_model(model)

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
            ema_state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            full_state = {**state, **at_step["pos"], "mixed_precision": mp, "lr_scheduler": lr_sched.state_dict(),
                          "ema": ema_state}
            path = ckpt.finish(tmp, state["step"], unwrapped.state_dict(), list(ema.shadow_params),
                               opt.state_dict(), full_state, cfg.to_yaml(), t_cfg.keep_checkpoints)
            export_model(unwrapped, ema, noise_sched, cfg, paths.model)
            emit("note", message=f"checkpoint {path.name} ({reason})")
        accelerator.wait_for_everyone()
        return path

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

    budget_s = t_cfg.max_minutes * 60 if t_cfg.max_minutes else None
    plan_by_time = budget_s is not None and horizon is None  # max_steps / epochs fix the horizon otherwise
    start_step, start_time = state["step"], clock()
    elapsed0 = state["elapsed_s"]
    emit("start", step=state["step"], total=state["horizon"], budget_s=budget_s, mixed_precision=mp,
         world=world, resumed_from=str(source["path"]) if source else None)
    window_loss, window_n, window_t, window_images = 0.0, 0, clock(), 0
    last_loss, last_ips = None, None
    saved_step = state["step"] if source else -1
    stopped_by = _stop_reason(state, cfg, steps_per_epoch, budget_s)
    model.train()
    # Position and random states as of the last optimizer step: what a checkpoint records, so a
    # Ctrl-C in the middle of gradient accumulation still resumes exactly.
    at_step = {"pos": {"epoch": state["epoch"], "batch": state["batch"]}, "rng": ckpt.capture_rng(gen)}
    # (step, time) the speed is measured from; the step of the next horizon plan; steps between plans
    probe, replan_at, spacing = None, 0, 0
    if stopped_by and source is not None:
        emit("note", message=f"the run already reached its {stopped_by} limit at step {state['step']}; "
                             "raise it (e.g. --max-steps, --max-minutes) to train on, or use a new --name")
    sigint = _DeferredSigint()
    try:
        while stopped_by is None:
            feed = batches(data, order, state["epoch"], state["batch"], rank, world, cfg.data.num_workers)
            for images, labels in feed:
                images, labels = _augment(images, labels, cfg, gen, accelerator.device)
                state["batch"] += 1
                with accelerator.accumulate(model):
                    labels = drop_labels(labels, t_cfg.label_dropout, gen)
                    loss = diffusion_loss(model, noise_sched, images, labels, gen, t_cfg.min_snr_gamma,
                                          cfg.schedule.p_mean, cfg.schedule.p_std)
                    if not _all_finite(accelerator, loss):
                        if t_cfg.nan_policy == "stop":
                            last = ckpt.list_checkpoints(paths.checkpoints)
                            kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint yet"
                            raise IclevrError(
                                f"Loss became {loss.item()} at step {state['step'] + 1}; {kept}. Lower train.lr, "
                                "or set train.nan_policy=skip to skip such steps."
                            )
                        emit("note", message=f"non-finite loss at step {state['step'] + 1}: batch skipped")
                        opt.zero_grad(set_to_none=True)
                        continue
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t_cfg.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                # Several processes: log the loss of the whole global batch, not rank 0's share of it.
                window_loss += (accelerator.reduce(loss.detach(), "mean") if world > 1 else loss).item()
                window_n += 1
                window_images += images.shape[0] * world
                if not accelerator.sync_gradients:
                    continue
                lr_sched.step()
                ema.step(unwrapped.parameters())
                state["step"] += 1
                step = state["step"]
                at_step = {"pos": {"epoch": state["epoch"], "batch": state["batch"]}, "rng": ckpt.capture_rng(gen)}
                state["elapsed_s"] = elapsed0 + clock() - start_time
                if step - start_step == PROBE_SKIP:  # the first steps are slow (lazy init): time the next ones
                    probe = (step, clock())
                if plan_by_time and probe and step >= probe[0] + PROBE_STEPS and step >= replan_at:
                    now = clock()
                    planned = _planned_horizon(step, (step - probe[0]) / (now - probe[1]), budget_s,
                                               state["elapsed_s"])
                    state["horizon"] = _agree(accelerator, planned)
                    # About REPLANS plans per run, spaced by the first (agreed) plan, so every process
                    # re-plans at the same step; the speed is then measured over the last interval.
                    spacing = spacing or max(PROBE_STEPS, (state["horizon"] - step) // REPLANS)
                    replan_at, probe = step + spacing, (step, now)
                    lr_sched = _with_horizon(lr_sched, opt, t_cfg.warmup_steps, state["horizon"])
                    emit("horizon", total=state["horizon"])
                if step % t_cfg.log_every == 0 or step == 1:
                    now = clock()
                    last_loss, last_ips = window_loss / max(window_n, 1), window_images / max(now - window_t, 1e-9)
                    if main:
                        row = {"step": step, "epoch": state["epoch"], "loss": last_loss,
                               "lr": lr_sched.get_last_lr()[0], "images_per_s": last_ips,
                               "elapsed_s": round(state["elapsed_s"], 3)}
                        if on_log is not None:  # e.g. compare-timesteps' fixed-noise-level probe (raw weights)
                            row.update(on_log(step, unwrapped) or {})
                        paths.log(row)
                    window_loss, window_n, window_t, window_images = 0.0, 0, clock(), 0
                eta = _eta(state, budget_s, step - start_step, clock() - start_time)
                emit("step", step=step, loss=loss.item(), images_per_s=last_ips, elapsed_s=state["elapsed_s"],
                     eta_s=eta)
                busy = clock()  # grids, checkpoints and evaluations do not count in images/s
                if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0:
                    save_all("scheduled")
                    saved_step = step
                if t_cfg.sample_every and step % t_cfg.sample_every == 0:
                    sample_grid()
                for mark in _due_snapshots(t_cfg.snapshot_minutes, state["elapsed_s"], paths.snapshots) if main else ():
                    export_model(unwrapped, ema, noise_sched, cfg, paths.snapshot(mark))
                    emit("note", message=f"snapshot {snapshot_name(mark)} at step {step}")
                if t_cfg.eval_every and step % t_cfg.eval_every == 0:
                    root = getattr(data, "root", cfg.data.root)
                    evaluate_hook(unwrapped, ema, noise_sched, cfg, run_dir, step, emit, main, root)
                    accelerator.wait_for_everyone()
                window_t += clock() - busy
                if interrupt_after is not None and step >= interrupt_after:
                    raise KeyboardInterrupt
                reason = "interrupted" if sigint.hit else _stop_reason(state, cfg, steps_per_epoch, budget_s, grid_s[0])
                stopped_by = _agree_stop(accelerator, reason)  # every process stops after the same step
                if stopped_by == "interrupted":
                    raise KeyboardInterrupt
                if stopped_by is not None:
                    break
            else:  # the epoch ran out
                state["epoch"] += 1
                state["batch"] = 0
                stopped_by = _stop_reason(state, cfg, steps_per_epoch, budget_s)
    except KeyboardInterrupt:
        if state["step"] != saved_step and state["step"] > 0:
            emit("note", message="interrupted: saving a checkpoint")
            save_all("interrupted")
        raise
    finally:
        sigint.restore()
    if state["step"] != saved_step:
        save_all("end")
    elif main:
        export_model(unwrapped, ema, noise_sched, cfg, paths.model)
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


def _with_sigma_data(cfg: Config, source: dict | None, data, emit: Progress) -> Config:
    """EDM needs sigma_data, the std of the training pixels: the config's, else the checkpoint's (a resumed
    run), else measured on the dataset now. Returned in a copy of the config, which every run file records."""
    sch = cfg.schedule
    if sch.formulation != "edm" or sch.sigma_data is not None:
        return cfg
    import copy

    import yaml

    from iclevr_diffusion.edm import measure_sigma_data

    value = None
    if source is not None and source.get("config"):
        value = config_from_dict(yaml.safe_load(source["config"])).schedule.sigma_data
    if value is None:
        value = measure_sigma_data(data)
        emit("note", message=f"sigma_data {value} (std of the training pixels, measured on up to 1,024 images)")
    cfg = copy.deepcopy(cfg)
    cfg.schedule.sigma_data = value
    return cfg


def _micro_batch(batch_size: int, grad_accum: int, world: int) -> int:
    per = batch_size // (grad_accum * world)
    if per * grad_accum * world != batch_size:
        raise IclevrError(
            f"train.batch_size={batch_size} must be divisible by train.grad_accum={grad_accum} x {world} "
            "process(es); change train.batch_size."
        )
    return per


def _known_horizon(cfg: Config, steps_per_epoch: int) -> int | None:
    limits = [x for x in (cfg.train.max_steps, cfg.train.epochs and cfg.train.epochs * steps_per_epoch) if x]
    if limits:
        return min(limits)
    if not cfg.train.max_minutes:
        raise IclevrError("Set at least one of train.max_steps, train.epochs or train.max_minutes.")
    return None


def _planned_horizon(step: int, steps_per_s: float, budget_s: float, elapsed_s: float) -> int:
    """The step at which a wall-clock run should end: the steps that fit in the time left at this speed,
    less the reserve kept for the final grid and export; always at least one more step."""
    left = budget_s * (1 - BUDGET_RESERVE) - elapsed_s
    return step + max(1, int(steps_per_s * left))


def _stop_reason(
    state: dict, cfg: Config, steps_per_epoch: int, budget_s: float | None, reserve_s: float = 0.0
) -> str | None:
    """Which limit, if any, is reached; `reserve_s` of the time budget is kept for the final sample grid."""
    t = cfg.train
    if t.max_steps and state["step"] >= t.max_steps:
        return "max_steps"
    if t.epochs and state["epoch"] >= t.epochs:
        return "epochs"
    out_of_time = budget_s and state["elapsed_s"] + reserve_s >= budget_s
    # A horizon planned from the time budget; one fixed by max_steps or epochs ends the run as those.
    planned = budget_s and not (t.max_steps or t.epochs) and state["horizon"]
    if out_of_time or (planned and state["step"] >= state["horizon"]):
        return "max_minutes"
    return None


def _due_snapshots(marks: list[float], elapsed_s: float, folder: Path) -> list[float]:
    """Marks passed by now and not exported yet (a resumed run does not redo them)."""
    return [m for m in marks if m * 60 <= elapsed_s and not (folder / snapshot_name(m)).is_dir()]


def _eta(state, budget_s, steps_done, seconds) -> float | None:
    """Seconds left: from the step horizon at the current speed, capped by the wall-clock budget."""
    left = []
    if state["horizon"] and steps_done:
        left.append((state["horizon"] - state["step"]) * seconds / steps_done)
    if budget_s:
        left.append(budget_s - state["elapsed_s"])
    return max(0.0, min(left)) if left else None


def _apply_lr(lr_sched, opt) -> None:
    """Set the optimizer's lr to what the schedule says for its current step (after a state load)."""
    for group, base, fn in zip(opt.param_groups, lr_sched.base_lrs, lr_sched.lr_lambdas):
        group["lr"] = base * fn(lr_sched.last_epoch)


def _with_horizon(lr_sched, opt, warmup: int, horizon: int):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    state = lr_sched.state_dict()
    new = get_cosine_schedule_with_warmup(getattr(opt, "optimizer", opt), warmup, horizon)
    new.load_state_dict(state)
    _apply_lr(new, getattr(opt, "optimizer", opt))
    return new


def _all_finite(accelerator, loss: torch.Tensor) -> bool:
    """Every process must agree, or one would skip a step the others take (and DDP would hang)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.gather(finite)
    return bool(finite.min() > 0)


def _agree(accelerator, value: int) -> int:
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast

    return int(broadcast(torch.tensor([value], device=accelerator.device)).item())


_REASONS = [None, "max_steps", "epochs", "max_minutes", "interrupted"]


class _DeferredSigint:
    """Ctrl-C during the loop sets a flag that is acted on after a whole optimizer step.

    A KeyboardInterrupt raised between opt.step() and the step counter would save weights one update
    ahead of the step the checkpoint records, and under several processes each would stop at a
    different step; checked at the step boundary (and agreed between processes) neither can happen.
    A second Ctrl-C stops at once. Outside the main thread signals cannot be caught, and a process
    that ignores SIGINT keeps ignoring it: nothing changes then.
    """

    def __init__(self):
        self.hit = False
        self.previous = None
        # A process started with SIGINT ignored (nohup, a background job) keeps ignoring it.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) not in (
            signal.SIG_IGN, None
        ):
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _agree_stop(accelerator, reason: str | None) -> str | None:
    """Clocks differ between processes: the main process decides when a time budget is spent."""
    if accelerator.num_processes == 1:
        return reason
    return _REASONS[_agree(accelerator, _REASONS.index(reason))]


def _augment(images, labels, cfg: Config, gen: torch.Generator, device):
    if cfg.data.hflip:  # flips drawn from the run's generator so they resume exactly
        flip = torch.rand(images.shape[0], generator=gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def _resume_candidates(run_dir: Path, resume: Path | None) -> list[Path]:
    """--resume PATH (a named checkpoint is used as is; a folder falls back to older ones), else run_dir's."""
    if resume is not None:
        return ckpt.find_resume_source(Path(resume))[0]
    return list(reversed(ckpt.list_checkpoints(RunFolder(run_dir).checkpoints)))


def _check_compatible(cfg: Config, source: dict, run_dir: Path) -> None:
    """The model must be the one the checkpoint holds; other keys (budget, lr...) may change."""
    if not source.get("config"):
        return
    import yaml

    old = config_from_dict(yaml.safe_load(source["config"]))
    for section in ("model", "schedule"):
        a, b = getattr(old, section), getattr(cfg, section)
        # sigma_data left to be measured (None) takes the checkpoint's measured value
        diff = [k for k in vars(a)
                if getattr(a, k) != getattr(b, k) and not (k == "sigma_data" and getattr(b, k) is None)]
        if diff:
            k = diff[0]
            raise IclevrError(
                f"{section}.{k} is {getattr(b, k)!r} but the checkpoint {source['path']} was trained with "
                f"{getattr(a, k)!r}; use the same config to resume, or a new --name to start another run."
            )
    if old.data.image_size != cfg.data.image_size:
        raise IclevrError(
            f"data.image_size is {cfg.data.image_size} but the checkpoint {source['path']} was trained at "
            f"{old.data.image_size}; use a new --name to start another run."
        )
