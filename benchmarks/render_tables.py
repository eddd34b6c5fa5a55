"""The table kinds of benchmarks/render_docs.py: one function per results-file shape.

Each kind takes [(path, data)] (the results files a marker names, parsed) and the marker's options,
and returns markdown lines: the table, its spread convention, seeds and conditions where the file has
them, and one source line per file (path, exact command, commit, CPU model and flags, torch and its
threads, date; "not recorded" for what an older file lacks). Plain Python, no torch.
"""

from __future__ import annotations

import statistics
from pathlib import Path

SPREAD = "Spread: population standard deviation over seeds, in percentage points."
NOT_RECORDED = "not recorded"
# What the recipes of benchmarks/quality_at_steps.py are, for the reader; an unknown one shows its name.
RECIPES = {
    "ddpm-minsnr": "an earlier default: epsilon DDPM, linear betas, min-SNR 5, lr 1e-3",
    "edm": "EDM, lr 1e-3",
    "edm-adagn": "EDM + AdaGN, lr 1e-3",
    "edm-adagn-lr4e-3": "EDM + AdaGN, lr 4e-3",
    "edm-adagn-lr2e-3-p08": "EDM + AdaGN, lr 2e-3, EDM2's noise levels (P_mean -0.8, P_std 1.6)",
    "edm-adagn-lr2e-3": "EDM + AdaGN, lr 2e-3 (EDM's noise levels: the default before this release)",
    "default-lpb2": "the previous default, 2 resnet layers per level (about 1.6x the time per step)",
    "default-w48": "the previous default, 1.5x the width: 48/96/192 (about 1.6x the time per step)",
    "default-b32": "the previous default with batch 32 (the same training images in half the steps)",
    "default-b8": "the previous default with batch 8 (the same training images in twice the steps)",
    "default-xattn8": "the previous default + cross-attention to one token per class at 8x8",
    "default-xattn16": "the previous default + cross-attention to one token per class at 16x16 and 8x8",
    "default-beta099": "the previous default with AdamW beta2 0.99 (EDM2's) instead of 0.999",
    "default-pm21": "the previous default with P_mean -2.1 (EDM's -1.2 moved by ln(0.2 / 0.5) to our sigma_data)",
    "default-pm06": "the previous default with P_mean -0.6 (more training at high noise levels)",
    "default-pm0": "the previous default with P_mean 0",
    "default-pm06-s09": "EDM + AdaGN with P_mean -0.6, P_std 0.9 (the default until rectified flow)",
    "default-pm06-s06": "the previous default with P_mean -0.6, P_std 0.6",
    "default-p4w": "the previous default on 4x4 patches, 64/128/256 channels (the UNet at 16x16)",
    "default-selfcond": "the previous default + self-conditioning",
    "noise06-p1": "the default without pixel patches (the UNet at 64x64)",
    "noise06-p1-16": "the default without pixel patches, a 16-channel level at 64x64 in front of its three",
    "noise06-hflip": "the default with random horizontal flips of the training images",
    "noise06-seed1": "EDM + AdaGN (the default until rectified flow), another training seed (1 instead of 0)",
    "noise06-attn16": "the default + self-attention at 16x16",
    "noise06-uniform02": "the default with 20% of its noise levels uniform in ln(sigma) over 0.002..80",
    "noise06-head32": "the default + a 32-channel conv head at 64x64 after the patches unfold",
    "noise06-p1-seed1": "the default without pixel patches, another training seed (1 instead of 0)",
    "noise06-fp32": "the default trained in fp32 instead of bf16 autocast",
    "noise06-overlap": "the default with overlapping patch convolutions (4x4 at stride 2 in, its transpose out)",
    "noise06-fg3": "the default with its loss weighted towards pixels off the floor (foreground_weight 3)",
    "noise06-lr3e-3": "the default with peak learning rate 3e-3 instead of 2e-3",
    "noise06-emas": "the default, with three more EMA lengths kept beside its own",
    "flow": "rectified flow instead of EDM, on the raw pixels (sigma_data 1), the default's noise levels",
    "flow-scaled": "rectified flow instead of EDM, pixels scaled to unit variance, the default's noise levels",
    "flow-scaled-sd3": "rectified flow, pixels scaled to unit variance, SD3's logit-normal(0, 1) for t",
    "flow-scaled-seed1": "rectified flow, pixels scaled to unit variance, another training seed (1 instead of 0)",
    "flow-scaled-seed2": "rectified flow, pixels scaled to unit variance, a third training seed (2)",
    "noise06-seed2": "EDM + AdaGN (the default until rectified flow), a third training seed (2)",
    "flow-midnorm": "the default + a group norm before the middle block's attention (model.mid_attention_norm)",
    "flow-midnorm-seed1": "the default + mid_attention_norm, another training seed (1 instead of 0)",
    "flow-midnorm-seed2": "the default + mid_attention_norm, a third training seed (2)",
    "default": "**the default preset**",
    "default-heun": "the previous default preset, sampled with Heun (its default)",
    "default-dpm++sde": "the previous default preset, sampled with DPM-Solver++ SDE",
    "flow-default-heun": "the default preset (rectified flow), sampled with Heun 18 (its default)",
    "flow-default-dpm++sde": "the default preset (rectified flow), sampled with DPM-Solver++ SDE 35",
}
# Earlier defaults, as the README's quality table names them.
PREVIOUS = {"default-pm06-s09": "EDM, before rectified flow",
            "edm-adagn-lr2e-3": "EDM at EDM's noise levels, N(-1.2, 1.2^2)"}
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


