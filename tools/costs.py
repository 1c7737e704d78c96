"""Costs of a model: parameters, FLOPs, peak memory and time (train.py --benchmark), the paper's
cost table beside ours (--against-paper), --compare-methods and its table, and torch.compile (--compile).

    python train.py --method galdv2 --backbone resnet50 --crop-size 512 --benchmark --batch-size 1

FLOPs are torch.utils.flop_counter's count (convolutions and matrix products, 2 per multiply-add).
Memory on CUDA is the allocator's peak; on CPU the bytes of live tensors (LiveTensorBytes), the same
quantity counted in the dispatcher.
"""
import json
import os
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import common
from tools import paper_costs, progress


def add_args(parser):
    g = parser.add_argument_group("costs and comparison")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--benchmark", action="store_true",
                      help="print parameters, GFLOPs, time and peak memory of --method on a random "
                           "--batch-size x --crop-size input, then stop (no dataset needed)")
    mode.add_argument("--compare-methods", metavar="M1,M2,...",
                      help="train and evaluate each method with the same flags; write OUT/comparison.md")
    g.add_argument("--against-paper", action="store_true",
                   help="with --benchmark: measure every row of the method's cost table in its paper "
                        "(its PAPER_COSTS) and print ours beside the paper's, with the ratio")
    g.add_argument("--benchmark-iters", type=common.ranged(int, 1), default=5,
                   help="timed calls (the median is reported)")
    g.add_argument("--benchmark-warmup", type=common.ranged(int, 0), default=2, help="untimed calls before them")
    g.add_argument("--num-classes", type=common.ranged(int, 1), default=19,
                   help="class count of --benchmark's random target (training uses the dataset's)")


def parameter_counts(model):
    """{'total', 'backbone', 'head'}: the model's parameters, model.backbone's, and the rest's."""
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters())
    return {"total": total, "backbone": backbone, "head": total - backbone}


