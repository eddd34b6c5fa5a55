"""Table kinds of benchmarks/render_docs.py for the GPU checks (gpu_check.py, gpu_stability.py).
See render_tables.py."""

from __future__ import annotations

from render_tables import NOT_RECORDED, assembled_runs, footer, num, table


def _runs(files) -> list[dict]:
    """Every GPU run in the files: a gpu_check.json is one run, an assembled file lists several under `runs`."""
    return [run for _, d in files for run in (assembled_runs(d) or [d])]


def _gpu(runs: list[dict]) -> str:
    names = sorted({(r.get("machine") or {}).get("gpu") or NOT_RECORDED for r in runs})
    return f"GPU: {', '.join(names)}."


def gpu_throughput(files, opts):
    """Training images/s of each (preset, batch) row, one column per run: small models are launch-bound on a
    large GPU and vary from run to run, so every run is shown rather than one figure."""
    runs = _runs(files)
    keys = list(dict.fromkeys((r["name"], r["batch"]) for run in runs for r in run["throughput"]))
    rows = []
    for name, batch in keys:
        found = [next((r for r in run["throughput"] if (r["name"], r["batch"]) == (name, batch)), None) for run in runs]
        first = next(r for r in found if r)
        peak = first.get("peak_memory_gib")
        rows.append([name, str(batch), f"{first['params'] / 1e6:.2f}M",
                     *[f"{r['images_per_s']:.0f}" if r else "-" for r in found],
                     f"{peak:.2f}" if peak is not None else NOT_RECORDED])
    header = ["preset", "batch", "params", *[f"images/s, run {i + 1}" for i in range(len(runs))], "peak GiB"]
    note = (f"{_gpu(runs)} Full optimizer steps (forward, loss, backward, AdamW) on random 64x64 batches, timed with "
            "CUDA synchronisation after 3 warm-up steps; runs in the order of the source lines below.")
    return table(header, rows, set(range(1, len(header)))) + footer(files, note)


def gpu_short_runs(files, opts):
    """The short training runs of gpu_check.py: steps reached in the budget and accuracy, or where they stopped."""
    rows = []
    for run in _runs(files):
        for r in run.get("short_runs") or ([run["short_run"]] if run.get("short_run") else []):
            if r.get("error"):
                rows.append([r["config"], f"{r['minutes']:g}", "stopped", "-", "-", "-", "-", r["error"]])
                continue
            a = r["accuracy"]
            rows.append([r["config"], f"{r['minutes']:g}", num(r["steps"]), f"{r['images_per_s']:.0f}",
                         f"{r['sampler']}, w {r['guidance_scale']:g}", f"{100 * a['test']:.1f}",
                         f"{100 * a['new_test']:.1f}", ""])
    header = ["preset", "minutes", "steps", "images/s", "sampler", "test %", "new_test %", "stopped by"]
    note = f"{_gpu(_runs(files))} One sampling seed, each split's conditions once; the toolkit's own evaluator."
    return table(header, rows, {1, 2, 3, 5, 6}) + footer(files, note)


def gpu_stability(files, opts):
    """benchmarks/gpu_stability.py: each variant's steps, where its loss went non-finite, its last loss."""
    rows = []
    for _, d in files:
        for r in d["runs"]:
            last = r["curve"][-1] if r["curve"] else {}
            at = r["non_finite_at_step"]
            rows.append([r["name"], num(r["finished_steps"]) if r["finished_steps"] else "-", num(at) if at else "none",
                         f"{last['loss']:.3f}" if last.get("loss") is not None else "-",
                         f"{last['max_abs_param']:.2f}" if last.get("max_abs_param") is not None else "-"])
    d = files[0][1]
    note = (f"{_gpu([d for _, d in files])} Preset `{d.get('preset')}`, {num(d.get('steps'))} optimizer steps each "
            "(max_steps, so the learning rate anneals over them), train.nan_policy=stop.")
    return table(["variant", "steps done", "non-finite loss at step", "last logged loss", "largest |weight|"],
                 rows, {1, 2, 3, 4}) + footer(files, note)
