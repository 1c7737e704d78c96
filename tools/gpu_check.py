"""The prepared GPU check: one call runs the CUDA paths that no CPU test reaches and writes what it
found, step by step, into one folder.

    python -m tools.gpu_check --out DIR --camvid data/camvid --budget-s 540    # one GPU, about 9 minutes
    python -m tools.gpu_check --out DIR --dry-run                              # CPU, tiny sizes, 1-2 minutes

Steps, each a subprocess with its own time limit (a failing step is recorded and the next one runs),
the most valuable first:
  1. the environment (GPU name, torch, CUDA), then `pytest --maxfail=10` with CUDA visible (the dry
     run: two tests), in the background while the training runs (which time nothing);
  2. torchrun --nproc_per_node=1 training (the DDP + SyncBatchNorm path even at one process): galdv1
     with --amp bf16 --channels-last for 50 iterations on CamVid, --resume to 60, --eval-only; the same
     for hier_ms_attn (its RMI loss) with --amp fp16 and the GradScaler;
  3. train.py --benchmark of every method at its paper's crop and backbone in bf16 (alone on the
     machine): training images/s, peak memory, and the ratios of RATIOS below; a step that would not
     fit in what is left of --budget-s is skipped ("skipped: budget").
Outputs in DIR: results.jsonl (one JSON object per step, appended as it ends), log.txt (every step's
output) and summary.md (the table, rewritten after every step, so that a killed check keeps it). The
runs' checkpoints go to --work (a temporary folder by default), not DIR. --dry-run runs every step's
code on the CPU at tiny sizes (synthetic data without --camvid), its benchmarks a subset; its compile
step does not fit its budget (compiling takes minutes on a CPU) and is skipped.
"""
import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

from tools.crash_safety import append_json_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL_LINES = 15                                   # output lines kept in a step's record
LOG_CHARS = 400_000                               # output kept in log.txt per step (at most 16 MiB come back)


# ----------------------------------------------------------------------------------------------
# Steps and their runner


@dataclasses.dataclass
class Step:
    """One subprocess: `limit` seconds at most; skipped when less than `expect` seconds of the budget
    are left, or when a step of `needs` did not end ok. read(output) -> figures (a dict);
    check(figures, output) -> what is wrong, or None. A `background` step runs beside the next ones; an
    `alone` step (a timing) first waits for every background step to end."""
    name: str
    cmd: list
    limit: float
    expect: float
    read: object = None
    check: object = None
    needs: tuple = ()
    background: bool = False
    alone: bool = False


