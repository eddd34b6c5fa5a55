"""Training loop, checkpoints, resume and EMA export on a tiny model and a tiny PIL-drawn dataset."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file

from iclevr_diffusion.config import load_config
from iclevr_diffusion.diffusion.losses import diffusion_loss, drop_labels
from iclevr_diffusion.diffusion.model import ConditionalUNet
from iclevr_diffusion.diffusion.schedule import make_train_scheduler
from iclevr_diffusion.errors import IclevrError
from iclevr_diffusion.training import checkpoints as ckpt
from iclevr_diffusion.training.loop import train
from tiny_data import (
    TINY_MODEL,
    expected_ranked_accuracy,
    final_weights,
    make_tiny_dataset,
    tiny_cfg,
    write_ranked_evaluator,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "iclevr_data", n=12)



def assert_bit_identical(run_a, run_b):
    """The README's promise: a resumed run ends bit-identical to one that never stopped (weights, EMA,
    optimizer state) on the same machine."""
    a, b = (ckpt.load(ckpt.list_checkpoints(r / "checkpoints")[-1]) for r in (run_a, run_b))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert len(a["ema"]) == len(b["ema"]) and all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"]))
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][key]), (i, key)


def test_loss_falls_on_a_fixed_batch(data_root):
    cfg = tiny_cfg(data_root, "train.max_steps=1")
    torch.manual_seed(0)
    model = ConditionalUNet.from_run_config(cfg)
    sched = make_train_scheduler(cfg.schedule)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    labels = torch.zeros(4, 24)
    labels[:, 3] = 1
    losses = []
    for _ in range(40):  # the default's 2x2 patches fit pure noise more slowly than plain pixels
        loss = diffusion_loss(model, sched, images, labels, torch.Generator().manual_seed(1))  # same noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_label_dropout_hits_the_rate():
    labels = torch.ones(20000, 24)
    dropped = drop_labels(labels, 0.1, torch.Generator().manual_seed(0))
    null = (dropped.sum(1) == 0).float().mean().item()
    assert abs(null - 0.1) < 0.01
    kept = dropped[dropped.sum(1) > 0]
    assert torch.equal(kept, torch.ones_like(kept))  # whole rows, never single labels
    assert torch.equal(drop_labels(labels, 0.0), labels)


def test_checkpoint_files_round_trip_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(5, generator=g).half()}
    ema = [torch.randn(2, 2, generator=g)]
    opt_state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, generator=g)}},
                 "param_groups": [{"lr": 1e-4, "params": [0]}]}
    state = {"step": 7, "epoch": 1, "batch": 2, "ema": {"decay": 0.999}}
    tmp = ckpt.begin(tmp_path, 7)
    ckpt.write_rng(tmp, 0, ckpt.capture_rng(g))
    path = ckpt.finish(tmp, 7, weights, ema, opt_state, state, "name: x\n", keep=3)
    loaded = ckpt.load(path)
    assert path.name == "step_000007" and not tmp.exists()
    for k, v in weights.items():
        assert loaded["model"][k].dtype == v.dtype and torch.equal(loaded["model"][k], v)
    assert torch.equal(loaded["ema"][0], ema[0])
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], opt_state["state"][0]["exp_avg"])
    assert loaded["state"] == state
    assert torch.equal(loaded["rng"]["generator"], g.get_state())


def test_run_folder_ema_export_and_pruning(data_root, tmp_path):
    cfg = tiny_cfg(data_root, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                   "train.sample_every=2", "train.ema_decay=0.9")
    run = tmp_path / "run"
    result = train(cfg, run)
    assert result.step == 4 and result.stopped_by == "max_steps"
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_000003", "step_000004"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "images_per_s", "elapsed_s"}
    assert (run / "loss.png").stat().st_size > 0 and (run / "config.yaml").is_file()
    # The export holds the EMA weights, which differ from the raw ones.
    last = ckpt.load(run / "checkpoints" / "step_000004")
    exported = load_file(str(run / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    model = ConditionalUNet.from_run_config(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(last["ema"])
    for name, ema_value in zip(names, last["ema"]):
        assert torch.equal(exported[name], ema_value)
    assert any(not torch.equal(last["model"][n], e) for n, e in zip(names, last["ema"]))
    assert (run / "model" / "run_config.yaml").is_file()


def test_interrupt_then_resume_equals_uninterrupted(data_root, tmp_path):
    sets = ("train.max_steps=7", "data.hflip=true", "train.label_dropout=0.5", "model.dropout=0.1")
    straight = train(tiny_cfg(data_root, *sets), tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(data_root, *sets), tmp_path / "b", interrupt_after=4)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_000004"]
    resumed = train(tiny_cfg(data_root, *sets), tmp_path / "b")  # same command again
    assert resumed.resumed_from.name == "step_000004" and resumed.step == straight.step == 7
    assert_bit_identical(tmp_path / "a", tmp_path / "b")
    steps = lambda run: [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps(tmp_path / "b") == steps(tmp_path / "a") == list(range(1, 8))


def test_same_seed_same_weights_other_seed_differs(data_root, tmp_path):
    train(tiny_cfg(data_root, "train.max_steps=3"), tmp_path / "a")
    train(tiny_cfg(data_root, "train.max_steps=3"), tmp_path / "b")
    train(tiny_cfg(data_root, "train.max_steps=3", "seed=1"), tmp_path / "c")
    a, b, c = (final_weights(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_corrupt_newest_checkpoint_falls_back(data_root, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(data_root, "train.max_steps=4", "train.checkpoint_every=2")
    train(cfg, run)
    (run / "checkpoints" / "step_000004" / "model.safetensors").write_bytes(b"garbage")
    notes = []
    result = train(cfg, run, progress=lambda e, **i: notes.append(i.get("message", "")))
    assert result.resumed_from.name == "step_000002" and result.step == 4
    assert any("step_000004" in n and "falling back" in n for n in notes)


def test_resume_with_another_model_is_an_error(data_root, tmp_path):
    train(tiny_cfg(data_root, "train.max_steps=1"), tmp_path / "run")
    with pytest.raises(IclevrError, match="model.layers_per_block"):
        train(tiny_cfg(data_root, "train.max_steps=2", "model.layers_per_block=2"), tmp_path / "run")


class _NaNImages(torch.utils.data.Dataset):
    """Four images; those at the indices in `bad` are NaN."""

    def __init__(self, bad=(0,)):
        self.bad = set(bad)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        image = torch.full((3, 16, 16), float("nan") if i in self.bad else 0.1)
        return image, torch.eye(24)[i]


def test_nan_policy_stop_stops_at_the_first_non_finite_loss(data_root, tmp_path):
    cfg = tiny_cfg(data_root, "train.max_steps=2", "train.batch_size=1", "train.nan_policy=stop")
    with pytest.raises(IclevrError, match=r"The loss became nan at step 1; no checkpoint yet.*nan_policy=skip"):
        train(cfg, tmp_path / "a", dataset=_NaNImages())


def test_the_default_skips_an_isolated_non_finite_batch_and_keeps_the_weights_finite(data_root, tmp_path):
    notes = []
    result = train(tiny_cfg(data_root, "train.max_steps=5", "train.batch_size=1", "train.log_every=1"),
                   tmp_path / "b", dataset=_NaNImages(), progress=lambda e, **i: notes.append(i.get("message", "")))
    assert result.step == 5 and any("non-finite loss" in n and "batch skipped" in n for n in notes)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped"] == 1  # one NaN image in the 5 optimizer steps' 6 batches
    weights = final_weights(tmp_path / "b")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_skip_stops_when_every_batch_is_non_finite(data_root, tmp_path):
    cfg = tiny_cfg(data_root, "train.max_steps=5", "train.batch_size=1")
    with pytest.raises(IclevrError, match="non-finite in 20 batches in a row at step 1"):
        train(cfg, tmp_path / "c", dataset=_NaNImages(bad=range(4)))


def test_a_non_finite_gradient_norm_is_reported_and_clipping_keeps_finite_ones():
    """What stops an optimizer step from writing NaN into the weights: the norm before clipping."""
    from accelerate import Accelerator

    from iclevr_diffusion.training.agreement import all_finite, clip_gradients

    accelerator = Accelerator(cpu=True)
    layer = torch.nn.Linear(3, 2)
    layer.weight.grad = torch.full_like(layer.weight, 3.0)
    layer.bias.grad = torch.zeros_like(layer.bias)
    norm = clip_gradients(accelerator, layer.parameters(), 1.0)
    assert float(norm) == pytest.approx(3.0 * 6**0.5) and all_finite(accelerator, norm)
    assert float(layer.weight.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    unclipped = clip_gradients(accelerator, layer.parameters(), 0.0)  # grad_clip 0: measured, not clipped
    assert float(unclipped) == pytest.approx(1.0, rel=1e-4)
    assert float(layer.weight.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    layer.weight.grad[0, 0] = float("inf")
    assert not all_finite(accelerator, clip_gradients(accelerator, layer.parameters(), 1.0))


def test_wall_clock_budget_and_bf16(data_root, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(tiny_cfg(data_root, "train.max_minutes=0.01", "train.mixed_precision=bf16"), tmp_path / "r")
    assert result.stopped_by == "max_minutes" and result.mixed_precision == "bf16" and result.step >= 1
    assert (tmp_path / "r" / "model" / "model_index.json").is_file()


def test_wall_clock_run_replans_its_horizon_when_the_speed_changes(data_root, tmp_path):
    """Steps slow down after the first plan (as when the CPU gets busy): the run re-plans and still
    ends at its horizon, learning rate annealed, instead of running out of time mid-schedule.

    The run's clock is injected: every optimizer step costs 0.02 s of it before the first plan and
    0.1 s after, whatever the machine's real speed (a real sleep made this test depend on how fast
    the CPU is: on a 4x slower one the real step time hid the slow-down)."""
    horizons: list[int] = []
    now = [0.0]

    def progress(event, **info):
        if event == "horizon":
            horizons.append(info["total"])
        elif event == "step":
            now[0] += 0.1 if horizons else 0.02

    cfg = tiny_cfg(data_root, "train.max_minutes=0.15", "train.lr=0.001", "train.sample_every=0")
    result = train(cfg, tmp_path / "r", progress=progress, clock=lambda: now[0])
    # 9 s budget, 10% reserve: planned at step 23 (22 steps done at 0.02 s) for 50 steps/s, then ~5x fewer.
    assert horizons[0] == pytest.approx(23 + 50 * (0.9 * 9 - 22 * 0.02), abs=1)
    assert len(horizons) >= 3 and horizons[-1] < horizons[0] / 3
    assert result.stopped_by == "max_minutes" and result.step == horizons[-1]
    assert result.elapsed_s <= 9.0
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == result.step and rows[-1]["lr"] < 0.02 * 0.001


def test_max_steps_fixes_the_horizon_even_with_a_time_budget(data_root, tmp_path):
    horizons: list[int] = []
    cfg = tiny_cfg(data_root, "train.max_minutes=5", "train.max_steps=30")
    result = train(cfg, tmp_path / "r", progress=lambda e, **i: horizons.append(i["total"]) if e == "horizon" else None)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert horizons == [] and result.stopped_by == "max_steps" and result.step == 30
    assert rows[-1]["step"] == 30 and rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # annealed at step 30


def test_builtin_synthetic_data_when_no_root(tmp_path, monkeypatch):
    monkeypatch.setenv("ICLEVR_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config("default", [*TINY_MODEL, "data.synthetic_scenes=4", "train.max_steps=2"])
    events = []
    result = train(cfg, tmp_path / "run", progress=lambda e, **i: events.append((e, i)))
    assert result.step == 2
    renders = [i for e, i in events if e == "render"]
    assert renders and renders[-1]["done"] == renders[-1]["total"]
    assert any("built-in synthetic dataset" in i.get("message", "") for e, i in events if e == "note")


def test_mixed_precision_auto_picks_the_faster_of_the_two_it_timed(data_root, monkeypatch):
    from iclevr_diffusion import precision
    from iclevr_diffusion.training import loop as training

    cfg = tiny_cfg(data_root, "train.mixed_precision=auto", "train.max_steps=1")
    model = ConditionalUNet.from_run_config(cfg)
    before = torch.get_rng_state()
    # This CPU as it is: without native bf16 (an AVX2-only one) bf16 is emulated, so fp32, nothing timed.
    notes = []
    native = precision.cpu_has_native_bf16()
    choice = training.resolve_mixed_precision(cfg, torch.device("cpu"), model, 2, note=notes.append)
    if not native:
        assert choice == "no" and notes == []
    # Timed for real (taken as a CPU with native bf16 where it is not: emulated bf16 still runs).
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    notes = []
    choice = training.resolve_mixed_precision(cfg, torch.device("cpu"), model, 2, note=notes.append)
    # The note reports both speeds this CPU measured just now; the choice must be the faster one.
    found = re.fullmatch(r"mixed_precision auto: fp32 ([\d.]+) images/s, bf16 autocast ([\d.]+) images/s "
                         r"\(forward\+backward\) -> (bf16|fp32)", notes[0])
    assert found, notes
    fp32, bf16 = float(found[1]), float(found[2])
    assert fp32 > 0 and bf16 > 0
    if fp32 != bf16:  # (equal only when both round to the same figure)
        assert choice == ("bf16" if bf16 > fp32 else "no")
    assert found[3] == {"bf16": "bf16", "no": "fp32"}[choice]
    assert torch.equal(torch.get_rng_state(), before) and all(p.grad is None for p in model.parameters())
    # The decision itself, with the timings (seconds per pass: fp32, bf16) given instead of measured.
    monkeypatch.setattr(training, "_time_precisions", lambda *a, **k: (1.0, 0.5))
    assert training.resolve_mixed_precision(cfg, torch.device("cpu"), model, 2) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)  # emulated bf16: not even timed
    assert training.resolve_mixed_precision(cfg, torch.device("cpu"), model, 2) == "no"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(training, "_time_precisions", lambda *a, **k: (0.5, 1.0))
    assert training.resolve_mixed_precision(cfg, torch.device("cpu"), model, 2) == "no"
    # Neither CPU nor CUDA: no autocast, nothing timed. A fixed choice is kept as given.
    assert training.resolve_mixed_precision(cfg, torch.device("meta"), model, 2) == "no"
    for fixed in ("bf16", "no"):
        given = tiny_cfg(data_root, "train.max_steps=1", f"train.mixed_precision={fixed}")
        assert training.resolve_mixed_precision(given, torch.device("cpu"), model, 2) == fixed


def test_evaluation_during_training_keeps_best(tmp_path):
    """With an evaluator checkpoint in the data root, eval_every scores test/new_test and keeps best/."""
    from iclevr_diffusion.data.iclevr import load_conditions
    from iclevr_diffusion.evaluator.metric import OFFICIAL_NAME

    root = make_tiny_dataset(tmp_path / "data", n=8)
    # An official-format evaluator whose score on each split is known in advance (it ignores the images).
    write_ranked_evaluator(root / OFFICIAL_NAME)
    result = train(tiny_cfg(root, "train.max_steps=2", "train.eval_every=1", "sample.guidance_scale=1.0"),
                   tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    test, new_test = (expected_ranked_accuracy(load_conditions(s)) for s in ("test", "new_test"))
    assert rows == [{"step": s, "test": pytest.approx(test), "new_test": pytest.approx(new_test),
                     "mean": pytest.approx((test + new_test) / 2)} for s in (1, 2)]
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == 1 and best["mean"] == rows[0]["mean"]  # a tie does not replace the best
    assert (tmp_path / "run" / "best" / "model_index.json").is_file() and result.step == 2


def test_snapshots_export_the_ema_model_once_per_mark(data_root, tmp_path):
    # Marks of a few milliseconds are passed after the first step; a resumed run does not redo them.
    cfg = tiny_cfg(data_root, "train.max_steps=2", "train.snapshot_minutes=[0.00001, 0.00002, 600]")
    run = tmp_path / "run"
    train(cfg, run)
    snaps = run / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["1e-05min", "2e-05min"]
    first = (snaps / "1e-05min" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    train(tiny_cfg(data_root, "train.max_steps=3", "train.snapshot_minutes=[0.00001, 0.00002, 600]"), run)
    assert (snaps / "1e-05min" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == first
    from iclevr_diffusion.diffusion.sampling import load_pipeline

    pipe, loaded, folder = load_pipeline(snaps / "1e-05min", device="cpu")
    assert folder == snaps / "1e-05min" and loaded.train.snapshot_minutes == [1e-05, 2e-05, 600.0]
    with pytest.raises(IclevrError, match="snapshot_minutes"):
        tiny_cfg(data_root, "train.snapshot_minutes=[0]")


def test_extra_emas_are_exported_beside_the_model_and_resume_exactly(data_root, tmp_path):
    """train.extra_ema_lengths: each an average over a share of the steps so far, exported to ema/<share>/
    and kept in the checkpoints, so an interrupted run resumes it exactly; the main EMA is unchanged by them."""
    sets = ("train.max_steps=6", "train.extra_ema_lengths=[0.25, 1]", "train.checkpoint_every=1",
            "train.keep_checkpoints=10")
    straight = tmp_path / "a"
    train(tiny_cfg(data_root, *sets), straight)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(data_root, *sets), tmp_path / "b", interrupt_after=3)
    train(tiny_cfg(data_root, *sets), tmp_path / "b")
    assert_bit_identical(straight, tmp_path / "b")
    states = [ckpt.load(p) for p in ckpt.list_checkpoints(straight / "checkpoints")]
    last, resumed = states[-1], ckpt.load(ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")[-1])
    assert len(states) == 6 and sorted(last["extra_ema"]) == ["0.25", "1"]
    for share in ("0.25", "1"):
        assert all(torch.equal(x, y) for x, y in zip(last["extra_ema"][share], resumed["extra_ema"][share]))
    # Share 1 averages the weights after every step alike (decay 1 - 1 / t at step t + 1): their plain mean.
    from iclevr_diffusion.diffusion.sampling import load_pipeline

    exported = {name: load_pipeline(straight / name, device="cpu")[0].unet.state_dict()
                for name in ("model", "ema/0.25", "ema/1")}
    for key, value in exported["ema/1"].items():
        assert torch.allclose(value, torch.stack([st["model"][key] for st in states]).mean(0), atol=1e-6), key
    key = next(iter(exported["model"]))
    assert not torch.equal(exported["ema/0.25"][key], exported["ema/1"][key])
    assert not torch.equal(exported["model"][key], exported["ema/0.25"][key])
    without = tmp_path / "c"  # the same run without extras: the main EMA is the same
    train(tiny_cfg(data_root, "train.max_steps=6"), without)
    assert all(torch.equal(x, y) for x, y in zip(ckpt.load(ckpt.list_checkpoints(without / "checkpoints")[-1])["ema"],
                                                  last["ema"]))
    with pytest.raises(IclevrError, match="extra_ema_lengths"):
        tiny_cfg(data_root, "train.extra_ema_lengths=[1.5]")


def test_an_extra_ema_added_on_resuming_starts_from_the_main_ema(data_root, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(data_root, "train.max_steps=2"), run)
    notes = []
    train(tiny_cfg(data_root, "train.max_steps=3", "train.extra_ema_lengths=[0.25]"), run,
          progress=lambda e, **i: notes.append(i.get("message", "")))
    assert any("EMA 0.25 is not in checkpoint step_000002" in n for n in notes)
    assert (run / "ema" / "0.25" / "model_index.json").is_file()
    extra = ckpt.load(ckpt.list_checkpoints(run / "checkpoints")[-1])
    assert "0.25" in extra["extra_ema"] and extra["state"]["extra_ema"]["0.25"]["inv_gamma"] == 4.0


def test_ctrl_c_right_after_an_optimizer_update_still_resumes_exactly(data_root, tmp_path):
    # SIGINT lands just after AdamW's 4th update, before the loop counts step 4: the checkpoint must
    # still hold weights and step that agree (the loop acts on Ctrl-C only at a step boundary).
    import os
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    sets = ("train.max_steps=7",)
    straight = train(tiny_cfg(data_root, *sets), tmp_path / "a")
    updates = [0]

    def ctrl_c_after_fourth(optimizer, args, kwargs):
        updates[0] += 1
        if updates[0] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    handle = register_optimizer_step_post_hook(ctrl_c_after_fourth)
    # Under a background launcher (nohup, CI) SIGINT may be ignored; Ctrl-C here means Python's default.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tiny_cfg(data_root, *sets), tmp_path / "b")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    finally:
        handle.remove()
        signal.signal(signal.SIGINT, before)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_000004"]
    resumed = train(tiny_cfg(data_root, *sets), tmp_path / "b")
    assert resumed.step == straight.step == 7
    assert_bit_identical(tmp_path / "a", tmp_path / "b")
