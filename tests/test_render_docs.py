"""benchmarks/render_docs.py: the published tables are what the results files say, and --check notices when not."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "render_docs.py"

spec = importlib.util.spec_from_file_location("render_docs", SCRIPT)
render_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_docs)

MACHINE = {
    "command": "python benchmarks/quality_at_steps.py --seeds 2",
    "commit": "abc1234",
    "cpu": "Test CPU",
    "cpu_flags": ["avx2", "avx512f"],
    "cores": 2,
    "torch": "2.0+cpu",
    "torch_threads": 1,
    "date": "2026-01-01T00:00:00+00:00",
}
MARKED = "# Doc\n\nBefore.\n\n<!-- render:quality_at_steps results/q.json -->\n<!-- /render -->\n\nAfter.\n"


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def rendered(tmp_path: Path, *specs: str) -> str:
    """The text of DOC.md holding one marker per spec ("KIND FILES"), after the CLI rendered it."""
    doc = tmp_path / "DOC.md"
    doc.write_text("\n\n".join(f"<!-- render:{spec} -->\n<!-- /render -->" for spec in specs) + "\n")
    assert cli(doc).returncode == 0
    return doc.read_text()


def tiny_results(tmp_path: Path, means=(41.67, 58.93), machine=MACHINE) -> Path:
    rows = [
        {
            "recipe": "default",
            "steps": 1150,
            "split": split,
            "conditions": 32,
            "mean": mean,
            "spread": 5.64,
            "seeds": [mean - 1, mean + 1],
            "sampler": "heun",
            "sampler_steps": 18,
            "guidance": 3.0,
        }
        for split, mean in zip(("test", "new_test"), means)
    ]
    (tmp_path / "results").mkdir(exist_ok=True)
    path = tmp_path / "results" / "q.json"
    path.write_text(json.dumps({"machine": machine, "batch_size": 16, "rows": rows}))
    return path


def test_committed_readme_and_benchmarks_are_what_the_results_files_render():
    out = cli("--check")
    assert out.returncode == 0, (
        f"stale rendered sections (run python benchmarks/render_docs.py):\n{out.stdout}{out.stderr}"
    )
    for name in render_docs.DOCS:  # the check covered real sections, not files without markers
        assert (ROOT / name).read_text().count("<!-- render:") >= 1


def test_check_names_the_stale_section_and_write_mode_fixes_it(tmp_path):
    tiny_results(tmp_path)
    doc = tmp_path / "DOC.md"
    doc.write_text(MARKED)

    stale = cli("--check", doc)
    assert stale.returncode == 1
    assert stale.stdout.strip().splitlines() == [
        "DOC.md:5: section 'render:quality_at_steps results/q.json' is stale; run python benchmarks/render_docs.py"
    ]
    assert doc.read_text() == MARKED  # --check writes nothing

    assert cli(doc).returncode == 0
    text = doc.read_text()
    assert (
        "| **the default preset** | 1,150 (18,400) | heun 18, guidance 3 | **41.7% ± 5.6** | **58.9% ± 5.6** |" in text
    )
    assert "Spread: population standard deviation over seeds, in percentage points. Seeds: 2." in text
    assert "Conditions per split: test 32, new_test 32." in text
    assert (
        "Source: `results/q.json`; command: `python benchmarks/quality_at_steps.py --seeds 2`; commit: abc1234; "
        "CPU: Test CPU (avx2, avx512f), 2 cores; torch 2.0+cpu; torch threads: 1; date: 2026-01-01"
    ) in text
    assert text.startswith("# Doc\n\nBefore.\n\n") and text.endswith("<!-- /render -->\n\nAfter.\n")
    assert cli("--check", doc).returncode == 0
    assert list(tmp_path.glob(".DOC.md.*")) == []  # the atomic write left no temporary file

    # A number edited by hand in the rendered text is caught...
    doc.write_text(text.replace("41.7% ± 5.6", "44.7% ± 5.6"))
    assert cli("--check", doc).returncode == 1
    # ...and so is a results file that changed after the text was rendered.
    assert cli(doc).returncode == 0
    tiny_results(tmp_path, means=(50.0, 58.93))
    assert cli("--check", doc).returncode == 1
    assert cli(doc).returncode == 0
    assert "**50.0% ± 5.6**" in doc.read_text()


def test_an_older_file_without_machine_details_says_not_recorded(tmp_path):
    tiny_results(tmp_path, machine={"cpu": "AMD EPYC", "cores": 2, "torch": "2.14.1+cu130"})
    doc = tmp_path / "DOC.md"
    doc.write_text(MARKED)
    assert cli(doc).returncode == 0
    assert (
        "command: not recorded; commit: not recorded; CPU: AMD EPYC (flags not recorded), 2 cores; "
        "torch 2.14.1+cu130; torch threads: not recorded; date: not recorded."
    ) in doc.read_text()


def test_main_job_spread_is_the_population_sd_of_the_seeds_not_the_files_accuracy_std():
    result = {
        "split": "test",
        "images": 32,
        "accuracies": [0.5, 0.6, 0.5, 0.6],
        "accuracy": 0.55,
        "accuracy_std": 0.0577,
        "sampler": "heun",
        "steps": 18,
        "guidance_scale": 3.0,
    }
    data = {"machine": MACHINE, "steps": 10, "train_wall_s": 831.5, "evaluate": {"results": [result]}}
    assert render_docs.current.main_job_accuracy(data) == {"test": (55.0, pytest.approx(5.0), 4, 32)}
    lines = render_docs.current.main_job([("main_job.json", data)], {})
    assert (
        "| accuracy on test (32 conditions, 4 seeds, heun 18, guidance 3) | **55.0% ± 5.0** "
        "(seeds 50.0 / 60.0 / 50.0 / 60.0) |" in lines
    )
    assert "| `iclevr-diff train`, wall clock (rendering the built-in set included) | 13:52 |" in lines


def test_evaluator_table_reads_the_current_results_shape():
    """benchmarks/evaluator.py's `evaluators` dict (what a re-run writes), not only the older card files."""
    summary = {
        "heldout_accuracy": 99.11,
        "first_use_s": 118.5,
        "first_use_gflop": 8347.3,
        "parameters": 137128,
        "epochs": 8,
        "batch_size": 64,
        "lr": 0.01,
        "precision": "bf16 autocast",
        "cpu": "Intel Xeon",
        "threads": 1,
        "heldout": {"hits": 1784, "labels": 1800, "per_shape": {"cube": 0.997}},
    }
    data = {
        "machine": MACHINE,
        "evaluators": {
            "small-cnn": {**summary, "first_use": "installing the shipped network", "first_use_s": 6.5,
                          "first_use_gflop": 17.3, "training_once": {"seconds": 390.4, "gflop_total": 8347.3,
                                                                     "cpu": "Intel Xeon", "threads": 1}},
            "resnet18": {**summary, "heldout_accuracy": 99.28, "parameters": 11189336, "first_use": "training"},
        },
        "generated": {
            "images": 64,
            "source": "runs/x/model",
            "accuracy": {"small-cnn": 60.0, "resnet18": 61.5},
            "difference_points": 1.5,
            "images_scored_alike": 0.8,
        },
    }
    lines = render_docs.current.evaluator([("evaluator.json", data)], {})
    assert lines[0] == "| what | small-cnn (`evaluator.json`) | resnet18 (`evaluator.json`) |"
    assert "| held-out accuracy | **99.11%** (1,784/1,800 labels) | **99.28%** (1,784/1,800 labels) |" in lines
    assert "| parameters | 137,128 | 11,189,336 |" in lines
    assert ("| first use (`evaluate` with no evaluator cached), time | 6.5 s: installing the shipped network "
            "(checks the held-out images) | 118.5 s: training |") in lines
    assert "| first use, compute (GFLOP) | 17.3: one forward pass per held-out image | 8347.3 |" in lines
    assert "| the shipped network's one-time training | 390.4 s, 8347.3 GFLOP (Intel Xeon, 1 thread) | - |" in lines
    assert any(line.startswith("On 64 generated images") and "1.50 points apart" in line for line in lines)


