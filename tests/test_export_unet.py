"""The seed preset's architecture as a plain diffusers UNet2DModel folder + the label projection (issue 16)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from iclevr_diffusion.cli import app
from iclevr_diffusion.testing import tiny_config, write_tiny_run

runner = CliRunner()


def test_a_plain_unet2dmodel_plus_the_projection_predicts_what_the_toolkit_predicts(tmp_path):
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from iclevr_diffusion.diffusion.sampling import load_pipeline

    cfg = tiny_config()  # DDPM
    cfg.model.patch_size = 1  # the seed preset's shape
    run = write_tiny_run(tmp_path / "run", cfg, train_steps=2)
    result = runner.invoke(app, ["export-unet", "--model", str(run), "--out", str(tmp_path / "plain"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["unet"].endswith("unet")

    unet = UNet2DModel.from_pretrained(tmp_path / "plain" / "unet").eval()
    proj = load_file(tmp_path / "plain" / "label_projection.safetensors")
    card = json.loads((tmp_path / "plain" / "label_projection.json").read_text())
    assert unet.config.class_embed_type == "identity" and "class_labels=emb" in card["usage"]
    assert len(card["label_names"]) == 24 and card["label_names"][0] == "gray cube"

    ours = load_pipeline(run, device="cpu")[0].unet
    x, t = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 17, 99])
    labels = torch.zeros(3, 24)
    labels[0, 3] = labels[1, [1, 5]] = 1  # row 2: the null label
    with torch.no_grad():
        expected = ours(x, t, labels)
        emb = labels @ proj["weight"].T + proj["bias"]
        got = unet(x, t, class_labels=emb).sample
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()


@pytest.mark.parametrize("formulation,patch_size,cross,head,reason", [
    ("ddpm", 2, [], 0, "patch"), ("edm", 1, [], 0, "EDM"), ("ddpm", 1, [False, True], 0, "cross-attend"),
    ("ddpm", 1, [], 8, "model.patch_head")])
def test_a_model_a_plain_unet_cannot_express_is_refused_in_one_line(tmp_path, formulation, patch_size, cross, head,
                                                                    reason):
    cfg = tiny_config(formulation=formulation)
    cfg.model.patch_size = patch_size
    cfg.model.cross_attention = cross
    cfg.model.patch_head = head
    run = write_tiny_run(tmp_path / "run", cfg, train_steps=0)
    result = runner.invoke(app, ["export-unet", "-m", str(run), "-o", str(tmp_path / "plain")])
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert line.startswith("error: Cannot write this model as a plain UNet2DModel") and reason in line
    assert "\n" not in line and not (tmp_path / "plain" / "unet").exists()
