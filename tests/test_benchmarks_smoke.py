"""Every benchmark script runs in its --smoke mode (seconds), so none can rot unnoticed, and what it
writes holds together: derived figures (ratios, means, spreads, the chosen row) agree with the rows
they come from, counts match what was asked for. Timings themselves are the machine's and not checked."""

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
approx = pytest.approx


def run(script: str, *args: str, tmp_path: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ICLEVR_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, str(BENCH / script), "--smoke", *args], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    if ok:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


def smoke(script: str, tmp_path: Path, out_flag: str = "--out", *extra: str) -> dict:
    result = tmp_path / "result.json"
    run(script, out_flag, str(result), *extra, tmp_path=tmp_path)
    data = json.loads(result.read_text())
    assert data["machine"]["cores"] >= 1
    return data


def test_render_speed(tmp_path):
    from iclevr_diffusion.data.synthetic import planned_images

    rows = smoke("render_speed.py", tmp_path)["results"]
    assert [r["what"] for r in rows[:3]] == [f"render {k} object(s), 64" for k in (1, 2, 3)]
    for r in rows:
        assert r["images"] > 0 and r["images_per_s"] == approx(r["images"] / r["seconds"])
    scenes = int(re.search(r"--scenes (\d+)", rows[-1]["what"])[1])
    assert rows[-1]["images"] == planned_images(scenes)  # train + held-out scenes, 3 images each


def test_train_speed(tmp_path):
    data = smoke("train_speed.py", tmp_path)
    rows = data["rows"]
    assert data["failed"] == {} and len(rows) >= 2 and rows[0]["speedup_vs_first"] == 1.0
    for r in rows:
        assert len(r["images_per_s_rounds"]) == data["rounds"]
        assert r["images_per_s"] == max(r["images_per_s_rounds"])  # the best round
        assert r["speedup_vs_first"] == approx(r["images_per_s"] / rows[0]["images_per_s"])
    assert [r["bf16"] for r in rows[:2]] == [False, True] and rows[0]["params"] == rows[1]["params"]


def test_learn_speed(tmp_path):
    (row,) = smoke("learn_speed.py", tmp_path)["rows"]
    assert row["steps"] > 0 and row["images_seen"] % row["steps"] == 0
    assert Path(row["samples"]).name == f"step_{row['steps']:06d}.png"  # the grid of the last step
    assert set(row["accuracy"]) == {"test", "new_test"} and math.isfinite(row["train_loss"])


def test_samplers(tmp_path):
    data = smoke("samplers.py", tmp_path, "--json", "--plot", str(tmp_path / "plot.png"))
    rows = data["rows"]
    ref = rows[0]
    assert ref["sampler"] == "ddpm" and ref["steps"] == data["num_train_timesteps"]
    assert (ref["delta_vs_reference"], ref["speedup_vs_reference"]) == (0.0, 1.0)
    images = data["splits"]["test"] + data["splits"]["new_test"]
    for r in rows:
        assert r["images"] == images * data["seeds"]
        assert r["delta_vs_reference"] == approx(r["accuracy"] - ref["accuracy"])
        assert r["speedup_vs_reference"] == approx(ref["seconds_per_image"] / r["seconds_per_image"])
        assert min(r["per_set"].values()) <= r["accuracy"] <= max(r["per_set"].values())  # a weighted mean
    within = [r for r in rows[1:] if r["steps"] <= 25 and r["delta_vs_reference"] >= -0.01]
    target = data["target"]
    assert target["met"] == bool(within)
    if within:
        fastest = max(within, key=lambda r: r["speedup_vs_reference"])
        assert target["fastest_within"]["speedup_vs_reference"] == fastest["speedup_vs_reference"]
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_quality_at_budget(tmp_path):
    data = smoke("quality_at_budget.py", tmp_path)
    assert data["trained"]["stopped_by"] == "max_minutes" and data["trained"]["steps"] > 0
    best = max(c["mean_accuracy_seed0"] for c in data["candidates"])
    assert data["choice"]["mean_accuracy_seed0"] == best and data["choice"]["sampler"] in {
        c["sampler"] for c in data["candidates"] if c["mean_accuracy_seed0"] == best}
    rows = data["rows"]
    assert [r["minutes"] for r in rows] == sorted(r["minutes"] for r in rows)
    for r in rows:
        for split in ("test", "new_test"):
            cell = r[split]
            assert len(cell["seeds"]) == data["seeds"]
            assert cell["mean"] == approx(statistics.fmean(cell["seeds"]))
            assert cell["spread"] == approx(statistics.pstdev(cell["seeds"]), abs=1e-12)  # population SD
    met = any(r["test"]["mean"] >= 0.922 and r["new_test"]["mean"] >= 0.953 for r in rows)
    assert data["target"]["met"] == met


