"""Checking a resolved config: the allowed values of every key, alone and in combination.

`validate` runs whenever a config is resolved (config.load_config, config.config_from_dict), so
`train --dry-run` refuses a bad value too, before any work starts; each error is one line naming the
key and what it may be.
"""

from __future__ import annotations

from typing import Any

from iclevr_diffusion.data.iclevr import SPLITS as COURSE_SPLITS
from iclevr_diffusion.data.iclevr import VALIDATION
from iclevr_diffusion.errors import IclevrError

Config = Any  # a config.Config (that module imports this one: no import back)

CHOICES: dict[str, tuple[str, ...]] = {
    "data.resize": ("squash", "center_crop"),
    "schedule.beta_schedule": ("linear", "scaled_linear", "cosine"),
    "schedule.prediction_type": ("epsilon", "v_prediction"),
    "schedule.formulation": ("ddpm", "edm", "flow"),
    "model.time_scale_shift": ("default", "scale_shift"),
    "model.patch_embed": ("fold", "overlap"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.nan_policy": ("stop", "skip"),
}
# The samplers each formulation offers (diffusion/samplers.py, diffusion/edm.py); the config accepts any of them.
_EDM_FAMILY = ("heun", "euler", "dpm++", "dpm++sde")  # rectified flow runs on EDM's samplers (diffusion/flow.py)
SAMPLERS_BY_FORMULATION = {"ddpm": ("ddpm", "ddim", "dpm++", "unipc"), "edm": _EDM_FAMILY, "flow": _EDM_FAMILY}
CHOICES["sample.sampler"] = tuple(dict.fromkeys(n for names in SAMPLERS_BY_FORMULATION.values() for n in names))
PRESETS = ("default", "seed", "full", "compare-timesteps")
SPLITS = (*COURSE_SPLITS, VALIDATION)  # the packaged condition files: --split and eval.splits


def validate(cfg: Config) -> Config:
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise IclevrError(f"Config key '{key}' is '{value}'; choose one of: {', '.join(choices)}.")
    m = cfg.model
    if len(m.attention) != len(m.block_out_channels):
        raise IclevrError(
            f"model.attention has {len(m.attention)} entries but model.block_out_channels has "
            f"{len(m.block_out_channels)}; give one true/false per level."
        )
    if m.cross_attention and len(m.cross_attention) != len(m.block_out_channels):
        raise IclevrError(
            f"model.cross_attention has {len(m.cross_attention)} entries but model.block_out_channels has "
            f"{len(m.block_out_channels)}; give one true/false per level, or [] for none."
        )
    if any(m.cross_attention) and any(a and not c for a, c in zip(m.attention, m.cross_attention)):
        raise IclevrError(
            f"model.cross_attention {m.cross_attention} leaves out a level with self-attention "
            f"(model.attention {m.attention}); set it true at every level where model.attention is true."
        )
    _validate_ranges(cfg)
    bad = [c for c in m.block_out_channels if c % m.norm_num_groups]
    if bad:
        raise IclevrError(
            f"model.norm_num_groups={m.norm_num_groups} does not divide channel count(s) {bad}; "
            "change model.norm_num_groups or model.block_out_channels."
        )
    divisor = m.patch_size * 2 ** (len(m.block_out_channels) - 1)
    if cfg.data.image_size % divisor:
        raise IclevrError(
            f"data.image_size={cfg.data.image_size} must be divisible by {divisor} "
            f"(model.patch_size {m.patch_size} x 2^{len(m.block_out_channels) - 1} for "
            f"{len(m.block_out_channels)} UNet levels)."
        )
    _validate_combinations(cfg)
    _validate_formulation(cfg)
    if any(m <= 0 for m in cfg.train.snapshot_minutes):
        raise IclevrError(f"train.snapshot_minutes must be positive minutes, got {cfg.train.snapshot_minutes}.")
    for split in cfg.eval.splits:
        if split not in SPLITS:
            raise IclevrError(f"eval.splits entry '{split}' is not a split; use test, new_test and/or val.")
    return cfg


# Value ranges, checked one key at a time: (rule, keys). What 0 means where it is allowed is in RANGE_NOTES.
RANGES = {
    "positive": ("train.batch_size", "train.grad_accum", "train.lr", "train.log_every", "train.keep_checkpoints",
                 "schedule.num_train_timesteps", "sample.steps", "sample.batch_size", "eval.seeds", "data.image_size",
                 "data.synthetic_scenes", "model.layers_per_block", "model.attention_head_dim", "model.norm_num_groups",
                 "model.patch_size", "model.num_classes"),
    "0 or more": ("seed", "model.patch_head", "train.foreground_weight", "data.num_workers", "train.weight_decay",
                  "train.warmup_steps",
                  "train.grad_clip", "train.sample_every", "train.checkpoint_every", "train.eval_every",
                  "sample.guidance_scale", "sample.churn"),
    "in [0, 1)": ("model.dropout", "train.label_dropout", "train.ema_decay"),
    "in (0, 1)": ("schedule.beta_start", "schedule.beta_end", "train.adam_beta2"),
    "positive or null": ("train.max_steps", "train.epochs", "train.max_minutes", "train.min_snr_gamma",
                         "schedule.sigma_data"),
}
RANGE_NOTES = {
    "train.sample_every": " (0 = no grids during training, only the one at the end)",
    "train.checkpoint_every": " (0 = no scheduled checkpoints, only at the end and on Ctrl-C)",
    "train.eval_every": " (0 = no evaluations)",
    "train.grad_clip": " (0 = no clipping)",
    "sample.guidance_scale": " (1 = no guidance)",
    "sample.churn": " (0 = deterministic)",
    "train.max_minutes": " (null = no time limit)",
    "train.min_snr_gamma": " (null = off)",
}
_RULES = {
    "positive": lambda v: v > 0,
    "0 or more": lambda v: v >= 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1)": lambda v: 0 < v < 1,
    "positive or null": lambda v: v is None or v > 0,
}


