"""ConditionalUNet, noise schedules and the loss's targets and weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from iclevr_diffusion.config import load_config
from iclevr_diffusion.diffusion.losses import diffusion_loss, snr_weights, target_for
from iclevr_diffusion.diffusion.model import ConditionalUNet, ExactGradientAttnProcessor, count_parameters
from iclevr_diffusion.diffusion.schedule import final_alpha_bar, make_train_scheduler
from iclevr_diffusion.errors import IclevrError
from tiny_data import DDPM, TINY_MODEL


def structure(module: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in module.named_modules()]


def test_seed_preset_is_the_reports_model():
    model = ConditionalUNet.from_run_config(load_config("seed"))
    report_unet = UNet2DModel(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 96, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        class_embed_type="identity",
    )
    report_proj = nn.Linear(24, 128)
    expected = count_parameters(report_unet) + count_parameters(report_proj)
    print(f"seed preset: {count_parameters(model):,} parameters (report: {expected:,})")
    assert count_parameters(model) == expected
    assert structure(model.unet) == structure(report_unet)
    assert (model.label_proj.in_features, model.label_proj.out_features) == (24, 128)
    assert model.unet.config.attention_head_dim == report_unet.config.attention_head_dim


def test_every_architecture_knob_reaches_the_unet():
    cfg = load_config("default", [*TINY_MODEL, "model.dropout=0.2", "model.mid_attention=false",
                                  "model.layers_per_block=3", "model.attention_head_dim=4", "model.patch_size=2"])
    unet = ConditionalUNet.from_run_config(cfg).unet
    c = unet.config
    assert c.sample_size == 8 and c.in_channels == c.out_channels == 12  # 16x16 images in 2x2 patches
    assert list(c.block_out_channels) == [8, 16] and c.layers_per_block == 3
    assert c.norm_num_groups == 4 and c.dropout == 0.2 and c.add_attention is False and c.attention_head_dim == 4
    assert list(c.down_block_types) == ["DownBlock2D", "AttnDownBlock2D"]
    assert list(c.up_block_types) == ["AttnUpBlock2D", "UpBlock2D"]


def test_mid_attention_norm_normalises_what_the_middle_attention_sees():
    plain = ConditionalUNet.from_run_config(load_config("default", [*TINY_MODEL, "model.time_scale_shift=scale_shift"]))
    normed = ConditionalUNet.from_run_config(load_config("default", [*TINY_MODEL, "model.time_scale_shift=scale_shift",
                                                                     "model.mid_attention_norm=true"]))
    assert plain.unet.mid_block.attentions[0].group_norm is None  # diffusers' choice under AdaGN
    norm = normed.unet.mid_block.attentions[0].group_norm
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 4
    # Only the unnormalised attention trains on the math kernel; every other keeps diffusers' processor.
    exact = [name for name, m in plain.named_modules()
             if isinstance(m, Attention) and isinstance(m.processor, ExactGradientAttnProcessor)]
    assert exact == ["unet.mid_block.attentions.0"]
    assert not any(isinstance(m.processor, ExactGradientAttnProcessor)
                   for m in normed.modules() if isinstance(m, Attention))
    with pytest.raises(ValueError, match="mid_attention_norm"):
        ConditionalUNet(sample_size=16, block_out_channels=(8, 16), attention=(False, True), norm_num_groups=4,
                        attention_head_dim=8, cross_attention=(False, True), mid_attention_norm=True)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ConditionalUNet.from_run_config(load_config("default", TINY_MODEL)).eval()
    model.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "config.json").is_file()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    again = ConditionalUNet.from_pretrained(tmp_path / "unet").eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    labels = torch.zeros(2, 24)
    labels[0, 1] = labels[1, 5] = 1
    with torch.no_grad():
        out = model(x, t, labels)
        assert out.shape == x.shape
        assert torch.equal(out, again(x, t, labels))
        assert not torch.allclose(out, model(x, t, torch.zeros_like(labels)))  # labels matter


@pytest.mark.parametrize("T", [100, 1000])
def test_schedules_end_in_noise(T):
    scaled = make_train_scheduler(load_config("default", [*DDPM, f"schedule.num_train_timesteps={T}",
                                                          "schedule.beta_schedule=scaled_linear"]).schedule)
    cosine = make_train_scheduler(load_config("default", [*DDPM, f"schedule.num_train_timesteps={T}",
                                                          "schedule.beta_schedule=cosine"]).schedule)
    assert final_alpha_bar(scaled) < 1e-3 and final_alpha_bar(cosine) < 1e-3
    assert cosine.config.beta_schedule == "squaredcos_cap_v2"


def test_v_prediction_target_and_min_snr_weights():
    cfg = load_config("default", [*DDPM, "schedule.prediction_type=v_prediction"])
    sched = make_train_scheduler(cfg.schedule)
    x0, noise, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(target_for(sched, x0, noise, t), a * noise - s * x0)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    torch.testing.assert_close(snr_weights(sched, t, 5.0), snr.clamp(max=5) / (snr + 1))
    eps = make_train_scheduler(load_config("default", DDPM).schedule)
    w = snr_weights(eps, t, 5.0)
    assert w[0] < 0.01 and w[2] == pytest.approx(1.0)  # low-noise steps are down-weighted


def test_min_snr_loss_runs_and_differs():
    cfg = load_config("default", TINY_MODEL)
    model = ConditionalUNet.from_run_config(cfg)
    sched = make_train_scheduler(cfg.schedule)
    x, labels = torch.rand(4, 3, 16, 16) * 2 - 1, torch.zeros(4, 24)
    plain = diffusion_loss(model, sched, x, labels, torch.Generator().manual_seed(0))
    weighted = diffusion_loss(model, sched, x, labels, torch.Generator().manual_seed(0), min_snr_gamma=5.0)
    assert torch.isfinite(weighted) and not torch.isclose(plain, weighted)


def test_dataclass_defaults_equal_the_default_preset():
    from iclevr_diffusion.config import Config

    defaults, preset = Config().to_dict(), load_config("default").to_dict()
    for section in ("data", "model", "schedule", "train", "sample"):
        assert defaults[section] == preset[section], section


def test_patch_size_runs_the_unet_at_a_lower_resolution():
    # patch 2: a 16x16 image goes through the UNet as 8x8 with 12 channels and comes back 16x16.
    model = ConditionalUNet(sample_size=16, block_out_channels=(8, 16), attention=(False, True),
                            layers_per_block=1, attention_head_dim=8, norm_num_groups=4, patch_size=2)
    assert model.unet.config.sample_size == 8 and model.unet.config.in_channels == 12
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([3, 7]), torch.zeros(2, 24))
    assert out.shape == x.shape
    # Each output pixel depends on the whole image (the UNet is not per-patch): perturb one corner.
    y = x.clone()
    y[..., 0, 0] += 1
    assert not torch.allclose(model(y, torch.tensor([3, 7]), torch.zeros(2, 24))[..., 15, 15], out[..., 15, 15])
    with pytest.raises(ValueError, match="patch_size"):
        ConditionalUNet(sample_size=15, patch_size=2)


def test_patch_head_starts_as_the_plain_patched_model():
    """model.patch_head: the same weights as without it, plus a zero-initialised head, so the first
    prediction is the patched UNet's; once the head's output conv is non-zero, it changes it."""
    kwargs = dict(sample_size=16, block_out_channels=(8, 16), attention=(False, True), layers_per_block=1,
                  attention_head_dim=8, norm_num_groups=4, patch_size=2)
    torch.manual_seed(0)
    plain = ConditionalUNet(**kwargs)
    torch.manual_seed(0)
    headed = ConditionalUNet(**kwargs, patch_head=8)
    assert count_parameters(headed) - count_parameters(plain) == (6 * 9 * 8 + 8) + (8 * 9 * 3 + 3)
    x, t, labels = torch.randn(2, 3, 16, 16), torch.tensor([3, 7]), torch.zeros(2, 24)
    with torch.no_grad():
        assert torch.equal(headed(x, t, labels), plain(x, t, labels))
        nn.init.normal_(headed.head[-1].weight, std=0.1)
        changed = headed(x, t, labels) - plain(x, t, labels)
    assert changed.abs().max() > 0 and changed.shape == x.shape
    with pytest.raises(IclevrError, match="patch_head"):
        load_config("default", ["model.patch_head=-1"])


def test_overlapping_patches_draw_each_pixel_from_the_positions_around_it(tmp_path):
    """model.patch_embed=overlap: a strided 2p x 2p conv in and its transpose out instead of folding;
    the UNet still runs at 1/p resolution, and a bad value is refused with a one-line message."""
    kwargs = dict(sample_size=16, block_out_channels=(8, 16), attention=(False, True), layers_per_block=1,
                  attention_head_dim=8, norm_num_groups=4, patch_size=2)
    model = ConditionalUNet(**kwargs, patch_embed="overlap")
    conv_in, conv_out = model.unet.conv_in, model.unet.conv_out
    assert (conv_in.in_channels, conv_in.kernel_size, conv_in.stride) == (3, (4, 4), (2, 2))
    assert isinstance(conv_out, nn.ConvTranspose2d) and conv_out.out_channels == 3 and conv_out.stride == (2, 2)
    x, t, labels = torch.randn(2, 3, 16, 16), torch.tensor([3, 7]), torch.zeros(2, 24)
    out = model(x, t, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    model.save_pretrained(tmp_path)  # the config names the convs: a saved model reloads with its weights
    assert torch.equal(ConditionalUNet.from_pretrained(tmp_path)(x, t, labels), out)
    # The last conv alone: pixel (1, 1) sits in patch (0, 0) but takes features of patch (1, 1) too.
    features = torch.zeros(1, 8, 8, 8)
    features[0, :, 1, 1] = 1
    with torch.no_grad():
        assert conv_out(features)[0, :, 1, 1].abs().sum() > 0
    with pytest.raises(IclevrError, match="patch_embed"):
        load_config("default", ["model.patch_embed=shuffle"])


def test_cross_attention_levels_attend_to_one_token_per_class():
    cfg = load_config("default", [*TINY_MODEL, "model.attention=[false, true]", "model.cross_attention=[true, true]"])
    model = ConditionalUNet.from_run_config(cfg)
    c = model.unet.config
    assert isinstance(model.unet, UNet2DConditionModel) and c.cross_attention_dim == 16
    assert list(c.down_block_types) == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert list(c.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    assert list(c.only_cross_attention) == [True, False]  # self-attention only where model.attention says
    assert c.mid_block_type == "UNetMidBlock2DCrossAttn"
    labels = torch.zeros(2, 24)
    labels[0, [1, 7]] = 1
    tokens = model.label_tokens(labels)
    assert tokens.shape == (2, 24, 16)
    # one token per class; asked-for classes differ from the same class not asked for
    assert torch.equal(tokens[0, 2], tokens[1, 2]) and not torch.equal(tokens[0, 1], tokens[1, 1])


def test_labels_reach_a_cross_attention_model_through_its_tokens(tmp_path):
    torch.manual_seed(0)
    cfg = load_config("default", [*TINY_MODEL, "model.cross_attention=[false, true]"])
    model = ConditionalUNet.from_run_config(cfg).eval()
    with torch.no_grad():  # cut the other path (the label embedding added to the time embedding)
        model.label_proj.weight.zero_()
        model.label_proj.bias.zero_()
        # diffusers zero-initialises the attention output projections; give them weights to carry labels
        for name, param in model.unet.named_parameters():
            if "to_out" in name or "proj_out" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "unet")
    again = ConditionalUNet.from_pretrained(tmp_path / "unet").eval()
    assert again.config.cross_attention == [False, True]
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    labels = torch.zeros(2, 24)
    labels[0, 1] = labels[1, 5] = 1
    with torch.no_grad():
        out = model(x, t, labels)
        assert torch.equal(out, again(x, t, labels))
        assert not torch.allclose(out, model(x, t, torch.zeros_like(labels)))


def test_a_model_without_cross_attention_has_no_label_tokens():
    model = ConditionalUNet.from_run_config(load_config("default", TINY_MODEL))
    assert isinstance(model.unet, UNet2DModel) and not hasattr(model, "label_tokens")
    with pytest.raises(ValueError, match="every level with self-attention"):
        ConditionalUNet(sample_size=16, block_out_channels=(8, 16), attention=(False, True), norm_num_groups=4,
                        attention_head_dim=8, cross_attention=(True, False))


def test_saturated_attention_still_gives_finite_gradients():
    # The default preset's middle-block attention (AdaGN: no group norm before it) reached logits of ~1e7
    # by step 2,000, and its training stopped at step 3,025 on non-finite gradients from the CPU fused
    # kernel's backward (BENCHMARKS.md, "Saturated attention in the middle block"). Queries and keys
    # scaled up here give logits of ~8e8: the gradient must stay finite and of the size of the loss's
    # (1.65 on the math kernel; the fused kernel's backward gives NaN here).
    torch.manual_seed(0)
    model = ConditionalUNet(sample_size=16, block_out_channels=(32, 32), attention=(False, True),
                            layers_per_block=1, attention_head_dim=8, norm_num_groups=4,
                            time_scale_shift="scale_shift")
    attention = model.unet.mid_block.attentions[0]
    assert attention.group_norm is None  # why the logits can grow without bound
    with torch.no_grad():
        attention.to_q.weight.mul_(3e4)
        attention.to_k.weight.mul_(3e4)
    x, labels = torch.randn(4, 3, 16, 16), torch.zeros(4, 24)
    model(x, torch.tensor([3, 7, 9, 20]), labels).square().mean().backward()
    norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None))
    assert torch.isfinite(norm) and norm < 1e6, norm
