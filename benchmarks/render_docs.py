"""Render the tables of BENCHMARKS.md and README.md from benchmarks/results/*.json, or check they are current.

    python benchmarks/render_docs.py            # rewrite every rendered section (atomic write)
    python benchmarks/render_docs.py --check    # exit 1, one line per stale section, when a file differs
    python benchmarks/render_docs.py --check docs/OTHER.md   # any markdown files instead of the two

A rendered section sits between two marker comments; the first names a table kind (a function below)
and the results files it reads, relative to the markdown file, then optional key=value options:

    <!-- render:quality_at_steps benchmarks/results/quality_at_steps.json group=recipe -->
    ... replaced by the table, the spread convention and a source line per file ...
    <!-- /render -->

Every table says its spread convention (population SD over seeds, in percentage points), its seeds
and conditions where the file has them, and for each file: the path, the exact command, the git
commit, the CPU model and flags, torch and its threads, the date. A key an older file lacks is
rendered as "not recorded". Plain Python (no torch): the test suite runs it against the real files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "BENCHMARKS.md")
MARKER = re.compile(r"^<!-- render:(?P<spec>[^>]*?) -->\n(?P<body>.*?)^<!-- /render -->$", re.S | re.M)
SPREAD = "Spread: population standard deviation over seeds, in percentage points."
NOT_RECORDED = "not recorded"
# What the recipes of benchmarks/quality_at_steps.py are, for the reader; an unknown one shows its name.
RECIPES = {
    "ddpm-minsnr": "previous default: epsilon DDPM, linear betas, min-SNR 5, lr 1e-3",
    "edm": "EDM, lr 1e-3",
    "edm-adagn": "EDM + AdaGN, lr 1e-3",
    "edm-adagn-lr4e-3": "EDM + AdaGN, lr 4e-3",
    "edm-adagn-lr2e-3-p08": "EDM + AdaGN, lr 2e-3, EDM2's noise levels (P_mean -0.8, P_std 1.6)",
    "edm-adagn-lr2e-3": "EDM + AdaGN, lr 2e-3",
    "default-lpb2": "the default, 2 resnet layers per level (1.7x the time per step)",
    "default-w48": "the default, 1.5x the width: 48/96/192 (1.9x the time per step)",
    "default": "**the default preset**",
    "default-heun": "the default preset, sampled with Heun (its default)",
    "default-dpm++sde": "the default preset, sampled with DPM-Solver++ SDE",
}
NFE = {"heun": lambda n: 2 * n - 1}  # network evaluations per sample; other samplers: one per step


class RenderError(Exception):
    """A marker or results file that cannot be rendered: one line for the user."""


# --- formatting ---------------------------------------------------------------------------------


def num(x, digits: int = 0) -> str:
    if x is None:
        return NOT_RECORDED
    return f"{x:,.{digits}f}" if isinstance(x, float) or digits else f"{x:,}"


def acc(mean: float | None, spread: float | None = None) -> str:
    """An accuracy in percent, with its spread in points when there is one."""
    if mean is None:
        return NOT_RECORDED
    return f"{mean:.1f}%" + ("" if spread is None else f" ± {spread:.1f}")


def pop_sd(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return NOT_RECORDED
    m, s = divmod(round(seconds), 60)
    return f"{m}:{s:02d}"


def table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]


def machine_of(data: dict) -> dict:
    """The `machine` dict, or the same keys at the top level and in the card (evaluator cards)."""
    if data.get("machine"):
        return data["machine"]
    card = data.get("card") or {}
    found = {"date": card.get("date"), "torch_threads": card.get("threads")}
    return {**found, **{k: data[k] for k in ("command", "commit", "cpu", "cpu_flags", "date") if k in data}}


def source_line(path: str, data: dict) -> str:
    m = machine_of(data)

    def get(key):
        value = m.get(key)
        return NOT_RECORDED if value in (None, "", []) else value

    flags = m.get("cpu_flags")
    flags = ", ".join(flags) if flags else "flags " + NOT_RECORDED
    command = f"`{m['command']}`" if m.get("command") else NOT_RECORDED
    return (
        f"Source: `{path}`; command: {command}; commit: {get('commit')}; CPU: {get('cpu')} ({flags}), "
        f"{get('cores')} cores; torch {get('torch')}; torch threads: {get('torch_threads')}; date: {get('date')}."
    )


def footer(files: list[tuple[str, dict]], *notes: str) -> list[str]:
    """The notes as one paragraph, then one bullet per source file."""
    notes = [n for n in notes if n]
    return ["", *notes, *([""] if notes else []), *[f"- {source_line(p, d)}" for p, d in files]]


def seeds_and_conditions(rows: list[dict]) -> str:
    seeds = sorted({len(r["seeds"]) for r in rows if r.get("seeds")})
    cond = {}
    for r in rows:
        if r.get("split") and r.get("conditions"):
            cond.setdefault(r["split"], r["conditions"])
    text = f"Seeds: {' or '.join(map(str, seeds))}." if seeds else "Seeds: " + NOT_RECORDED + "."
    if cond:
        text += " Conditions per split: " + ", ".join(f"{s} {n}" for s, n in cond.items()) + "."
    return text


# --- the table kinds: each takes [(path, data)] and options, returns markdown lines ----------------


def quality_at_steps(files, opts):
    """Rows {recipe, steps, split, mean, spread, seeds} of benchmarks/quality_at_steps.py, one column per split."""
    group = opts.get("group", "recipe_name")  # recipe_name: what trained; recipe: "default" if it is the shipped one
    rows = [r for _, d in files for r in d["rows"]]
    if opts.get("recipes"):
        rows = [r for r in rows if r.get(group, r["recipe"]) in opts["recipes"].split(",")]
    splits = list(dict.fromkeys(r["split"] for r in rows))
    batch = next((d["batch_size"] for _, d in files if d.get("batch_size")), None)
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r.get(group, r["recipe"]), r["steps"]), {"row": r})[r["split"]] = r
    order = list(RECIPES)
    keys = sorted(cells, key=lambda k: (k[1], order.index(k[0]) if k[0] in order else len(order)))
    out = []
    for name, steps in keys:
        first = cells[(name, steps)]["row"]
        images = f" ({steps * batch:,})" if batch else ""
        sampler = (
            f"{first.get('sampler', '?')} {first.get('sampler_steps', '')}, guidance {first.get('guidance', '?'):g}"
        )
        split_cells = [
            acc(c["mean"], c.get("spread")) if (c := cells[(name, steps)].get(s)) else "not run" for s in splits
        ]
        if name in opts.get("highlight", "default").split(","):
            split_cells = [f"**{c}**" if c != "not run" else c for c in split_cells]
        out.append([RECIPES.get(name, f"`{name}`"), f"{steps:,}{images}", sampler, *split_cells])
    header = ["recipe", f"steps{f' of batch {batch} (training images)' if batch else ''}", "sampler", *splits]
    return table(header, out, {1, *range(3, 3 + len(splits))}) + footer(
        files, SPREAD + " " + seeds_and_conditions(rows)
    )


def main_job_accuracy(data: dict) -> dict[str, tuple[float, float, int, int]]:
    """split -> (mean %, population SD in points, seeds, conditions), from the per-seed accuracies."""
    out = {}
    for r in data["evaluate"]["results"]:
        seeds = [100 * a for a in r.get("accuracies") or [r["accuracy"]]]
        out[r["split"]] = (statistics.fmean(seeds), pop_sd(seeds), len(seeds), r.get("images"))
    return out


def main_job(files, opts):
    """benchmarks/main_job.py: the README's newcomer path on a fresh cache, timed, and its accuracy."""
    (_, d), rows = files[0], []
    ev = d.get("evaluator_first_use") or {}
    rows.append(
        ["`iclevr-diff train`, wall clock (rendering the built-in set included)", minutes(d.get("train_wall_s"))]
    )
    rows.append(["optimizer steps", num(d.get("steps"))])
    rows.append(["training time the trainer logged", minutes(d.get("train_elapsed_s"))])
    rows.append(["images/s, last logged", num(d.get("images_per_s_last"), 1)])
    rows.append(["`iclevr-diff evaluate --seeds 4`, wall clock", minutes(d.get("evaluate_wall_s"))])
    held = ev.get("heldout_accuracy")
    rows.append(
        [
            f"of which training the own evaluator ({ev.get('arch', NOT_RECORDED)}) on first use",
            f"{num(ev.get('seconds'), 1)} s, {acc(None if held is None else 100 * held)} held-out",
        ]
    )
    results = d["evaluate"]["results"]
    for split, (mean, sd, n, cond) in main_job_accuracy(d).items():
        r = next(x for x in results if x["split"] == split)
        sampler = f"{r.get('sampler')} {r.get('steps')}, guidance {r.get('guidance_scale'):g}"
        per_seed = " / ".join(f"{100 * a:.1f}" for a in r.get("accuracies", []))
        rows.append(
            [
                f"accuracy on {split} ({cond} conditions, {n} seeds, {sampler})",
                f"**{acc(mean, sd)}** (seeds {per_seed})",
            ]
        )
    for r in results:
        if r.get("per_shape"):
            shapes = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(r["per_shape"].items(), key=lambda kv: -kv[1]))
            rows.append([f"per shape on {r['split']}", shapes])
    note = SPREAD[:-1] + ", computed here from the per-seed accuracies in the file."
    cmds = "; ".join(f"`{c}`" for c in d.get("commands", [])) or NOT_RECORDED
    return table(["what", "figure"], rows, {1}) + footer(files, note, f"Commands it ran: {cmds}.")


