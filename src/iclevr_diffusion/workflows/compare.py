"""Workflow for `iclevr-diff compare-timesteps`: one run per (T, schedule), then one table and figure.

Finished runs (DONE.json + model/) are reused; an interrupted run resumes from its checkpoints, so
rerunning the command continues the experiment where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from iclevr_diffusion.config import Config
from iclevr_diffusion.run_folder import RunFolder
from iclevr_diffusion.workflows.console import err, print_json, table
from iclevr_diffusion.workflows.console import out as stdout

COLUMNS = (
    ("T", "T"), ("schedule", "schedule"), ("steps", "steps"), ("minutes", "train_minutes"),
    ("final loss", "final_loss"), ("fixed-level loss", "fixed_level_loss"),
    ("acc test", "accuracy_test"), ("acc new_test", "accuracy_new_test"),
    ("s/img ddpm-T", "ddpm_s_per_image"), ("fast sampler", "fast_sampler"), ("s/img fast", "fast_s_per_image"),
    ("alpha_bar_T", "alpha_bar_T"), ("SNR_T dB", "snr_db"),
)


def run(
    cfg: Config,
    timesteps: str = "300,1000",
    schedules: str = "linear",
    out: Path = Path("runs/compare-timesteps"),
    evaluate: bool = True,
    timing_images: int = 2,
    as_json: bool = False,
    quiet: bool = False,
) -> list[dict]:
    from iclevr_diffusion.diffusion.schedule import make_train_scheduler
    from iclevr_diffusion.io import write_json, write_text
    from iclevr_diffusion.training import timestep_comparison as ex
    from iclevr_diffusion.training.batches import build_dataset
    from iclevr_diffusion.training.loop import train
    from iclevr_diffusion.workflows.train import train_progress

    if cfg.schedule.formulation != "ddpm":
        from iclevr_diffusion.errors import IclevrError

        raise IclevrError(
            f"compare-timesteps studies the DDPM timestep count T; schedule.formulation={cfg.schedule.formulation} "
            "has continuous noise levels. Use schedule.formulation=ddpm (the compare-timesteps preset does)."
        )
    values = ex.parse_timesteps(timesteps)
    names = ex.parse_schedules(schedules)
    out = Path(out)
    runs = ex.run_configs(cfg, values, names)
    write_text(out / "experiment.yaml", cfg.to_yaml())
    note = (lambda m: None) if quiet else (lambda m: err.print(m))
    dataset = None
    for name, run_cfg in runs:
        run_dir = out / name
        if ex.is_done(run_dir):
            note(f"{name}: finished earlier, reused")
            continue
        if dataset is None:  # one dataset for every run: same images, same order
            dataset = build_dataset(cfg, note=note)
        probe = ex.FixedLevelProbe(dataset, make_train_scheduler(run_cfg.schedule), every=ex.probe_every(run_cfg))
        note(f"{name}: training (alpha_bar_T = {ex.final_alpha_bar_of(run_cfg):.3g})")
        with train_progress(name, quiet) as progress:
            result = train(run_cfg, run_dir, progress=progress, dataset=dataset, on_log=probe)
        write_json(RunFolder(run_dir).done, {"step": result.step, "stopped_by": result.stopped_by})

    results = []
    for name, run_cfg in runs:
        note(f"{name}: measuring accuracy and sampling time")
        results.append(ex.summarize_run(out / name, run_cfg, run_cfg.data.root, timing_images, evaluate, note))
    ex.plot_learning_curves([(name, out / name) for name, _ in runs], out / "learning_curves.png")
    rows = ex.write_results(results, out)
    if as_json:
        print_json(rows)
    else:
        stdout.print(table(f"compare-timesteps ({out})", [c for c, _ in COLUMNS], [
            ["-" if row[key] is None else row[key] for _, key in COLUMNS] for row in rows
        ]))
        stdout.print(f"learning curves: {out / 'learning_curves.png'}; results: {out / 'results.csv'}")
    return rows
