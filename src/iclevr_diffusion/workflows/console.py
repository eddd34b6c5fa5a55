"""Console helpers shared by the workflows: progress and messages on stderr, results on stdout."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)
LOG_TABLE_WIDTH = 240  # the widest a table gets in a log file or pipe
# Seconds between plain progress lines when stderr is no terminal (a log file, nohup, a batch scheduler, CI),
# where a bar cannot redraw; ICLEVR_PROGRESS_SECONDS sets another interval.
LOG_EVERY = float(os.environ.get("ICLEVR_PROGRESS_SECONDS") or 30.0)


class _Table(Table):
    """A rich Table that, written to a file or pipe (no terminal, so rich assumes 80 columns), takes the
    width its cells need (up to LOG_TABLE_WIDTH) instead of truncating headers to "accur…"."""

    def __rich_console__(self, console, options):
        if not console.is_terminal:
            need = console.measure(self, options=options.update(width=LOG_TABLE_WIDTH)).maximum
            if need > options.max_width:
                options = options.update(width=need)
        yield from super().__rich_console__(console, options)


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    t = _Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*[fmt(v) for v in row])
    return t


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def duration(seconds: float) -> str:
    """45s, 3m 05s, 1h 02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def plain_line(message: str) -> None:
    """One line on stderr, as it is (no markup), flushed at once: for logs."""
    err.print(message, markup=False, highlight=False, soft_wrap=True)
    err.file.flush()


@contextmanager
def progress_bar(
    description: str, total: int | None, quiet: bool = False, extra: str = "", log_every: float | None = None
) -> Iterator:
    """A rich progress bar on stderr; yields an `advance(n=1, **fields)` callback. Quiet: a no-op.

    log_every: when stderr is no terminal (a log file, a pipe, nohup), where a bar cannot redraw,
    print a plain line "DESCRIPTION: done/total, rate/s, about T left" at most every LOG_EVERY
    seconds and when done, instead of the bar.
    """
    if quiet:
        yield lambda n=1, **fields: None
        return
    if log_every is not None and not err.is_terminal:
        yield _plain_progress(description, total, log_every, extra)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("<"),
        TimeRemainingColumn(),
    ]
    if extra:
        columns.append(TextColumn(extra))
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(description, total=total, **_blank_fields(extra))

        def advance(n: int = 1, **fields) -> None:
            progress.update(task, advance=n, **fields)

        yield advance


def _plain_progress(description: str, total: int | None, every: float, extra: str = ""):
    """The bar's plain-line stand-in: the same advance(n, completed=, total=, description=, **fields) calls.

    `extra` is the bar's template of fields ("loss {task.fields[loss]} ..."); once every field has a value,
    the line shows it instead of the time left estimated from the rate. A new description (e.g. "render
    data", then "train") starts a new count and clock."""
    start = time.monotonic()
    state = {"done": 0, "total": total, "last": start, "start": start, "description": description, "fields": {}}
    template = re.sub(r"\{task\.fields\[(\w+)\]\}", r"{\1}", extra)

    def advance(n: int = 1, completed: int | None = None, total: int | None = None, description: str | None = None,
                **fields) -> None:
        now = time.monotonic()
        if description is not None and description != state["description"]:
            state.update(description=description, start=now, last=now, done=0)
        state["done"] = completed if completed is not None else state["done"] + n
        if total is not None:
            state["total"] = total
        state["fields"].update(fields)
        done, whole = state["done"], state["total"]
        finished = whole is not None and done >= whole
        if not finished and (now - state["last"] < every or done == 0):
            return
        state["last"] = now
        rate = done / max(now - state["start"], 1e-9)
        parts = [f"{state['description']}: {done}/{whole if whole is not None else '?'}", f"{rate:.1f}/s"]
        try:
            shown = template.format(**state["fields"]) if template else ""
        except (KeyError, IndexError):
            shown = ""  # a field not reported yet
        if finished:
            parts.append(f"done in {duration(now - state['start'])}")
        if shown:
            parts.append(" ".join(shown.split()))
        elif not finished and whole is not None and rate > 0:
            parts.append(f"about {duration((whole - done) / rate)} left")
        plain_line(", ".join(parts))

    return advance


def _blank_fields(extra: str) -> dict[str, str]:
    import re

    return {name: "" for name in re.findall(r"\{task\.fields\[(\w+)\]\}", extra)}
