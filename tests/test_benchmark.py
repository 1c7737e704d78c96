"""Costs and comparison (tools/costs.py): --benchmark's figures, the CPU memory peak, --compile's fallback, and
--compare-methods' table (tiny CPU runs; speed itself is never asserted, only that it was taken)."""
import contextlib
import io
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import common
import train
from tools import costs, paper_costs


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: one intra-op thread

BENCH = ["--benchmark", "--method", "fcn", "--backbone", "resnet18", "--head-channels", "16", "--batch-size", "1",
         "--benchmark-iters", "1", "--benchmark-warmup", "1", "--device", "cpu"]
FIELDS = {"method", "backbone", "input", "eval", "amp", "channels_last", "device", "params_total", "params_backbone",
          "params_head", "gflops_forward", "gflops_train_step", "forward_peak_mib", "train_step_peak_mib",
          "forward_ms", "train_step_ms", "compiled", "memory"}
RESNET18_TRUNK = 11_176_512                                  # torchvision resnet18 without its fc layer


def conv_flops(model, x, training):
    """FLOPs of each Conv2d in one forward of x, counted by hand from hooks: 2 x output elements x
    (input channels / groups) x kernel area. An FCN has no other matrix products."""
    counts = []

    def hook(m, inp, out):
        counts.append(2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    model.train(training)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts


@pytest.fixture(scope="module")
def bench_48():
    """One --benchmark run at 48 x 48 for the two tests below: (model, its record, what it printed)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        model, r = train.main(BENCH + ["--crop-size", "48"])
    return model, r, out.getvalue()


def test_benchmark_fields_counts_and_sane_values(bench_48):
    model, r, printed = bench_48
    printed = printed.strip().splitlines()
    assert json.loads(printed[-1]) == r and any(line.startswith("| parameters") for line in printed)
    assert set(r) == FIELDS and r["input"] == [1, 3, 48, 48] and not r["compiled"]
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    assert r["params_backbone"] == RESNET18_TRUNK
    assert r["params_head"] == head > 0
    assert r["params_total"] == sum(p.numel() for p in model.parameters()) == r["params_backbone"] + r["params_head"]
    # the eval forward: every conv once; a training step: the training forward (aux head included),
    # then a grad-input and a grad-weight product per conv, but no grad-input for the image's conv1
    evaluation, training = (conv_flops(model, torch.randn(1, 3, 48, 48), t) for t in (False, True))
    assert r["gflops_forward"] == pytest.approx(sum(evaluation) / 1e9, rel=1e-9)
    assert sum(training) > sum(evaluation)
    assert r["gflops_train_step"] == pytest.approx((3 * sum(training) - training[0]) / 1e9, rel=1e-9)
    assert r["forward_ms"] > 0 and r["train_step_ms"] > 0
    weights_mib = 4 * r["params_total"] / 2 ** 20
    assert weights_mib < r["forward_peak_mib"] < r["train_step_peak_mib"]                   # + activations, grads


def test_benchmark_flops_grow_with_the_input_and_follow_the_eval_flags(bench_48):
    _, small, _ = bench_48
    no_warmup = ["--benchmark-warmup", "0"]                      # FLOPs only: the times are not read here
    _, large = train.main(BENCH + ["--crop-size", "64"] + no_warmup)
    _, flip = train.main(BENCH + ["--crop-size", "48", "--flip"] + no_warmup)
    # every feature map of the FCN scales with the pixel count: 64x64 / 48x48 = 1.78x
    assert large["gflops_forward"] / small["gflops_forward"] == pytest.approx((64 / 48) ** 2, rel=0.01)
    assert flip["gflops_forward"] == pytest.approx(2 * small["gflops_forward"])           # two views
    assert flip["gflops_train_step"] == pytest.approx(small["gflops_train_step"])          # training has no flip


class PooledBatchNorm(common.SegModel):
    """A model whose training step cannot run at batch 1: BatchNorm after a global pooling."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, image):
        x = self.backbone(image)
        return {"out": x + self.norm(x.mean((2, 3), keepdim=True))}

    def loss(self, outputs, target):
        total = nn.functional.cross_entropy(outputs["out"], target)
        return {"total": total}


def test_benchmark_at_batch_one_keeps_the_forward_when_training_cannot_run(capsys):
    args = train.parse_args(BENCH + ["--crop-size", "16", "--num-classes", "4"])
    r = costs.benchmark(PooledBatchNorm(), args, torch.device("cpu"))
    assert "train step fails at --batch-size 1" in capsys.readouterr().out
    assert r["gflops_forward"] > 0 and r["forward_ms"] > 0 and r["forward_peak_mib"] > 0
    assert r["gflops_train_step"] is None and r["train_step_ms"] is None and r["train_step_peak_mib"] is None


def test_live_tensor_bytes_counts_new_storages_until_freed():
    held = torch.ones(10, 10)

    def fn():
        a = torch.ones(500, 500)                              # 1 MB
        b = a @ a                                             # 2 MB live
        c = b + 1                                             # 3 MB: the peak
        del a, b                                              # 1 MB
        c.add_(1)                                             # in place: no new memory
        d = c.t() * 2                                         # a view, then 2 MB
        return d.sum()

    with costs.LiveTensorBytes() as live:
        fn()
    assert live.peak == 3 * 500 * 500 * 4 and live.current == 0
    assert costs.peak_memory(fn, torch.device("cpu"), held=[held, held[0]]) == 400 + 3 * 500 * 500 * 4


def tiny_fcn():
    torch.manual_seed(0)
    return common.FCN(common.ResNet(18, output_stride=8), 3, head_channels=8).eval()


def test_compile_falls_back_to_eager_with_a_message(monkeypatch):
    model, x = tiny_fcn(), torch.randn(1, 3, 32, 32)
    expected = model(x)["out"]

    def broken(fn):
        def call(*args, **kwargs):
            raise RuntimeError("no working C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    lines = []
    costs.compile_forward(model, log=lines.append)
    assert costs.is_compiled(model)
    assert torch.equal(model(x)["out"], expected) and torch.equal(model(x)["out"], expected)
    assert len(lines) == 1 and "torch.compile failed" in lines[0] and "no working C++ compiler" in lines[0]
    assert not costs.is_compiled(model)

    def unsupported(fn):                                      # torch.compile itself refuses (old torch, new Python)
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    costs.compile_forward(model, log=lines.append)
    assert len(lines) == 2 and "not supported" in lines[1] and not costs.is_compiled(model)
    assert torch.equal(model(x)["out"], expected)


def test_compiled_forward_serves_predict_and_lets_input_errors_through(monkeypatch):
    model, x = tiny_fcn(), torch.randn(1, 3, 32, 32)
    keys, calls = list(model.state_dict()), []

    def counting(fn):
        def call(*args, **kwargs):
            calls.append(1)
            if args[0].shape[-1] == 17:
                raise common.InputError("bad input")
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(torch, "compile", counting)
    costs.compile_forward(model, log=pytest.fail)
    model.predict(x, scales=(1.0,), flip=True)                # two views through the compiled forward
    assert len(calls) == 2 and list(model.state_dict()) == keys
    with pytest.raises(common.InputError):
        model(torch.randn(1, 3, 32, 17))
    assert costs.is_compiled(model)


COMPARE = ["--dataset", "synthetic", "--backbone", "resnet18", "--crop-size", "32", "--batch-size", "2",
           "--synthetic-size", "40", "--synthetic-length", "8", "--synthetic-val-length", "2", "--workers", "0",
           "--device", "cpu", "--iters", "1", "--log-every", "1"]


def test_compare_methods_writes_a_well_formed_table(tmp_path):
    out = str(tmp_path / "cmp")
    rows = train.main(["--compare-methods", "fcn,galdv1"] + COMPARE + ["--out", out])[1]
    with open(os.path.join(out, "comparison.md")) as f:
        table = [line for line in f.read().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert cells[0] == ["method", "mIoU", "aAcc", "BF 3px", "params (M)", "GFLOPs", "train it/s", "eval img/s"]
    assert set(cells[1]) == {"---"} and len(cells[1]) == 8
    assert [row[0] for row in cells[2:]] == ["fcn", "galdv1"]
    for row in cells[2:]:
        values = [float(c) for c in row[1:]]
        assert all(math.isfinite(v) for v in values) and min(values[3:]) > 0
        summary = json.load(open(os.path.join(out, row[0], "summary.json")))
        assert summary["method"] == row[0] and float(row[1]) == pytest.approx(summary["mIoU"], abs=0.005)
        assert float(row[3]) == pytest.approx(summary["boundary_f"]["3px"]["mBF"], abs=0.005)   # forced on
    assert float(cells[3][4]) > float(cells[2][4])            # GALD adds its GA and LD modules to the FCN
    args = train.parse_args(["--method", "fcn"] + COMPARE)    # the FCN's GFLOPs by hand: one 32x32 image
    args.num_classes = len(common.SYNTHETIC_CLASSES)
    fcn = train.METHODS["fcn"][1](args)
    assert rows[0]["GFLOPs"] == pytest.approx(sum(conv_flops(fcn, torch.randn(1, 3, 32, 32), False)) / 1e9, rel=1e-9)
    assert float(cells[2][5]) == pytest.approx(rows[0]["GFLOPs"], abs=0.005)


def test_compare_methods_rejects_method_flags_and_unknown_methods(tmp_path):
    with pytest.raises(SystemExit):                           # --head-channels belongs to fcn, not to the comparison
        train.main(["--compare-methods", "fcn", "--head-channels", "8"] + COMPARE)
    with pytest.raises(common.InputError, match="nope"):
        train.main(["--compare-methods", "fcn,nope"] + COMPARE + ["--out", str(tmp_path)])


def test_against_paper_puts_each_row_beside_the_paper_with_the_right_ratios(monkeypatch, capsys):
    """A cost table of three FCN rows (head widths 8, 16, 32): parameters read as absolute, GFLOPs
    relative to the first row, peak memory added over it (the paper's figure is the addition, as
    printed); each cell against the rows' own figures."""
    paper = dict(title="Table X", flags=["--crop-size", "32"],
                 quantities={"params (M)": ("params_total", "absolute"), "GFLOPs": ("gflops_forward", "relative"),
                             "memory (MiB)": ("forward_peak_mib", "added")},
                 rows=[("narrow", ["--head-channels", "8"], {"params (M)": 10.0, "GFLOPs": 2.0, "memory (MiB)": 100}),
                       ("mid", ["--head-channels", "16"], {"params (M)": 12.0, "GFLOPs": 3.0}),
                       ("wide", ["--head-channels", "32"], {"params (M)": 20.0, "GFLOPs": 4.0, "memory (MiB)": 50})])
    monkeypatch.setitem(paper_costs.PAPER_COSTS, "fcn", paper)
    _, report = train.main(BENCH + ["--against-paper"])
    rows = report["rows"]
    assert [r["params_head"] > 0 for r in rows] == [True] * 3 and rows[0]["params_total"] < rows[2]["params_total"]
    cells = {tuple(line.split(" | ")[:2]): line.split(" | ")[2:] for line in report["table"].splitlines()[4:]}
    fmt = lambda v: f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
    ours = rows[2]["params_total"] / 1e6
    assert cells[("| wide", "params (M)")] == [fmt(20.0), fmt(ours), fmt(ours / 20.0) + " |"]
    relative = rows[1]["gflops_forward"] / rows[0]["gflops_forward"]
    assert cells[("| mid", "GFLOPs, relative to narrow")] == [fmt(1.5), fmt(relative), fmt(relative / 1.5) + " |"]
    added = rows[2]["forward_peak_mib"] - rows[0]["forward_peak_mib"]
    assert cells[("| wide", "memory (MiB), added over narrow")] == [fmt(50), fmt(added), fmt(added / 50) + " |"]
    assert ("| mid", "memory (MiB), added over narrow") not in cells                # the paper gives none
    assert cells[("| mid", "params (M)")][0] == fmt(12.0)
    assert report["table"] in capsys.readouterr().out


def test_against_paper_without_a_table_says_so():
    with pytest.raises(common.InputError, match="fcn has no cost table of its paper"):
        train.main(BENCH + ["--against-paper"])
