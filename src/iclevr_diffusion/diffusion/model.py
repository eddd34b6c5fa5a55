"""ConditionalUNet: a diffusers UNet2DModel conditioned on a multi-hot label vector.

UNet2DModel's own class embeddings take one class index; i-CLEVR scenes hold up to three objects, so
a Linear(24 -> time_embed_dim) projects the multi-hot vector and the UNet adds it to the time
embedding (`class_embed_type="identity"`). The all-zero vector is the null label used for
classifier-free guidance: real scenes always hold at least one object, so it means "unconditioned".

`patch_size` p > 1 folds each p x p pixel patch into channels (`pixel_unshuffle`) before the UNet and
unfolds the prediction after it: a 64x64 image runs through the UNet as 32x32x12, which on a CPU is
about 2x faster per image while the model still draws (and the evaluator still sees) 64x64 pixels.
Training at 32x32 and upscaling is not the same: blurred upscales cost the evaluator 20 points.

`time_scale_shift="scale_shift"` makes every resnet block modulate its normalised features with a
scale and shift from the time + label embedding (AdaGN, Dhariwal & Nichol 2021) instead of adding it.
`timestep_scale` multiplies the timestep the scheduler passes (EDM's c_noise = ln(sigma) / 4) before
the sinusoidal embedding; see edm.EDM_TIMESTEP_SCALE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models import UNet2DModel
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from iclevr_diffusion.config import Config, DataConfig, ModelConfig
from iclevr_diffusion.diffusion.edm import EDM_TIMESTEP_SCALE

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
    ):
        super().__init__()
        if len(attention) != len(block_out_channels):
            raise ValueError("attention needs one flag per entry of block_out_channels")
        if patch_size < 1 or sample_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must be a positive divisor of sample_size {sample_size}")
        down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention]
        up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
        self.unet = UNet2DModel(
            sample_size=sample_size // patch_size,
            in_channels=3 * patch_size**2,
            out_channels=3 * patch_size**2,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
            add_attention=mid_attention,
            class_embed_type="identity",
            resnet_time_scale_shift=time_scale_shift,
        )
        time_embed_dim = block_out_channels[0] * 4  # UNet2DModel's positional time embedding width
        self.label_proj = nn.Linear(num_classes, time_embed_dim)

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
            timestep_scale=EDM_TIMESTEP_SCALE if cfg.schedule.formulation == "edm" else 1.0,
        )

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, labels: torch.Tensor) -> torch.Tensor:
        emb = self.label_proj(labels.to(self.label_proj.weight.dtype))
        if self.config.timestep_scale != 1.0:
            timestep = torch.as_tensor(timestep, device=sample.device) * self.config.timestep_scale
        p = self.config.patch_size
        if p == 1:
            return self.unet(sample, timestep, class_labels=emb).sample
        out = self.unet(F.pixel_unshuffle(sample, p), timestep, class_labels=emb).sample
        return F.pixel_shuffle(out, p)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
