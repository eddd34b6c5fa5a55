"""Conventions users bring from diffusers and from command-line tools (issue 16): the pipeline's output,
progress bar, step callbacks and saved defaults; diffusers' generic loader; from_config samplers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, ImagePipelineOutput

from iclevr_diffusion.diffusion.pipeline import LOADER_MODULE, ConditionalDDPMPipeline
from iclevr_diffusion.diffusion.sampling import generate, image_generators, load_pipeline
from iclevr_diffusion.testing import one_thread, tiny_config, tiny_pipeline

CONDS = [["red sphere", "cyan cube"], ["gray cylinder"]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pipe():
    """A briefly trained tiny DDPM pipeline whose saved defaults are ddim, 4 steps, guidance 2."""
    with one_thread():
        trained = tiny_pipeline(tiny_config(num_train_timesteps=100), train_steps=5)
    pipe = ConditionalDDPMPipeline(trained.unet, trained.scheduler, default_sampler="ddim", default_steps=4,
                                   default_guidance_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "model"
    pipe.save_pretrained(folder)
    return folder


def gens(seed: int = 0, n: int = len(CONDS)):
    return image_generators(seed, 0, n)


def test_call_returns_image_pipeline_output_or_a_tuple(pipe):
    out = pipe(CONDS, generator=gens(), output_type="pt")
    assert isinstance(out, ImagePipelineOutput) and out.images.shape == (2, 3, 16, 16)
    (same,) = pipe(CONDS, generator=gens(), output_type="pt", return_dict=False)
    assert torch.equal(same, out.images)
    pil = pipe(CONDS, generator=gens()).images  # output_type defaults to "pil", as in diffusers
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    arr = pipe(CONDS, generator=gens(), output_type="np").images
    assert arr.shape == (2, 16, 16, 3) and arr.min() >= 0 and arr.max() <= 1
    assert np.allclose(arr, ((out.images + 1) / 2).permute(0, 2, 3, 1).numpy())
    images, frames = pipe(CONDS, generator=gens(), output_type="pt", frames=3, return_dict=False)
    assert torch.equal(images, out.images) and frames.shape == (3, 2, 3, 16, 16)


def test_defaults_come_from_the_saved_model(pipe, saved):
    explicit = pipe(CONDS, 4, 2.0, generator=gens(), sampler="ddim", output_type="pt").images
    assert torch.equal(pipe(CONDS, generator=gens(), output_type="pt").images, explicit)
    assert not torch.equal(pipe(CONDS, 4, 1.0, generator=gens(), sampler="ddim", output_type="pt").images, explicit)
    index = json.loads((saved / "model_index.json").read_text())
    assert (index["default_sampler"], index["default_steps"], index["default_guidance_scale"]) == ("ddim", 4, 2.0)
    loaded = ConditionalDDPMPipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded(CONDS, generator=gens(), output_type="pt").images, explicit)
    assert pipe.sampling_defaults("ddpm") == ("ddpm", 100, 2.0)  # ddpm: the full chain unless steps are given


def test_progress_bar_shows_steps_unless_disabled(pipe, capsys):
    pipe.set_progress_bar_config()
    try:
        pipe(CONDS[:1], 3, generator=gens(n=1), sampler="ddim", output_type="pt")
        assert "3/3" in capsys.readouterr().err  # tqdm on stderr
    finally:
        pipe.set_progress_bar_config(disable=True)
    pipe(CONDS[:1], 3, generator=gens(n=1), sampler="ddim", output_type="pt")
    assert capsys.readouterr().err == ""


def test_callback_on_step_end_sees_and_replaces_the_latents(pipe):
    seen = []

    def record(p, step_index, timestep, kwargs):
        assert p is pipe and set(kwargs) == {"latents"}
        seen.append((step_index, int(timestep)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if step_index == 2 else kwargs

    out = pipe(CONDS, 3, generator=gens(), sampler="ddim", output_type="pt", callback_on_step_end=record,
               callback_on_step_end_tensor_inputs=["latents"]).images
    assert [i for i, _ in seen] == [0, 1, 2]
    assert [t for _, t in seen] == sorted((t for _, t in seen), reverse=True)
    assert torch.equal(out, torch.zeros_like(out))  # the returned latents replaced the final state
    with pytest.raises(ValueError, match="offers"):
        pipe(CONDS, 3, generator=gens(), sampler="ddim", callback_on_step_end=record,
             callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_older_callback_still_counts_images_per_step(pipe):
    counts = []
    pipe(CONDS, 3, generator=gens(), sampler="unipc", output_type="pt", callback=counts.append)
    assert counts == [2, 2, 2]


def test_ddim_from_the_saved_scheduler_config_is_the_toolkits_ddim(pipe, saved):
    """diffusers' way of swapping samplers reproduces `--sampler ddim` (trailing spacing saved with the model)."""
    loaded = ConditionalDDPMPipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)  # runs as it is, as in diffusers
    theirs = loaded(CONDS, 6, 2.0, generator=image_generators(3, 0, 2), output_type="pt").images
    assert torch.equal(theirs, generate(pipe, CONDS, "ddim", 6, 2.0, seed=3))
    loaded.scheduler = DDPMScheduler.from_config(loaded.scheduler.config)
    theirs = loaded(CONDS, 6, 2.0, generator=image_generators(3, 0, 2), output_type="pt").images
    assert torch.equal(theirs, generate(pipe, CONDS, "ddpm", 6, 2.0, seed=3))


