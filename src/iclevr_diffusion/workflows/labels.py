"""`iclevr-diff labels`: the 24 class names with their indices."""

from __future__ import annotations

from iclevr_diffusion.labels import LABELS
from iclevr_diffusion.workflows.console import out, print_json, table


def run(as_json: bool = False) -> None:
    if as_json:
        print_json({name: i for i, name in enumerate(LABELS)})
        return
    out.print(table("i-CLEVR labels (objects.json order)", ["index", "label"], list(enumerate(LABELS))))
