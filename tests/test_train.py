"""train.py end to end on tiny synthetic runs: learning, exact resume, CPU DDP, clear errors."""
import contextlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import common
import train
from tools import sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--method", "fcn", "--dataset", "synthetic", "--backbone", "resnet18", "--head-channels", "32",
        "--crop-size", "32", "--batch-size", "2", "--synthetic-size", "40", "--synthetic-length", "16",
        "--synthetic-val-length", "4", "--workers", "0", "--device", "cpu", "--log-every", "1"]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["total"] for r in map(json.loads, f) if "total" in r]


def test_a_few_iterations_lower_the_loss(tmp_path):
    out = str(tmp_path / "run")
    _, metrics = train.main(TINY + ["--iters", "30", "--lr", "0.02", "--out", out])
    curve = losses(out)
    assert len(curve) == 30 and np.mean(curve[-5:]) < 0.8 * np.mean(curve[:5])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["mIoU"] == metrics["mIoU"] and set(summary["IoU"]) == set(common.SYNTHETIC_CLASSES)
    assert os.path.isfile(os.path.join(out, "last.pt")) and os.path.isfile(os.path.join(out, "best.pt"))


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    """Killed (an exception, as SIGKILL leaves no handler a chance) in the 5th step, after logging the
    4th and saving the 3rd, with a line cut short: the resumed run ends with the uninterrupted run's
    weights, and its metrics.jsonl logs every iteration once."""
    args = TINY + ["--iters", "6", "--save-every", "3", "--lr", "0.02"]
    straight, _ = train.main(args + ["--out", str(tmp_path / "a")])
    calls, real_step = [], train.train_step

    def interrupted_step(*a, **k):                                          # killed during the 5th step
        calls.append(1)
        if len(calls) == 5:
            with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
                f.write('{"iter": 5, "lr"')                                 # a line the kill cut short
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(train, "train_step", real_step)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["iteration"] == 3
    resumed, _ = train.main(args + ["--out", str(tmp_path / "b"), "--resume"])
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        logged = [r["iter"] for r in map(json.loads, f) if "total" in r]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_eval_only_reproduces_the_final_evaluation(tmp_path):
    out = str(tmp_path / "run")
    _, trained = train.main(TINY + ["--iters", "3", "--out", out])
    _, again = train.main(TINY + ["--eval-only", "--checkpoint", os.path.join(out, "last.pt"), "--out", out])
    assert again["mIoU"] == trained["mIoU"] and again["aAcc"] == trained["aAcc"]


