"""Every kind of bad input a user can give, through the real CLI, in one matrix.

Each failing case must exit 1 (2 for usage errors) with a single `error: ...` line that names the
problem, print no traceback, and leave every file that was already in the workspace untouched.
A few inputs that look odd but are fine (grayscale/RGBA/other-size images, no objects.json,
--force, more than three objects) must work. Full disk and read-only folders are real: a tiny tmpfs
mounted in a private mount namespace (`unshare -m`, or `unshare -rm` without root), skipped where
neither is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from iclevr_diffusion.cli import app
from iclevr_diffusion.config import config_from_dict
from iclevr_diffusion.labels import LABEL_INDEX
from iclevr_diffusion.testing import one_thread, tiny_config, write_tiny_run
from tiny_data import TINY_MODEL, make_tiny_dataset

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny: a trained-format run; ten: the same with 10 labels; foreign: a plain diffusers DDPM."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    root = tmp_path_factory.mktemp("models")
    write_tiny_run(root / "tiny", tiny_config(num_train_timesteps=20), train_steps=2)
    ten = tiny_config(num_train_timesteps=20).to_dict()
    ten["model"]["num_classes"] = 10
    write_tiny_run(root / "ten", config_from_dict(ten), train_steps=0)
    unet = UNet2DModel(sample_size=16, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=20)).save_pretrained(root / "foreign")
    return root


@pytest.fixture
def ws(tmp_path, models):
    """A workspace: runs/tiny (with an earlier sample output), data/ (8 images), models of other kinds."""
    shutil.copytree(models / "tiny", tmp_path / "runs" / "tiny")
    prior = tmp_path / "runs" / "tiny" / "samples-earlier"
    prior.mkdir()
    (prior / "manifest.json").write_text('{"earlier": true}\n')
    for name in ("ten", "foreign"):
        shutil.copytree(models / name, tmp_path / name)
    make_tiny_dataset(tmp_path / "data", n=8)
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Argument builders and workspace edits


def sample(ws: Path, *args: str, sampler: str = "ddim") -> list[str]:
    # ddim: the tiny model's own dpm++ would add a (correct) sampler warning line to every case.
    return ["sample", "--model", str(ws / "runs" / "tiny"), "--out", str(ws / "out"), "--steps", "2", "-q",
            "--sampler", sampler, *args]


def train(ws: Path, *args: str) -> list[str]:
    argv = ["train", "--data", str(ws / "data"), "--name", "t", "--runs-dir", str(ws / "runs"), "--max-steps", "1",
            "-q"]
    for s in TINY_MODEL:
        argv += ["--set", s]
    return [*argv, *args]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def conditions(ws: Path, text: str) -> list[str]:
    return sample(ws, "--conditions", str(write(ws / "mine.json", text)))


def edit_train_json(ws: Path, change) -> None:
    path = ws / "data" / "train.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def last_image(ws: Path) -> Path:
    return ws / "data" / "iclevr" / sorted(json.loads((ws / "data" / "train.json").read_text()))[-1]


def convert_images(ws: Path, mode: str, size=(32, 24)) -> None:
    for path in (ws / "data" / "iclevr").glob("*.png"):
        with Image.open(path) as img:
            img.convert(mode).resize(size).save(path)


def evaluate(ws: Path, evaluator_state) -> list[str]:
    """evaluate --images on two images with an evaluator file holding `evaluator_state`."""
    folder = ws / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (128, 128, 128)).save(folder / f"{i}.png")
    path = ws / "checkpoint.pth"
    if isinstance(evaluator_state, bytes):
        path.write_bytes(evaluator_state)
    else:
        torch.save(evaluator_state, path)
    conds = write(ws / "two.json", '[["red cube"], ["blue sphere", "gray cube"]]')
    return ["evaluate", "--images", str(folder), "--conditions", str(conds), "--evaluator", str(path), "-q"]


def wrong_shape_evaluator() -> dict:
    from iclevr_diffusion.evaluator.metric import build_evaluator

    state = build_evaluator().state_dict()
    state["fc.0.weight"], state["fc.0.bias"] = torch.zeros(10, 512), torch.zeros(10)
    return {"model": state}


def parent_is_a_file(ws: Path) -> Path:
    return write(ws / "a-file", "not a folder") / "sub"


# name: (prepare the workspace and return argv, exit code, fragment of the message)
FAILS = {
    # labels
    "unknown label": (lambda ws: sample(ws, "--labels", "purple cone"), 1, "Unknown label 'purple cone'"),
    "misspelled label": (lambda ws: sample(ws, "--labels", "red cub"), 1, "Did you mean 'red cube'?"),
    "empty label list": (lambda ws: sample(ws, "--labels", " , "), 1, "Empty label list"),
    "duplicate labels": (lambda ws: sample(ws, "--labels", "red cube,Red  Cube"), 1, "appears twice"),
    "unknown --process label": (lambda ws: sample(ws, "--process", "red sphre"), 1, "--process"),
    # condition files
    "condition file missing": (lambda ws: sample(ws, "--conditions", str(ws / "nope.json")), 1,
                               "condition file not found"),
    "condition file empty": (lambda ws: conditions(ws, " \n"), 1, "is empty"),
    "condition file malformed": (lambda ws: conditions(ws, '[["red cube"'), 1, "is not valid JSON"),
    "condition file not a list": (lambda ws: conditions(ws, '{"a": 1}'), 1, "must be a non-empty JSON list"),
    "condition entry not a list": (lambda ws: conditions(ws, "[[1, 2]]"), 1, "entry 0 must be a list"),
    "condition entry empty": (lambda ws: conditions(ws, '[["red cube"], []]'), 1, "Empty label list"),
    "condition entry unknown label": (lambda ws: conditions(ws, '[["red cube"], ["purple cone"]]'), 1,
                                      "mine.json entry 1"),
    # the dataset
    "data folder missing": (lambda ws: train(ws, "--data", str(ws / "nope")), 1, "does not exist"),
    "train.json missing": (lambda ws: (ws / "data" / "train.json").unlink() or train(ws), 1,
                           "train.json not found"),
    "train.json empty": (lambda ws: write(ws / "data" / "train.json", "") and train(ws), 1, "is empty"),
    "train.json malformed": (lambda ws: write(ws / "data" / "train.json", '{"a.png": [') and train(ws), 1,
                             "is not valid JSON"),
    "train.json not a mapping": (lambda ws: write(ws / "data" / "train.json", "[]") and train(ws), 1,
                                 "must map image file names to label lists"),
    "train.json unknown label": (lambda ws: edit_train_json(ws, lambda m: m.update({next(iter(m)): ["red cub"]}))
                                 or train(ws), 1, "Did you mean 'red cube'?"),
    "train.json duplicate label": (lambda ws: edit_train_json(
        ws, lambda m: m.update({next(iter(m)): ["red cube", "red cube"]})) or train(ws), 1, "appears twice"),
    "train.json image missing": (lambda ws: last_image(ws).unlink() or train(ws), 1, "is missing"),
    "train.json image not an image": (lambda ws: write(last_image(ws), "hello") and train(ws), 1,
                                      "Cannot read image"),
    "objects.json empty": (lambda ws: write(ws / "data" / "objects.json", "") and train(ws), 1, "is empty"),
    "objects.json malformed": (lambda ws: write(ws / "data" / "objects.json", "{") and train(ws), 1,
                               "is not valid JSON"),
    "objects.json other classes": (lambda ws: write(ws / "data" / "objects.json", json.dumps(
        {k: 23 - v for k, v in LABEL_INDEX.items()})) and train(ws), 1, "does not match the 24 i-CLEVR classes"),
    # models and evaluators
    "model folder missing": (lambda ws: sample(ws, "--labels", "red cube", "--model", str(ws / "nope")), 1,
                             "does not exist"),
    "model of another architecture": (lambda ws: sample(ws, "--labels", "red cube", "--model", str(ws / "foreign")),
                                      1, "is a UNet2DModel, not this toolkit's ConditionalUNet"),
    "model with another label count": (lambda ws: sample(ws, "--labels", "red cube", "--model", str(ws / "ten")), 1,
                                       "takes 10 labels, but i-CLEVR has 24"),
    "evaluator without 'model' key": (lambda ws: evaluate(ws, {"state_dict": {}}), 1, "no 'model' key"),
    "evaluator with wrong shapes": (lambda ws: evaluate(ws, wrong_shape_evaluator()), 1,
                                    "'fc.0.weight' has shape (10, 512), expected (24, 512)"),
    "evaluator not a torch file": (lambda ws: evaluate(ws, b"garbage"), 1, "cannot read it"),
    # configs
    "config unknown key": (lambda ws: train(ws, "--config", str(write(ws / "c.yaml", "train:\n  lrr: 1\n"))), 1,
                           "Unknown config key 'train.lrr'. Did you mean 'train.lr'?"),
    "config wrong type": (lambda ws: train(ws, "--config", str(write(ws / "c.yaml", "train:\n  batch_size: big\n"))),
                          1, "'train.batch_size' must be int, got 'big'"),
    "config not YAML": (lambda ws: train(ws, "--config", str(write(ws / "c.yaml", "train: [\n"))), 1,
                        "is not valid YAML"),
    "--set wrong type": (lambda ws: train(ws, "--set", "train.lr=fast"), 1, "train.lr"),
    # output locations
    "output folder not empty": (lambda ws: sample(ws, "--labels", "red cube", "--out",
                                                  str(ws / "runs" / "tiny" / "samples-earlier")), 1,
                                "not empty; pass --force"),
    "output is a file": (lambda ws: sample(ws, "--labels", "red cube", "--out", str(write(ws / "f", "x"))), 1,
                         "is a file"),
    "sample output parent is a file": (
        lambda ws: sample(ws, "--labels", "red cube", "--out", str(parent_is_a_file(ws))), 1, "Not a directory"),
    "runs folder parent is a file": (lambda ws: train(ws, "--runs-dir", str(parent_is_a_file(ws))), 1,
                                     "Not a directory"),
    # usage errors (click's own message, exit 2)
    "usage: unknown option": (lambda ws: sample(ws, "--no-such-flag"), 2, "No such option"),
    "usage: option type": (lambda ws: sample(ws, "--n", "many"), 2, "Invalid value for '--n'"),
    "usage: unknown sampler": (lambda ws: sample(ws, "--labels", "red cube", sampler="eulr"), 2,
                               "Invalid value for '--sampler'"),
    "usage: unknown split": (lambda ws: sample(ws, "--split", "train"), 2, "Invalid value for '--split'"),
    "usage: unknown preset": (lambda ws: train(ws, "--config", "defualt"), 2, "Invalid value for '--config'"),
}


@pytest.mark.parametrize("case", list(FAILS))
def test_bad_input_fails_cleanly_and_keeps_files(ws, case):
    prepare, code, fragment = FAILS[case]
    argv = prepare(ws)
    before = snapshot(ws)
    result = runner.invoke(app, argv)
    assert result.exit_code == code, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    err = result.stderr
    assert "Traceback" not in result.output and "Traceback" not in err
    if code == 1:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in " ".join(err.split()), err
    after = snapshot(ws)
    assert {k: after.get(k) for k in before} == before  # nothing written earlier is lost or changed


# name: (prepare and return argv, what must exist afterwards)
WORKS = {
    "grayscale images": (lambda ws: convert_images(ws, "L") or train(ws), "runs/t/model/model_index.json"),
    "RGBA images of another size": (lambda ws: convert_images(ws, "RGBA", (50, 50)) or train(ws),
                                    "runs/t/model/model_index.json"),
    "no objects.json (optional)": (lambda ws: (ws / "data" / "objects.json").unlink() or train(ws),
                                   "runs/t/model/model_index.json"),
    "output folder not empty with --force": (lambda ws: sample(ws, "--labels", "red cube", "--force", "--out",
                                                               str(ws / "runs" / "tiny" / "samples-earlier")),
                                             "runs/tiny/samples-earlier/labels/0.png"),
}


@pytest.mark.parametrize("case", list(WORKS))
def test_odd_but_valid_input_works(ws, case):
    prepare, expected = WORKS[case]
    result = runner.invoke(app, prepare(ws))
    assert result.exit_code == 0, result.output
    assert (ws / expected).is_file()


def test_more_than_three_objects_warns_in_one_line(ws):
    # A subprocess: in-process, pytest would capture the warning instead of the real stderr.
    four = "red cube,blue cube,green cube,gray cube"
    argv = [sys.executable, "-m", "iclevr_diffusion", *sample(ws, "--labels", four)]
    result = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: 4 objects asked for"), result.stderr
    assert (ws / "out" / "labels" / "0.png").is_file()


def test_a_sampler_likely_to_fail_on_the_model_warns_in_one_line_and_still_samples(ws):
    # A few training steps leave the tiny epsilon model's x0 estimate at t = T-1 outside [-1, 1]
    # (tests/test_pipeline.py checks the probe itself).
    argv = [sys.executable, "-m", "iclevr_diffusion", *sample(ws, "--labels", "red cube", sampler="dpm++")]
    result = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: dpm++ is likely to give saturated"), result.stderr
    assert "--sampler ddim" in lines[0]
    assert (ws / "out" / "labels" / "0.png").is_file()


def _unprivileged_prefix() -> list[str] | None:
    """How to run a command that folder permissions apply to: as it is for an ordinary user; for root (who
    ignores them) in a user namespace that maps it to an ordinary uid with no capabilities; None if neither."""
    if os.geteuid() != 0:
        return []
    prefix = ["unshare", "--user", "--map-user=1000", "--map-group=1000"]
    if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
        return prefix
    return None


UNPRIVILEGED = _unprivileged_prefix()


@pytest.mark.skipif(UNPRIVILEGED is None, reason="running as root, which ignores folder permissions, and no user "
                    "namespace (unshare --user --map-user) to run without that; the read-only tmpfs case covers it")
def test_read_only_folder_by_permissions(ws):
    locked = ws / "locked"
    locked.mkdir()
    (locked / "keep.txt").write_text("earlier")
    locked.chmod(0o555)
    argv = [*UNPRIVILEGED, sys.executable, "-m", "iclevr_diffusion",
            *sample(ws, "--labels", "red cube", "--out", str(locked / "out"))]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Permission denied" in lines[0], result.stderr
    assert (locked / "keep.txt").read_text() == "earlier" and not (locked / "out").exists()


# ---------------------------------------------------------------------------------------------
# A real full disk and a real read-only file system: tmpfs in a private mount namespace


def _mount_namespace() -> list[str] | None:
    """A private mount namespace a tmpfs can be mounted in: `unshare -m` (root, or CAP_SYS_ADMIN), else
    `unshare -rm` (an unprivileged user namespace, as on most CI runners); None where neither works."""
    if not shutil.which("unshare"):
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


MOUNT_NS = _mount_namespace()
needs_mount = pytest.mark.skipif(
    MOUNT_NS is None, reason="cannot mount a tmpfs: `unshare -m` needs CAP_SYS_ADMIN and `unshare -rm` needs "
    "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone / apparmor_restrict_unprivileged_userns)")


def in_tmpfs(mnt: Path, size: str, argv: list[str], read_only: bool = False, copy_to: Path | None = None):
    """Run `python -m iclevr_diffusion ARGV` with MNT a fresh tmpfs of SIZE holding keep.txt; afterwards
    keep.txt (and with copy_to, the whole tmpfs) is copied out, since the mount ends with the namespace."""
    mnt.mkdir()
    out = mnt.parent / "after"
    out.mkdir()
    cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "iclevr_diffusion", *argv])
    script = (f"mount -t tmpfs -o size={size} tmpfs {mnt} && echo earlier > {mnt}/keep.txt && "
              + (f"mount -o remount,ro {mnt} && " if read_only else "")
              + f"{{ {cmd}; rc=$?; }}; cp {mnt}/keep.txt {out}/keep.txt; "
              + (f"cp -a {mnt}/. {copy_to}/; " if copy_to else "") + "exit $rc")
    result = subprocess.run([*MOUNT_NS, "sh", "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert (out / "keep.txt").read_text() == "earlier\n"  # what was on the disk before survives
    return result


def one_error_line(result) -> str:
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


@needs_mount
def test_sample_onto_a_full_disk(ws):
    mnt = ws / "mnt"
    line = one_error_line(in_tmpfs(mnt, "16k", sample(ws, "--split", "test", "--out", str(mnt / "out"))))
    assert "No space left on device" in line and str(mnt / "out") in line


@needs_mount
def test_sample_onto_a_read_only_file_system(ws):
    mnt = ws / "mnt"
    line = one_error_line(in_tmpfs(mnt, "64k", sample(ws, "--labels", "red cube", "--out", str(mnt / "out")),
                                   read_only=True))
    assert "Read-only file system" in line


@needs_mount
def test_training_onto_a_full_disk_keeps_the_last_checkpoint(ws):
    """The disk fills while a checkpoint is written: one line, the half-written checkpoint is removed,
    the earlier ones stay, and the run resumes from them once there is space."""
    from iclevr_diffusion.training import checkpoints as ckpt

    mnt, saved = ws / "mnt", ws / "saved"
    saved.mkdir()
    argv = train(ws, "--runs-dir", str(mnt), "--max-steps", "20", "--set", "train.checkpoint_every=1")
    line = one_error_line(in_tmpfs(mnt, "2500k", argv, copy_to=saved))
    assert "No space left on device" in line and "older checkpoints are kept" in line
    run = saved / "t"
    found = ckpt.list_checkpoints(run / "checkpoints")
    assert found and not list((run / "checkpoints").glob(".tmp-*"))
    last = int(found[-1].name.split("_")[1])
    ckpt.load(found[-1])
    again = runner.invoke(app, train(ws, "--runs-dir", str(saved), "--max-steps", str(last + 1)))
    assert again.exit_code == 0, again.output
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, last + 2))
