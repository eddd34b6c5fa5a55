"""The multi-label evaluators: networks, safe checkpoint loading, the accuracy metric.

The official evaluator is torchvision's ResNet18 with `fc = Sequential(Linear(512, 24), Sigmoid())`,
its weights stored under the key "model" of checkpoint.pth, fed (B, 3, 64, 64) images in [-1, 1].
Its score: for an image with k true labels take the k highest outputs and count the true ones;
accuracy = all hits / all k over the whole set (a micro average; extra objects cost nothing).

For the built-in synthetic data the toolkit trains a much smaller network instead (`SmallCNN`,
"small-cnn": ~15x fewer FLOPs per image than ResNet18, so its first-use training takes minutes, not
an hour, on a 2-core CPU). Same input, same 24-way sigmoid head, same metric; its checkpoint is
{"model": state_dict, "arch": "small-cnn"}, while a ResNet18 checkpoint stays the course's
{"model": state_dict}. `load_evaluator` builds whichever network the file names.

Which evaluator scores a set (`find_evaluator`): --evaluator PATH, else DATA_ROOT/checkpoint.pth
(where the course's file sits), else the toolkit's own one trained on that dataset
(DATA_ROOT/evaluator/checkpoint.pth, see evaluator_training.py). Every reported number carries the
evaluator's name, so an official figure is never confused with one from our own network.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.labels import COLORS, LABELS, NUM_CLASSES, SHAPES

IMAGE_SIZE = 64
OFFICIAL_NAME = "checkpoint.pth"  # the course's file name, looked for in the data root
OWN_DIR = "evaluator"  # our own evaluator of a dataset lives in DATA_ROOT/evaluator/
CARD_NAME = "card.json"  # what our own evaluator was trained on and how well it scores


RESNET18 = "resnet18"  # the course's architecture (official checkpoint format)
SMALL_CNN = "small-cnn"  # the toolkit's small network for the built-in synthetic data
ARCHS = (RESNET18, SMALL_CNN)
ARCH_NAMES = {RESNET18: "ResNet18", SMALL_CNN: "small CNN"}  # how reports name them
ARCH_DESCRIPTIONS = {
    RESNET18: "torchvision resnet18, random init, fc = Sequential(Linear(512, 24), Sigmoid())",
    SMALL_CNN: "small CNN: conv3x3 stride 2 x3 (3-16-32-64), conv3x3 64-128, conv1x1 128-256 (each with "
    "BatchNorm, ReLU), global max pool, fc = Sequential(Linear(256, 24), Sigmoid())",
}


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


# ---------------------------------------------------------------------------------------------
# The metric


def top_k_hits(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, C) bool: class c counted as a hit for image i (c is true and among i's k highest outputs).

    k is the number of true labels of each image. Ties between equal outputs go to the lower class
    index (a stable sort), so a score never depends on the order torch happens to return ties in.
    """
    if outputs.shape != targets.shape or outputs.dim() != 2:
        raise IclevrError(f"Outputs {tuple(outputs.shape)} and labels {tuple(targets.shape)} must both be (N, 24).")
    outputs = outputs.detach().float().cpu()
    truth = targets.detach().cpu() > 0.5
    k = truth.sum(dim=1)
    order = torch.sort(outputs, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(outputs.shape[1]).expand_as(order).contiguous())
    return truth & (rank < k.unsqueeze(1))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The course's score: hits in each image's top-k outputs / total k, over the whole set."""
    hits = top_k_hits(outputs, targets)
    total = int((targets > 0.5).sum())
    if total == 0:
        raise IclevrError("No true labels to score: every condition is empty.")
    return int(hits.sum()) / total


@dataclass
class Score:
    """What one scored image set yields: the accuracy and where the misses are."""

    accuracy: float
    hits: int
    labels: int
    images: int
    per_image: list[tuple[int, int]] = field(repr=False)  # (hits, k) of each image, in order
    per_class: dict[str, tuple[int, int]] = field(repr=False)  # name -> (hits, times asked for)

    def group_rates(self, names: Sequence[str]) -> dict[str, float | None]:
        """Hit rate per colour or per shape (None where no image asks for it)."""
        out = {}
        for name in names:
            got = [v for k, v in self.per_class.items() if name in k.split()]
            total = sum(t for _, t in got)
            out[name] = sum(h for h, _ in got) / total if total else None
        return out

    def to_dict(self) -> dict:
        rate = {k: (h / t if t else None) for k, (h, t) in self.per_class.items()}
        return {
            "accuracy": self.accuracy,
            "hits": self.hits,
            "labels": self.labels,
            "images": self.images,
            "per_class": {k: {"hits": h, "total": t, "rate": rate[k]} for k, (h, t) in self.per_class.items() if t},
            "per_color": {k: v for k, v in self.group_rates(COLORS).items() if v is not None},
            "per_shape": {k: v for k, v in self.group_rates(SHAPES).items() if v is not None},
        }


def score_outputs(outputs: torch.Tensor, targets: torch.Tensor) -> Score:
    hits = top_k_hits(outputs, targets)
    truth = targets.cpu() > 0.5
    per_image = [(int(h), int(k)) for h, k in zip(hits.sum(1), truth.sum(1), strict=True)]
    per_class = {LABELS[c]: (int(hits[:, c].sum()), int(truth[:, c].sum())) for c in range(NUM_CLASSES)}
    total = int(truth.sum())
    if total == 0:
        raise IclevrError("No true labels to score: every condition is empty.")
    return Score(int(hits.sum()) / total, int(hits.sum()), total, len(per_image), per_image, per_class)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 24) sigmoid outputs for (N, 3, H, W) images in [-1, 1]; other sizes are resized to 64x64."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise IclevrError(f"Images must be (N, 3, H, W), got {tuple(images.shape)}.")
    device = next(model.parameters()).device
    outs = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device, torch.float32)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        outs.append(model(x).float().cpu())
    return torch.cat(outs)


def score_images(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> Score:
    """Score (N, 3, H, W) images in [-1, 1] against (N, 24) multi-hot labels."""
    if len(images) != len(targets):
        raise IclevrError(f"{len(images)} images but {len(targets)} label lists; they must match one to one.")
    return score_outputs(predict(model, images, batch_size), targets)


# ---------------------------------------------------------------------------------------------
# Images on disk and which evaluator to use


def load_image_folder(folder: str | Path, count: int) -> torch.Tensor:
    """(count, 3, 64, 64) in [-1, 1] from FOLDER/0.png ... FOLDER/{count-1}.png (any size or mode)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor, resize

    folder = Path(folder)
    if not folder.is_dir():
        raise IclevrError(f"--images {folder} is not a folder.")
    for i in range(count):
        if not (folder / f"{i}.png").is_file():
            raise IclevrError(
                f"{folder / f'{i}.png'} is missing: --images needs 0.png ... {count - 1}.png, one per condition."
            )
    out = []
    for i in range(count):
        path = folder / f"{i}.png"
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # RGBA, grayscale and palette images become RGB
        except (UnidentifiedImageError, OSError) as e:
            raise IclevrError(f"Cannot read image {path}: {e}.") from None
        x = pil_to_tensor(img)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = resize(x, [IMAGE_SIZE, IMAGE_SIZE], antialias=True)
        out.append(x)
    return torch.stack(out).float() / 127.5 - 1.0