class Runner:
    """Runs steps in order within budget_s seconds, writing OUT/results.jsonl, OUT/log.txt and
    OUT/summary.md as each step ends. records: step name -> its record; describe(records): the
    summary's first line."""

    def __init__(self, out, budget_s, describe=lambda records: ""):
        self.out, self.budget_s, self.describe = out, budget_s, describe
        self.start, self.records, self.running = time.monotonic(), {}, {}
        os.makedirs(out, exist_ok=True)

    def left(self):
        return self.budget_s - (time.monotonic() - self.start)

    def run(self, step):
        self.reap()
        if step.alone:
            self.wait_all()
        reason = self.skip_reason(step)
        if reason:
            return self.record(step, status=reason)
        job = self.launch(step)
        if step.background:
            self.running[step.name] = job
            return None
        return self.wait(job)

    def skip_reason(self, step):
        failed = [n for n in step.needs if self.records.get(n, {}).get("status") != "ok"]
        if failed:
            return f"skipped: needs {', '.join(failed)}"
        if self.left() < step.expect:
            return "skipped: budget"
        return None

    def launch(self, step):
        """Start the step; a thread notes when it ends (a background step's time is its own)."""
        log = tempfile.NamedTemporaryFile("w+", prefix=f"gpu_check_{step.name}_", suffix=".txt", delete=False)
        proc = subprocess.Popen(step.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        job = dict(step=step, proc=proc, log=log, started=time.monotonic())

        def note_the_end():
            proc.wait()
            job["ended"] = time.monotonic()
        threading.Thread(target=note_the_end, daemon=True).start()
        return job

    def wait(self, job):
        """Wait for the job within its limit and the budget; kill its process group past either."""
        step, proc = job["step"], job["proc"]
        limit_left, budget_left = job["started"] + step.limit - time.monotonic(), self.left()
        timed_out = None
        try:
            proc.wait(timeout=max(0.0, min(limit_left, budget_left)))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            timed_out = "budget" if budget_left < limit_left else "limit"
        wall = job.get("ended", time.monotonic()) - job["started"]
        job["log"].close()
        with open(job["log"].name, errors="replace") as f:
            output = f.read()
        os.remove(job["log"].name)
        return self.record(step, **outcome(step, proc.returncode, output, timed_out), wall_s=round(wall, 1),
                           output=output)

    def wait_all(self):
        for name in list(self.running):
            self.wait(self.running.pop(name))

    def reap(self):
        """Record the background steps that have ended."""
        for name in [n for n, job in self.running.items() if "ended" in job]:
            self.wait(self.running.pop(name))

    def record(self, step, status, wall_s=0.0, rc=None, figures=None, problem=None, output=""):
        """Append the step's record to results.jsonl and its output to log.txt; rewrite summary.md."""
        rec = {"step": step.name, "status": status, "rc": rc, "wall_s": wall_s, "figures": figures or {},
               "problem": problem, "command": shlex.join(step.cmd),
               "elapsed_s": round(time.monotonic() - self.start, 1), "tail": output.splitlines()[-TAIL_LINES:]}
        self.records[step.name] = rec
        append_json_line(os.path.join(self.out, "results.jsonl"), rec)
        with open(os.path.join(self.out, "log.txt"), "a") as f:
            f.write(f"\n===== {step.name}: {status} ({wall_s} s)\n$ {rec['command']}\n{output[-LOG_CHARS:]}\n")
        self.write_summary()
        print(f"[{rec['elapsed_s']:6.1f} s] {step.name}: {status} ({wall_s} s) {format_figures(rec['figures'])}"
              + (f" -- {problem}" if problem else ""), flush=True)
        return rec

    def write_summary(self):
        text = summary_markdown(self.describe(self.records), self.records, compare(self.records),
                                time.monotonic() - self.start, self.budget_s)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(text)
        return text


def kill_group(proc):
    """SIGTERM to the step's process group (torchrun, its worker, the loader workers), SIGKILL after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def outcome(step, rc, output, timed_out):
    """status, rc, figures and problem of an ended step: ok only with exit code 0, its figures read and
    its check passed. A failed or killed step's problem is its last line of output (train.py's
    `error: ...`, a traceback's last line)."""
    figures, problem = {}, None
    try:
        figures = step.read(output) if step.read else {}
        problem = step.check(figures, output) if step.check else None
    except Exception as e:                                     # a figure missing, a file not written
        problem = f"reading its figures: {type(e).__name__}: {e}"
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")[:300]
    if timed_out:
        status, problem = f"timed out ({timed_out})", f"last line: {last}"
    elif rc != 0:
        status, problem = "failed", f"exit code {rc}: {last}"
    else:
        status = "failed" if problem else "ok"
    return dict(status=status, rc=rc, figures=figures, problem=problem)



# ----------------------------------------------------------------------------------------------
# Reading the figures of a step's output


def json_lines(output):
    """The lines of the output that are JSON objects, parsed."""
    found = []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
    return found


def benchmark_figures(output):
    """The key figures of train.py --benchmark, from the JSON record it prints after its table."""
    records = [r for r in json_lines(output) if "train_step_ms" in r]
    if not records:
        raise ValueError("no JSON line of --benchmark in the output")
    record = records[-1]
    batch, ms = record["input"][0], record["train_step_ms"]
    return {"input": "x".join(map(str, record["input"])), "backbone": record["backbone"], "amp": record["amp"],
            "train_img_per_s": None if not ms else round(1000 * batch / ms, 2), "train_step_ms": ms,
            "forward_ms": record["forward_ms"], "train_step_peak_mib": record["train_step_peak_mib"],
            "forward_peak_mib": record["forward_peak_mib"], "gflops_train_step": record["gflops_train_step"],
            "params_m": round(record["params_total"] / 1e6, 2), "compiled": record["compiled"]}


def pytest_figures(output):
    """passed / failed / skipped / errors counts and seconds of pytest's last summary line."""
    lines = [l for l in output.splitlines() if re.search(r"\d+ (passed|failed|error)", l) and " in " in l]
    if not lines:
        raise ValueError("no pytest summary line in the output")
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1])}
    seconds = re.search(r" in ([\d.]+)s", lines[-1])
    return {**counts, "seconds": float(seconds.group(1)) if seconds else None}


