"""Typed configuration: dataclass defaults < YAML file < `--set section.key=value` < explicit flags.

Every knob of a run lives here, so the resolved config written into a run folder and each
checkpoint says exactly how the run was made. Unknown keys and wrong types are `IclevrError`s that
list what is valid; values alone and in combination are checked by config_checks.validate.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# The allowed values and the checks live in config_checks.py; re-exported here, where callers find them.
from iclevr_diffusion.config_checks import CHOICES as CHOICES
from iclevr_diffusion.config_checks import PRESETS as PRESETS
from iclevr_diffusion.config_checks import SAMPLERS_BY_FORMULATION as SAMPLERS_BY_FORMULATION
from iclevr_diffusion.config_checks import SPLITS as SPLITS
from iclevr_diffusion.config_checks import require_stop as require_stop
from iclevr_diffusion.config_checks import validate
from iclevr_diffusion.errors import IclevrError


@dataclass
class DataConfig:
    root: str | None = None  # i-CLEVR folder (train.json, objects.json, images); None = built-in synthetic set
    images: str | None = None  # folder of the PNGs when it is not ROOT/iclevr or ROOT/images
    image_size: int = 64  # square side the images are resized to (the evaluator expects 64)
    resize: str = "squash"  # squash the full 4:3 frame (course practice) or center_crop
    # Random horizontal flips: the labels carry no left/right, but the built-in scenes are lit from one
    # side, and flips cost 5.5 points on val after 5,200 steps (BENCHMARKS.md, "Pixel patches ...").
    hflip: bool = False
    synthetic_scenes: int = 6003  # size of the built-in synthetic set (the real one has 6,003 scenes)
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class ModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels per level
    attention: list[bool] = field(default_factory=lambda: [False, False, True])  # self-attention per level
    layers_per_block: int = 1  # resnet blocks per level
    attention_head_dim: int = 32  # channels per attention head
    norm_num_groups: int = 32  # GroupNorm groups (must divide every channel count)
    dropout: float = 0.0  # dropout inside the resnet blocks
    mid_attention: bool = True  # self-attention in the middle block
    # a GroupNorm before the middle block's attention, which diffusers leaves out under AdaGN (model.py)
    mid_attention_norm: bool = False
    patch_size: int = 2  # fold p x p pixel patches into channels: the UNet runs at image_size / p
    patch_head: int = 0  # channels of a small residual conv head at full resolution after unpatching (0 = none)
    # how patches enter and leave the UNet: fold (pixel_unshuffle / pixel_shuffle) | overlap (a strided
    # 2p x 2p convolution in, its transpose out: neighbouring patches share pixels; model.py)
    patch_embed: str = "fold"
    time_scale_shift: str = "scale_shift"  # scale_shift (AdaGN) | default (add the time+label embedding)
    num_classes: int = 24  # length of the multi-hot label vector
    # cross-attention to one token per class, per level (empty = none; model.py says why)
    cross_attention: list[bool] = field(default_factory=list)
    self_condition: bool = False  # edm: feed the network its previous clean-image estimate (model.py)


@dataclass
class ScheduleConfig:
    # flow (rectified flow on data scaled to unit variance by sigma_data, diffusion/flow.py: EDM's keys) |
    # edm (Karras et al. 2022: the keys after prediction_type) | ddpm (the keys up to it)
    formulation: str = "flow"
    num_train_timesteps: int = 1000  # T, the number of diffusion steps
    beta_schedule: str = "linear"  # linear (1e-4..0.02) | scaled_linear (linear scaled by 1000/T) | cosine
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    sigma_data: float | None = None  # edm, flow: std of the training pixels; None = measured at the start of training
    p_mean: float = -0.6  # edm: training noise levels ln(sigma) ~ N(p_mean, p_std^2) (EDM's: -1.2, 1.2)
    p_std: float = 0.9
    p_uniform: float = 0.0  # edm: share of training noise levels uniform in ln(sigma) over sigma_min..sigma_max
    sigma_min: float = 0.002  # edm: the sampling noise range (Karras sigmas, rho 7)
    sigma_max: float = 80.0


@dataclass
class TrainConfig:
    batch_size: int = 16  # images per optimizer step (across all processes)
    lr: float = 0.002  # peak AdamW learning rate
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay (EDM2 uses 0.99)
    warmup_steps: int = 100  # linear warm-up before the cosine decay
    max_steps: int | None = None  # stop after this many optimizer steps ...
    epochs: int | None = None  # ... or after this many passes over the data ...
    max_minutes: float | None = 14.0  # ... or after this much wall-clock time, whichever comes first
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    # EMA of the weights; the EMA model is what gets exported. diffusers' EMAModel warms it up as
    # min(ema_decay, (1 + t) / (10 + t)) at step t: an average over about the last 11% of the steps until
    # t = 9 / (1 - ema_decay) (9,000 steps for 0.999), a fixed window of 1 / (1 - ema_decay) steps after.
    ema_decay: float = 0.999
    # further averages of the same run, each over the last share s of the steps so far (decay
    # 1 - 1 / (1 + s t) at step t, EDM2's growing EMA), exported to RUN/ema/<s>/ beside model/: the
    # averaging length is then chosen after training, on validation conditions. E.g. [0.05, 0.25].
    extra_ema_lengths: list[float] = field(default_factory=list)
    mixed_precision: str = "auto"  # auto (CPU: bf16 if timed faster; CUDA: bf16, else fp16) | no | bf16 | fp16
    label_dropout: float = 0.1  # probability of the null label, for classifier-free guidance
    min_snr_gamma: float | None = None  # DDPM only: min-SNR loss weighting (5 is the paper's value); None = off
    # per-pixel loss weight 1 + w * |pixel - the image's median colour|, renormalised (losses.py): more of
    # each step on the objects, less on the gray floor; 0 = off
    foreground_weight: float = 0.0
    log_every: int = 25  # steps between metrics.jsonl lines
    sample_every: int = 800  # steps between sample grids (0 = none during training, one at the end)
    checkpoint_every: int = 500  # steps between training-state checkpoints (0 = only at the end and on Ctrl-C)
    keep_checkpoints: int = 3  # how many checkpoints to keep
    # Export the EMA model to snapshots/<M>min/ when the run's clock passes each of these minutes.
    snapshot_minutes: list[float] = field(default_factory=list)
    eval_every: int = 0  # steps between evaluations on test/new_test (0 = off)
    channels_last: bool = False
    # What a batch with a NaN/inf loss or gradient norm does. skip: no optimizer step (weights, optimizer
    # state and EMA untouched), a note, and the run stops after 20 such batches in a row; stop: stop at
    # the first, naming the last good checkpoint.
    nan_policy: str = "skip"


@dataclass
class SampleConfig:
    sampler: str = "heun"  # ddpm models: ddpm | ddim | dpm++ | unipc; edm models: heun | euler | dpm++ | dpm++sde
    steps: int = 18  # solver steps (ddpm uses T unless given; heun evaluates the network 2 x steps - 1 times)
    guidance_scale: float = 3.0  # classifier-free guidance w (1 = off)
    # EDM's S_churn for the heun and euler samplers of EDM and flow models: fresh noise added at each step
    # between noise levels 0.05 and 50 (edm.EDMHeunScheduler); 0 = the deterministic ODE. 15 is EDM's
    # largest per-step churn (sqrt(2) - 1) for heun 18 and euler 35 steps: chosen on val (BENCHMARKS.md, "Churn").
    churn: float = 15.0
    batch_size: int = 32


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: ["test", "new_test"])
    seeds: int = 1  # repeat sampling with this many seeds and report mean and spread
    evaluator: str | None = None  # official-format checkpoint.pth; None = look in the data root, then our own


@dataclass
class Config:
    name: str = "default"  # run folder name under runs/
    seed: int = 0  # seeds model init, data order, noise and sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so `mixed_precision: no` stays the string "no"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def valid_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key a YAML file or `--set` may use."""
    obj = Config() if obj is None else obj
    keys = []
    for name in _fields(obj):
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys.extend(valid_keys(value, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a field's type hint, converting only where it is lossless (int->float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except IclevrError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise IclevrError(f"Config key '{key}' must be a list of {item.__name__}, got {value!r}.")
        return [_coerce(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise IclevrError(f"Config key '{key}' must be {hint.__name__}, got {value!r}.")


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key (`train.lr`) with type checking."""
    parts = key.split(".")
    target: Any = cfg
    for part in parts[:-1]:
        if part not in _fields(target) or not dataclasses.is_dataclass(getattr(target, part)):
            raise _unknown(key)
        target = getattr(target, part)
    name = parts[-1]
    if name not in _fields(target) or dataclasses.is_dataclass(getattr(target, name)):
        raise _unknown(key)
    hint = typing.get_type_hints(type(target))[name]
    setattr(target, name, _coerce(value, hint, key))


def _unknown(key: str) -> IclevrError:
    import difflib

    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return IclevrError(f"Unknown config key '{key}'.{hint} Valid keys: {', '.join(keys)}.")


def _flatten(data: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in data.items():
        key = f"{prefix}{k}"
        section = Config() if not prefix else None
        is_section = section is not None and k in _fields(section) and dataclasses.is_dataclass(
            getattr(section, k)
        )
        if isinstance(v, dict) and is_section:
            yield from _flatten(v, f"{key}.")
        else:
            yield key, v


def preset_path(name: str) -> Path:
    """Path of a shipped preset (`default`, `seed`, `full`, `compare-timesteps`)."""
    return Path(str(resources.files("iclevr_diffusion").joinpath("presets", f"{name}.yaml")))


def resolve_config_path(spec: str) -> Path:
    """`--config` takes a YAML path or the name of a shipped preset."""
    path = Path(spec)
    if path.is_file():
        return path
    if spec in PRESETS:
        return preset_path(spec)
    if path.exists():
        raise IclevrError(f"--config {spec} is not a file.")
    raise IclevrError(
        f"Config file '{spec}' not found. Give a YAML path or a preset name: {', '.join(PRESETS)}."
    )


def read_yaml(path: Path) -> dict:
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise IclevrError(f"Config file {path} is not valid YAML{where}; fix the syntax.") from None
    except OSError as e:
        raise IclevrError(f"Cannot read config file {path}: {e.strerror}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise IclevrError(f"Config file {path} must hold a mapping of sections, not {type(data).__name__}.")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 0.0001); values are read as YAML ('[32, 64]', 'null', 'true')."""
    if "=" not in text:
        raise IclevrError(f"--set '{text}' must look like section.key=value, e.g. train.lr=1e-4.")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads '1e-4' as a string (it wants '1.0e-4'); users expect a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    flags: dict[str, Any] | None = None,
) -> Config:
    """Resolve a config: defaults, then the YAML file, then `--set` overrides, then explicit flags.

    `flags` maps dotted keys to values from CLI options; None values mean "not given".
    """
    cfg = Config()
    if path is not None:
        file = resolve_config_path(str(path))
        cfg.name = file.stem
        for key, value in _flatten(read_yaml(file)):
            try:
                set_key(cfg, key, value)
            except IclevrError as e:
                raise IclevrError(f"{file}: {e}") from None
    for text in overrides:
        set_key(cfg, *parse_override(text))
    for key, value in (flags or {}).items():
        if value is not None:
            set_key(cfg, key, value)
    return validate(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved by `Config.to_dict` (run folders, checkpoints)."""
    cfg = Config()
    for key, value in _flatten(data):
        set_key(cfg, key, value)
    return validate(cfg)