def count_flops(fn):
    """FLOPs of one call of fn(), as torch.utils.flop_counter counts them: convolutions and matrix
    products (the attention of NL, CGNL, Denoised NL, S&F and HMSA's heads included), 2 per
    multiply-add; element-wise ops, pooling and resizing are free, and so is attention computed with
    element-wise products. LDv2 is counted as its three 1x1 convolutions (Q, K, V) alone; left out are
    its k*k logits per pixel, each a C'-wide dot product, and its weighted sum of k*k C-wide values:
    k*k (C' + C) multiply-adds, 2 k*k (C' + C) FLOPs per pixel (the softmax aside). At a 65 x 65 map
    with k = 5 and C = 512 that is 0.22 GFLOPs at the default C' = C (0.12 at C' = 64)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active and not yet freed: the CPU stand-in
    for torch.cuda.max_memory_allocated (the CPU allocator keeps no statistics). An output that
    shares an input's storage (a view, an in-place op) is no new memory; a storage counts until it
    is freed (a weakref on it), whoever holds it (autograd's saved tensors included). Buffers that
    kernels allocate internally, outside torch's dispatcher, are not seen."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = set(), 0, 0

    def _freed(self, key, nbytes):
        self.live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {storage_key(t) for t in tensors_in((args, kwargs))}
        for t in tensors_in(out):
            key = storage_key(t)
            if key is None or key in inputs or key in self.live:
                continue
            storage = t.untyped_storage()
            self.live.add(key)
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


def tensors_in(x):
    """The tensors of a nest of lists, tuples and dicts (an op's arguments or outputs)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tensors_in(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors_in(v)]
    return []


def storage_key(t):
    """The address of a tensor's storage, or None (not a tensor, no storage, or an empty one)."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return storage.data_ptr() if storage.nbytes() > 0 else None


def peak_memory(fn, device, held=()):
    """Peak bytes of live tensors during fn(), the tensors alive before included: on CUDA the
    allocator's peak (reset first); on CPU the bytes of `held` (what is alive before: weights,
    inputs) plus the peak of the tensors fn() creates (LiveTensorBytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    storages = {storage_key(t): t.untyped_storage().nbytes() for t in held if storage_key(t) is not None}
    with LiveTensorBytes() as live:
        fn()
    return sum(storages.values()) + live.peak


def median_seconds(fn, iters, warmup, device, after_each=lambda: None):
    """Median wall time of fn() over `iters` calls, after `warmup` untimed ones (CUDA synchronised);
    after_each() runs after each call, untimed."""
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
        after_each()
    return statistics.median(times)


def compile_forward(model, log=print):
    """--compile: model.forward becomes torch.compile(model.forward), in place, so that every call
    (train step, predict, sliding windows) runs compiled while the state_dict and model.loss stay
    as they are (the loss is never compiled). torch compiles at the first call; if that fails (no
    C++ compiler, an unsupported op or Python), the model says why and runs eagerly from then on (at
    worst the BN statistics of the layers already run see that batch twice). Input errors pass through."""
    eager = model.forward
    fallback = lambda e: log(f"--compile: torch.compile failed ({type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0][:300]}); running eagerly instead")
    try:
        compiled = torch.compile(eager)
    except Exception as e:                                     # e.g. a Python version dynamo does not support
        fallback(e)
        return model

    def forward(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except common.InputError:
            raise
        except Exception as e:
            fallback(e)
            del model.forward                                  # back to the class's own forward
            return eager(*args, **kwargs)

    model.forward = forward
    return model


def is_compiled(model):
    """True while compile_forward's compiled forward is in place (False after a fallback)."""
    return "forward" in vars(model)


# ----------------------------------------------------------------------------------------------
# --benchmark


def random_batch(args, device, batch_size):
    """A random image batch of --crop-size and a random target of --num-classes: no dataset needed."""
    H, W = args.crop_size
    x = torch.randn(batch_size, 3, H, W, device=device)
    y = torch.randint(args.num_classes, (batch_size, H, W), device=device)
    return (x.contiguous(memory_format=torch.channels_last) if args.channels_last else x), y


def inference(model, x, args):
    """The evaluation forward as the eval flags say (--eval-mode, --eval-scales, --flip), as a call."""
    def call():
        model.eval()
        return common.infer_as_flagged(model, x, x.shape[-2:], args)
    return call


def training_step(model, x, y, args):
    """A training step without the optimiser: forward in training mode, the loss, backward."""
    def call():
        model.train()
        model.zero_grad(set_to_none=True)
        with common.autocast(args.amp, x.device):
            outputs = model(x)
        model.loss(outputs, y)["total"].backward()
    return call


def benchmark(model, args, device, say=print):
    """Parameters, forward GFLOPs (eval flags applied) and training-step GFLOPs, median times and
    peak memory of `model` on a random --batch-size x 3 x --crop-size input. FLOPs and memory are
    measured eagerly; the times with --compile when it is given. A model that cannot train on this
    batch (BatchNorm after a global pooling at batch 1) gets the forward figures only."""
    x, y = random_batch(args, device, args.batch_size)
    phases = {"forward": inference(model, x, args), "train_step": training_step(model, x, y, args)}
    r = {"method": args.method, "backbone": args.backbone, "input": [args.batch_size, 3, *args.crop_size],
         "eval": f"{args.eval_mode}, scales {' '.join(map(str, args.eval_scales))}" + ", flip" * args.flip,
         "amp": args.amp, "channels_last": args.channels_last, "device": str(device),
         **{f"params_{k}": v for k, v in parameter_counts(model).items()}}
    calls = 2 + args.benchmark_warmup + args.benchmark_iters                  # per phase: FLOPs, memory, times
    bar = progress.Progress(f"benchmark {args.method}", len(phases) * calls)
    for name in list(phases):
        bar.what = f"benchmark {args.method}: {name.replace('_', ' ')} FLOPs"
        try:
            r[f"gflops_{name}"] = count_flops(phases[name]) / 1e9
        except ValueError as e:                               # "Expected more than 1 value per channel"
            say(f"benchmark: the {name.replace('_', ' ')} fails at --batch-size {args.batch_size} ({e}): "
                f"its figures are left empty")
            r[f"gflops_{name}"], r[f"{name}_peak_mib"], r[f"{name}_ms"] = None, None, None
            bar.total -= calls - 1
            del phases[name]
        bar.update()
    held = [*model.parameters(), *model.buffers(), x, y]
    for name, fn in phases.items():
        bar.what = f"benchmark {args.method}: {name.replace('_', ' ')} peak memory"
        model.zero_grad(set_to_none=True)
        r[f"{name}_peak_mib"] = peak_memory(fn, device, held) / 2 ** 20
        bar.update()
    if args.compile:
        compile_forward(model, log=say)
    for name, fn in phases.items():
        bar.what = f"benchmark {args.method}: {name.replace('_', ' ')} time"
        r[f"{name}_ms"] = 1000 * median_seconds(fn, args.benchmark_iters, args.benchmark_warmup, device, bar.update)
    r["compiled"] = is_compiled(model)
    r["memory"] = "CUDA allocator peak" if device.type == "cuda" else "live CPU tensors (eager)"
    say(benchmark_table(r))
    say(json.dumps(r))
    return r


def benchmark_table(r):
    """The benchmark's figures as a Markdown table (n/a where a phase could not run)."""
    M = lambda n: f"{n / 1e6:.2f}M"
    f = lambda v, fmt: "n/a" if v is None else fmt.format(v)
    rows = [("input", "x".join(map(str, r["input"])) + f" on {r['device']}, amp {r['amp']}, channels_last "
             f"{r['channels_last']}, compiled {r['compiled']}"),
            ("parameters: total = backbone + head", f"{M(r['params_total'])} = {M(r['params_backbone'])} + "
             f"{M(r['params_head'])}"),
            (f"forward GFLOPs (eval: {r['eval']})", f(r["gflops_forward"], "{:.2f}")),
            ("training step GFLOPs (forward + backward)", f(r["gflops_train_step"], "{:.2f}")),
            ("forward time (median)", f(r["forward_ms"], "{:.1f} ms")),
            ("training step time (median, no optimiser step)", f(r["train_step_ms"], "{:.1f} ms")),
            (f"peak memory: forward / training step ({r['memory']})",
             f"{f(r['forward_peak_mib'], '{:.0f}')} / {f(r['train_step_peak_mib'], '{:.0f}')} MiB")]
    return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


# ----------------------------------------------------------------------------------------------
# --against-paper: a method's table of tools/paper_costs.py (its docstring gives the format)


def against_paper(args, argv, parse, build, device, say=print):
    """--benchmark --against-paper: every row of the method's table in tools/paper_costs.py (its
    paper's costs) benchmarked with the table's flags, then the command line's `argv` (which may
    override them: --amp, a smaller --backbone), then the row's own; parse(argv) gives a row's
    flags, build(flags) its model. Returns {'table': the Markdown table, 'rows': each row's figures}."""
    paper = paper_costs.PAPER_COSTS.get(args.method)
    if paper is None:
        raise common.InputError(f"--against-paper: {args.method} has no cost table of its paper "
                                f"(tools/paper_costs.py has {', '.join(paper_costs.PAPER_COSTS)})")
    results = []
    for label, flags, _ in paper["rows"]:
        row_args = parse(paper["flags"] + [a for a in argv if a != "--against-paper"] + flags)
        say(f"== {label}: {' '.join(paper['flags'] + flags)}")
        results.append(benchmark(build(row_args), row_args, device, say))
    table = against_paper_table(paper, results)
    say(table)
    return {"table": table, "rows": results}


def figure(r, key):
    """One benchmark figure; parameters in millions."""
    value = r.get(key)
    return None if value is None else value / 1e6 if key.startswith("params") else value


def against_paper_table(costs, results):
    """The paper's cost table with ours beside it: one Markdown row per (row, quantity)."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
    first_label, _, first_paper = costs["rows"][0]
    lines = [f"{costs['title']}", "", "| row | quantity | paper | ours | ours / paper |", "|---|---|---|---|---|"]
    for (label, _, paper), r in zip(costs["rows"], results):
        for name, (key, mode) in costs["quantities"].items():
            if mode == "added" and (r is results[0] or name not in paper):
                continue                                       # nothing to put beside: the reference, a row without it
            ours, theirs = figure(r, key), paper.get(name)
            if mode != "absolute":
                ours_ref, theirs_ref = figure(results[0], key), first_paper.get(name)
                if mode == "relative":
                    ours = None if ours is None or not ours_ref else ours / ours_ref
                    theirs = None if theirs is None or not theirs_ref else theirs / theirs_ref
                else:                                          # papers print the addition itself: "+0.4M"
                    ours = None if ours is None or ours_ref is None else ours - ours_ref
                name = f"{name}, {'relative to' if mode == 'relative' else 'added over'} {first_label}"
            ratio = None if ours is None or not theirs else ours / theirs
            lines.append(f"| {label} | {name} | {fmt(theirs)} | {fmt(ours)} | {fmt(ratio)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# --compare-methods: each method trained and evaluated (train.py's run), then one table


def compare_methods(args, runs, run, world, master=True):
    """Train and evaluate each of `runs` (one method's flags each: the same data, backbone, seed and
    iterations) with run(flags) -> (model, metrics); the master process writes OUT/comparison.md.
    Returns the table's rows."""
    rows = []
    for i, run_args in enumerate(runs):
        if master:
            print(f"== compare {i + 1}/{len(runs)}: {run_args.method} ==", flush=True)
        model, metrics = run(run_args)
        rows.append(comparison_row(model, metrics, run_args))
    if master:
        write_comparison(os.path.join(args.out, "comparison.md"), rows, args, world)
    return rows


COMPARISON_COLUMNS = ("method", "mIoU", "aAcc", "BF 3px", "params (M)", "GFLOPs", "train it/s", "eval img/s")
COMPARISON_FORMATS = ("{}",) + ("{:.2f}",) * 7


def comparison_row(model, metrics, args):
    """One line of comparison.md; GFLOPs of one --crop-size image with the eval flags."""
    device = next(model.parameters()).device
    x, _ = random_batch(args, device, 1)
    gflops = count_flops(inference(model, x, args)) / 1e9
    values = (metrics["mIoU"], metrics["aAcc"], metrics["boundary_f"]["3px"]["mBF"],
              parameter_counts(model)["total"] / 1e6, gflops, metrics["train_it_per_s"],
              metrics["eval_img_per_s"])
    return dict(zip(COMPARISON_COLUMNS, (args.method, *values)))


def write_comparison(path, rows, args, world):
    """OUT/comparison.md: the settings in one paragraph, then one table row per method."""
    (H, W), scales = args.crop_size, " ".join(map(str, args.eval_scales))
    settings = (f"{args.dataset}, {args.backbone}, crop {H}x{W}, {args.iters} iterations of batch {args.batch_size} "
                f"x {world} process(es), seed {args.seed}; evaluation {args.eval_mode}, scales {scales}"
                f"{', flip' if args.flip else ''}. Each method's own flags at their defaults. BF 3px: boundary "
                f"F-score within 3 pixels. GFLOPs: one {H}x{W} image through the evaluation forward. "
                f"Speeds include data loading. Run folders: {args.out}/METHOD.")
    lines = ["# Method comparison", "", settings, "",
             "| " + " | ".join(COMPARISON_COLUMNS) + " |", "|" + "---|" * len(COMPARISON_COLUMNS)]
    for row in rows:
        cells = ("n/a" if row[c] is None else fmt.format(row[c])           # n/a: a speed not recorded
                 for c, fmt in zip(COMPARISON_COLUMNS, COMPARISON_FORMATS))
        lines.append("| " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