def process_line(output):
    """(processes, ddp, device) of train.py's line '... N process(es) (DDP), DEVICE'."""
    match = re.search(r"(\d+) process\(es\)( \(DDP\))?, (\S+)", output)
    if not match:
        raise ValueError("no 'process(es)' line in the output")
    return int(match.group(1)), bool(match.group(2)), match.group(3)


def training_figures(run_dir, batch, output):
    """What a training run wrote (summary.json, metrics.jsonl, last.pt) and said."""
    processes, ddp, device = process_line(output)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    speed = summary.get("train_it_per_s")
    figures = {"iteration": summary["iteration"], "ddp": ddp, "processes": processes, "device": device,
               "train_img_per_s": None if speed is None else round(speed * batch, 2), "mIoU": summary["mIoU"],
               "last_loss": last_loss(os.path.join(run_dir, "metrics.jsonl"))}
    resumed = re.search(r"resumed from \S+ at iteration (\d+)", output)
    if resumed:
        figures["resumed_at"] = int(resumed.group(1))
    scaler = torch.load(os.path.join(run_dir, "last.pt"), map_location="cpu", weights_only=True)["scaler"]
    if scaler:
        figures["grad_scale"] = scaler["scale"]
    return figures


def last_loss(path):
    with open(path) as f:
        losses = [r["total"] for r in map(json.loads, f) if "total" in r]
    return losses[-1] if losses else None


def evaluation_figures(run_dir):
    with open(os.path.join(run_dir, "eval-val", "summary.json")) as f:
        summary = json.load(f)
    return {"mIoU": summary["mIoU"], "aAcc": summary["aAcc"], "eval_img_per_s": summary.get("eval_img_per_s")}


def training_check(iteration, device, resumed_at=None):
    """The check of a training step: the DDP path, the iterations reached, a finite last loss, the
    device, the iteration it resumed at, a finite GradScaler scale."""
    def check(figures, output):
        problems, loss = [], figures["last_loss"]
        if not figures["ddp"]:
            problems.append("not the DDP path")
        if figures["iteration"] != iteration:
            problems.append(f"ended at iteration {figures['iteration']}, not {iteration}")
        if loss is None or not math.isfinite(loss):
            problems.append(f"last loss {loss}")
        if not figures["device"].startswith(device):
            problems.append(f"ran on {figures['device']}, not {device}")
        if resumed_at is not None and figures.get("resumed_at") != resumed_at:
            problems.append(f"resumed at {figures.get('resumed_at')}, not {resumed_at}")
        if "grad_scale" in figures and not 0 < figures["grad_scale"] < math.inf:
            problems.append(f"GradScaler scale {figures['grad_scale']}")
        return "; ".join(problems) or None
    return check


# ----------------------------------------------------------------------------------------------
# Ratios and targets


# (label, step, reference step, figure, target): the step's figure over the reference's, at most target
RATIOS = [
    ("GALD v1 / FCN, training step (R101, 832)", "bench_galdv1", "bench_fcn_gald", "train_step_ms", 1.2),
    ("GALD v2 / FCN, training step (R101, 832)", "bench_galdv2", "bench_fcn_gald", "train_step_ms", 1.2),
    ("Denoised NL / FCN, training step (R101, 768)", "bench_dnl", "bench_fcn_dnl", "train_step_ms", 1.2),
    ("S&F / bare HRNet-W48, training step (512; FCN takes no HRNet; paper 1.30x)", "bench_sf", "bench_sf_bare",
     "train_step_ms", 1.2),
    ("HMSA HRNet-OCR two scales / one, training step", "bench_hmsa_ocr", "bench_hmsa_ocr_single",
     "train_step_ms", 1.35),
    ("HMSA DeepLab V3+ two scales / one, training step", "bench_hmsa_deeplab", "bench_hmsa_deeplab_single",
     "train_step_ms", 1.35),
    ("--compile / eager, training step (galdv1 R50, 512)", "bench_galdv1_compiled", "bench_galdv1_eager",
     "train_step_ms", None),
]
# (label, step, reference step, figure, the paper's added MB): the MiB the step adds over the reference
ADDED = [("Denoised NL added training peak, fp32, MiB (Table V: +428 MB)", "bench_dnl_fp32", "bench_dnl_none_fp32",
          "train_step_peak_mib", 428)]


