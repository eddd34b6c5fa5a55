"""Table kinds of benchmarks/render_docs.py for the previous DDPM default's results files (samplers,
x0 check, preset choice, quality at budget): kept so those sections stay traceable. See render_tables.py."""

from __future__ import annotations

from pathlib import Path

from render_tables import NOT_RECORDED, SPREAD, acc, footer, num, table


def samplers(files, opts):
    """benchmarks/samplers.py (DDPM models): accuracy per sampler and step count (rows) and guidance (columns)."""
    lines = []
    for _, d in files:
        guid = sorted({r["guidance_scale"] for r in d["rows"]})
        grid: dict[tuple, dict] = {}
        for r in d["rows"]:
            grid.setdefault((r["sampler"], r["steps"], r["precision"]), {})[r["guidance_scale"]] = r
        rows = []
        for (name, steps, prec), by_g in grid.items():
            speed = by_g.get(3.0) or by_g[max(by_g)]
            rows.append(
                [
                    f"{name} {steps}" + (f", **{prec}**" if prec != "bf16" else ""),
                    *[acc(100 * by_g[g]["accuracy"]) if g in by_g else "-" for g in guid],
                    f"{speed['seconds_per_image']:.3f} (w {speed['guidance_scale']:g})",
                ]
            )
        lines += [
            *([""] if lines else []),
            *table(["sampler, steps", *[f"w = {g:g}" for g in guid], "s/image"], rows, set(range(1, len(guid) + 2))),
        ]
        splits = ", ".join(f"{k} {v}" for k, v in (d.get("splits") or {}).items()) or NOT_RECORDED
        lines += [
            "",
            f"Model: `{d.get('model', NOT_RECORDED)}`; accuracy pooled over {splits} conditions and "
            f"{d.get('seeds', NOT_RECORDED)} seed(s), no spread recorded.",
        ]
    return lines + footer(files)


def x0_check(files, opts):
    """benchmarks/x0_check.py: probe, x0 error per timestep, accuracy per sampler, one row per model."""
    path, d = files[0]
    models = d["models"]
    ts = [e["t"] for e in next(iter(models.values()))["noise_errors"]]
    samplers_ = list(next(iter(models.values()))["accuracy"])
    rows = []
    for name, m in models.items():
        errs = {e["t"]: e["x0_rms_error"] for e in m["noise_errors"]}
        a = m["accuracy"]
        rows.append(
            [
                f"`{name}` ({m.get('prediction_type')})",
                f"{m['probe_x0_rms']:.2f}",
                " / ".join(f"{errs[t]:.3g}" for t in ts),
                *[f"{100 * a[s]['test']:.1f}% / {100 * a[s]['new_test']:.1f}%" for s in samplers_],
            ]
        )
    header = ["model", "probe", "x0 RMS error at t = " + " / ".join(map(str, ts)), *samplers_]
    m0 = next(iter(models.values()))
    note = (
        f"Accuracy: test / new_test, seed 0 (1 seed, no spread), {m0.get('steps')} steps, "
        f"guidance {m0.get('guidance_scale')}."
    )
    return table(header, rows, set(range(1, len(header)))) + footer(files, note)


def preset_choice(files, opts):
    """results/preset_choice.json: candidates trained for a wall-clock budget, scored with several samplers."""
    path, d = files[0]
    eval_key = next((k for k in d["runs"][0] if k.startswith("accuracy_")), None)
    scored = [(run, r) for run in d["runs"] for r in run.get("sampler_rows", []) if r.get("source") != "log"]
    cols = list(dict.fromkeys((r["sampler"], r["steps"], r["guidance_scale"], r.get("precision")) for _, r in scored))
    rows = []
    for run in d["runs"]:
        by = {
            (r["sampler"], r["steps"], r["guidance_scale"], r.get("precision")): r
            for r in run.get("sampler_rows", [])
            if r.get("source") != "log"
        }
        ev = run.get(eval_key) or {}
        rows.append(
            [
                f"{run['id']}: {run['name']} ({run['threads']} thread(s), {run['minutes']} min)",
                num(run.get("steps")),
                f"{acc(100 * ev['test'])} / {acc(100 * ev['new_test'])}" if ev else "-",
                *[acc(100 * by[c]["accuracy"]) if c in by else "-" for c in cols],
            ]
        )
    header = [
        "candidate",
        "steps",
        "dpm++ 25, w 2 (test / new_test)",
        *[f"{s} {n}, w {g:g}{f', {p}' if p and p != 'bf16' else ''}" for s, n, g, p in cols],
    ]
    logged = [
        f"{run['id']} {r['sampler']} {r['steps']} at w {r['guidance_scale']:g}: {acc(100 * r['accuracy'])}"
        for run in d["runs"]
        for r in run.get("sampler_rows", [])
        if r.get("source") == "log"
    ]
    note = "Seed 0 (1 seed, no spread); the sampler columns pool test + new_test."
    log = f"From the runs' logs (pooled, not re-scored): {'; '.join(logged)}." if logged else ""
    return table(header, rows, set(range(1, len(header)))) + footer(files, note, log)


def quality_at_budget(files, opts):
    """benchmarks/quality_at_budget.py: snapshots of one time-budgeted run, per file, and the sampler choice."""
    rows, cand = [], {}
    for path, d in files:
        t = d.get("trained") or {}
        label = f"`{Path(path).name}`"
        for r in d["rows"]:
            end = r.get("model", "").endswith("/model")
            steps = num(t.get("steps")) if end else NOT_RECORDED
            rows.append(
                [
                    label,
                    f"{r['minutes']:g} min ({'end' if end else 'snapshot'})",
                    steps,
                    *[acc(100 * r[s]["mean"], 100 * r[s]["spread"]) for s in ("test", "new_test")],
                ]
            )
        c = d.get("choice") or {}
        rows[-1][0] += (
            f": {num(t.get('steps'))} steps in {num(t.get('elapsed_s'), 0)} s, "
            f"{num(t.get('images_per_s'), 0)} images/s overall; sampled with {c.get('sampler')} "
            f"{c.get('steps')}, w {c.get('guidance_scale', 0):g}"
        )
        for x in d.get("candidates", []):
            cand.setdefault((x["sampler"], x["steps"], x["guidance_scale"]), {})[path] = x["mean_accuracy_seed0"]
    lines = table(["run", "budget", "steps", "test", "new_test"], rows, {2, 3, 4})
    crow = [
        [f"{s} {n}, w {g:g}", *[acc(100 * v[p]) if p in v else "-" for p, _ in files]] for (s, n, g), v in cand.items()
    ]
    lines += [
        "",
        *table(
            ["candidate sampler (seed 0, mean of test and new_test)", *[f"`{Path(p).name}`" for p, _ in files]],
            crow,
            set(range(1, len(files) + 1)),
        ),
    ]
    seeds = sorted({len(r[s]["seeds"]) for _, d in files for r in d["rows"] for s in ("test", "new_test")})
    splits = ", ".join(f"{k} {v}" for k, v in (files[0][1].get("splits") or {}).items())
    return lines + footer(files, f"{SPREAD} Seeds: {' or '.join(map(str, seeds))}. Conditions per split: {splits}.")