def test_gpu_check(tmp_path):
    data = smoke("gpu_check.py", tmp_path)
    rows = data["throughput"]
    assert [r["bf16"] for r in rows] == [False, True, True, True, True, True, True]
    assert rows[0]["params"] == rows[1]["params"] > 0 and [r["batch"] for r in rows[2:4]] == [4, 4]
    assert [r["config"] for r in data["short_runs"]] == ["default", "full"]
    for run_ in data["short_runs"]:
        assert run_["steps"] > 0 and set(run_["accuracy"]) == {"test", "new_test"}


def test_gpu_stability(tmp_path):
    data = smoke("gpu_stability.py", tmp_path)
    runs = data["runs"]
    assert [r["name"] for r in runs] == [v[0] for v in _gpu_stability_variants()]
    for r in runs:  # a tiny model for 4 steps: every variant finishes, and each logged step is recorded
        assert r["finished_steps"] == 4 and r["non_finite_at_step"] is None and r["error"] is None
        assert [c["step"] for c in r["curve"]] == [1, 2, 3, 4] and all(c["max_abs_param"] > 0 for c in r["curve"])


def test_main_job(tmp_path):
    """The README's two commands as subprocesses on a fresh cache (a tiny budget): the run's steps, both
    wall times, and 2 seeds scored per split by the evaluator its first use made."""
    data = smoke("main_job.py", tmp_path)
    assert data["steps"] == 2 and data["train_wall_s"] > 0 and data["evaluate_wall_s"] > 0
    assert data["commands"][0].endswith("train --runs-dir runs/main-job --max-steps 2 --set data.synthetic_scenes=8 "
                                        "--set sample.steps=2")
    assert data["evaluator_first_use"]["source"] in ("trained", "shipped")
    results = data["evaluate"]["results"]
    assert {r["split"] for r in results} == {"test", "new_test"}
    assert all(0 <= r["accuracy"] <= 1 and r["seeds"] == [0, 1] for r in results)


def test_attention_check(tmp_path):
    data = smoke("attention_check.py", tmp_path)
    rows = data["rows"]  # the tiny run's two checkpoints and its exported EMA model
    assert [(r["step"], r["weights"]) for r in rows] == [(2, "raw weights"), (4, "raw weights"), (None, "exported EMA")]
    for r in rows:
        assert "mid_block.attentions.0" in r["attention"]
        for layer in r["attention"].values():
            assert layer["max_abs_logit"] > 0 and 0 < layer["mean_top_weight"] <= 1
        norms = r["gradient_norm"]  # unsaturated attention: both kernels give the same gradient
        assert norms["fused fp32"] == approx(norms["math fp32"], rel=1e-4) and all(0 < n < 1e3 for n in norms.values())
    sweep = data["kernel_sweep"]
    assert [r["max_abs_logit"] for r in sweep] == sorted(r["max_abs_logit"] for r in sweep)
    assert sweep[0]["fused"] == approx(sweep[0]["math"], rel=1e-4)
    assert all(0 < r["math"] < 1e4 for r in sweep)  # the math kernel's backward stays finite and bounded
    assert set(data["pass_seconds"]) == {"fused", "math"} and all(t > 0 for t in data["pass_seconds"].values())


def _gpu_stability_variants():
    sys.path.insert(0, str(BENCH))
    import gpu_stability

    return gpu_stability.VARIANTS


def test_x0_check(tmp_path):
    models = smoke("x0_check.py", tmp_path)["models"]
    eps = models["tiny epsilon"]
    assert eps["prediction_type"] == "epsilon" and models["tiny v_prediction"]["prediction_type"] == "v_prediction"
    for row in eps["noise_errors"]:  # an epsilon model's x0 error is its noise error times sqrt(1 - a) / sqrt(a)
        a = row["sqrt_alpha_bar"]
        assert row["x0_rms_error"] == approx(math.sqrt(row["noise_mse"]) * math.sqrt(1 - a * a) / a, rel=1e-3)