def test_resume_after_switching_amp_on_starts_a_fresh_grad_scaler(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--iters", "2", "--out", out])                        # --amp off: empty scaler state
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["scaler"] == {}
    train.main(TINY + ["--iters", "3", "--amp", "fp16", "--resume", "--out", out])
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert state["iteration"] == 3 and state["scaler"]["scale"] > 0


COMPARE = ["--dataset", "synthetic", "--backbone", "resnet18", "--crop-size", "32", "--batch-size", "2",
           "--synthetic-size", "40", "--synthetic-length", "8", "--synthetic-val-length", "2", "--workers", "0",
           "--device", "cpu", "--iters", "2", "--log-every", "1"]


def test_resuming_a_finished_comparison_evaluates_it_once_more(tmp_path):
    argv = ["--compare-methods", "fcn"] + COMPARE + ["--out", str(tmp_path)]
    first, = train.main(argv)[1]
    again, = train.main(argv + ["--resume"])[1]                                # nothing left to train
    first.pop("eval img/s"), again.pop("eval img/s")                           # timed again
    assert again == first                                                      # same weights and evaluation,
    with open(tmp_path / "fcn" / "metrics.jsonl") as f:                        # training speed from summary.json
        evaluations = [r["iter"] for r in map(json.loads, f) if "mIoU" in r]
    assert evaluations == [2, 2]


def reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def test_an_empty_split_writes_strict_json(tmp_path):
    camvid_tree(tmp_path / "cv")
    for i in range(4):                                                         # every val pixel void -> ignored
        Image.fromarray(np.full((20, 24), 11, np.uint8)).save(tmp_path / "cv" / "valannot" / f"f{i}.png")
    _, metrics = run_camvid(tmp_path, tmp_path / "cv")
    assert math.isnan(metrics["mIoU"])                                         # no pixel: no mean
    with open(tmp_path / "o" / "summary.json") as f:
        summary = json.loads(f.read(), parse_constant=reject_constant)
    assert summary["mIoU"] is None and summary["mAcc"] is None and summary["aAcc"] == 0
    with open(tmp_path / "o" / "metrics.jsonl") as f:
        records = [json.loads(line, parse_constant=reject_constant) for line in f]
    assert [r["mIoU"] for r in records if "mIoU" in r] == [None]


def test_help_never_prints_a_default_of_none():
    """--help shows each flag's default; a flag without one (None) says in its help what happens."""
    for method in train.METHODS:
        text = train.build_parser(method).format_help()
        assert "(default: None)" not in " ".join(text.split()), method
    assert "(default: 0.01)" in " ".join(train.build_parser("fcn").format_help().split())


def test_checkpoint_of_a_cpu_run_holds_no_cuda_rng_state(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)             # a GPU in the machine, unused
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(8, dtype=torch.uint8)])
    model = torch.nn.Conv2d(3, 2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = str(tmp_path / "c.pt")
    train.save_checkpoint(path, model, train.parse_args(TINY), 1, 0.0, optimizer,
                          torch.amp.GradScaler("cpu", enabled=False))
    assert torch.load(path, weights_only=True)["rng_cuda"] is None


def test_finetune_from_another_class_count_reinitialises_only_the_classifiers(tmp_path, capsys):
    out = str(tmp_path / "six")
    six, _ = train.main(TINY + ["--iters", "2", "--out", out])                 # synthetic: 6 classes
    camvid_tree(tmp_path / "cv")
    argv = TINY[:]
    argv[argv.index("synthetic")] = "camvid"                                   # 11 classes
    argv += ["--data-root", str(tmp_path / "cv"), "--iters", "1", "--lr", "0", "--crop-size", "16",
             "--checkpoint", os.path.join(out, "last.pt"), "--out", str(tmp_path / "o")]
    with pytest.raises(common.InputError, match=r"4 mis-shaped keys \(head\.2\.weight, head\.2\.bias, aux_head\.2\.weight"):
        train.main(argv)
    eleven, _ = train.main(argv + ["--finetune"])
    assert "head.2.weight" in capsys.readouterr().out
    for (name, a), b in zip(six.state_dict().items(), eleven.state_dict().values()):
        if "num_batches_tracked" in name or "running" in name:
            continue                                                           # BN statistics move in training
        assert torch.equal(a, b) == (a.shape == b.shape), name                 # lr 0: copied or fresh


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    indexed, load_label = [], common.SyntheticDataset.load_label

    def recording_load_label(self, i):                                       # of the 16 training images, only
        if len(self) == 16:                                                  # the class index reads labels alone
            indexed.append(i)
        return load_label(self, i)
    common.SyntheticDataset.load_label = recording_load_label
    model, metrics = train.main(TINY + ["--iters", "3", "--class-uniform", "0.5", "--out", out])
    torch.save({"params": {k: v.detach() for k, v in model.named_parameters()},
                "buffers": {k: v for k, v in model.named_buffers()}, "mIoU": metrics["mIoU"],
                "indexed": indexed, "draw": torch.rand(8)}, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_process_cpu_ddp_keeps_ranks_identical(tmp_path):
    out = str(tmp_path / "ddp")
    mp.spawn(ddp_worker, args=(2, free_port(), out), nprocs=2)
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    for name, b in r0["buffers"].items():                                    # plain BN: rank 0's statistics
        assert torch.equal(b, r1["buffers"][name]), name
    assert r0["mIoU"] == r1["mIoU"]                                          # one all-reduced matrix
    assert not torch.equal(r0["draw"], r1["draw"])                           # each rank its own dropout masks
    start = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert start["iteration"] == 3
    # the class-uniform index: each rank read its half of the 16 labels, merged = one process's index
    assert r0["indexed"] == list(range(0, 16, 2)) and r1["indexed"] == list(range(1, 16, 2))
    cache, = [f for f in os.listdir(out) if f.startswith("class_uniform_synthetic_16_1024_")]
    with open(os.path.join(out, cache)) as f:
        whole = sampling.class_centroids(common.SyntheticDataset(16, (40, 40), 0), progress=False)
        assert json.load(f) == whole and sum(map(len, whole)) > 16


def stopped_worker(rank, world, ports, out):
    """A torchrun-like rank of a run that rank 1's node stops with SIGTERM during step 2 (rank 0 is not
    signalled: the stop reaches it through the ranks' agreement), then of the run resumed with --resume
    --out alone. Writes what each rank saw."""
    torch.set_num_threads(1)
    steps, real_step, seen = [], train.train_step, {}

    def step(*a, **k):
        steps.append(1)
        if rank == 1 and len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*a, **k)
    train.train_step = step
    for phase, argv in (("stopped", TINY + ["--iters", "4", "--out", out]), ("resumed", ["--resume", "--out", out])):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[phase == "resumed"]))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = train.cli(argv)
        seen[phase] = {"code": code, "err": err.getvalue(), "steps": len(steps)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


def test_sigterm_under_ddp_stops_every_rank_after_the_same_step_and_resumes_with_out_alone(tmp_path):
    out = str(tmp_path / "ddp")
    mp.spawn(stopped_worker, args=(2, (free_port(), free_port()), out), nprocs=2)
    r0, r1 = (json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1))
    assert r0["stopped"]["code"] == r1["stopped"]["code"] == 128 + signal.SIGTERM
    assert r0["stopped"]["steps"] == r1["stopped"]["steps"] == 2                # the same step on every rank
    assert r0["stopped"]["err"].strip() == (f"stopped by SIGTERM after iteration 2 of 4: {out}/last.pt written; "
                                            f"continue with --resume --out {out}") and r1["stopped"]["err"] == ""
    assert r0["resumed"]["code"] == r1["resumed"]["code"] == 0 and r0["resumed"]["steps"] == 4
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["iteration"] == 4
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logged = [r["iter"] for r in map(json.loads, f) if "total" in r]
    assert logged == [1, 2, 3, 4]