@dataclass
class EvaluatorChoice:
    path: Path
    kind: str  # "given" (--evaluator), "official" (DATA_ROOT/checkpoint.pth) or "own"
    name: str  # how reports name it
    arch: str | None = None  # "resnet18" or "small-cnn" once the checkpoint is read

    def to_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "name": self.name, "arch": self.arch}


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


def _trained_on_other_labels(checkpoint: Path, root: str | Path) -> bool:
    """Whether our own evaluator's card names a fingerprint of other labels than ROOT's (no card: can't say)."""
    from iclevr_diffusion.evaluator_training import fingerprint

    card = read_card(checkpoint)
    return bool(card and card.get("fingerprint")) and card["fingerprint"] != fingerprint(Path(root))


def find_evaluator(evaluator: str | Path | None, data_root: str | Path | None) -> EvaluatorChoice | None:
    """--evaluator, else DATA_ROOT/checkpoint.pth, else DATA_ROOT/evaluator/checkpoint.pth; None if none."""
    if evaluator is not None:
        path = Path(evaluator)
        if path.is_dir():
            path = path / OFFICIAL_NAME
        if not path.is_file():
            raise IclevrError(f"--evaluator {evaluator}: no such checkpoint file.")
        return EvaluatorChoice(path, "given", describe(path, "given"))
    if data_root is None:
        return None
    for path, kind in ((Path(data_root) / OFFICIAL_NAME, "official"), (own_evaluator_path(data_root), "own")):
        if path.is_file():
            return EvaluatorChoice(path, kind, describe(path, kind))
    return None