def _validate_ranges(cfg: Config) -> None:
    for rule, keys in RANGES.items():
        for key in keys:
            target: Any = cfg
            for part in key.split("."):
                target = getattr(target, part)
            if not _RULES[rule](target):
                raise IclevrError(f"Config key '{key}' must be {rule}{RANGE_NOTES.get(key, '')}, got {target}.")
    m = cfg.model
    if not m.block_out_channels or any(c <= 0 for c in m.block_out_channels):
        raise IclevrError(f"model.block_out_channels must be positive channel counts, got {m.block_out_channels}.")
    shares = cfg.train.extra_ema_lengths
    if any(not 0 < s <= 1 for s in shares) or len(set(shares)) != len(shares):
        raise IclevrError(f"train.extra_ema_lengths must be distinct shares of the steps in (0, 1], e.g. "
                          f"[0.05, 0.25]; got {shares}.")
    if any(x <= 0 for x in cfg.train.snapshot_minutes):
        raise IclevrError(f"train.snapshot_minutes must be positive minutes, got {cfg.train.snapshot_minutes}.")


def require_stop(cfg: Config) -> Config:
    """A config to train with needs a stop condition (checked by `train` and `compare-timesteps` before any
    work, --dry-run too; a config only used to build or sample a model does not)."""
    t = cfg.train
    if not (t.max_steps or t.epochs or t.max_minutes):
        raise IclevrError("Set at least one of train.max_steps, train.epochs or train.max_minutes.")
    return cfg


def _validate_combinations(cfg: Config) -> None:
    """Values that are each fine but do not fit together."""
    m, sch, t = cfg.model, cfg.schedule, cfg.train
    levels = [c for c, a, x in zip(m.block_out_channels, m.attention, m.cross_attention or m.attention) if a or x]
    levels += [m.block_out_channels[-1]] if m.mid_attention else []
    if levels and m.attention_head_dim > min(levels):
        raise IclevrError(
            f"model.attention_head_dim={m.attention_head_dim} is more than the {min(levels)} channels of a level "
            "with attention; lower model.attention_head_dim (it must fit in every attention level's channels)."
        )
    if sch.formulation == "ddpm":
        if sch.beta_start >= sch.beta_end:
            raise IclevrError(
                f"schedule.beta_start ({sch.beta_start}) must be less than schedule.beta_end ({sch.beta_end})."
            )
        if sch.beta_schedule == "scaled_linear" and sch.beta_end * 1000 / sch.num_train_timesteps >= 1:
            raise IclevrError(
                f"schedule.beta_schedule=scaled_linear scales beta_end {sch.beta_end} by 1000/T to "
                f"{sch.beta_end * 1000 / sch.num_train_timesteps:g}, which must stay below 1: raise "
                "schedule.num_train_timesteps or lower schedule.beta_end."
            )
        if cfg.sample.sampler != "ddpm" and cfg.sample.steps > sch.num_train_timesteps:
            raise IclevrError(
                f"sample.steps={cfg.sample.steps} is more than schedule.num_train_timesteps="
                f"{sch.num_train_timesteps}; lower sample.steps or raise schedule.num_train_timesteps."
            )
    if t.batch_size % t.grad_accum:
        raise IclevrError(
            f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}."
        )


def _validate_formulation(cfg: Config) -> None:
    sch, sampler = cfg.schedule, cfg.sample.sampler
    offered = SAMPLERS_BY_FORMULATION[sch.formulation]
    if sampler not in offered:
        raise IclevrError(
            f"sample.sampler '{sampler}' is not a sampler of schedule.formulation={sch.formulation}; "
            f"choose one of: {', '.join(offered)}."
        )
    if sch.formulation != "edm" and cfg.model.self_condition:
        raise IclevrError(f"model.self_condition needs schedule.formulation=edm; set model.self_condition=false "
                          f"for a {sch.formulation} model.")
    if sch.formulation == "ddpm":
        return
    if cfg.train.min_snr_gamma is not None:
        raise IclevrError(
            f"train.min_snr_gamma is a DDPM loss weighting; {sch.formulation} weights its loss itself: set "
            f"train.min_snr_gamma=null with schedule.formulation={sch.formulation}."
        )
    if sch.sigma_data is not None and sch.sigma_data <= 0:
        raise IclevrError(f"schedule.sigma_data must be positive (or null to measure it), got {sch.sigma_data}.")
    if sch.p_std <= 0:
        raise IclevrError(f"schedule.p_std must be positive, got {sch.p_std}.")
    if not 0 <= sch.p_uniform <= 1:
        raise IclevrError(f"schedule.p_uniform is a share of the training noise levels: between 0 and 1, "
                          f"got {sch.p_uniform}.")
    if not 0 < sch.sigma_min < sch.sigma_max:
        raise IclevrError(
            f"schedule.sigma_min ({sch.sigma_min}) and schedule.sigma_max ({sch.sigma_max}) must satisfy "
            "0 < sigma_min < sigma_max."
        )