def single_rank_worker(rank, port, out):
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, _ = train.main(TINY + ["--iters", "2", "--out", out])
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, os.path.join(out, "weights.pt"))
    torch.distributed.destroy_process_group()


def test_torchrun_with_one_process_takes_the_ddp_path_and_trains_as_one_plain_process(tmp_path, capfd):
    """torchrun --nproc_per_node=1 wraps the model in DDP (SyncBatchNorm too on CUDA), so that a one-GPU
    check runs the multi-GPU code; with one rank its all-reduce averages one gradient, so the weights
    equal a plain process's after the same steps."""
    out = str(tmp_path / "ddp1")
    mp.spawn(single_rank_worker, args=(free_port(), out), nprocs=1)
    assert "1 process(es) (DDP)" in capfd.readouterr().out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                                 # as the worker: the same sums
    try:
        plain, _ = train.main(TINY + ["--iters", "2", "--out", str(tmp_path / "plain")])
    finally:
        torch.set_num_threads(threads)
    assert "(DDP)" not in capfd.readouterr().out
    ddp = torch.load(os.path.join(out, "weights.pt"), weights_only=True)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, ddp[name]), name


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error naming the problem


def camvid_tree(root, n=4, size=(24, 20)):
    """A tiny CamVid tree in the SegNet layout with valid files."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        os.makedirs(root / split), os.makedirs(root / f"{split}annot")
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / split / f"f{i}.png")
            Image.fromarray(rng.integers(0, 12, (size[1], size[0]), dtype=np.uint8)).save(root / f"{split}annot" / f"f{i}.png")


def run_camvid(tmp_path, root):
    argv = TINY[:]
    argv[argv.index("synthetic")] = "camvid"
    return train.main(argv + ["--data-root", str(root), "--iters", "2", "--crop-size", "16", "--out", str(tmp_path / "o")])


def test_missing_data_root_says_which_layout(tmp_path):
    with pytest.raises(common.InputError, match="camvid.*layout"):
        run_camvid(tmp_path, tmp_path / "nowhere")
    os.makedirs(tmp_path / "half" / "train")
    with pytest.raises(common.InputError, match=r"missing folder .*trainannot.*SegNet tutorial"):
        run_camvid(tmp_path, tmp_path / "half")


def test_corrupt_image_is_named(tmp_path):
    camvid_tree(tmp_path / "cv")
    (tmp_path / "cv" / "train" / "f2.png").write_bytes(b"\x89PNG not really")   # 2 iterations x 2 = all 4 read
    with pytest.raises(common.InputError, match=r"cannot read image .*train.f2\.png"):
        run_camvid(tmp_path, tmp_path / "cv")


def test_size_mismatch_and_unknown_class_are_named(tmp_path):
    camvid_tree(tmp_path / "cv")
    dataset = common.file_dataset("camvid", str(tmp_path / "cv"), "train")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "cv" / "trainannot" / "f1.png")
    with pytest.raises(common.InputError, match=r"f1\.png is 24x20 but its label .*f1\.png is 5x5"):
        dataset[1]
    Image.fromarray(np.full((20, 24), 17, np.uint8)).save(tmp_path / "cv" / "trainannot" / "f3.png")
    with pytest.raises(common.InputError, match=r"trainannot.f3\.png has values \[17\] outside the 11 classes"):
        dataset[3]
    raw = np.asarray(Image.open(tmp_path / "cv" / "trainannot" / "f0.png"))
    assert (raw == 11).any() and (raw < 11).any()
    np.testing.assert_array_equal(dataset[0][1].numpy(), np.where(raw == 11, 255, raw))   # void 11 -> ignore


def test_empty_split_is_an_error(tmp_path):
    camvid_tree(tmp_path / "cv", n=0)
    with pytest.raises(common.InputError, match="empty"):
        run_camvid(tmp_path, tmp_path / "cv")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(common.InputError, match="not finite.*last good checkpoint"):
        train.main(TINY + ["--iters", "50", "--lr", "1e30", "--save-every", "1", "--out", str(out)])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["iteration"] >= 1
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(common.InputError, match=r"not finite.*no checkpoint was written yet \(--save-every 1000\)"):
        train.main(TINY + ["--iters", "50", "--lr", "1e30", "--out", str(out)])
    assert not (out / "last.pt").exists()


def test_eval_only_without_checkpoint_and_a_gapped_slide_are_refused(tmp_path):
    with pytest.raises(common.InputError, match="--eval-only needs --checkpoint"):
        train.main(TINY + ["--eval-only", "--out", str(tmp_path)])
    with pytest.raises(common.InputError, match=r"--eval-stride 40 must be between 1 and --eval-crop \(32\)"):
        train.main(TINY + ["--eval-mode", "slide", "--eval-crop", "32", "--eval-stride", "40", "--out", str(tmp_path)])
    assert os.listdir(tmp_path) == []                                          # refused before anything ran


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--dataset", "camvid", "--data-root",
                             str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --data-root") and "Traceback" not in result.stderr


def test_a_checkpoint_carries_its_model_for_eval_only(tmp_path, capsys):
    """Train with non-default model flags, then --eval-only --checkpoint with none of them: the same
    mIoU, written beside the checkpoint; the training run's summary.json is untouched; a model flag
    that disagrees with the checkpoint is refused, naming it and both values."""
    out = tmp_path / "run"
    argv = TINY[:]
    argv[argv.index("fcn")] = "galdv1"
    del argv[argv.index("--head-channels"):argv.index("--head-channels") + 2]
    _, trained = train.main(argv + ["--iters", "2", "--ga", "psp", "--output-stride", "16", "--out", str(out)])
    summary = (out / "summary.json").read_bytes()
    bare = ["--eval-only", "--checkpoint", str(out / "best.pt"), "--synthetic-size", "40",
            "--synthetic-val-length", "4", "--workers", "0", "--device", "cpu"]
    model, metrics = train.main(bare)
    assert metrics["mIoU"] == trained["mIoU"] and any(type(m).__name__ == "PSP" for m in model.modules())
    assert model.backbone(torch.zeros(1, 3, 64, 64))[3].shape[-1] == 64 // 16              # output stride 16
    assert (out / "summary.json").read_bytes() == summary
    assert json.load(open(tmp_path / "run" / "eval-val" / "summary.json"))["mIoU"] == trained["mIoU"]
    assert train.cli(bare + ["--output-stride", "8"]) == 2
    err = capsys.readouterr().err
    assert "--output-stride 8 differs from" in err and "16" in err
    assert train.cli(bare + ["--output-stride", "16", "--eval-scales", "0.5", "1.0"]) == 0   # agrees; eval flags free


def test_best_pt_holds_the_weights_and_flags_only(tmp_path):
    out = tmp_path / "run"
    train.main(TINY + ["--iters", "1", "--out", str(out)])
    best, last = (torch.load(out / f, weights_only=True) for f in ("best.pt", "last.pt"))
    assert set(best) == {"model", "iteration", "best_miou", "args"}
    assert {"optimizer", "scaler", "rng_cpu"} <= set(last)


def test_finetune_starts_the_layers_a_pretrained_model_never_had_fresh(tmp_path, capsys):
    """HMSA Sec. 5.1.1: pre-trained without attention (--ms-mode average), then trained with it: the
    attention head is missing from the file; without --finetune that is an error, with it those
    layers start fresh, are listed, and every other weight is the file's."""
    argv = TINY[:]
    argv[argv.index("fcn")] = "hier_ms_attn"
    argv[argv.index("--head-channels") + 1] = "8"
    plain, _ = train.main(argv + ["--iters", "1", "--ms-mode", "average", "--out", str(tmp_path / "pre")])
    start = argv + ["--iters", "1", "--lr", "0", "--checkpoint", str(tmp_path / "pre" / "best.pt"), "--out", str(tmp_path / "o")]
    with pytest.raises(common.InputError, match=r"missing keys \(scale_attn"):
        train.main(start)
    capsys.readouterr()
    attention, _ = train.main(start + ["--finetune"])
    fresh = capsys.readouterr().out.split("--finetune: ")[1].splitlines()[0]
    assert "scale_attn" in fresh and "backbone" not in fresh
    pre = plain.state_dict()
    for name, value in attention.state_dict().items():
        if name in pre and "running" not in name and "num_batches" not in name:
            assert torch.equal(value, pre[name]), name                     # lr 0: the file's weights