def readme_quality(files, opts):
    """The README's quality table: the main job (main_job.json), then the default and the previous
    default at each step count of quality_at_steps.json."""
    by = {Path(p).name: (p, d) for p, d in files}
    out = []
    mj_path, mj = by["main_job.json"]
    acc_mj = main_job_accuracy(mj)
    ips = mj.get("images_per_s_last")
    out.append(
        [
            f"`iclevr-diff train` (the main job: {minutes(mj.get('train_wall_s'))} wall on a fresh cache, "
            "rendering included)",
            f"{num(mj.get('steps'))} steps, {num(ips, 1)} images/s (last logged)",
            *[acc(*acc_mj[s][:2]) if s in acc_mj else "not run" for s in ("test", "new_test")],
        ]
    )
    qp, q = by["quality_at_steps.json"]
    names = {"default": "the default preset", "ddpm-minsnr": "the previous default (epsilon DDPM, min-SNR 5, DDIM 25)"}
    cells: dict[tuple, dict] = {}
    for r in q["rows"]:
        if r["recipe"] in names and r["split"] in ("test", "new_test"):
            cells.setdefault((r["steps"], list(names).index(r["recipe"])), {})[r["split"]] = r
    for (steps, i), c in sorted(cells.items()):
        out.append(
            [
                f"{list(names.values())[i]}, exactly {steps:,} steps",
                f"{steps:,} steps of batch {q['batch_size']}",
                *[acc(c[s]["mean"], c[s].get("spread")) if s in c else "not run" for s in ("test", "new_test")],
            ]
        )
    seeds = sorted({len(r["seeds"]) for r in q["rows"]} | {v[2] for v in acc_mj.values()})
    cond = sorted({r.get("conditions") for r in q["rows"] if r["split"] in ("test", "new_test")} - {None})
    note = (
        f"{SPREAD} Seeds: {' or '.join(map(str, seeds))}; conditions per split: "
        f"{' or '.join(map(str, cond)) or NOT_RECORDED}."
    )
    return table(["run", "training", "test", "new_test"], out, {2, 3}) + footer([by["main_job.json"], (qp, q)], note)