def source_line(path: str, data: dict, which: str = "") -> str:
    m = machine_of(data)

    def get(key):
        value = m.get(key)
        return NOT_RECORDED if value in (None, "", []) else value

    flags = m.get("cpu_flags")
    flags = ", ".join(flags) if flags else "flags " + NOT_RECORDED
    command = f"`{m['command']}`" if m.get("command") else NOT_RECORDED
    return (
        f"Source: `{path}`{which}; command: {command}; commit: {get('commit')}; CPU: {get('cpu')} ({flags}), "
        f"{get('cores')} cores; " + (f"GPU: {m['gpu']}; " if m.get("gpu") else "") +
        f"torch {get('torch')}; torch threads: {get('torch_threads')}; date: {get('date')}."
    )


def assembled_runs(data: dict) -> list[dict]:
    """The runs of a file that assembles several under `runs`, each with its own `machine`; [] for a
    file of one run (its `machine` at the top)."""
    if data.get("machine"):
        return []
    return [r for r in data.get("runs") or [] if isinstance(r, dict) and r.get("machine")]


def footer(files: list[tuple[str, dict]], *notes: str) -> list[str]:
    """The notes as one paragraph, then one bullet per source file (per run, for an assembled file)."""
    notes = [n for n in notes if n]
    sources = []
    for p, d in files:
        runs = assembled_runs(d)
        sources += [source_line(p, r, f" (run {i + 1} of {len(runs)})") for i, r in enumerate(runs)] or [
            source_line(p, d)]
    return ["", *notes, *([""] if notes else []), *[f"- {line}" for line in sources]]


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
    if opts.get("steps"):  # only these step counts
        rows = [r for r in rows if str(r["steps"]) in opts["steps"].split(",")]
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
            f"of which {'installing the shipped' if ev.get('source') == 'shipped' else 'training the own'} "
            f"evaluator ({ev.get('arch', NOT_RECORDED)}) on first use",
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
    """The README's quality table: the main job (main_job.json, and a row for each other main_job*.json,
    each named by its CPU), then the default and the previous defaults at each step count of
    quality_at_steps.json."""
    by = {Path(p).name: (p, d) for p, d in files}
    out, acc_mjs = [], []
    main_jobs = [(p, d) for p, d in files if Path(p).name.startswith("main_job")]  # one row per machine
    for _, mj in main_jobs:
        acc_mj = main_job_accuracy(mj)
        acc_mjs.append(acc_mj)
        ips = mj.get("images_per_s_last")
        # A main job of an earlier default names its recipe (quality_at_steps.py's name for that config).
        recipe = mj.get("recipe", "default")
        earlier = f" of an earlier default ({PREVIOUS[recipe]})" if recipe != "default" else ""
        machine = machine_of(mj)
        avx2 = " (AVX2 only)" if "avx512f" not in (machine.get("cpu_flags") or ["avx512f"]) else ""
        where = f" on the {machine.get('cpu') or NOT_RECORDED}{avx2}" if len(main_jobs) > 1 else ""
        out.append(
            [
                f"`iclevr-diff train`{earlier} (the main job{where}: {minutes(mj.get('train_wall_s'))} wall on a "
                "fresh cache, rendering included)",
                f"{num(mj.get('steps'))} steps, {num(ips, 1)} images/s (last logged)",
                *[acc(*acc_mj[s][:2]) if s in acc_mj else "not run" for s in ("test", "new_test")],
            ]
        )
    qp, q = by["quality_at_steps.json"]
    # quality_at_steps-*.json: another training run of a recipe, its row under the main file's
    reruns = [(p, d) for p, d in files if Path(p).name.startswith("quality_at_steps-")]
    names = {"default": "the default preset", **{k: f"an earlier default ({v})" for k, v in PREVIOUS.items()},
             "ddpm-minsnr": "the DDPM default before those (epsilon, min-SNR 5, DDIM 25)"}
    cells: dict[tuple, dict] = {}
    for order, (_, qd) in enumerate([(qp, q), *reruns]):
        for r in qd["rows"]:
            if r["recipe"] in names and r["split"] in ("test", "new_test"):
                cells.setdefault((r["steps"], list(names).index(r["recipe"]), order), {})[r["split"]] = r
    shown_runs: set[str] = set()  # training runs already shown in a row: a later file of one is a re-scoring
    for (steps, i, order), c in sorted(cells.items()):
        again = f": {_another_run(*reruns[order - 1], steps, shown_runs)}" if order else ""
        out.append(
            [
                f"{list(names.values())[i]}, exactly {steps:,} steps{again}",
                f"{steps:,} steps of batch {q['batch_size']}",
                *[acc(c[s]["mean"], c[s].get("spread")) if s in c else "not run" for s in ("test", "new_test")],
            ]
        )
    seeds = sorted({len(r["seeds"]) for r in q["rows"]} | {v[2] for a in acc_mjs for v in a.values()})
    cond = sorted({r.get("conditions") for r in q["rows"] if r["split"] in ("test", "new_test")} - {None})
    note = (
        f"{SPREAD} Seeds: {' or '.join(map(str, seeds))}; conditions per split: "
        f"{' or '.join(map(str, cond)) or NOT_RECORDED}."
    )
    return table(["run", "training", "test", "new_test"], out, {2, 3}) + footer([*main_jobs, (qp, q), *reruns], note)