def test_freeze_bn_keeps_every_batchnorm_fixed(tmp_path):
    """--freeze-bn (GALD v2's coarse-data stage): against a run with lr 0 from the same seed, every
    BatchNorm's running statistics and affine parameters are unchanged, and the convolutions trained."""
    argv = TINY + ["--iters", "2", "--freeze-bn", "--seed", "3"]
    trained, _ = train.main(argv + ["--out", str(tmp_path / "frozen")])
    untouched, _ = train.main(argv + ["--lr", "0", "--out", str(tmp_path / "lr0")])
    bn = {n for n, m in trained.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    moved = [name for (name, a), b in zip(trained.state_dict().items(), untouched.state_dict().values())
             if not torch.equal(a, b)]
    assert bn and not [name for name in moved if name.rsplit(".", 1)[0] in bn]
    assert any(name.endswith("conv1.weight") for name in moved)


def test_a_checkpoint_of_an_earlier_version_with_none_flags_evaluates(tmp_path):
    """Earlier versions saved None for the method flags not given (their parser's default). Such a
    checkpoint still evaluates: each None stands for today's default instead of reaching build_model."""
    out = tmp_path / "run"
    argv = TINY[:]
    argv[argv.index("fcn")] = "galdv1"
    del argv[argv.index("--head-channels"):argv.index("--head-channels") + 2]
    _, trained = train.main(argv + ["--iters", "1", "--ga", "psp", "--out", str(out)])
    state = torch.load(out / "best.pt", weights_only=True)
    state["args"].update(ld_downsample=None, follow_code=None)
    torch.save(state, out / "old.pt")
    _, metrics = train.main(["--eval-only", "--checkpoint", str(out / "old.pt"), "--synthetic-size", "40",
                             "--synthetic-val-length", "4", "--workers", "0", "--device", "cpu"])
    assert metrics["mIoU"] == trained["mIoU"]
