"""Bad input, tried as a user and as an adversary: every case ends in one line naming the file or
flag (exit code 2, no traceback), and the files already written stay intact."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--method", "fcn", "--dataset", "synthetic", "--backbone", "resnet18", "--head-channels", "16",
        "--crop-size", "32", "--batch-size", "2", "--synthetic-size", "40", "--synthetic-length", "8",
        "--synthetic-val-length", "2", "--workers", "0", "--device", "cpu", "--log-every", "1"]


def fails(capsys, argv, *expected):
    """Run the command line in this process: exit code 2, one `error:` line holding every string of
    `expected`, no traceback. Returns the line."""
    assert train.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    return err


def flag_fails(capsys, argv, flag, expected):
    """argparse's own error: exit code 2 and a last line naming the flag and the accepted range."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in last and expected in last, last


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-iteration run: its folder with last.pt, best.pt and summary.json."""
    out = tmp_path_factory.mktemp("run")
    assert train.cli(TINY + ["--iters", "2", "--out", str(out)]) == 0
    return out


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


# ----------------------------------------------------------------------------------------------
# Checkpoints


def bad_files(folder):
    """name -> (path, what the message must say) of files that are not checkpoints of this project."""
    (folder / "text").write_bytes(b"just some text\n")
    (folder / "random").write_bytes(bytes(range(256)) * 40)
    torch.save(torch.zeros(3), folder / "tensor")
    torch.save({"a": 1, "b": 2}, folder / "ints")

    class Exploit:                                      # a pickle that would run code if loaded unsafely
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'pwned'}",))
    (folder / "exploit").write_bytes(pickle.dumps({"model": Exploit()}, protocol=2))   # torch.save's protocol
    return {"text": "can read", "random": "can read", "tensor": "it holds a Tensor",
            "ints": "found a dict of int", "exploit": "can read"}


def test_a_checkpoint_that_is_not_one_is_named_in_one_line(tmp_path, capsys):
    for name, expected in bad_files(tmp_path).items():
        path = str(tmp_path / name)
        fails(capsys, TINY + ["--eval-only", "--checkpoint", path, "--out", str(tmp_path / "o")], path, expected)
        fails(capsys, TINY + ["--iters", "1", "--pretrained", path, "--out", str(tmp_path / "o")], path)
    assert not (tmp_path / "pwned").exists()


def test_a_truncated_or_foreign_last_pt_stops_the_resume_and_stays(run, tmp_path, capsys):
    good = (run / "last.pt").read_bytes()
    cases = {"truncated": (good[: len(good) // 2], "can read"), "random": (os.urandom(4096), "can read")}
    for name, (data, expected) in cases.items():
        out = tmp_path / name
        out.mkdir()
        (out / "last.pt").write_bytes(data)
        fails(capsys, TINY + ["--iters", "4", "--resume", "--out", str(out)], str(out / "last.pt"), expected)
        assert (out / "last.pt").read_bytes() == data                          # nothing overwritten
    wider = TINY[:]
    wider[wider.index("--head-channels") + 1] = "24"                           # another head width
    fails(capsys, wider + ["--iters", "4", "--resume", "--out", str(run)], "cannot resume", "mis-shaped keys",
          "--method fcn --backbone resnet18")
    other = TINY[:]
    other[other.index("fcn")] = "galdv1"                                       # another method's last.pt
    del other[other.index("--head-channels"):other.index("--head-channels") + 2]
    fails(capsys, other + ["--iters", "4", "--resume", "--out", str(run)], "cannot resume", "unexpected key")
    (tmp_path / "weights.pt").write_bytes((run / "best.pt").read_bytes())
    os.makedirs(tmp_path / "w")
    (tmp_path / "w" / "last.pt").write_bytes((run / "best.pt").read_bytes())  # best.pt holds no optimiser
    fails(capsys, TINY + ["--iters", "4", "--resume", "--out", str(tmp_path / "w")], "is not a last.pt", "optimizer")


def test_a_model_mismatch_is_one_short_line(run, tmp_path, capsys):
    """A checkpoint into the wrong model: the key counts and the first few keys, not all of them."""
    argv = TINY[:]
    argv[argv.index("resnet18")] = "resnet34"
    err = fails(capsys, argv + ["--iters", "1", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "o")],
                str(run / "best.pt"), "missing keys", "...", "every key in ")
    assert len(err) < 500
    listing = err.rsplit("every key in ", 1)[1]
    args = train.parse_args(argv)
    own = train.METHODS[args.method][1](args).state_dict()                    # the resnet34 model
    saved = torch.load(run / "best.pt", weights_only=True)["model"]
    missing = [k for k in own if k not in saved]
    assert len(missing) > 3 and open(listing).read().split() == (
        f"{run / 'best.pt'} does not fit this model".split() + [str(len(missing)), "missing:"] + missing)


def test_finetune_is_refused_with_eval_only_and_predict(run, capsys):
    fails(capsys, TINY + ["--eval-only", "--finetune", "--checkpoint", str(run / "best.pt")], "--finetune")
    fails(capsys, TINY + ["--predict", ROOT, "--finetune", "--checkpoint", str(run / "best.pt")], "--finetune")


# ----------------------------------------------------------------------------------------------
# Flags


@pytest.mark.parametrize("flag,value,expected", [
    ("--crop-size", "0", "[1, inf]"), ("--crop-size", "-4", "[1, inf]"), ("--batch-size", "0", "[1, inf]"),
    ("--iters", "0", "[1, inf]"), ("--iters", "-3", "[1, inf]"), ("--lr", "nan", "[0, inf]"),
    ("--lr", "-0.1", "[0, inf]"), ("--eval-scales", "0", "(0, inf]"), ("--eval-scales", "-1", "(0, inf]"),
    ("--log-every", "0", "[1, inf]"), ("--save-every", "0", "[1, inf]"), ("--workers", "-1", "[0, inf]"),
    ("--eval-every", "0", "[1, inf]"), ("--class-uniform", "1.5", "[0, 1]"), ("--extra-ratio", "1", "[0, 1)"),
    ("--min-confidence", "2", "[0, 1]"), ("--batch-size", "two", "expected an integer"),
])
def test_a_numeric_flag_out_of_range_stops_at_parse_time(capsys, flag, value, expected):
    flag_fails(capsys, TINY + [flag, value], flag, expected)


# ----------------------------------------------------------------------------------------------
# The output folder


def test_out_that_is_a_file_or_under_one_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    fails(capsys, TINY + ["--iters", "1", "--out", str(tmp_path / "file")], "--out", "is a file")
    fails(capsys, TINY + ["--iters", "1", "--out", str(tmp_path / "file" / "run")], "--out", "not a writable folder")
    assert (tmp_path / "file").read_text() == "x"


def test_a_failed_save_removes_its_temporary_file_and_keeps_the_previous_checkpoint(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "last.pt").write_bytes((run / "last.pt").read_bytes())             # a run that had reached it. 2
    before = (out / "last.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    fails(capsys, TINY + ["--iters", "4", "--resume", "--save-every", "1", "--out", str(out)],
          str(out / "last.pt"), "No space left on device", "the previous one is kept")
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "last.pt").read_bytes() == before and not [f for f in os.listdir(out) if f.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# Data that trains nothing, and late failures


def camvid_tree(root, n=4, size=(24, 20), void=False):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        os.makedirs(root / split), os.makedirs(root / f"{split}annot")
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / split / f"f{i}.png")
            label = np.full((size[1], size[0]), 11, np.uint8) if void else rng.integers(0, 12, (size[1], size[0]), dtype=np.uint8)
            Image.fromarray(label).save(root / f"{split}annot" / f"f{i}.png")


def camvid(root, out, *more):
    argv = TINY[:]
    argv[argv.index("synthetic")] = "camvid"
    return argv + ["--data-root", str(root), "--crop-size", "16", "--out", str(out), *more]


def test_a_split_without_a_labelled_pixel_warns_then_stops_after_one_epoch(tmp_path, capsys):
    camvid_tree(tmp_path / "cv", void=True)                                   # every label void (ignored)
    fails(capsys, camvid(tmp_path / "cv", tmp_path / "o", "--iters", "10"), "a whole epoch (2 iterations)",
          "no labelled pixel")


def test_the_warning_is_printed_for_each_step_without_labels(tmp_path, capsys):
    camvid_tree(tmp_path / "cv", void=True)
    assert train.cli(camvid(tmp_path / "cv", tmp_path / "o", "--iters", "10")) == 2
    out = capsys.readouterr().out
    assert out.count("warning: no labelled pixel in these batches") == 2


def test_a_one_bit_label_png_reads_as_classes_0_and_1(tmp_path):
    camvid_tree(tmp_path / "cv")
    mask = np.zeros((20, 24), bool)
    mask[:, :12] = True
    Image.fromarray(mask).save(tmp_path / "cv" / "trainannot" / "f0.png")     # mode "1"
    assert Image.open(tmp_path / "cv" / "trainannot" / "f0.png").mode == "1"
    label = common.file_dataset("camvid", str(tmp_path / "cv"), "train").load_label(0)
    np.testing.assert_array_equal(label, mask.astype(np.uint8))


def test_a_bad_val_label_stops_before_training(tmp_path, capsys):
    camvid_tree(tmp_path / "cv")
    Image.fromarray(np.full((20, 24), 40, np.uint8)).save(tmp_path / "cv" / "valannot" / "f3.png")
    fails(capsys, camvid(tmp_path / "cv", tmp_path / "o", "--iters", "3"), "valannot", "f3.png", "outside the 11 classes")
    assert not (tmp_path / "o" / "last.pt").exists() and not (tmp_path / "o" / "metrics.jsonl").exists()


def test_last_pt_is_written_before_an_evaluation_that_fails(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise common.InputError("evaluation failed")
    monkeypatch.setattr(train, "evaluate", broken)
    fails(capsys, TINY + ["--iters", "3", "--eval-every", "2", "--out", str(tmp_path)], "evaluation failed")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == 2


def test_a_nan_loss_between_logging_steps_stops_with_the_checkpoint_before_it(tmp_path, monkeypatch, capsys):
    """The loss turns NaN at iteration 5, logging every 4 and saving every 2: the run stops at the
    next check (iteration 6), names iteration 5, and last.pt is the one written at 4."""
    real_loss = common.FCN.loss
    calls = []

    def loss(self, outputs, target):
        calls.append(1)
        terms = real_loss(self, outputs, target)
        if len(calls) == 5:
            terms["total"] = terms["total"] * float("nan")
        return terms
    monkeypatch.setattr(common.FCN, "loss", loss)
    argv = TINY + ["--iters", "20", "--log-every", "4", "--save-every", "2", "--out", str(tmp_path)]
    fails(capsys, argv, "the loss is not finite at iteration 5", str(tmp_path / "last.pt"))
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["iteration"] == 4 and all(torch.isfinite(v.float()).all() for v in state["model"].values())


# ----------------------------------------------------------------------------------------------
# Kills: SIGKILL mid-run, then --resume


def processes_of(out):
    """PIDs whose command line names `out` (the run and its data-loader workers)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(out).encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_run_leaves_no_process_and_resumes_from_an_intact_last_pt(tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, "train.py", *TINY, "--workers", "2", "--iters", "400", "--save-every", "1",
            "--out", str(out)]
    for kill in range(2):                                          # a few kills, each at a random moment
        proc = subprocess.Popen(argv + ["--resume"] * kill, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not (out / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.2 + np.random.default_rng(kill).uniform(0, 0.6))   # mid-iteration or mid-save (one of each ~0.1 s)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        for _ in range(50):                                        # workers die with their parent
            if not processes_of(out):
                break
            time.sleep(0.1)
        assert processes_of(out) == [], "a process of the killed run is left"
        assert b"Traceback" not in err, err.decode()[-2000:]
        state = torch.load(out / "last.pt", weights_only=True)     # intact, whenever the kill came
        assert state["iteration"] >= 1
    last_iteration = torch.load(out / "last.pt", weights_only=True)["iteration"]
    finish = [sys.executable, "train.py", *TINY, "--iters", str(last_iteration + 1), "--resume", "--out", str(out)]
    finish = subprocess.run(finish, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert f"resumed from {out / 'last.pt'} at iteration {last_iteration}" in finish.stdout
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == last_iteration + 1
    with open(out / "metrics.jsonl") as f:                         # a line cut by a kill is dropped on resume
        assert all(isinstance(json.loads(line), dict) for line in f)


def test_an_unknown_split_names_the_splits_and_train_plus_val_joins_two(tmp_path):
    camvid_tree(tmp_path / "cv")
    with pytest.raises(common.InputError, match=r"camvid has no split 'tset': its splits are train, val, test"):
        common.file_dataset("camvid", str(tmp_path / "cv"), "tset")
    both = common.file_dataset("camvid", str(tmp_path / "cv"), "train+val")
    parts = [common.file_dataset("camvid", str(tmp_path / "cv"), s).pairs for s in ("train", "val")]
    assert both.pairs == parts[0] + parts[1] and len(both) == 8


# ----------------------------------------------------------------------------------------------
# Issue 26: SIGTERM and SIGINT, shared folders, poisoned checkpoints, devices, checkpoint flags


def lines(out):
    """The iterations of metrics.jsonl: (training records, evaluation records)."""
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return [r["iter"] for r in records if "total" in r], [r["iter"] for r in records if "mIoU" in r]


def stopped(capsys, argv, signum, *expected):
    """The command line stopped by a signal: exit code 128 + its number, one line, no traceback."""
    try:
        code = train.cli(argv)
    except KeyboardInterrupt:                                # not caught: fail this test, not the session
        pytest.fail("SIGINT reached the caller as a KeyboardInterrupt")
    assert code == 128 + signum
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"stopped by {signal.Signals(signum).name}"), err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"


@pytest.fixture
def no_sigterm_death(monkeypatch):
    """SIGTERM to this test process raises instead of killing pytest (if train.py did not catch it)."""
    def uncaught(signum, frame):
        raise RuntimeError("SIGTERM was not caught by train.py")
    previous = signal.signal(signal.SIGTERM, uncaught)
    yield
    signal.signal(signal.SIGTERM, previous)


def signal_at_step(monkeypatch, step, signum):
    """train_step sends `signum` to this process during step `step` (1-based), as a cluster or a
    terminal would; returns the list of steps taken."""
    calls, real_step = [], train.train_step

    def step_with_signal(*a, **k):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real_step(*a, **k)
    monkeypatch.setattr(train, "train_step", step_with_signal)
    return calls


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_writes_last_pt_and_resume_needs_only_out(tmp_path, monkeypatch, capsys,
                                                                              no_sigterm_death, signum):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        calls = signal_at_step(patch, 2, signum)
        stopped(capsys, TINY + ["--iters", "4", "--out", str(out)], signum, "after iteration 2 of 4",
                str(out / "last.pt"), f"--resume --out {out}")
    assert len(calls) == 2 and torch.load(out / "last.pt", weights_only=True)["iteration"] == 2
    assert lines(out) == ([1, 2], [])
    assert train.cli(["--resume", "--out", str(out)]) == 0                    # every other flag from last.pt
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["iteration"] == 4 and state["args"]["backbone"] == "resnet18"
    assert lines(out) == ([1, 2, 3, 4], [4])


def test_ctrl_c_during_an_evaluation_is_one_line_and_the_resume_evaluates_it(run, tmp_path, monkeypatch, capsys):
    out, real_evaluate = tmp_path / "run", train.evaluate

    def interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*a, **k)
    with monkeypatch.context() as patch:
        patch.setattr(train, "evaluate", interrupted)
        stopped(capsys, TINY + ["--iters", "2", "--eval-every", "1", "--out", str(out)], signal.SIGINT,
                "during the evaluation at iteration 1", f"{out / 'last.pt'} (iteration 1) is intact")
        stopped(capsys, TINY + ["--eval-only", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "e")],
                signal.SIGINT, "during --eval-only")
    assert train.cli(["--resume", "--out", str(out)]) == 0
    assert lines(out) == ([1, 2], [1, 2])                                      # the missed evaluation first


