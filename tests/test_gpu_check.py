"""tools/gpu_check.py's pieces, in seconds: reading the figures of each step's output, the ratios and
their targets, the budget, a failing or hanging step followed by the next, the JSON lines, and one
tiny real --benchmark step (its command run through train.py's cli in this process). The whole dry
run (`python -m tools.gpu_check --out DIR --dry-run`) takes a minute or more and is run by hand."""
import json
import math
import os
import sys

import pytest
import torch

import train
from tools import gpu_check
from tools.gpu_check import Runner, Step


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: one intra-op thread

BENCHMARK_OUTPUT = """| quantity | value |
|---|---|
| training step time (median, no optimiser step) | 250.0 ms |
{"method": "galdv1", "backbone": "resnet101", "input": [2, 3, 832, 832], "eval": "whole, scales 1.0", \
"amp": "bf16", "channels_last": true, "device": "cuda", "params_total": 75400000, "params_backbone": 42500000, \
"params_head": 32900000, "gflops_forward": 600.0, "gflops_train_step": 1800.0, "forward_peak_mib": 3000.0, \
"train_step_peak_mib": 12000.5, "forward_ms": 80.0, "train_step_ms": 250.0, "compiled": false, \
"memory": "CUDA allocator peak"}
"""
RECORD_KEYS = {"step", "status", "rc", "wall_s", "figures", "problem", "command", "elapsed_s", "tail"}


def python(code):
    return [sys.executable, "-c", code]


def results(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------
# Reading the figures


def test_benchmark_figures_come_from_its_json_line():
    figures = gpu_check.benchmark_figures("warning: something\n" + BENCHMARK_OUTPUT)
    assert figures["train_step_ms"] == 250.0 and figures["train_step_peak_mib"] == 12000.5
    assert figures["train_img_per_s"] == 8.0                                  # 2 images in 0.25 s
    assert figures["input"] == "2x3x832x832" and figures["params_m"] == 75.4 and figures["compiled"] is False
    with pytest.raises(ValueError, match="no JSON line"):
        gpu_check.benchmark_figures("| quantity | value |\n{not json\n")


def test_pytest_figures_read_the_last_summary_line():
    output = "....F\n=== short test summary info ===\nFAILED tests/test_x.py::test_y\n" \
             "1 failed, 541 passed, 2 skipped in 121.34s (0:02:01)\n"
    assert gpu_check.pytest_figures(output) == {"failed": 1, "passed": 541, "skipped": 2, "seconds": 121.34}
    assert gpu_check.pytest_figures("2 passed, 64 deselected in 2.91s\n") == \
        {"passed": 2, "deselected": 64, "seconds": 2.91}
    with pytest.raises(ValueError):
        gpu_check.pytest_figures("ImportError while loading conftest\n")


def test_the_process_line_says_whether_ddp_was_taken():
    line = "galdv1 on camvid: 47.12M parameters, 1 process(es) (DDP), cuda:0"
    assert gpu_check.process_line(line) == (1, True, "cuda:0")
    assert gpu_check.process_line("fcn on synthetic: 1.00M parameters, 1 process(es), cpu") == (1, False, "cpu")


def fake_run(run_dir, iteration, loss, scaler):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"iteration": iteration, "mIoU": 12.5, "train_it_per_s": 2.0}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for record in ({"iter": iteration, "total": loss}, {"iter": iteration, "mIoU": 1}):
            f.write(json.dumps(record) + "\n")
    torch.save({"scaler": scaler}, os.path.join(run_dir, "last.pt"))


def test_training_figures_and_their_check(tmp_path):
    run_dir = str(tmp_path / "run")
    fake_run(run_dir, 60, 1.5, {"scale": 16384.0})
    output = ("galdv1 on camvid: 47.12M parameters, 1 process(es) (DDP), cuda:0\n"
              "resumed from x/last.pt at iteration 50\n")
    figures = gpu_check.training_figures(run_dir, 8, output)
    assert figures == {"iteration": 60, "ddp": True, "processes": 1, "device": "cuda:0", "train_img_per_s": 16.0,
                       "mIoU": 12.5, "last_loss": 1.5, "resumed_at": 50, "grad_scale": 16384.0}
    assert gpu_check.training_check(60, "cuda", resumed_at=50)(figures, output) is None
    bad = {**figures, "ddp": False, "device": "cpu", "last_loss": math.nan, "resumed_at": 0, "grad_scale": 0.0}
    problem = gpu_check.training_check(50, "cuda", resumed_at=50)(bad, output)
    for words in ("not the DDP path", "ended at iteration 60, not 50", "last loss nan", "ran on cpu",
                  "resumed at 0", "GradScaler scale 0.0"):
        assert words in problem


def test_a_bf16_run_has_no_grad_scale(tmp_path):
    fake_run(str(tmp_path / "run"), 50, 1.5, {})
    figures = gpu_check.training_figures(str(tmp_path / "run"), 8, "1 process(es) (DDP), cuda:0")
    assert "grad_scale" not in figures and "resumed_at" not in figures