def _another_run(path: str, data: dict, steps: int, shown_runs: set[str]) -> str:
    """How a quality_at_steps-*.json run differs from the main file's: where and in what precision it
    trained, and at which commit; or, for a run folder a row above already showed, that it is that run
    scored again (with another sampling setting)."""
    trained = next((t for t in data.get("trained", []) if t["steps"] == steps), None)
    if trained is None:
        raise RenderError(f"{path}: no `trained` entry for its {steps:,}-step rows (where and how it trained)")
    churns = {r.get("churn") for r in data.get("rows", []) if r["steps"] == steps} - {None, 0}
    sampled = f", sampled with churn {', '.join(f'{c:g}' for c in sorted(churns))}" if churns else ""
    if trained.get("run") in shown_runs:
        return f"the run of the row above, scored again{sampled}"
    shown_runs.add(trained.get("run"))
    avx2 = " (AVX2 only)" if "avx512f" not in trained.get("cpu_flags", ["avx512f"]) else ""
    precision = {"no": "fp32", "bf16": "bf16 autocast"}.get(trained.get("mixed_precision"), NOT_RECORDED)
    commit = machine_of(data).get("commit") or NOT_RECORDED
    return (f"another training run, {precision} on the {trained.get('cpu') or NOT_RECORDED}{avx2}, code of {commit}"
            f"{sampled}")


def sampler_agreement(files, opts):
    """benchmarks/sampler_agreement.py: every sampler of a model, a long reference, fp32, and a guidance curve.
    A churn column where any row was sampled with EDM's churn (heun and euler; "-" for the DPM-Solvers)."""
    path, d = files[0]
    rows = []
    entries = [(s, "") for s in d.get("samplers", [])]
    entries += [(d["reference"], " (long stochastic reference)")] if d.get("reference") else []
    other = d.get("other_precision") or d.get("fp32")  # "fp32" in files written before 2026-12-02
    entries += [(other, "")] if other else []
    churned = any(s.get("churn") for s, _ in entries)
    for s, note in entries:
        nfe = NFE.get(s["name"], lambda n: n)(s["steps"])
        # ("heun", "euler"): edm.CHURN_SAMPLERS; this module renders without importing the package
        churn = [f"{s.get('churn', 0):g}" if s["name"] in ("heun", "euler") else "-"] if churned else []
        rows.append(
            [
                f"`{s['name']}`{note}",
                f"{s['steps']} ({nfe})",
                f"{s['guidance']:g}",
                *churn,
                s["precision"],
                acc(s["accuracy"], s.get("spread")),
                str(len(s.get("seeds", []))),
                num(s.get("seconds_per_image"), 2),
            ]
        )
    head = ["sampler", "steps (network evaluations)", "guidance", *(["churn"] if churned else []), "precision",
            "accuracy", "seeds", "s/image (1 thread)"]
    lines = table(head, rows, {i for i, h in enumerate(head) if h not in ("sampler", "precision")})
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
    pooled = d.get("accuracy", "pooled test + new_test").split(" (")[0].removeprefix("pooled ")
    model = f"Model: `{d.get('model_dir', d.get('model', NOT_RECORDED))}`. Accuracy: {pooled} pooled."
    return lines + footer(files, model, SPREAD)