def test_non_finite_buffers_are_never_saved_as_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A BatchNorm's running_var turns infinite at step 3 while the loss stays finite (a BN in training
    mode normalises by the batch's statistics): the run stops there, and last.pt stays at 2."""
    calls, real_step = [], train.train_step

    def poisoning_step(model, raw_model, *a, **k):
        calls.append(1)
        losses = real_step(model, raw_model, *a, **k)
        if len(calls) == 3:
            raw_model.backbone.bn1.running_var.fill_(float("inf"))
        return losses
    monkeypatch.setattr(train, "train_step", poisoning_step)
    out = tmp_path / "run"
    fails(capsys, TINY + ["--iters", "5", "--save-every", "1", "--out", str(out)], "not finite after iteration 3",
          "backbone.bn1.running_var", f"the last good checkpoint is {out / 'last.pt'}")
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["iteration"] == 2 and all(torch.isfinite(v.float()).all() for v in state["model"].values())


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(run, tmp_path, capsys):
    before = snapshot(run)
    fails(capsys, TINY + ["--iters", "2", "--out", str(run)], f"--out {run} already holds a run", "--resume",
          "--overwrite")
    assert snapshot(run) == before
    import fcntl
    with open(run / ".lock", "a+") as lock:                                   # a run in progress holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fails(capsys, TINY + ["--iters", "3", "--resume", "--out", str(run)], f"--out {run} is in use by a running run")
    assert snapshot(run) == before
    out = tmp_path / "again"
    out.mkdir()
    for name in ("last.pt", "metrics.jsonl"):
        (out / name).write_bytes((run / name).read_bytes())
    assert train.cli(TINY + ["--iters", "1", "--overwrite", "--out", str(out)]) == 0
    assert lines(out) == ([1], [1]) and torch.load(out / "last.pt", weights_only=True)["iteration"] == 1