# ----------------------------------------------------------------------------------------------
# Ratios and targets


def ok(**figures):
    return {"status": "ok", "figures": figures}


def rows_by_label(records):
    return {row["comparison"]: row for row in gpu_check.compare(records)}


def test_ratios_meet_or_miss_their_targets_and_say_what_is_missing():
    records = {"bench_fcn_gald": ok(train_step_ms=100.0), "bench_galdv1": ok(train_step_ms=115.0),
               "bench_galdv2": ok(train_step_ms=130.0), "bench_hmsa_ocr_single": ok(train_step_ms=100.0),
               "bench_hmsa_ocr": {"status": "failed", "figures": {}},
               "bench_galdv1_eager": ok(train_step_ms=100.0), "bench_galdv1_compiled": ok(train_step_ms=80.0),
               "bench_dnl_none_fp32": ok(train_step_peak_mib=1000.0), "bench_dnl_fp32": ok(train_step_peak_mib=1408.2)}
    rows = rows_by_label(records)
    gald1, gald2 = rows["GALD v1 / FCN, training step (R101, 832)"], rows["GALD v2 / FCN, training step (R101, 832)"]
    assert gald1["value"] == pytest.approx(1.15) and gald1["target"] == "<= 1.2" and gald1["verdict"] == "met"
    assert gald2["value"] == pytest.approx(1.3) and gald2["verdict"] == "missed"
    hmsa = rows["HMSA HRNet-OCR two scales / one, training step"]
    assert hmsa["value"] is None and hmsa["verdict"] == "n/a: bench_hmsa_ocr failed"
    dnl = rows["Denoised NL / FCN, training step (R101, 768)"]
    assert dnl["verdict"] == "n/a: bench_dnl not run, bench_fcn_dnl not run"
    compiled = rows["--compile / eager, training step (galdv1 R50, 512)"]
    assert compiled["value"] == pytest.approx(0.8) and compiled["verdict"] == "no target"
    memory = rows["Denoised NL added training peak, fp32, MiB (Table V: +428 MB)"]
    assert memory["value"] == pytest.approx(408.2) and memory["verdict"] == "428 MB = 1.00x the paper's"


def test_every_comparison_names_steps_of_the_gpu_plan():
    names = {step.name for step in gpu_check.plan(False, ["--dataset", "synthetic"], "work")}
    for _, step, ref, *_ in gpu_check.RATIOS + gpu_check.ADDED:
        assert {step, ref} <= names


# ----------------------------------------------------------------------------------------------
# The plan