def test_evaluator(tmp_path):
    out = run("evaluator.py", tmp_path=tmp_path).stdout
    for pct, hits, labels in re.findall(r"held-out accuracy ([\d.]+)% \((\d+)/(\d+) labels", out):
        assert float(pct) == approx(100 * int(hits) / int(labels), abs=0.006)
    found = re.search(r"small CNN ([\d.]+)%, ResNet18 ([\d.]+)% -> ([\d.]+) points apart \((NOT )?within (\d+)\)", out)
    assert found, out[-2000:]
    small, resnet, apart = (float(found[i]) for i in (1, 2, 3))
    assert apart == approx(abs(small - resnet), abs=0.011) and (found[4] is None) == (apart <= float(found[5]))


def test_slow_cpu(tmp_path):
    data = smoke("slow_cpu.py", tmp_path)
    speeds = data["training_images_per_s"]
    simulated = [row for key, row in speeds.items() if key.endswith("simulated AVX2-only")]
    assert set(speeds) == {"default native", "default simulated AVX2-only"} and len(simulated) == 1
    # The simulation really runs torch as an AVX2-only CPU without native bf16 (so fp32, as there).
    assert all(row["cpu_capability"] == "AVX2" and row["bf16"] is False for row in simulated)
    for mode, key in (("native", "default native"), ("simulated", "default simulated AVX2-only")):
        assert data["main_job_steps"][mode] == int(speeds[key]["images_per_s"] * 14 * 60 / 16)
    first = data["evaluate_first_use"]
    assert set(first) == {"native", "simulated"}
    assert all(set(r["accuracy"]) == {"test", "new_test"} and r["seconds"] > r["sampling_seconds"] > 0
               for r in first.values())


def test_only_the_shipped_config_is_called_default_in_results_files():
    """Results rows say "default" only for a run that trains what the default preset does: its budget,
    measured sigma_data and data location aside, but not a data option such as flips."""
    sys.path.insert(0, str(BENCH))
    from scoring import is_default_recipe

    from iclevr_diffusion.config import load_config

    assert is_default_recipe(load_config("default", ["train.max_steps=5200", "train.max_minutes=null",
                                                     "data.root=/elsewhere", "schedule.sigma_data=0.2"]))
    assert not is_default_recipe(load_config("default", ["data.hflip=true"]))
    assert not is_default_recipe(load_config("default", ["data.synthetic_scenes=100"]))
    assert not is_default_recipe(load_config("default", ["schedule.p_mean=-1.2"]))


def test_ema_lengths(tmp_path):
    """The run's main EMA, each extra EMA (by share, ascending) and the raw weights, each scored."""
    data = smoke("ema_lengths.py", tmp_path)
    assert [r["kind"] for r in data["rows"]] == ["ema_decay 0.999", "share 0.25", "share 0.5", "raw"]
    assert all(0 <= r["mean"] <= 100 and len(r["seeds"]) == 2 for r in data["rows"]) and data["steps"] == 3


def _default_churn(name: str) -> float:
    from iclevr_diffusion.config import SampleConfig

    return SampleConfig().churn if name in ("heun", "euler") else 0.0


def _agreement_checks_hold(data: dict) -> None:
    rows = [r for r in data["samplers"] if r["churn"] == _default_churn(r["name"])]  # the checked ones
    best = max(r["accuracy"] for r in rows)
    default = next(r for r in rows if r["name"] == "heun")  # the smoke model's sampler
    reference_loss = default["accuracy"] - data["reference"]["accuracy"]
    assert data["checks"] == {
        "every sampler within 3 points of the best": all(best - r["accuracy"] <= 3 for r in rows),
        "reference not worse than the default by more than 3 points": reference_loss <= 3,
        "fp32 and bf16 within 3 points": abs(data["other_precision"]["accuracy"] - default["accuracy"]) <= 3,
    }
    for r in [*rows, data["reference"], data["other_precision"], *data["guidance_curve"]]:
        assert r["accuracy"] == approx(statistics.fmean(r["seeds"]), abs=0.006)
        assert r["spread"] == approx(statistics.pstdev(r["seeds"]), abs=0.006)