@pytest.mark.parametrize(
    "marker, message",
    [
        ("<!-- render:no_such_table results/q.json -->\n<!-- /render -->\n", "unknown table kind 'no_such_table'"),
        ("<!-- render:quality_at_steps results/missing.json -->\n<!-- /render -->\n", "missing.json not found"),
        ("<!-- render:quality_at_steps results/q.json -->\nno end marker\n", "no matching '<!-- /render -->'"),
    ],
)
def test_a_bad_marker_or_missing_file_is_one_error_line(tmp_path, marker, message):
    tiny_results(tmp_path)
    doc = tmp_path / "DOC.md"
    doc.write_text(marker)
    out = cli("--check", doc)
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and message in out.stderr and out.stderr.count("\n") == 1
    assert doc.read_text() == marker


def test_main_job_names_an_installed_shipped_evaluator_with_its_install_time():
    """The first `evaluate` on the built-in set installs the shipped evaluator: main_job.json records
    the seconds installing took, not the card's one-time training (390 s on the machine that made it)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import main_job

    from iclevr_diffusion.evaluator.shipped import shipped_evaluator

    _, packaged = shipped_evaluator()
    installed = {**packaged, "source": "shipped", "heldout_accuracy": 0.995, "seconds_installing": 6.5}
    assert main_job.first_use(installed) == {"arch": packaged["arch"], "source": "shipped", "seconds": 6.5,
                                             "heldout_accuracy": 0.995}
    assert main_job.first_use(packaged)["source"] == "trained"  # a card the trainer wrote: its own seconds
    assert main_job.first_use(packaged)["seconds"] == packaged["seconds"]
    data = {"machine": MACHINE, "steps": 10, "evaluate": {"results": []},
            "evaluator_first_use": main_job.first_use(installed)}
    lines = render_docs.current.main_job([("main_job.json", data)], {})
    assert f"| of which installing the shipped evaluator ({packaged['arch']}) on first use | 6.5 s, 99.5% held-out |" \
        in lines


def test_gpu_tables_show_every_run_and_a_stopped_run_with_its_error(tmp_path):
    """An assembled file of several GPU runs gets one column and one source line per run; a short run
    that stopped shows its error instead of accuracy."""
    gpu = {**MACHINE, "gpu": "Test GPU", "cores": 16}
    row = {"name": "default preset, bf16", "params": 2_000_000, "batch": 16, "bf16": True, "peak_memory_gib": 0.25}
    runs = [{"machine": {**gpu, "commit": f"c{i}"}, "throughput": [{**row, "images_per_s": ips}],
             "short_run": {"config": "default", "minutes": 2, "error": f"Loss became nan at step {step}"}}
            for i, (ips, step) in enumerate([(500.4, 465), (326.0, 432)])]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "nan.json").write_text(json.dumps({"benchmark": "assembled", "runs": runs}))
    text = rendered(tmp_path, "gpu_throughput results/nan.json", "gpu_short_runs results/nan.json")
    assert "| default preset, bf16 | 16 | 2.00M | 500 | 326 | 0.25 |" in text
    assert "| default | 2 | stopped | - | - | - | - | Loss became nan at step 432 |" in text
    assert "`results/nan.json` (run 2 of 2); command: `python benchmarks/quality_at_steps.py --seeds 2`; commit: c1;" \
        in text
    assert "GPU: Test GPU; torch 2.0+cpu" in text


def test_ema_lengths_table_has_a_column_per_run_and_bolds_the_best(tmp_path):
    """benchmarks/ema_lengths.py files: one row per kept average, one column per run's step count, the best
    of each column in bold, a length one run lacks as '-'."""
    def result(steps, means):
        rows = [{"weights": w, "ema_decay": d, "split": "val", "conditions": 261, "mean": m, "spread": 0.5,
                 "seeds": [m - 0.5, m + 0.5]} for (w, d), m in zip(
                     [("EMA 0.999 (model/)", 0.999), ("EMA 0.9998", 0.9998), ("raw weights (last checkpoint)", None)],
                     means)]
        return {"benchmark": "ema_lengths", "machine": MACHINE, "steps": steps, "rows": rows[:len(means)]}

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.json").write_text(json.dumps(result(1150, [53.3, 50.1, 52.0])))
    (tmp_path / "results" / "b.json").write_text(json.dumps(result(5200, [66.1, 67.2])))
    doc = tmp_path / "DOC.md"
    doc.write_text("<!-- render:ema_lengths results/a.json results/b.json -->\n<!-- /render -->\n")
    assert cli(doc).returncode == 0
    text = doc.read_text()
    assert "| weights | val after 1,150 steps | val after 5,200 steps |" in text
    assert "| EMA 0.999 (model/) | **53.3% ± 0.5** | 66.1% ± 0.5 |" in text
    assert "| EMA 0.9998 | 50.1% ± 0.5 | **67.2% ± 0.5** |" in text
    assert "| raw weights (last checkpoint) | 52.0% ± 0.5 | - |" in text
    assert "Seeds: 2. Conditions per split: val 261." in text
    # Rows with a kind are labelled by it: the default's EMA, a share of the steps, the raw weights.
    kinds = result(1150, [53.3, 50.1, 52.0])
    for row, kind in zip(kinds["rows"], ("ema_decay 0.999", "share 0.25", "raw")):
        row["kind"] = kind
    (tmp_path / "results" / "a.json").write_text(json.dumps(kinds))
    doc.write_text("<!-- render:ema_lengths results/a.json -->\n<!-- /render -->\n")
    assert cli(doc).returncode == 0
    text = doc.read_text()
    assert "| the default's EMA (`ema_decay` 0.999, warmed up: the last ~11% of the steps, at most 1,000 steps) |" \
        in text
    assert "| EMA over the last 25% of the steps | 50.1% ± 0.5 |" in text


def test_attention_tables_show_saturation_kernels_and_timing(tmp_path):
    """A run's checkpoints give one row each (the exported EMA by name); the kernel sweep gives a column
    pair per file that has one, a non-finite gradient reads "inf", and every file's timing is in the note."""
    layer = {"max_abs_logit": 1947.9, "mean_top_weight": 0.863, "normalised_input": True}
    mid = {"max_abs_logit": 7679625.5, "mean_top_weight": 0.99999, "normalised_input": False}
    norms = {"fused fp32": 0.3972, "fused bf16": 0.3997, "math fp32": 0.3971, "math bf16": 0.40}
    rows = [{"step": step, "weights": kind, "gradient_norm": norms,
             "attention": {"down_blocks.2.attentions.0": layer, "mid_block.attentions.0": mid}}
            for step, kind in ((2000, "raw weights"), (None, "exported EMA"))]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run.json").write_text(json.dumps(
        {"machine": MACHINE, "run": "runs/flow-3025", "batch": 16, "rows": rows,
         "pass_seconds": {"fused": 0.5, "math": 0.4}}))
    sweep = [{"max_abs_logit": 10.0, "fused": 254.3, "math": 254.3},
             {"max_abs_logit": 1e9, "fused": float("inf"), "math": 363.0}]
    (tmp_path / "results" / "kernels.json").write_text(json.dumps(
        {"machine": {**MACHINE, "cpu_flags": ["avx2"]}, "run": None, "batch": 16, "rows": [],
         "kernel_sweep": sweep, "pass_precision": "fp32", "pass_seconds": {"fused": 1.0, "math": 1.1}}))
    text = rendered(tmp_path, "attention_saturation results/run.json",
                    "attention_kernels results/kernels.json results/run.json")
    assert "| `flow-3025` | 2,000 | no | 7.7e6 | 1.000 | 1,948 | 0.86 | 0.397 | 0.397 | 0.400 | 0.400 |" in text
    assert "| `flow-3025` | exported EMA | no |" in text
    assert "| largest abs logit | fused, Test CPU (AVX2 only) | math, Test CPU (AVX2 only) |" in text
    assert "| 10 | 254 | 254 |" in text and "| 1.0e9 | inf | 363 |" in text
    assert "Test CPU, fp32, 1 thread(s): fused 1.000 s, math 1.100 s (1.10x)" in text
    assert "Test CPU, bf16 autocast, 1 thread(s): fused 0.500 s, math 0.400 s (0.80x)" in text


