"""Run by test_multiprocess.py under `torchrun --nproc_per_node 2`: the core `train()` on each rank.

Each rank records, with a global forward pre-hook (no patching of the code under test), the label
batches its ConditionalUNet is trained on, and after training writes RANK.json with those and a
SHA-256 of its final model weights, so the test can compare the ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/mp_train_helper.py OUT_DIR RUN_DIR DATA_ROOT [SET ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from iclevr_diffusion.config import load_config
from iclevr_diffusion.diffusion.model import ConditionalUNet
from iclevr_diffusion.training.loop import train


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out_dir: str, run_dir: str, data_root: str, *sets: str) -> None:
    torch.set_num_threads(1)
    seen: list[list[list[float]]] = []  # labels of each training forward pass
    models: list[ConditionalUNet] = []

    def record(module, args):
        if isinstance(module, ConditionalUNet) and module.training:  # not the eval-mode sample grid
            if not models:
                models.append(module)
            seen.append(args[2].tolist())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    cfg = load_config("default", [f"data.root={data_root}", *sets])
    result = train(cfg, Path(run_dir))
    hook.remove()
    rank = int(os.environ["RANK"])
    report = {"rank": rank, "world": int(os.environ["WORLD_SIZE"]), "step": result.step,
              "sha256": weights_hash(models[0].state_dict()), "labels": seen}
    Path(out_dir, f"{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