def sampler_agreement(files, opts):
    """benchmarks/sampler_agreement.py: every sampler of a model, a long reference, fp32, and a guidance curve."""
    path, d = files[0]
    rows = []
    entries = [(s, "") for s in d.get("samplers", [])]
    entries += [(d["reference"], " (long stochastic reference)")] if d.get("reference") else []
    entries += [(d["fp32"], "")] if d.get("fp32") else []
    for s, note in entries:
        nfe = NFE.get(s["name"], lambda n: n)(s["steps"])
        rows.append(
            [
                f"`{s['name']}`{note}",
                f"{s['steps']} ({nfe})",
                f"{s['guidance']:g}",
                s["precision"],
                acc(s["accuracy"], s.get("spread")),
                str(len(s.get("seeds", []))),
                num(s.get("seconds_per_image"), 2),
            ]
        )
    lines = table(
        ["sampler", "steps (network evaluations)", "guidance", "precision", "accuracy", "seeds", "s/image (1 thread)"],
        rows,
        {1, 2, 4, 5, 6},
    )
    if d.get("guidance_curve"):
        g = d["guidance_curve"]
        lines += [
            "",
            *table(
                ["guidance", *[f"{s['guidance']:g}" for s in g]],
                [
                    ["accuracy", *[acc(s["accuracy"], s.get("spread")) for s in g]],
                    ["seeds", *[str(len(s.get("seeds", []))) for s in g]],
                ],
                set(range(1, len(g) + 1)),
            ),
        ]
    model = f"Model: `{d.get('model_dir', d.get('model', NOT_RECORDED))}`. Accuracy: test + new_test pooled."
    return lines + footer(files, model, SPREAD)


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


