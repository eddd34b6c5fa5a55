"""Table kinds of benchmarks/render_docs.py for benchmarks/attention_check.py. See render_tables.py."""

from __future__ import annotations

from render_tables import NOT_RECORDED, footer, machine_of, num, table

MID = "mid_block.attentions.0"


def _sci(x: float | None) -> str:
    """7.7e6 for large figures, 1,947, 68.4 or 0.397 for the others."""
    if x is None:
        return NOT_RECORDED
    if x == float("inf"):
        return "inf"
    if abs(x) >= 1e4:
        mantissa, exponent = f"{x:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3f}"


def _run_name(d: dict) -> str:
    return f"`{d['run'].removeprefix('runs/')}`" if d.get("run") else "untrained"


def attention_saturation(files, opts):
    """Per checkpoint: the middle block's and the other layers' largest |logit| and mean top attention
    weight, and the training loss's gradient norm on the fused and the math kernel (fp32, bf16)."""
    rows = []
    for _, d in files:
        for r in d["rows"]:
            mid = r["attention"][MID]
            others = [a for name, a in r["attention"].items() if name != MID]
            g = r["gradient_norm"]
            rows.append([_run_name(d), r["weights"] if r["step"] is None else num(r["step"]),
                         "yes" if mid["normalised_input"] else "no", _sci(mid["max_abs_logit"]),
                         f"{mid['mean_top_weight']:.3f}", _sci(max(a["max_abs_logit"] for a in others)),
                         f"{max(a['mean_top_weight'] for a in others):.2f}",
                         *[_sci(g[k]) for k in ("fused fp32", "math fp32", "fused bf16", "math bf16")]])
    header = ["run", "step", "mid norm", "mid: max abs logit", "mid: top weight", "others: max abs logit",
              "others: top weight", "grad fused fp32", "grad math fp32", "grad fused bf16", "grad math bf16"]
    batches = sorted({d["batch"] for _, d in files})
    note = (f"One fixed batch of {', '.join(map(str, batches))} training images, noise from seed 0. \"top weight\": "
            "the attention weight of each query's largest key, averaged (1.0: every position copies one other); "
            "\"others\": the largest figure over the other attention layers, whose input is group-normalised. "
            "Gradient norm of the training loss over all weights.")
    return table(header, rows, set(range(1, len(header)))) + footer(files, note)


def attention_kernels(files, opts):
    """The kernel sweep (gradient norm of one attention call as its logits grow) and the training pass's
    seconds on each kernel, one column pair per file."""
    header, columns = ["largest abs logit"], []
    for _, d in files:
        if not d.get("kernel_sweep"):  # an early file: timing only
            continue
        machine = machine_of(d)
        cpu = machine.get("cpu") or NOT_RECORDED
        flags = "avx512_bf16" if "avx512_bf16" in (machine.get("cpu_flags") or []) else "AVX2 only"
        header += [f"fused, {cpu} ({flags})", f"math, {cpu} ({flags})"]
        columns.append({r["max_abs_logit"]: r for r in d["kernel_sweep"]})
    logits = sorted({x for c in columns for x in c})
    rows = []
    for x in logits:
        cells = [(_sci(c[x]["fused"]), _sci(c[x]["math"])) if x in c else ("-", "-") for c in columns]
        rows.append([_sci(x) if x >= 1e4 else f"{x:,.0f}", *[v for pair in cells for v in pair]])
    timing = []
    for _, d in files:
        t = d.get("pass_seconds")
        if t:
            machine = machine_of(d)
            timing.append(f"{machine.get('cpu') or NOT_RECORDED}, {d.get('pass_precision', 'bf16 autocast')}, "
                          f"{machine.get('torch_threads', NOT_RECORDED)} thread(s): "
                          f"fused {t['fused']:.3f} s, math {t['math']:.3f} s ({t['math'] / t['fused']:.2f}x)")
    note = ("Gradient norm of one attention call's backward (batch 16, 4 heads, 64 positions, 32 channels: the "
            "default's middle block) with random queries and keys scaled to the largest |logit| of the row, fp32. "
            "Median training pass (forward + backward of the default's loss, batch 16) on each kernel: "
            + ("; ".join(timing) if timing else NOT_RECORDED) + ".")
    return table(header, rows, set(range(1, len(header)))) + footer(files, note)