def figure_of(records, step, key):
    """A figure of a step that ended ok, or None."""
    rec = records.get(step)
    return rec["figures"].get(key) if rec and rec["status"] == "ok" else None


def compare(records):
    """One row per comparison whose steps are in the plan: value, target and verdict."""
    rows = []
    for label, step, ref, key, target in RATIOS:
        a, b = figure_of(records, step, key), figure_of(records, ref, key)
        value = None if a is None or not b else a / b
        verdict = missing(records, step, ref) if value is None else "no target" if target is None else \
            "met" if value <= target else "missed"
        rows.append({"comparison": label, "value": value, "target": target and f"<= {target}", "verdict": verdict})
    for label, step, ref, key, paper_mb in ADDED:
        a, b = figure_of(records, step, key), figure_of(records, ref, key)
        value = None if a is None or b is None else a - b
        verdict = missing(records, step, ref) if value is None else \
            f"{value * 2 ** 20 / 1e6:.0f} MB = {value * 2 ** 20 / 1e6 / paper_mb:.2f}x the paper's"
        rows.append({"comparison": label, "value": value, "target": None, "verdict": verdict})
    return rows


def missing(records, *steps):
    """Why a comparison has no value: the steps that did not end ok."""
    why = [f"{s} {records[s]['status'] if s in records else 'not run'}" for s in steps
           if s not in records or records[s]["status"] != "ok"]
    return "n/a: " + ", ".join(why)


# ----------------------------------------------------------------------------------------------
# The summary