def test_readme_quality_puts_another_training_run_under_the_row_it_repeats(tmp_path):
    """A quality_at_steps-*.json row is labelled with where, in what precision and on what code it trained."""
    first = tiny_results(tmp_path)
    first.rename(tmp_path / "results" / "quality_at_steps.json")
    again = json.loads(tiny_results(tmp_path, means=(50.0, 60.0)).read_text())
    again["trained"] = [{"recipe": "default", "steps": 1150, "mixed_precision": "no", "cpu": "AMD EPYC",
                         "cpu_flags": ["avx2"]}]
    (tmp_path / "results" / "quality_at_steps-again.json").write_text(json.dumps(again))
    text = rendered(tmp_path, "readme_quality results/quality_at_steps.json results/quality_at_steps-again.json")
    rows = [line for line in text.splitlines() if line.startswith("| the default preset")]
    assert rows == [
        "| the default preset, exactly 1,150 steps | 1,150 steps of batch 16 | 41.7% ± 5.6 | 58.9% ± 5.6 |",
        "| the default preset, exactly 1,150 steps: another training run, fp32 on the AMD EPYC (AVX2 only), code of "
        "abc1234 | 1,150 steps of batch 16 | 50.0% ± 5.6 | 60.0% ± 5.6 |",
    ]
    assert "`results/quality_at_steps-again.json`" in text  # its own source line

    del again["trained"]
    (tmp_path / "results" / "quality_at_steps-again.json").write_text(json.dumps(again))
    doc = tmp_path / "DOC.md"
    doc.write_text("<!-- render:readme_quality results/quality_at_steps.json results/quality_at_steps-again.json -->\n"
                   "<!-- /render -->\n")
    out = cli(doc)
    assert out.returncode != 0 and "no `trained` entry for its 1,150-step rows" in out.stderr
