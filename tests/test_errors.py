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
    (folder / "exploit").write_bytes(pickle.dumps({"model": Exploit()}))
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
    assert (out / "last.pt").read_bytes() == before and not (out / "last.pt.tmp").exists()


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
        time.sleep(0.5 + np.random.default_rng(kill).uniform(0, 1.5))   # mid-iteration or mid-save
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