def _ema_label(row: dict) -> str:
    """A row of benchmarks/ema_lengths.py by its kind ("ema_decay 0.999", "share 0.25", "raw")."""
    what, _, value = row.get("kind", "").partition(" ")
    if what == "ema_decay":
        return (f"the default's EMA (`ema_decay` {value}, warmed up: the last ~11% of the steps, at most "
                f"{1 / (1 - float(value)):,.0f} steps)")
    if what == "share":
        return f"EMA over the last {100 * float(value):g}% of the steps"
    return "raw weights (last checkpoint)" if what == "raw" else row["weights"]


def ema_lengths(files, opts):
    """benchmarks/ema_lengths.py: every EMA length (and the raw weights) of one run, scored on one split;
    one column per file (its run's step count)."""
    columns = [(d["steps"], {_ema_label(r): r for r in d["rows"]}) for _, d in files]
    labels = list(dict.fromkeys(_ema_label(r) for _, d in files for r in d["rows"]))
    best = {steps: max(r["mean"] for r in rows.values()) for steps, rows in columns}
    out = []
    for label in labels:
        cells = []
        for steps, rows in columns:
            r = rows.get(label)
            cell = acc(r["mean"], r["spread"]) if r else "-"
            cells.append(f"**{cell}**" if r and r["mean"] == best[steps] else cell)
        out.append([label, *cells])
    split = files[0][1]["rows"][0]["split"]
    header = ["weights", *(f"{split} after {num(steps)} steps" for steps, _ in columns)]
    note = f"{SPREAD} {seeds_and_conditions([r for _, d in files for r in d['rows']])} Bold: the best per column."
    return table(header, out, set(range(1, len(columns) + 1))) + footer(files, note)


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
        if s is not None and e.get("first_use") == "installing the shipped network":
            return f"{s:.1f} s: installing the shipped network (checks the held-out images)"
        ips = e.get("images_per_s")
        return None if s is None else f"{s:.1f} s: training" + (f" ({ips:.0f} images/s)" if ips else "")

    def compute(e):
        g = e.get("first_use_gflop", e.get("gflop_total"))
        if g is not None and e.get("first_use") == "installing the shipped network":
            return f"{g}: one forward pass per held-out image"
        return g

    def once(e):
        t = e.get("training_once")
        return f"{t['seconds']} s, {t['gflop_total']} GFLOP ({t['cpu']}, {t['threads']} thread)" if t else None

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
        ("first use (`evaluate` with no evaluator cached), time", seconds),
        ("first use, compute (GFLOP)", compute),
        ("the shipped network's one-time training", once),
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


def slow_cpu(files, opts):
    """benchmarks/slow_cpu.py: each step of the newcomer's path natively and as an AVX2-only CPU."""
    (_, d), rows = files[0], []
    speeds = d["training_images_per_s"]
    for key, row in speeds.items():
        rows.append([f"training images/s: {key}", f"{row['images_per_s']:.1f}",
                     f"{'bf16' if row['bf16'] else 'fp32'}, torch kernels {row['cpu_capability']}"])
    rows.append(["rendering the built-in set (`make-data`): native / simulated",
                 f"{minutes(d['render_s']['native'])} / {minutes(d['render_s']['simulated'])}", "wall clock"])
    for mode, r in d.get("evaluate_first_use", {}).items():
        cells = ", ".join(f"{split} {a:.1f}%" for split, a in r["accuracy"].items())
        rows.append([f"first `evaluate` ({mode}): in all / of it sampling", f"{minutes(r['seconds'])} / "
                     f"{minutes(r['sampling_seconds'])}", f"1 seed: {cells}"])
    sim = ", ".join(f"{k}={v}" for k, v in d["simulation"].items())
    return table(["what", "figure", "note"], rows, {1}) + footer(
        files, f"Simulated = every step in a child process with {sim}. Wall clock on the machine named below.")