def train_speed(files, opts):
    path, d = files[0]
    rows = [
        [r["name"], f"{r['params'] / 1e6:.2f}M", f"{r['images_per_s']:.1f}", f"{r.get('speedup_vs_first', 0):.1f}"]
        for r in d["rows"]
    ]
    note = (
        f"Batch {d.get('batch_size')}, {d.get('image_size')}x{d.get('image_size')}, {d.get('rounds')} rounds of "
        f"{d.get('seconds_per_variant_per_round')} s per variant; {d.get('method', '')}."
    )
    return table(["variant", "params", "images/s", "x the first row"], rows, {1, 2, 3}) + footer(files, note)


def render_speed(files, opts):
    path, d = files[0]
    rows = [[r["what"], num(r["images"]), f"{r['seconds']:.2f}", f"{r['images_per_s']:.0f}"] for r in d["results"]]
    load = (d.get("machine") or {}).get("load_avg_1min")
    note = f"1-minute load average when it ran: {load if load is not None else NOT_RECORDED}."
    return table(["what", "images", "seconds", "images/s"], rows, {1, 2, 3}) + footer(files, note)


def evaluator_speed(files, opts):
    variants = list(dict.fromkeys(r["variant"] for _, d in files for r in d["speed"]))
    rows = []
    for _, d in files:
        by = {r["variant"]: r for r in d["speed"]}
        threads = (d.get("machine") or {}).get("torch_threads", NOT_RECORDED)
        rows.append([str(threads), *[f"{by[v]['median']:.0f}" if v in by else "-" for v in variants]])
    return table(["threads", *variants], rows, set(range(1, len(variants) + 1))) + footer(
        files, "Training images/s, median of interleaved rounds."
    )


def _evaluators(data: dict) -> list[dict]:
    """The evaluators a results file describes, whatever its shape: benchmarks/evaluator.py's current
    `evaluators` dict, its older {card, heldout}, or a bare card file."""
    m = machine_of(data)
    where = {"cpu": m.get("cpu"), "threads": m.get("torch_threads")}
    if "evaluators" in data:
        return [
            {
                "arch": arch,
                **where,
                **e.get("card", {}),
                **{k: v for k, v in e.items() if v is not None},
                "heldout": e.get("heldout", {}),
            }
            for arch, e in data["evaluators"].items()
        ]
    card = data.get("card", {})
    return [{"arch": card.get("arch", "resnet18"), **where, **card, "heldout": data.get("heldout", {})}]


def evaluator(files, opts):
    """The own evaluators' accuracy and cost: one column per evaluator (of every file named)."""
    evs = [(path, e) for path, d in files for e in _evaluators(d)]

    def held(e):
        h = e["heldout"]
        pct = e.get("heldout_accuracy")
        pct = pct if isinstance(pct, float) and pct > 1 else 100 * (pct if pct is not None else h.get("accuracy", 0))
        hits = f" ({h['hits']:,}/{h['labels']:,} labels)" if "hits" in h else ""
        return f"**{pct:.2f}%**{hits}"

    def shape(e):
        s = e["heldout"].get("per_shape") or e.get("heldout_per_shape")
        return ", ".join(f"{k} {100 * v:.1f}" for k, v in s.items()) if s else None

    def precision(e):
        t = e.get("precision_timing")
        return (
            (
                f"{e.get('precision')} (start-up timing: fp32 {t['fp32_images_per_s']:.0f}, bf16 "
                f"{t['bf16_images_per_s']:.0f} images/s)"
            )
            if t
            else e.get("precision")
        )

    def seconds(e):
        s = e.get("first_use_s", e.get("seconds"))
        ips = e.get("images_per_s")
        return None if s is None else f"{s:.1f} s" + (f" ({ips:.0f} images/s)" if ips else "")

    def smaller(e):
        s = e["heldout"].get("accuracy_from_smaller_images")
        return ", ".join(f"{k}x{k} {100 * v:.1f}%" for k, v in s.items()) if s else None

    what = [
        ("parameters", lambda e: num(e["parameters"]) if e.get("parameters") else None),
        ("GFLOP per image, forward", lambda e: e.get("gflop_per_image")),
        ("held-out accuracy", held),
        ("accuracy after each epoch, %", lambda e: " / ".join(f"{100 * a:.1f}" for a in e.get("heldout_curve", []))),
        ("per shape, %", shape),
        ("held-out images downscaled and upscaled back", smaller),
        ("epochs, batch, lr", lambda e: f"{e.get('epochs')}, {e.get('batch_size')}, {e.get('lr')}"),
        ("precision", precision),
        ("training (first use) time", seconds),
        ("training compute, GFLOP", lambda e: e.get("first_use_gflop", e.get("gflop_total"))),
        ("CPU, threads", lambda e: f"{e.get('cpu') or NOT_RECORDED}, {e.get('threads') or NOT_RECORDED}"),
    ]
    rows = [[w, *[str(v) if (v := f(e)) not in (None, "") else "-" for _, e in evs]] for w, f in what]
    rows = [r for r in rows if any(c != "-" for c in r[1:])]
    lines = table(["what", *[f"{e['arch']} (`{Path(p).name}`)" for p, e in evs]], rows)
    for _, d in files:
        g = d.get("generated")
        if g:
            lines += [
                "",
                f"On {g['images']} generated images (`{g.get('source')}`): "
                + ", ".join(f"{k} {v:.2f}%" for k, v in g["accuracy"].items())
                + f"; {g['difference_points']:.2f} points apart; the same hits on "
                f"{100 * g['images_scored_alike']:.0f}% of the images.",
            ]
    return lines + footer(files, "Held-out: the renderer's heldout.json, rendered images never trained on.")