def format_value(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def format_figures(figures):
    return ", ".join(f"{k} {format_value(v)}" for k, v in figures.items() if v is not None)


def summary_markdown(header, records, comparisons, elapsed, budget_s):
    lines = ["# GPU check", "", header, "", f"Wall time {elapsed:.0f} s of a {budget_s:.0f} s budget.", "",
             "| step | status | time (s) | figures |", "|---|---|---|---|"]
    for rec in records.values():
        status = rec["status"] + (f": {rec['problem']}" if rec["problem"] else "")
        lines.append(f"| {rec['step']} | {status.replace('|', '/')} | {rec['wall_s']} | "
                     f"{format_figures(rec['figures'])} |")
    lines += ["", "| comparison | ours | target | verdict |", "|---|---|---|---|"]
    for row in comparisons:
        value = "" if row["value"] is None else format_value(row["value"])
        lines.append(f"| {row['comparison']} | {value} | {row['target'] or ''} | {row['verdict']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The plan: the GPU's sizes, and the dry run's tiny stand-ins (tiny() below)


PYTHON = sys.executable
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py"]
ENV_PROBE = """
import importlib.util, json, os, platform, shutil, torch
def safe(fn):
    try:
        return fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
cuda = torch.cuda.is_available()
print(json.dumps({"gpu": safe(lambda: torch.cuda.get_device_name(0)) if cuda else None, "cuda_available": cuda,
    "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    "nccl": safe(lambda: str(torch.cuda.nccl.version())) if cuda else None, "python": platform.python_version(),
    "cpus": os.cpu_count(), "triton": importlib.util.find_spec("triton") is not None, "cc": shutil.which("cc")}))
"""
BF16 = ["--amp", "bf16", "--channels-last"]
GALD_TRUNK = ["--backbone", "resnet101", "--stem", "deep", "--multi-grid", "1", "2", "4"]
# (step, flags, expected seconds on an H100), in the order they run: the most valuable first
BENCHMARKS = [
    ("bench_fcn_gald", ["--method", "fcn", *GALD_TRUNK, "--crop-size", "832", "--batch-size", "2", *BF16], 25),
    ("bench_galdv1", ["--method", "galdv1", *GALD_TRUNK, "--crop-size", "832", "--batch-size", "2", *BF16], 25),
    ("bench_galdv2", ["--method", "galdv2", *GALD_TRUNK, "--crop-size", "832", "--batch-size", "2", *BF16], 25),
    # Table V: 768 x 768, batch 1, fp32 (the paper's "+428 MB"; its way of measuring is not stated)
    ("bench_dnl_none_fp32", ["--method", "denoised_nl", "--block", "none", *GALD_TRUNK, "--crop-size", "768",
                             "--batch-size", "1"], 25),
    ("bench_dnl_fp32", ["--method", "denoised_nl", *GALD_TRUNK, "--crop-size", "768", "--batch-size", "1"], 25),
    # HMSA's Cityscapes recipe crop, batch 1 (its 2 per GPU halved for time); the ratio is to one scale
    ("bench_hmsa_ocr_single", ["--method", "hier_ms_attn", "--backbone", "hrnet48", "--decoder", "ocr",
                               "--ms-mode", "average", "--crop-size", "1024", "2048", "--batch-size", "1", *BF16], 35),
    ("bench_hmsa_ocr", ["--method", "hier_ms_attn", "--backbone", "hrnet48", "--decoder", "ocr",
                        "--crop-size", "1024", "2048", "--batch-size", "1", *BF16], 40),
    ("bench_fcn_dnl", ["--method", "fcn", *GALD_TRUNK, "--crop-size", "768", "--batch-size", "2", *BF16], 25),
    ("bench_dnl", ["--method", "denoised_nl", *GALD_TRUNK, "--crop-size", "768", "--batch-size", "2", *BF16], 25),
    # S&F Table 5: 512, batch 4, HRNet-W48; FCN takes no HRNet, so the bare model is the reference
    ("bench_sf_bare", ["--method", "specialize_fuse", "--backbone", "hrnet48", "--output-format", "single",
                       "--context", "none", "--crop-size", "512", "--batch-size", "4", *BF16], 25),
    ("bench_sf", ["--method", "specialize_fuse", "--backbone", "hrnet48", "--crop-size", "512", "--batch-size", "4",
                  *BF16], 25),
    # DeepLab V3+ (Table 1's model) at 1024 x 1024: batch 2, which its image-pooling BatchNorm needs
    ("bench_hmsa_deeplab_single", ["--method", "hier_ms_attn", "--backbone", "resnet50", "--ms-mode", "average",
                                   "--crop-size", "1024", "--batch-size", "2", *BF16], 25),
    ("bench_hmsa_deeplab", ["--method", "hier_ms_attn", "--backbone", "resnet50", "--crop-size", "1024",
                            "--batch-size", "2", *BF16], 30),
    ("bench_galdv1_eager", ["--method", "galdv1", "--backbone", "resnet50", "--crop-size", "512", "--batch-size", "2",
                            *BF16], 20),
    ("bench_galdv1_compiled", ["--method", "galdv1", "--backbone", "resnet50", "--crop-size", "512", "--batch-size",
                               "2", *BF16, "--compile"], 200),
]
BENCHMARK_TIMING = ["--benchmark", "--benchmark-iters", "10", "--benchmark-warmup", "3"]
DRY_BENCHMARKS = ("bench_fcn_gald", "bench_galdv1", "bench_dnl_none_fp32", "bench_dnl_fp32", "bench_galdv1_compiled")
DRY_SECONDS = {"bench_galdv1_compiled": 180}      # compiling took 175 s on 2 CPU cores: more than the dry budget


def tiny(flags):
    """The dry run's stand-in of a benchmark's flags: ResNet-18 / HRNet-W18-small, 64 px, one timed call."""
    out, i = [], 0
    while i < len(flags):
        flag = flags[i]
        if flag == "--backbone":
            out += [flag, "hrnet18-small" if flags[i + 1].startswith("hrnet") else "resnet18"]
            i += 2
        elif flag == "--crop-size":
            out += [flag, "64"]
            i += 1
            while i < len(flags) and flags[i].isdigit():
                i += 1
        else:
            out.append(flag)
            i += 1
    return out


def training_data(camvid, dry):
    """The data flags of the training steps: CamVid when the folder exists, else synthetic images."""
    if camvid and os.path.isdir(camvid):
        return ["--dataset", "camvid", "--data-root", os.path.abspath(camvid)]
    size, length, val = ("48", "16", "2") if dry else ("320", "400", "20")
    return ["--dataset", "synthetic", "--synthetic-size", size, "--synthetic-length", length,
            "--synthetic-val-length", val]


def training_steps(name, method_flags, amp, data, dry, work):
    """torchrun training of one method: 50 iterations, --resume to 60, --eval-only of last.pt (the dry
    run: 2, 3)."""
    run_dir, batch, device = os.path.join(work, name), 2 if dry else 8, "cpu" if dry else "cuda"
    iters, more = (2, 3) if dry else (50, 60)
    machine = ["--workers", "0" if dry else "4", "--device", device, "--amp", amp, "--channels-last"]
    flags = [*method_flags, *data, *machine, "--backbone", "resnet18" if dry else "resnet50",
             "--crop-size", "32" if dry else "256", "--batch-size", str(batch), "--log-every", "1" if dry else "10",
             "--out", run_dir]
    seconds = (lambda gpu, cpu: cpu if dry else gpu)
    read = lambda output: training_figures(run_dir, batch, output)
    return [
        Step(f"{name}_train", TORCHRUN + flags + ["--iters", str(iters)], seconds(180, 90), seconds(45, 12),
             read, training_check(iters, device), needs=("environment",)),
        Step(f"{name}_resume", TORCHRUN + flags + ["--iters", str(more), "--resume"], seconds(150, 90),
             seconds(35, 10), read, training_check(more, device, resumed_at=iters), needs=(f"{name}_train",)),
        Step(f"{name}_eval", TORCHRUN + data + machine + ["--eval-only", "--checkpoint",
                                                         os.path.join(run_dir, "last.pt")],
             seconds(120, 60), seconds(30, 8), lambda output: evaluation_figures(run_dir),
             needs=(f"{name}_resume",)),
    ]


def benchmark_steps(dry):
    """train.py --benchmark of BENCHMARKS (the dry run: DRY_BENCHMARKS at tiny sizes on the CPU), each
    alone on the machine."""
    steps = []
    for name, flags, seconds in BENCHMARKS:
        if dry and name not in DRY_BENCHMARKS:
            continue
        if dry:
            cmd = [PYTHON, "train.py", *tiny(flags), "--benchmark", "--benchmark-iters", "1",
                   "--benchmark-warmup", "0", "--device", "cpu"]
            expect = DRY_SECONDS.get(name, 10)
            limit = 3 * expect
        else:
            cmd = [PYTHON, "train.py", *flags, *BENCHMARK_TIMING, "--device", "cuda"]
            limit, expect = max(120, 2 * seconds), seconds
        steps.append(Step(name, cmd, limit, expect, benchmark_figures, needs=("environment",), alone=True))
    return steps


def plan(dry, data, work):
    """Every step, in the order they run."""
    pytest = [PYTHON, "-m", "pytest", "-q", "--maxfail=10", "-p", "no:cacheprovider"]
    if dry:
        pytest += ["test_shapes.py", "-k", "every_method_is_covered or (command_line_builds and fcn)"]
    cuda_check = None if dry else (lambda figures, output: None if figures["cuda_available"] else "no CUDA device")
    return [
        Step("environment", [PYTHON, "-c", ENV_PROBE], 60, 5, lambda output: json_lines(output)[-1], cuda_check),
        Step("pytest", pytest, 90 if dry else 420, 10 if dry else 120, pytest_figures, background=True),
        *training_steps("galdv1_bf16", ["--method", "galdv1"], "bf16", data, dry, work),
        *training_steps("hmsa_fp16", ["--method", "hier_ms_attn", "--loss", "rmi"], "fp16", data, dry, work),
        *benchmark_steps(dry),
    ]


def describe(dry, data):
    """The summary's first line, from the environment step's figures."""
    def line(records):
        env = records.get("environment", {}).get("figures", {})
        return (f"{'Dry run (CPU, tiny sizes)' if dry else 'GPU run'} on {env.get('gpu') or 'no GPU'}: torch "
                f"{env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, NCCL {env.get('nccl')}, "
                f"{env.get('cpus')} CPUs, Python {env.get('python')}. Training data: {' '.join(data[:2])}.")
    return line


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results folder: results.jsonl, log.txt, summary.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: every step's code path")
    parser.add_argument("--camvid", help="CamVid in the SegNet layout (synthetic data without it)")
    parser.add_argument("--budget-s", type=float,
                        help="seconds for the whole check (default: 540; dry run: 170, too few for its compile step)")
    parser.add_argument("--work", help="folder of the runs' checkpoints (default: a temporary folder, removed)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    data = training_data(args.camvid, args.dry_run)
    work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    runner = Runner(args.out, args.budget_s or (170 if args.dry_run else 540), describe(args.dry_run, data))
    try:
        for step in plan(args.dry_run, data, work):
            runner.run(step)
        runner.wait_all()
        for row in compare(runner.records):
            append_json_line(os.path.join(args.out, "results.jsonl"), {"comparison": row})
        print(runner.write_summary(), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