def test_every_command_of_the_gpu_plan_parses(tmp_path, monkeypatch):
    """train.py's own parser (and its flag checks) accepts every training and benchmark command (on a
    machine with one GPU: --device cuda)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    data = ["--dataset", "camvid", "--data-root", str(tmp_path)]
    for step in gpu_check.plan(False, data, str(tmp_path)):
        if "train.py" in step.cmd:
            args = train.parse_args(step.cmd[step.cmd.index("train.py") + 1:])
            assert args.device == "cuda", step.name
            assert args.amp == ("off" if step.name.endswith("fp32") else "fp16" if "fp16" in step.name else "bf16")


def test_the_dry_plan_is_tiny_and_leaves_the_compile_step_out_of_its_budget(tmp_path):
    steps = gpu_check.plan(True, gpu_check.training_data(None, True), str(tmp_path))
    assert [s.name for s in steps[:3]] == ["environment", "pytest", "galdv1_bf16_train"] and steps[1].background
    for step in steps:
        if "train.py" in step.cmd:
            args = train.parse_args(step.cmd[step.cmd.index("train.py") + 1:])
            assert args.device == "cpu" and (args.eval_only or args.backbone == "resnet18"), step.name
            assert max(args.crop_size) <= 64 or args.eval_only, step.name
            assert args.benchmark == step.alone
    compiled = next(s for s in steps if s.name == "bench_galdv1_compiled")
    assert compiled.expect > 170 and "--compile" in compiled.cmd              # 170: the dry run's default budget


def test_tiny_shrinks_backbones_and_crops():
    flags = ["--backbone", "hrnet48", "--crop-size", "1024", "2048", "--batch-size", "1", "--stem", "deep"]
    assert gpu_check.tiny(flags) == ["--backbone", "hrnet18-small", "--crop-size", "64", "--batch-size", "1",
                                     "--stem", "deep"]
    assert gpu_check.tiny(["--backbone", "resnet101", "--crop-size", "832"]) == ["--backbone", "resnet18",
                                                                                  "--crop-size", "64"]


# ----------------------------------------------------------------------------------------------
# The runner


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path):
    out = str(tmp_path / "out")
    runner = Runner(out, budget_s=60)
    runner.run(Step("fails", python("print('half'); raise SystemExit(3)"), limit=30, expect=1))
    runner.run(Step("bad_figures", python("print('no figures')"), limit=30, expect=1,
                    read=lambda output: {"n": int(output.split()[0])}))
    runner.run(Step("checked", python("print(7)"), limit=30, expect=1, read=lambda output: {"n": int(output)},
                    check=lambda figures, output: "n is not 8" if figures["n"] != 8 else None))
    runner.run(Step("next", python("print(8)"), limit=30, expect=1, read=lambda output: {"n": int(output)}))
    records = results(out)
    assert [(r["step"], r["status"], r["rc"]) for r in records] == [
        ("fails", "failed", 3), ("bad_figures", "failed", 0), ("checked", "failed", 0), ("next", "ok", 0)]
    assert records[0]["problem"] == "exit code 3: half" and records[0]["tail"] == ["half"]
    assert records[1]["problem"].startswith("reading its figures: ValueError")
    assert records[2]["problem"] == "n is not 8" and records[3]["figures"] == {"n": 8}
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| fails | failed: exit code 3: half |" in summary and "| next | ok |" in summary
    assert "===== next: ok" in open(os.path.join(out, "log.txt")).read()


def test_a_step_past_its_limit_is_killed_and_the_next_one_runs(tmp_path):
    runner = Runner(str(tmp_path), budget_s=60)
    hung = runner.run(Step("hangs", python("import time; print('started', flush=True); time.sleep(60)"),
                           limit=1, expect=0))
    assert hung["status"] == "timed out (limit)" and hung["wall_s"] < 10 and hung["problem"] == "last line: started"
    assert runner.run(Step("next", python("pass"), limit=30, expect=0))["status"] == "ok"


def test_budget_and_needs_skip_steps_without_running_them(tmp_path):
    runner = Runner(str(tmp_path), budget_s=5)
    runner.run(Step("fails", python("raise SystemExit(1)"), limit=30, expect=0))
    ran = tmp_path / "ran"
    skipped = runner.run(Step("too_long", python(f"open({str(ran)!r}, 'w')"), limit=30, expect=10))
    needing = runner.run(Step("after", python("pass"), limit=30, expect=0, needs=("fails",)))
    assert skipped["status"] == "skipped: budget" and skipped["rc"] is None and not ran.exists()
    assert needing["status"] == "skipped: needs fails"


def test_the_budget_cuts_a_step_short(tmp_path):
    runner = Runner(str(tmp_path), budget_s=0.5)
    assert runner.run(Step("long", python("import time; time.sleep(60)"), limit=60, expect=0))["status"] == \
        "timed out (budget)"


def test_a_background_step_keeps_its_own_time_and_a_timed_step_waits_for_it(tmp_path):
    runner = Runner(str(tmp_path), budget_s=60)
    runner.run(Step("beside", python("import time; time.sleep(0.2)"), limit=30, expect=0, background=True))
    runner.run(Step("slow", python("import time; time.sleep(1.2)"), limit=30, expect=0))
    runner.run(Step("timed", python("pass"), limit=30, expect=0, alone=True))
    records = results(str(tmp_path))
    assert [r["step"] for r in records] == ["slow", "beside", "timed"]
    assert records[0]["wall_s"] >= 1.2              # "beside" ended during "slow", and was reaped after it:
    assert records[1]["status"] == "ok" and records[1]["wall_s"] < 1.0       # timed to its own end


def test_results_are_strict_json_lines(tmp_path):
    runner = Runner(str(tmp_path), budget_s=60)
    runner.run(Step("nan", python("print('x')"), limit=30, expect=0, read=lambda output: {"loss": math.nan}))
    (record,) = results(str(tmp_path))
    assert set(record) == RECORD_KEYS and record["figures"] == {"loss": None}
    assert isinstance(record["wall_s"], float) and record["command"].startswith(sys.executable)


def test_one_tiny_benchmark_step_runs_and_its_figures_are_read(capsys):
    """The dry run's first benchmark step: its command (`python train.py ...`, run from the project's
    folder) through train.py's cli in this process, its output read as the runner reads a step's. The
    runner's subprocesses are the tests above: as a subprocess, this step spent most of its 4-13 s
    importing torch and, on a busy machine, its two threads waiting for each other."""
    (step,) = [s for s in gpu_check.benchmark_steps(dry=True) if s.name == "bench_fcn_gald"]
    python_, script, *argv = step.cmd
    assert python_ == sys.executable and os.path.isfile(os.path.join(gpu_check.ROOT, script)) and script == "train.py"
    rc = train.cli(argv)
    printed = capsys.readouterr()
    record = gpu_check.outcome(step, rc, printed.out + printed.err, None)
    assert record["status"] == "ok", (record["problem"], printed.err[-2000:])
    assert record["figures"]["input"] == "2x3x64x64" and record["figures"]["train_step_ms"] > 0