def test_sampler_agreement(tmp_path):
    """One call, and the same work split into parts (one sampler subset each) joined by --merge: every
    offered sampler once, in the offered order, and the checks computed from the rows."""
    data = smoke("sampler_agreement.py", tmp_path)
    assert [r["name"] for r in data["samplers"]] == ["heun", "euler", "dpm++", "dpm++sde"]
    # the default sampler in the precision the machine does not sample in by default
    assert {data["other_precision"]["precision"], data["samplers"][0]["precision"]} == {"fp32", "bf16"}
    assert data["seeds"] == 2
    _agreement_checks_hold(data)

    out = tmp_path / "parts" / "agreement.json"
    for part in (["--part", "samplers", "--samplers", "dpm++sde,heun"], ["--part", "samplers,precision", "--samplers",
                 "euler,dpm++"], ["--part", "reference,guidance"], ["--part", "samplers", "--samplers", "heun",
                 "--churn", "1.5"]):
        run("sampler_agreement.py", "--out", str(out), *part, tmp_path=tmp_path)
    assert (out.parent / "agreement.samplers-heun-churn1.5.json").is_file()
    run("sampler_agreement.py", "--out", str(out), "--merge", tmp_path=tmp_path)
    merged = json.loads(out.read_text())
    # A row at another churn than the model's is kept beside the default one, and left out of the check.
    heun = _default_churn("heun")
    assert [(r["name"], r["churn"]) for r in merged["samplers"]] == [
        *sorted([("heun", heun), ("heun", 1.5)], key=lambda r: r[1]), ("euler", heun), ("dpm++", 0.0),
        ("dpm++sde", 0.0)]
    assert merged["seeds"] == {"samplers": 2, "precision": 2, "reference": 2, "guidance": 2}
    _agreement_checks_hold(merged)

    # Parts not run: their rows and the checks they decide are null (not measured), and no plot is drawn.
    (tmp_path / "parts" / "agreement.reference-guidance.json").unlink()
    plot = tmp_path / "partial.png"
    run("sampler_agreement.py", "--out", str(out), "--merge", "--plot", str(plot), tmp_path=tmp_path)
    partial = json.loads(out.read_text())
    assert partial["reference"] is None and partial["guidance_curve"] is None and "plot" not in partial
    assert not plot.exists()
    checks, full = partial["checks"], merged["checks"]
    assert checks["reference not worse than the default by more than 3 points"] is None
    for kept in ("every sampler within 3 points of the best", "fp32 and bf16 within 3 points"):
        assert checks[kept] == full[kept]


def test_sampler_agreement_names_an_unknown_sampler(tmp_path):
    out = run("sampler_agreement.py", "--part", "samplers", "--samplers", "ddim", "--out", str(tmp_path / "a.json"),
              tmp_path=tmp_path, ok=False)
    assert out.returncode != 0 and "--samplers ['ddim'] not offered by this model" in out.stderr


def test_sampler_agreement_names_an_unknown_part(tmp_path):
    out = run("sampler_agreement.py", "--part", "samplers,fp32", tmp_path=tmp_path, ok=False)
    assert out.returncode != 0 and "--part ['fp32'] unknown; choose from samplers, precision" in out.stderr


def test_quality_at_steps(tmp_path):
    """Each recipe x steps is its own run of exactly that many steps, scored per split; rows record the CPU."""
    data = smoke("quality_at_steps.py", tmp_path, "--out", "--recipes", "default")
    assert sorted((t["recipe"], t["steps"]) for t in data["trained"]) == [("default", 2), ("default", 4)]
    assert all(t["cpu"] and "cpu_flags" in t for t in data["trained"])
    assert sorted((r["steps"], r["split"]) for r in data["rows"]) == [
        (2, "new_test"), (2, "test"), (4, "new_test"), (4, "test")]
    for r in data["rows"]:
        assert r["recipe"] == "default" and r["cpu"] and len(r["seeds"]) == data["seeds"] == 2
        assert r["mean"] == approx(statistics.fmean(r["seeds"]), abs=0.006)