def scored_grid(images: torch.Tensor, per_image: Sequence[tuple[int, int]], nrow: int = 8):
    """PIL grid of (N, 3, H, W) images in [-1, 1], 8 per row, each framed by its score:
    green = every asked-for object found, orange = some, red = none."""
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    colors = {"all": (0.1, 0.8, 0.2), "some": (1.0, 0.6, 0.0), "none": (0.9, 0.1, 0.1)}
    framed = []
    for x, (hits, k) in zip(images.float().cpu(), per_image, strict=True):
        rgb = colors["all" if hits == k else "some" if hits else "none"]
        frame = torch.tensor(rgb).view(3, 1, 1).expand(3, x.shape[1] + 4, x.shape[2] + 4).clone()
        frame[:, 2:-2, 2:-2] = (x.clamp(-1, 1) + 1) / 2
        framed.append(frame)
    grid = make_grid(torch.stack(framed), nrow=nrow, padding=2, pad_value=1.0)
    return to_pil_image(grid)


def resolve_evaluator(
    evaluator: str | Path | None,
    data_root: str | Path | None,
    device: torch.device | str = "cpu",
    train_progress=None,  # evaluator_training progress(stage, done, total, **info) for a first-use training
    note=None,  # note(message): tells the user a first-use training starts
    synthetic_scenes: int = 6003,  # which built-in set data_root None means (cfg.data.synthetic_scenes)
) -> tuple[nn.Module, EvaluatorChoice]:
    """The evaluator network and its name: --evaluator, DATA_ROOT's checkpoint.pth, else our own.

    data_root None means the built-in synthetic set (rendered by then: whoever asks has trained or
    sampled on it); its own evaluator is trained once on first use and cached. For a user's dataset
    without any evaluator we stop and say how to get one rather than train for minutes unasked.
    """
    if evaluator is not None:
        choice = find_evaluator(evaluator, None)
        net = load_evaluator(choice.path, device)
        choice.arch = arch_of(net)
        return net, choice
    builtin = data_root is None
    if builtin:
        from iclevr_diffusion.data.synthetic import default_dataset_root

        data_root = default_dataset_root(synthetic_scenes)
    choice = find_evaluator(None, data_root)
    stale = choice is not None and choice.kind == "own" and _trained_on_other_labels(choice.path, data_root)
    if stale:
        if not builtin:
            raise IclevrError(
                f"The own evaluator {choice.path} was trained on other labels than {Path(data_root) / 'train.json'} "
                f"holds now; retrain it with 'iclevr-diff train-evaluator --data {data_root} --force'."
            )
        choice = None  # the built-in set's own evaluator: trained again below
    if choice is None:
        if not builtin:
            raise IclevrError(
                f"No evaluator for {data_root}: put the course's checkpoint.pth there, pass --evaluator PATH, "
                f"or train one with 'iclevr-diff train-evaluator --data {data_root}'."
            )
        from iclevr_diffusion.evaluator_training import ensure_evaluator

        if note is not None:
            from iclevr_diffusion.evaluator_shipped import fits, shipped_evaluator

            why = "Its evaluator was trained on other labels" if stale else "No evaluator for it yet"
            how = ("installing the small CNN shipped for it, after it scores the held-out images here"
                   if fits(Path(data_root), shipped_evaluator()[1])
                   else "training its own small CNN once (a few minutes on a 2-core CPU; progress by epoch below)")
            note(f"Built-in synthetic data: {why}: {how}.")
        card = ensure_evaluator(data_root, progress=train_progress, device=device)
        path = Path(card["checkpoint"])
        choice = EvaluatorChoice(path, "own", describe(path, "own"))
    net = load_evaluator(choice.path, device)
    choice.arch = arch_of(net)
    return net, choice
