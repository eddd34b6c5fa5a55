"""The evaluator networks and their files: architectures, safe checkpoint loading, cards and paths.

The official evaluator is torchvision's ResNet18 with `fc = Sequential(Linear(512, 24), Sigmoid())`,
its weights stored under the key "model" of checkpoint.pth, fed (B, 3, 64, 64) images in [-1, 1].

For the built-in synthetic data the toolkit trains a much smaller network instead (`SmallCNN`,
"small-cnn": ~15x fewer FLOPs per image than ResNet18, so its first-use training takes minutes, not
an hour, on a 2-core CPU). Same input, same 24-way sigmoid head; its checkpoint is
{"model": state_dict, "arch": "small-cnn"}, while a ResNet18 checkpoint stays the course's
{"model": state_dict}. `load_evaluator` builds whichever network the file names.

The toolkit's own evaluator of a dataset lives in DATA_ROOT/evaluator/checkpoint.pth with a JSON card
next to it (what it was trained on and how well it scores). The metric is in metric.py; which
evaluator scores a set in choice.py; training one in training.py.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.evaluator.archs import ARCH_DESCRIPTIONS, ARCH_NAMES, ARCHS, RESNET18, SMALL_CNN  # noqa: F401 (re-exported; archs.py has no torch, so the CLI lists them)
from iclevr_diffusion.labels import NUM_CLASSES

IMAGE_SIZE = 64
OFFICIAL_NAME = "checkpoint.pth"  # the course's file name, looked for in the data root
OWN_DIR = "evaluator"  # our own evaluator of a dataset lives in DATA_ROOT/evaluator/
CARD_NAME = "card.json"  # what our own evaluator was trained on and how well it scores



def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """A small multi-label classifier for the built-in synthetic scenes (gray floor, 1-3 objects).

    64x64 -> 32x32x16 -> 16x16x32 -> 8x8x64 (three stride-2 3x3 convolutions), a 3x3 convolution to
    128 channels at 8x8 (receptive field 31 pixels: the largest object whole), a 1x1 to 256 channels,
    then a global *max* pool: an object is present if some place shows it, however small it is in
    the picture. 0.019 GFLOP per image forward at 64x64 (ResNet18: 0.296, 15x more), 0.13 M
    parameters (ResNet18: 11.2 M); it trains ~17x faster than ResNet18 on a CPU in fp32.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(3, 16, stride=2),
            _conv_bn_relu(16, 32, stride=2),
            _conv_bn_relu(32, 64, stride=2),
            _conv_bn_relu(64, 128),
            _conv_bn_relu(128, 256, kernel=1),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Sequential(nn.Linear(256, num_classes), nn.Sigmoid())  # as ResNet18's: fc[1] is the Sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def build_evaluator(arch: str = RESNET18) -> nn.Module:
    """The evaluator network, random init (nothing downloaded): the course's ResNet18 with its 24-way
    sigmoid head, or the toolkit's SmallCNN."""
    if arch == SMALL_CNN:
        return SmallCNN()
    if arch != RESNET18:
        raise IclevrError(f"Unknown evaluator architecture '{arch}'; choose one of: {', '.join(ARCHS)}.")
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    model.fc = nn.Sequential(nn.Linear(512, NUM_CLASSES), nn.Sigmoid())
    return model


def arch_of(model: nn.Module) -> str:
    return SMALL_CNN if isinstance(model, SmallCNN) else RESNET18