KINDS = {
    f.__name__: f
    for f in (
        quality_at_steps,
        main_job,
        readme_quality,
        sampler_agreement,
        samplers,
        x0_check,
        preset_choice,
        quality_at_budget,
        train_speed,
        render_speed,
        evaluator_speed,
        evaluator,
    )
}


# --- the markdown side -----------------------------------------------------------------------------


def render_section(spec: str, base: Path) -> str:
    words = spec.split()
    kind, files, opts = (
        words[0],
        [w for w in words[1:] if "=" not in w],
        dict(w.split("=", 1) for w in words[1:] if "=" in w),
    )
    if kind not in KINDS:
        raise RenderError(f"unknown table kind '{kind}' (known: {', '.join(KINDS)})")
    loaded = []
    for f in files:
        try:
            loaded.append((f, json.loads((base / f).read_text())))
        except FileNotFoundError:
            raise RenderError(f"results file {base / f} not found (section render:{spec})") from None
        except json.JSONDecodeError as e:
            raise RenderError(f"results file {base / f} is not valid JSON ({e})") from None
    if not loaded:
        raise RenderError(f"section render:{spec} names no results file")
    try:
        return "\n".join(KINDS[kind](loaded, opts)) + "\n"
    except (KeyError, TypeError, IndexError, StopIteration) as e:
        raise RenderError(f"cannot render section render:{spec}: missing or odd value {e!r}") from None


def render(text: str, base: Path) -> tuple[str, list[tuple[str, int]]]:
    """The text with every section rendered, and the (spec, line) of each section that changed."""
    stale, parts, pos = [], [], 0
    for m in MARKER.finditer(text):
        body = render_section(m["spec"], base)
        if body != m["body"]:
            stale.append((m["spec"], text.count("\n", 0, m.start()) + 1))
        parts += [text[pos : m.start("body")], body]
        pos = m.end("body")
    if text.count("<!-- render:") != len(parts) // 2:
        raise RenderError("a '<!-- render:... -->' marker has no matching '<!-- /render -->' line")
    return "".join(parts) + text[pos:], stale


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md and BENCHMARKS.md)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a rendered section is stale")
    args = parser.parse_args(argv)
    paths = args.files or [ROOT / name for name in DOCS]
    stale_any = False
    try:
        for path in paths:
            text = path.read_text()
            new, stale = render(text, path.resolve().parent)
            for spec, line in stale:
                stale_any = True
                if args.check:
                    print(f"{path.name}:{line}: section 'render:{spec}' is stale; run python benchmarks/render_docs.py")
            if not args.check and new != text:
                write_atomic(path, new)
                print(f"rendered {len(stale)} section(s) of {path}")
    except (RenderError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 1 if args.check and stale_any else 0


if __name__ == "__main__":
    sys.exit(main())