def test_temporary_files_are_unique_to_their_writer(tmp_path):
    """Two runs writing one file never share a temporary name: another writer's file is left alone."""
    from tools import crash_safety
    for name, write in (("last.pt", lambda p: crash_safety.atomic_save({"a": torch.zeros(1)}, p)),
                        ("summary.json", lambda p: crash_safety.write_json(p, {"mIoU": 1.0}))):
        other = tmp_path / f"{name}.tmp"
        other.write_bytes(b"another run's half-written file")
        write(str(tmp_path / name))
        assert other.read_bytes() == b"another run's half-written file"
        left = [f for f in os.listdir(tmp_path) if f.startswith(f"{name}.") and f != other.name]
        assert (tmp_path / name).exists() and not left, left


def test_out_removed_mid_run_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    out, calls, real_step = tmp_path / "run", [], train.train_step

    def removing_step(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            import shutil
            shutil.rmtree(out)
        return real_step(*a, **k)
    monkeypatch.setattr(train, "train_step", removing_step)
    fails(capsys, TINY + ["--iters", "4", "--out", str(out)], str(out / "metrics.jsonl"), "was --out removed?")


@pytest.mark.parametrize("device,expected", [("nonsense", "is not a device"), ("cuda", "has no CUDA device"),
                                             ("cuda:3", "has no CUDA device"), ("mps", "has no MPS device"),
                                             ("xla", "runs on cpu, cuda or mps")])
def test_a_device_this_machine_lacks_is_one_line(capsys, monkeypatch, device, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)            # as on a machine without a GPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    argv = TINY[:]
    argv[argv.index("--device") + 1] = device
    fails(capsys, argv + ["--iters", "1"], f"--device {device}", expected)


def edited_checkpoint(run, path, **flags):
    """best.pt of `run` with some of its saved flags replaced (None: removed)."""
    state = torch.load(run / "best.pt", weights_only=True)
    state["args"].update(flags)
    state["args"] = {k: v for k, v in state["args"].items() if v is not None}
    torch.save(state, path)
    return str(path)


def test_a_checkpoint_naming_what_this_version_lacks_is_one_line(run, tmp_path, capsys):
    for flag, value in (("method", "segformer"), ("backbone", "resnet152"), ("dataset", "kitti")):
        path = edited_checkpoint(run, tmp_path / f"{flag}.pt", **{flag: value})
        fails(capsys, ["--eval-only", "--checkpoint", path], path, f"--{flag} {value}", "this version does not have")
        fails(capsys, ["--predict", ROOT, "--checkpoint", path], path, f"--{flag} {value}")
    os.makedirs(tmp_path / "r")
    edited_checkpoint(run, tmp_path / "r" / "last.pt", backbone="resnet152")
    fails(capsys, ["--resume", "--out", str(tmp_path / "r")], str(tmp_path / "r" / "last.pt"), "--backbone resnet152")


def test_eval_only_evaluates_the_split_the_checkpoint_was_evaluated_on(run, tmp_path, capsys):
    """--synthetic-size 40 and --synthetic-val-length 2 (and the seed) define the run's evaluation
    split: --eval-only takes them from the checkpoint, and says which flags a checkpoint lacks."""
    summary = json.load(open(run / "summary.json"))
    _, metrics = train.main(["--eval-only", "--checkpoint", str(run / "best.pt"), "--device", "cpu", "--workers", "0",
                             "--out", str(tmp_path / "e")])
    assert metrics["mIoU"] == summary["mIoU"] and metrics["aAcc"] == summary["aAcc"]
    older = edited_checkpoint(run, tmp_path / "older.pt", synthetic_size=None, flip=None)
    capsys.readouterr()
    assert train.cli(["--eval-only", "--checkpoint", older, "--device", "cpu", "--workers", "0",
                      "--out", str(tmp_path / "o")]) == 0
    assert f"note: {older} does not record --synthetic-size, --flip: the defaults stand" in capsys.readouterr().out


def test_eval_only_and_predict_together_are_refused(run, capsys):
    fails(capsys, ["--eval-only", "--predict", ROOT, "--checkpoint", str(run / "best.pt")], "--eval-only and --predict")


def test_a_checkpoints_data_root_that_is_not_a_folder_here_says_where_it_came_from(run, tmp_path, monkeypatch, capsys):
    camvid_tree(tmp_path / "cv")
    path = edited_checkpoint(run, tmp_path / "old.pt", dataset="camvid", data_root="cv", num_classes=11)
    monkeypatch.chdir(tmp_path / "cv")                                        # not where it was trained
    fails(capsys, ["--eval-only", "--checkpoint", path], "--data-root cv is not a folder here", f"it comes from {path}",
          "relative", "give --data-root")
    fails(capsys, TINY + ["--eval-only", "--dataset", "camvid", "--checkpoint", str(run / "best.pt"), "--data-root",
                          str(tmp_path / "cv")], "trained on 6 classes", "camvid has 11", "without --eval-only")
    assert train.saved_flags(train.parse_args(TINY + ["--data-root", "cv"]))["data_root"] == str(tmp_path / "cv" / "cv")


def test_a_huge_image_names_the_pixel_limit_and_the_flag_that_allows_it(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)    # restored after the test
    Image.new("RGB", (40, 30)).save(tmp_path / "tile.png")                    # 1,200 pixels
    argv = ["--predict", str(tmp_path / "tile.png"), "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "p")]
    fails(capsys, argv + ["--max-image-pixels", "1000"], str(tmp_path / "tile.png"), "1,200 pixels",
          "over the limit of 1,000", "--max-image-pixels 1200")
    assert train.cli(argv + ["--max-image-pixels", "1200"]) == 0


def test_a_full_disk_during_predict_is_one_line_and_keeps_what_was_written(run, tmp_path, monkeypatch, capsys):
    for name in ("a", "b"):
        Image.new("RGB", (24, 20)).save(tmp_path / f"{name}.png")
    out, real_save, calls = tmp_path / "p", Image.Image.save, []

    def disk_full(image, path, *a, **k):
        calls.append(path)
        if len(calls) == 5:                                                   # b's colour image
            with open(path, "wb") as f:
                f.write(b"half a png")
            raise OSError(28, "No space left on device")
        return real_save(image, path, *a, **k)
    monkeypatch.setattr(Image.Image, "save", disk_full)
    fails(capsys, ["--predict", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--checkpoint", str(run / "best.pt"),
                   "--out", str(out)], f"cannot write {out / 'color' / 'b.png'} (No space left on device)",
          "the 1 of 2 images labelled before it are kept")
    assert sorted(os.listdir(out / "labels")) == ["a.png", "b.png"] and os.listdir(out / "color") == ["a.png"]
