"""ConditionalUNet: a diffusers UNet2DModel conditioned on a multi-hot label vector.

UNet2DModel's own class embeddings take one class index; i-CLEVR scenes hold up to three objects, so
a Linear(24 -> time_embed_dim) projects the multi-hot vector and the UNet adds it to the time
embedding (`class_embed_type="identity"`). The all-zero vector is the null label used for
classifier-free guidance: real scenes always hold at least one object, so it means "unconditioned".

`patch_size` p > 1 folds each p x p pixel patch into channels (`pixel_unshuffle`) before the UNet and
unfolds the prediction after it: a 64x64 image runs through the UNet as 32x32x12, which on a CPU is
about 2x faster per image while the model still draws (and the evaluator still sees) 64x64 pixels.
Training at 32x32 and upscaling is not the same: blurred upscales cost the evaluator 20 points.

`patch_head` C > 0 adds a small residual head at full resolution after the unfolding: two 3x3
convolutions (the unfolded prediction and the network's input -> C -> 3 channels, the second zero-
initialised, so training starts from the plain patched model). Each output pixel of a patched UNet comes
from one 32x32 position, so nothing ties a pixel to its neighbours in the next patch: the grain on the
floors and objects of patched models. The head sees across patch borders (two small convs).

`patch_embed="overlap"` replaces the folding by the UNet's own first and last convolutions made 2p x 2p
at stride p (in) and its transpose (out): each UNet position sees its patch and half of each neighbour,
and every output pixel is drawn from the 2x2 positions around it rather than from one. It learned as
much per step as folding and left the same grain (BENCHMARKS.md), so the grain is not the patch borders.

`time_scale_shift="scale_shift"` makes every resnet block modulate its normalised features with a
scale and shift from the time + label embedding (AdaGN, Dhariwal & Nichol 2021) instead of adding it.
`timestep_scale` multiplies the timestep the scheduler passes (EDM's c_noise = ln(sigma) / 4) before
the sinusoidal embedding; see edm.EDM_TIMESTEP_SCALE (rectified flow's t in [0, 1]: flow.FLOW_TIMESTEP_SCALE).

`mid_attention_norm` puts a GroupNorm before the middle block's self-attention. diffusers' UNet2DModel
has one there only with `time_scale_shift="default"`; under AdaGN the attention sees the unnormalised
residual stream, and in the default preset's runs its logits reached ~1e7 by step 2,000 and stayed
there: every position attends to a single other one, and training computes that layer's gradients on
PyTorch's math kernel (exact_attention_gradients below). On val after 1,150 steps the norm made no
difference (BENCHMARKS.md), so the default leaves it off.

`cross_attention` (one flag per level) gives the UNet one token per class to attend to: the class's
embedding plus a learned "asked for" or "not asked for" embedding. The time + label embedding reaches
every pixel alike, so it can say which objects the scene holds but not where each one goes; with
cross-attention each position can take its colour and shape from one object's token. The UNet is then
diffusers' UNet2DConditionModel: levels with self-attention get self- plus cross-attention, the other
flagged levels cross-attention only, and the middle block cross-attends when `mid_attention` is on.
The null label (all zero) makes every token "not asked for": the unconditioned model of guidance.

`self_condition` (EDM models; Chen, Zhang & Hinton 2022, "Analog Bits") gives the network a second
image beside the noisy one: its own previous clean-image estimate (divided by sigma_data), or zeros
when there is none. Training feeds it, in half of the steps, the estimate of a first pass without
gradients; sampling feeds it the estimate of the previous network evaluation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from iclevr_diffusion.config import Config, DataConfig, ModelConfig
from iclevr_diffusion.diffusion.edm import EDM_TIMESTEP_SCALE
from iclevr_diffusion.diffusion.flow import FLOW_TIMESTEP_SCALE

# What the UNet multiplies its timestep by, per formulation (DDPM timesteps are already 0..T-1).
TIMESTEP_SCALES = {"edm": EDM_TIMESTEP_SCALE, "flow": FLOW_TIMESTEP_SCALE}
_DATA, _MODEL = DataConfig(), ModelConfig()  # the recipe's defaults: one home, config.py


class ConditionalUNet(ModelMixin, ConfigMixin):
    """Predicts the noise (or v) in `sample` at `timestep` given multi-hot `labels` (B, num_classes)."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = _DATA.image_size,
        num_classes: int = _MODEL.num_classes,
        block_out_channels: tuple[int, ...] = tuple(_MODEL.block_out_channels),
        attention: tuple[bool, ...] = tuple(_MODEL.attention),
        layers_per_block: int = _MODEL.layers_per_block,
        attention_head_dim: int = _MODEL.attention_head_dim,
        norm_num_groups: int = _MODEL.norm_num_groups,
        dropout: float = _MODEL.dropout,
        mid_attention: bool = _MODEL.mid_attention,
        # Keys added after the first release: their defaults are what a model folder saved before they
        # existed means (diffusers fills a key missing from config.json with the default), not the recipe.
        patch_size: int = 1,
        time_scale_shift: str = "default",
        timestep_scale: float = 1.0,
        cross_attention: tuple[bool, ...] = (),
        self_condition: bool = False,
        patch_head: int = 0,
        patch_embed: str = "fold",
        mid_attention_norm: bool = False,
    ):
        super().__init__()
        if len(attention) != len(block_out_channels):
            raise ValueError("attention needs one flag per entry of block_out_channels")
        if patch_size < 1 or sample_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must be a positive divisor of sample_size {sample_size}")
        if patch_embed not in ("fold", "overlap"):
            raise ValueError(f"patch_embed must be 'fold' or 'overlap', got {patch_embed!r}")
        in_ch = 6 if self_condition else 3
        folds = patch_size if patch_embed == "fold" else 1  # overlap: the UNet's own convs take the pixels
        common = dict(
            sample_size=sample_size // patch_size,
            in_channels=in_ch * folds**2,
            out_channels=3 * folds**2,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
            class_embed_type="identity",
            resnet_time_scale_shift=time_scale_shift,
        )
        if any(cross_attention):
            if mid_attention_norm:
                raise ValueError("mid_attention_norm is for models without cross_attention (whose middle block "
                                 "normalises before attending)")
            self.unet = _cross_attention_unet(common, attention, cross_attention, attention_head_dim, mid_attention)
            self.label_tokens = LabelTokens(num_classes, block_out_channels[-1])
        else:
            down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention]
            up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
            self.unet = UNet2DModel(
                **common,
                down_block_types=tuple(down),
                up_block_types=tuple(up),
                attention_head_dim=attention_head_dim,
                add_attention=mid_attention,
                attn_norm_num_groups=norm_num_groups if mid_attention_norm else None,
            )
            for layer in getattr(self.unet.mid_block, "attentions", []):
                if isinstance(layer, Attention) and layer.group_norm is None:  # AdaGN without mid_attention_norm
                    layer.set_processor(ExactGradientAttnProcessor())
        if patch_embed == "overlap" and patch_size > 1:
            # A 2p x 2p kernel at stride p: every UNet position sees its patch and half of each neighbour,
            # and (transposed, out) every pixel is drawn from the 2x2 positions around it.
            k, pad, width = 2 * patch_size, patch_size // 2, block_out_channels[0]
            self.unet.conv_in = nn.Conv2d(in_ch, width, k, stride=patch_size, padding=pad)
            self.unet.conv_out = nn.ConvTranspose2d(width, 3, k, stride=patch_size, padding=pad)
        time_embed_dim = block_out_channels[0] * 4  # UNet2DModel's positional time embedding width
        self.label_proj = nn.Linear(num_classes, time_embed_dim)
        if patch_head > 0:  # built last: the other weights initialise as without it
            self.head = nn.Sequential(nn.Conv2d(3 + in_ch, patch_head, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(patch_head, 3, 3, padding=1))
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    @classmethod
    def from_run_config(cls, cfg: Config) -> ConditionalUNet:
        m = cfg.model
        return cls(
            sample_size=cfg.data.image_size,
            num_classes=m.num_classes,
            block_out_channels=tuple(m.block_out_channels),
            attention=tuple(m.attention),
            layers_per_block=m.layers_per_block,
            attention_head_dim=m.attention_head_dim,
            norm_num_groups=m.norm_num_groups,
            dropout=m.dropout,
            mid_attention=m.mid_attention,
            patch_size=m.patch_size,
            time_scale_shift=m.time_scale_shift,
            timestep_scale=TIMESTEP_SCALES.get(cfg.schedule.formulation, 1.0),
            cross_attention=tuple(m.cross_attention),
            self_condition=m.self_condition,
            patch_head=m.patch_head,
            patch_embed=m.patch_embed,
            mid_attention_norm=m.mid_attention_norm,
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        labels: torch.Tensor,
        previous_estimate: torch.Tensor | None = None,  # self_condition: the last clean estimate / sigma_data
    ) -> torch.Tensor:
        if self.self_conditioned:
            if previous_estimate is None:
                previous_estimate = torch.zeros_like(sample)
            sample = torch.cat([sample, previous_estimate.to(sample.dtype)], dim=1)
        emb = self.label_proj(labels.to(self.label_proj.weight.dtype))
        if self.config.timestep_scale != 1.0:
            timestep = torch.as_tensor(timestep, device=sample.device) * self.config.timestep_scale
        extra = {"encoder_hidden_states": self.label_tokens(labels)} if hasattr(self, "label_tokens") else {}
        p = self.config.patch_size
        if p == 1 or self.config.patch_embed == "overlap":
            out = self.unet(sample, timestep, class_labels=emb, **extra).sample
        else:
            folded = self.unet(F.pixel_unshuffle(sample, p), timestep, class_labels=emb, **extra).sample
            out = F.pixel_shuffle(folded, p)
        if hasattr(self, "head"):
            out = out + self.head(torch.cat([out, sample.to(out.dtype)], dim=1))
        return out

    @property
    def self_conditioned(self) -> bool:
        return bool(self.config.self_condition)  # diffusers fills the key in for folders saved before it existed


def exact_attention_gradients():
    """While gradients are recorded, attention runs on PyTorch's plain (math) kernel; sampling keeps the
    fused one. Used by ExactGradientAttnProcessor, for the middle block's attention under AdaGN.

    With AdaGN (`time_scale_shift="scale_shift"`) diffusers gives the middle block's attention no group
    norm, so its input is the unnormalised residual stream: in the default preset's 22,700-step run its
    largest logit was ~1e7 from step 2,000 on (one-hot attention), and training stopped at step 3,025
    after 20 batches in a row with a non-finite gradient norm. The forward pass is right on every kernel,
    but the CPU fused kernel's backward (torch 2.14) drifts from 1e7 on and is non-finite by 1e9, while
    the math kernel's stays finite (benchmarks/attention_check.py, BENCHMARKS.md "Saturated attention in
    the middle block"). The middle block attends over a few dozen positions, so the math kernel costs
    nothing there; it is used on CUDA too, where fused backward kernels have given NaN for very large
    queries and keys (pytorch/pytorch#125674). The normalised layers, whose logits stayed below ~2,000,
    keep the fused kernel and its memory savings at large resolutions."""
    if not torch.is_grad_enabled():
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


class ExactGradientAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention, on the math kernel while gradients are recorded (exact_attention_gradients)."""

    # The parent's parameters, spelled out: diffusers drops (with a warning) keyword arguments that the
    # processor's signature does not name, such as the temb it passes to every processor.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        with exact_attention_gradients():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class LabelTokens(nn.Module):
    """One token per class: its embedding plus an "asked for" / "not asked for" embedding, (B, classes, dim)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.classes = nn.Parameter(torch.randn(num_classes, dim) * dim**-0.5)
        self.presence = nn.Embedding(2, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        asked = (labels > 0.5).long()  # the multi-hot vector, 0/1 per class
        return self.classes.unsqueeze(0) + self.presence(asked)


def _cross_attention_unet(common: dict, attention, cross_attention, head_dim: int, mid_attention: bool):
    if len(cross_attention) != len(attention):
        raise ValueError("cross_attention needs one flag per entry of block_out_channels")
    if any(a and not c for a, c in zip(attention, cross_attention)):
        raise ValueError("with cross_attention, every level with self-attention must cross-attend too")
    channels = common["block_out_channels"]
    down = ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross_attention]
    up = ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross_attention)]
    # UNet2DConditionModel's `attention_head_dim` is, for historical reasons, the number of heads.
    heads = tuple(max(1, c // head_dim) for c in channels)
    return UNet2DConditionModel(
        **common,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DCrossAttn" if mid_attention else "UNetMidBlock2D",
        only_cross_attention=tuple(c and not a for a, c in zip(attention, cross_attention)),
        cross_attention_dim=channels[-1],
        attention_head_dim=heads,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
