"""Render the tables of BENCHMARKS.md and README.md from benchmarks/results/*.json, or check they are current.

    python benchmarks/render_docs.py            # rewrite every rendered section (atomic write)
    python benchmarks/render_docs.py --check    # exit 1, one line per stale section, when a file differs
    python benchmarks/render_docs.py --check docs/OTHER.md   # any markdown files instead of the two

A rendered section sits between two marker comments; the first names a table kind (a function of
render_tables*.py, listed in KINDS below) and the results files it reads, relative
to the markdown file, then optional key=value options:

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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import render_tables as current  # noqa: E402
import render_tables_attention as attention  # noqa: E402
import render_tables_ddpm as ddpm  # noqa: E402
import render_tables_gpu as gpu  # noqa: E402
from render_tables import RenderError  # noqa: E402

# The table kinds a marker can name: one function per results-file shape.
KINDS = {
    f.__name__: f
    for f in (
        current.slow_cpu,
        current.quality_at_steps,
        current.main_job,
        current.readme_quality,
        current.sampler_agreement,
        current.ema_lengths,
        current.train_speed,
        current.render_speed,
        current.evaluator_speed,
        current.evaluator,
        ddpm.samplers,
        ddpm.x0_check,
        ddpm.preset_choice,
        ddpm.quality_at_budget,
        gpu.gpu_throughput,
        gpu.gpu_short_runs,
        gpu.gpu_stability,
        attention.attention_saturation,
        attention.attention_kernels,
    )
}

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "BENCHMARKS.md")
MARKER = re.compile(r"^<!-- render:(?P<spec>[^>]*?) -->\n(?P<body>.*?)^<!-- /render -->$", re.S | re.M)
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