def flops_per_image(arch: str, backward: bool = False) -> int:
    """FLOPs (a multiply-add counts 2; torch.utils.flop_counter) of one 64x64 image through the
    network: the forward pass, or forward + backward as in training."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_evaluator(arch)
    x = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with FlopCounterMode(display=False) as counter:
        y = model(x)
        if backward:
            y.sum().backward()
    return int(counter.get_total_flops())


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _checkpoint_error(path: Path, why: str) -> IclevrError:
    return IclevrError(
        f"{path} is not an official-format evaluator checkpoint: {why}. Expected a torch file "
        "{'model': state_dict} of torchvision ResNet18 with fc = Sequential(Linear(512, 24), Sigmoid()) "
        "(or the toolkit's {'model': state_dict, 'arch': 'small-cnn'})."
    )


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The "model" state dict of checkpoint.pth, read with weights_only=True (a file never runs code)."""
    return load_checkpoint(path)[0]


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, architecture) of checkpoint.pth, read with weights_only=True (a file never runs code).

    The architecture is the file's "arch" entry; a file without one (the course's format) is ResNet18.
    """
    path = Path(path)
    if not path.is_file():
        raise IclevrError(f"Evaluator checkpoint {path} does not exist; check --evaluator.")
    try:
        # map_location: the course's file was saved on CUDA; weights_only: refuse pickled code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the line naming the blocked global is the useful one.
        lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
        if not lines:  # not a pickle of objects at all, just a broken or foreign file
            raise _checkpoint_error(path, "cannot read it (not a torch checkpoint)") from None
        raise IclevrError(
            f"Refusing to load {path}: it holds pickled objects other than tensors ({lines[0][:160]}), which "
            "could run code. Re-save it as {'model': model.state_dict()}."
        ) from None
    except Exception as e:  # torch raises RuntimeError/EOFError/zip errors for a broken file
        raise _checkpoint_error(path, f"cannot read it ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = ", ".join(map(str, list(ckpt)[:5])) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise _checkpoint_error(path, f"no 'model' key (found: {keys or 'nothing'})")
    state = ckpt["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _checkpoint_error(path, "'model' is not a state dict of tensors")
    arch = ckpt.get("arch", RESNET18)
    if not isinstance(arch, str) or arch not in ARCHS:
        raise _checkpoint_error(path, f"unknown 'arch' {str(arch)[:40]!r} (known: {', '.join(ARCHS)})")
    # A model saved from nn.DataParallel prefixes every key with 'module.'; the weights are the same.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, arch


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """ResNet18: the course's {"model": state_dict}; SmallCNN: {"model": state_dict, "arch": "small-cnn"}.
    Tensors and plain strings only, so `torch.load(weights_only=True)` reads it."""
    from iclevr_diffusion.io import atomic_path

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    arch = arch_of(model)
    payload = {"model": state} if arch == RESNET18 else {"model": state, "arch": arch}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_evaluator(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The evaluator network (the architecture the checkpoint names) with its weights, in eval mode."""
    path = Path(path)
    state, arch = load_checkpoint(path)
    model = build_evaluator(arch)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise _checkpoint_error(path, ", ".join(parts))
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise _checkpoint_error(path, f"'{k}' has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict(state)
    return model.to(device).eval()


def is_builtin_synthetic(root: str | Path | None) -> bool:
    """Whether ROOT is one of the toolkit's cached synthetic datasets (see data/synthetic.py)."""
    if root is None:
        return False
    from iclevr_diffusion.data.synthetic import cache_dir

    try:
        root = Path(root).resolve()
        return root.parent == cache_dir().resolve() and root.name.startswith("synthetic-")
    except OSError:
        return False


def own_evaluator_path(root: str | Path) -> Path:
    return Path(root) / OWN_DIR / OFFICIAL_NAME


def read_card(checkpoint: Path) -> dict | None:
    """The JSON card next to an evaluator checkpoint (ours), or None (the course's, or unknown)."""
    path = checkpoint.parent / CARD_NAME
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return card if isinstance(card, dict) else None


def card_arch(card: dict) -> str:
    """The architecture a card describes (cards written before there was a choice: ResNet18)."""
    arch = card.get("arch")
    return arch if arch in ARCHS else RESNET18



def describe(path: Path, kind: str) -> str:
    card = read_card(path)
    if card and isinstance(card.get("heldout_accuracy"), (int, float)):
        shipped = " (shipped with the toolkit)" if card.get("source") == "shipped" else ""
        return (
            f"own {ARCH_NAMES[card_arch(card)]} trained on {card.get('dataset', '?')}{shipped} "
            f"({card['heldout_accuracy']:.1%} on held-out images), {path}"
        )
    if kind == "official":
        return f"official-format checkpoint in the data root, {path}"
    return f"checkpoint {path}"