@pytest.mark.parametrize("layout", ["now", "before diffusion/"])
def test_generic_diffusers_loader_loads_an_export(pipe, saved, tmp_path, layout):
    """A fresh interpreter that imports only diffusers: DiffusionPipeline.from_pretrained finds the class,
    also in a folder exported before the package had subpackages (it names the old module paths)."""
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == [LOADER_MODULE,
                                                                                 "ConditionalDDPMPipeline"]
    if layout != "now":
        import shutil

        saved = shutil.copytree(saved, tmp_path / "old")
        (saved / f"{LOADER_MODULE}.py").write_text("from iclevr_diffusion.pipeline import ConditionalDDPMPipeline\n")
        index = json.loads((saved / "model_index.json").read_text())
        index["unet"] = ["iclevr_diffusion.model", "ConditionalUNet"]
        (saved / "model_index.json").write_text(json.dumps(index))
    code = (
        "import sys, torch\n"
        "from diffusers import DiffusionPipeline\n"
        "assert 'iclevr_diffusion' not in sys.modules\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(saved)!r}, trust_remote_code=True)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "gens = [torch.Generator().manual_seed(s) for s in (1, 2)]\n"
        f"out = pipe({[', '.join(c) for c in CONDS]!r}, generator=gens, output_type='pt')\n"
        f"torch.save(out.images, {str(tmp_path / 'images.pt')!r})\n"
        "print(type(pipe).__module__, type(pipe).__name__, type(pipe.unet).__name__)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    want_names = ["iclevr_diffusion.diffusion.pipeline", "ConditionalDDPMPipeline", "ConditionalUNet"]
    assert result.stdout.split() == want_names
    want = pipe(CONDS, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="pt").images
    assert torch.equal(torch.load(tmp_path / "images.pt"), want)


def test_our_loader_needs_no_remote_code_and_reads_old_exports(saved, tmp_path):
    import shutil

    new = tmp_path / "run" / "model"
    shutil.copytree(saved, new)
    (new / f"{LOADER_MODULE}.py").write_text("raise SystemExit('the folder code must not run')\n")
    loaded = ConditionalDDPMPipeline.from_pretrained(new)  # by name: the folder's code is never executed
    assert loaded.config.default_sampler == "ddim"
    # An export of an earlier version: a plain class name, no loader module, defaults only in run_config.yaml.
    old = tmp_path / "old" / "model"
    shutil.copytree(saved, old)
    (old / f"{LOADER_MODULE}.py").unlink()
    index = json.loads((old / "model_index.json").read_text())
    index["_class_name"] = "ConditionalDDPMPipeline"
    index["unet"] = ["iclevr_diffusion.model", "ConditionalUNet"]  # the module path before diffusion/
    for key in ("default_sampler", "default_steps", "default_guidance_scale"):
        del index[key]
    (old / "model_index.json").write_text(json.dumps(index))
    (old / "run_config.yaml").write_text(tiny_config(num_train_timesteps=100, sampler="unipc", steps=3).to_yaml())
    pipe, cfg, folder = load_pipeline(old, device="cpu")
    assert folder == old and pipe.sampling_defaults() == ("unipc", 3, 2.0)  # from the run config
    assert pipe(CONDS, generator=gens(), output_type="pt").images.shape == (2, 3, 16, 16)
