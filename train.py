"""Train and evaluate any method of segpapers: one plain loop, one code path.

    python train.py --method fcn --dataset synthetic --backbone resnet18 --iters 300      # CPU or 1 GPU
    torchrun --standalone --nproc_per_node=8 train.py --method galdv1 --dataset cityscapes ...  # DDP
    python train.py --method galdv1 --help                                              # its flags
    python train.py --eval-only --checkpoint runs/galdv1_cityscapes/best.pt --data-root DIR
    python train.py --method galdv2 --backbone resnet50 --crop-size 512 --benchmark --batch-size 1  # costs
    python train.py --compare-methods fcn,galdv1,galdv2 --dataset synthetic --backbone resnet18 --iters 300
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB \
        train.py --resume --out runs/galdv1 --method galdv1 ...        # the same line on every node
    python train.py --resume --out runs/galdv1                           # after a stop: the flags of last.pt

Under torchrun (RANK is set, one process included) this is DDP: NCCL + SyncBatchNorm on CUDA, gloo + plain BN on CPU
(SyncBatchNorm does not run on CPU). Only rank 0 prints and writes. Outputs in --out: metrics.jsonl,
summary.json (last evaluation), last.pt (everything --resume needs) and best.pt (the weights and the
flags), both written atomically. A checkpoint carries its flags: --eval-only and --predict with
--checkpoint need no model or data flags, --resume --out DIR no other flag. SIGTERM or SIGINT (a time
limit, scancel, Ctrl-C) lets the step finish; every rank stops after the same step, rank 0 writes
last.pt, one line says so, and the exit code is 128 + the signal's number. The extras (--benchmark, --against-paper, --compare-methods,
--predict, --save-maps, --boundary-f, --levels, --class-uniform, --extra-data) and the crash-safety
helpers live in tools/; this file only calls them.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import denoised_nl
import galdv1
import galdv2
import hier_ms_attn
import specialize_fuse
from tools import boundary_f, carried_flags, check_data, costs, crash_safety, levels, predict, progress, sampling

# Every method: (add its argument group, build its model). train.py never branches on the name.
METHODS = {
    "fcn": (common.add_fcn_args, common.build_fcn),
    "galdv1": (galdv1.add_args, galdv1.build_model),
    "galdv2": (galdv2.add_args, galdv2.build_model),
    "denoised_nl": (denoised_nl.add_args, denoised_nl.build_model),
    "specialize_fuse": (specialize_fuse.add_args, specialize_fuse.build_model),
    "hier_ms_attn": (hier_ms_attn.add_args, hier_ms_attn.build_model),
}
EXTRAS = (sampling, boundary_f, levels, predict, costs, check_data)       # each adds its own argument group


# ----------------------------------------------------------------------------------------------
# Arguments


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows each flag's default; a flag whose default is
    None (its help says what happens without it) shows none."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=["synthetic", *common.DATASETS],
                   help="what to train on (README: Datasets)")
    g.add_argument("--data-root", help="dataset folder in the layout README.md describes")
    g.add_argument("--train-split", default="train", help="split trained on; 'train+val' joins two")
    g.add_argument("--val-split", default="val", help="split evaluated (val or test)")
    g.add_argument("--crop-size", type=common.ranged(int, 1), nargs="+", default=[512], help="train crop: S or H W")
    g.add_argument("--scale-range", type=common.ranged(float, 0, low_open=True), nargs=2, default=[0.5, 2.0],
                   help="random scale range")
    g.add_argument("--jitter", type=common.ranged(float, 0, 1), default=0.25,
                   help="photometric jitter strength (0 = off)")
    g.add_argument("--blur", action="store_true", help="Gaussian blur of every crop (HMSA's Mapillary recipe)")
    g.add_argument("--workers", type=common.ranged(int, 0), default=2, help="data loader processes per GPU/process")
    g.add_argument("--synthetic-size", type=common.ranged(int, 16), default=128, help="synthetic image side")
    g.add_argument("--synthetic-length", type=common.ranged(int, 1), default=2000, help="synthetic training images")
    g.add_argument("--synthetic-val-length", type=common.ranged(int, 1), default=50, help="synthetic evaluation images")
    g.add_argument("--max-image-pixels", type=common.ranged(int, 1), default=common.DEFAULT_IMAGE_PIXELS,
                   help="larger images are refused (Pillow's guard against decompression bombs): raise it "
                        "deliberately for large tiles you trust")


def add_model_args(parser):
    g = parser.add_argument_group("model (a checkpoint carries these)")
    g.add_argument("--backbone", default="resnet50",
                   choices=["resnet18", "resnet34", "resnet50", "resnet101", *common.HRNET_LAYOUTS],
                   help="resnet*: dilated ResNet (resnet50 and up are slow on a CPU: resnet18 there); "
                        "hrnet48/32/18/18-small: HRNetV2-W48/W32/W18/W18-small-v1 (stride-4 features; for "
                        "specialize_fuse and hier_ms_attn)")
    g.add_argument("--stem", default="tv", choices=["tv", "deep"], help="tv: 7x7 (torchvision keys); deep: 3x3 x3")
    g.add_argument("--output-stride", type=int, default=8, choices=[8, 16, 32],
                   help="a ResNet's stride: 8 dilates layer3 and layer4, 16 layer4 only, 32 none")
    g.add_argument("--multi-grid", type=common.ranged(int, 1), nargs="+",
                   help="layer4 dilation multipliers, e.g. 1 2 4 (default: none)")
    g.add_argument("--dilation-style", default="pspnet", choices=common.DILATION_STYLES,
                   help="pspnet: every block of a dilated stage dilated (the authors' trunks); torchvision: "
                        "the first block keeps the previous dilation")


def add_training_args(parser):
    g = parser.add_argument_group("optimisation")
    g.add_argument("--pretrained", help="local ImageNet checkpoint for the backbone (nothing is downloaded)")
    g.add_argument("--batch-size", type=common.ranged(int, 1), default=8,
                   help="images per process (global = this x processes)")
    g.add_argument("--iters", type=common.ranged(int, 1), default=1000, help="training iterations")
    g.add_argument("--lr", type=common.ranged(float, 0), default=0.01, help="base learning rate")
    g.add_argument("--momentum", type=common.ranged(float, 0, 1), default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=common.ranged(float, 0), default=5e-4, help="SGD weight decay")
    g.add_argument("--poly-power", type=common.ranged(float, 0), default=0.9, help="power of the poly schedule")
    g.add_argument("--warmup-iters", type=common.ranged(int, 0), default=0, help="linear warm-up iterations")
    g.add_argument("--freeze-bn", action="store_true",
                   help="keep every BatchNorm's statistics and affine fixed (GALD v2 Sec. IV-E, the coarse-data stage)")
    g.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast (fp16 with GradScaler)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on tensor cores)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (falls back to eager, saying why, if it fails)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentation")


def add_run_args(parser):
    g = parser.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=common.ranged(int, 1),
                   help="iterations between evaluations (default: at the end)")
    g.add_argument("--eval-mode", default="whole", choices=["whole", "slide"], help="whole image or sliding window")
    g.add_argument("--eval-crop", type=common.ranged(int, 1), default=512, help="sliding-window size")
    g.add_argument("--eval-stride", type=common.ranged(int, 1), default=341, help="sliding-window stride")
    g.add_argument("--eval-scales", type=common.ranged(float, 0, low_open=True), nargs="+", default=[1.0],
                   help="e.g. 0.5 1.0 2.0")
    g.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    g.add_argument("--out", help="output folder (default runs/METHOD_DATASET; with --checkpoint, "
                                 "eval-SPLIT/ or predict/ beside it)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt if it exists, with its flags (a flag given replaces its value)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a run, replacing its files")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint and stop")
    g.add_argument("--checkpoint", help="a train.py checkpoint: evaluated (--eval-only), used to label "
                                        "(--predict) or trained on from (its flags are then not taken)")
    g.add_argument("--finetune", action="store_true",
                   help="with --checkpoint in training: layers it lacks or holds in another shape start fresh")
    g.add_argument("--save-every", type=common.ranged(int, 1), default=1000, help="iterations between last.pt writes")
    g.add_argument("--log-every", type=common.ranged(int, 1), default=20, help="iterations between progress lines")


def build_parser(method=None):
    """The common flags, the extras' groups, and the method's own group when one is given.
    parser.model_flags: the flags that define the model, which a checkpoint carries."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--method", default="fcn", choices=list(METHODS), help="the paper to run")
    add_data_args(parser)
    first_model_flag = len(parser._actions)
    add_model_args(parser)
    model_flags = ["method", *(a.dest for a in parser._actions[first_model_flag:])]
    add_training_args(parser)
    add_run_args(parser)
    for extra in EXTRAS:
        extra.add_args(parser)
    if method:
        first_method_flag = len(parser._actions)
        METHODS[method][0](parser)
        model_flags += [a.dest for a in parser._actions[first_method_flag:]]
    parser.model_flags = model_flags
    return parser


def parse_args(argv=None):
    """Two passes. The first reads --method (or the checkpoint's) to pick the parser: the common
    flags and that method's group (none with --compare-methods: every compared method keeps its own
    defaults). The second parses everything, starting from the flags a checkpoint carries
    (tools/carried_flags.py: --resume takes last.pt's, --eval-only / --predict the model's and what
    it was evaluated on; a flag given wins, but a model flag must then agree with the checkpoint)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    known = carried_flags.pre_parse(argv)
    source, saved = carried_flags.source(known)
    method = known.method or saved.get("method") or "fcn"
    if method not in METHODS and not known.method:
        raise common.InputError(f"{source} was written by --method {method}, which this version does not have "
                                f"(it has {', '.join(METHODS)})")
    parser = build_parser(None if known.compare_methods or method not in METHODS else method)
    taken = carried_flags.taken(parser, known, saved, source)
    args = parser.parse_args(argv, argparse.Namespace(**taken))
    if len(args.crop_size) > 2:
        parser.error("argument --crop-size: takes one or two numbers")
    args.crop_size = args.crop_size * 2 if len(args.crop_size) == 1 else args.crop_size
    given = carried_flags.given(parser, argv)
    if known.eval_only or known.predict:
        carried_flags.check_agreement(args, parser.model_flags, saved, source)
    args.out = args.out or default_out(args)
    check_flags(args, parser)
    carried_flags.check_taken(args, source, saved, set(taken) - given)
    if source and not known.resume:
        carried_flags.note_unrecorded(args, source, saved, given)
    return args


def default_out(args):
    """runs/METHOD_DATASET for training; beside the checkpoint for --eval-only and --predict, so that
    they never write into the training run's summary.json."""
    if args.checkpoint and (args.eval_only or args.predict):
        folder = os.path.dirname(os.path.abspath(args.checkpoint))
        return os.path.join(folder, "predict" if args.predict else evaluation_folder(args))
    return os.path.join("runs", f"{'compare' if args.compare_methods else args.method}_{args.dataset}")


def evaluation_folder(args):
    """eval-SPLIT, named further by what differs from one whole image (eval-val-scales0.75,1,1.25-flip),
    so that evaluations of one checkpoint in other ways keep their own summary.json."""
    scales = [] if list(args.eval_scales) == [1.0] else ["scales" + ",".join(f"{s:g}" for s in args.eval_scales)]
    return "-".join([f"eval-{args.val_split}", *scales, *["flip"] * args.flip,
                     *[args.eval_mode] * (args.eval_mode != "whole")])


def check_flags(args, parser):
    """Flag combinations that cannot work, refused before any data or model is touched. --stem,
    --output-stride, --multi-grid and --dilation-style shape a ResNet: with an HRNet --backbone
    (fixed strides 4, 8, 16, 32) a value other than the default is refused."""
    if args.eval_only and not args.checkpoint:
        raise common.InputError("--eval-only needs --checkpoint (the trained model)")
    if args.eval_only and args.predict:
        raise common.InputError("--eval-only and --predict are two runs, each writing beside the checkpoint "
                                "(eval-SPLIT/, predict/): run one, then the other")
    if args.resume and args.overwrite:
        raise common.InputError("--resume continues the run in --out and --overwrite replaces it: give one")
    if args.predict and not args.checkpoint:
        raise common.InputError("--predict needs --checkpoint (the trained model)")
    if args.finetune and (args.eval_only or args.predict or not args.checkpoint):
        raise common.InputError("--finetune starts training from --checkpoint: it needs --checkpoint and "
                                "cannot go with --eval-only or --predict (which need every layer trained)")
    if args.predict and args.label_ids and args.dataset != "cityscapes":
        raise common.InputError("--label-ids writes Cityscapes labelIds: it needs --dataset cityscapes")
    if args.eval_mode == "slide":
        common.check_window(args.eval_crop, args.eval_stride)
    levels.check_args(args)
    for dest in ("stem", "output_stride", "multi_grid", "dilation_style"):
        if args.backbone in common.HRNET_LAYOUTS and getattr(args, dest) != parser.get_default(dest):
            raise common.InputError(f"--{dest.replace('_', '-')} shapes a dilated ResNet and means nothing with "
                                    f"--backbone {args.backbone} (HRNetV2's strides are fixed: 4, 8, 16, 32)")


def compared_runs(args):
    """The flags of each --compare-methods run: the common flags as given, the method's own at their
    defaults, the boundary F-score on, OUT/METHOD as its run folder."""
    methods = [m.strip() for m in args.compare_methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise common.InputError(f"--compare-methods: unknown method(s) {unknown}; choose from {list(METHODS)}")
    return [argparse.Namespace(**{**vars(build_parser(method).parse_args([])), **vars(args), "method": method,
                                  "compare_methods": None, "boundary_f": True, "out": os.path.join(args.out, method)})
            for method in methods]


# ----------------------------------------------------------------------------------------------
# Processes, the model, checkpoints


@dataclass(frozen=True)
class Process:
    """This process: its rank, the number of processes (world), its device, and whether torchrun
    started it (distributed: DDP, with SyncBatchNorm on CUDA, at any world size, one process included)."""
    rank: int
    world: int
    device: torch.device
    distributed: bool = False

    @property
    def master(self):
        """Rank 0, the one process that prints and writes."""
        return self.rank == 0

    def say(self, line):
        if self.master:
            print(line, flush=True)


def setup_distributed(device_arg):
    """torchrun sets RANK: DDP, NCCL on CUDA, gloo on CPU; otherwise one plain process."""
    if "RANK" not in os.environ:
        return Process(0, 1, torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu")))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and device_arg != "cpu":
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Process(rank, world, device, distributed=True)


def new_model(args, device):
    """The model of --method on `device`, its weights drawn from --seed (NHWC with --channels-last)."""
    torch.manual_seed(args.seed)
    model = METHODS[args.method][1](args).to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def build(args, proc, resuming=False):
    """new_model with --freeze-bn, --compile and the weights of --checkpoint applied. A resumed run
    (`resuming`: last.pt replaces every weight) reads neither --pretrained nor --checkpoint."""
    if resuming:
        args = argparse.Namespace(**{**vars(args), "pretrained": None, "checkpoint": None})
    model = new_model(args, proc.device)
    for m in batchnorms(model) if args.freeze_bn else []:
        m.requires_grad_(False)                                # --freeze-bn: affine fixed too
    if args.compile:
        costs.compile_forward(model, log=proc.say)
    if args.checkpoint:
        common.load_weights(model, args.checkpoint, args.finetune, can_finetune=not (args.eval_only or args.predict))
    return model


PATH_FLAGS = ("data_root", "extra_data", "pretrained", "checkpoint", "out")


def saved_flags(args):
    """The flags a checkpoint records: every parsed flag, its paths made absolute, so that the file
    is evaluated or resumed from any folder."""
    flags = vars(args).copy()
    for dest in PATH_FLAGS:
        if flags.get(dest):
            flags[dest] = os.path.abspath(flags[dest])
    return flags


def save_checkpoint(path, model, args, iteration, best_miou, optimizer=None, scaler=None):
    """With an optimizer (last.pt) everything --resume needs; without (best.pt) the weights and the
    flags. Written atomically (tools/crash_safety.py). The CUDA RNG state is that of the model's GPU
    (None on CPU)."""
    state = {"model": model.state_dict(), "iteration": iteration, "best_miou": best_miou, "args": saved_flags(args)}
    if optimizer is not None:
        device = next(model.parameters()).device
        state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng_cpu=torch.get_rng_state(),
                     rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    crash_safety.atomic_save(state, path)


RESUME_KEYS = ("model", "optimizer", "scaler", "iteration", "best_miou", "rng_cpu", "rng_cuda")


def resume(path, raw_model, optimizer, scaler, proc):
    """Continue last.pt: weights, optimiser, GradScaler (kept fresh when the saved state is empty:
    the run had --amp off or bf16), RNG state. Returns (iteration, best mIoU)."""
    state = common.load_checkpoint(path)
    lacking = [k for k in RESUME_KEYS if k not in state]
    if lacking:
        raise common.InputError(f"{path} is not a last.pt of this project (it lacks {', '.join(lacking)}): "
                                f"move it away or use another --out")
    saved = state.get("args") or {}
    try:
        common.load_state(raw_model, common.weights_in(state, path), path, can_finetune=False)
        optimizer.load_state_dict(state["optimizer"])
    except (common.InputError, ValueError) as e:
        was = f" (it was written by --method {saved.get('method')} --backbone {saved.get('backbone')})" if saved else ""
        raise common.InputError(f"cannot resume: {e}{was}") from None
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if proc.device.type == "cuda" and isinstance(state["rng_cuda"], torch.Tensor):
        torch.cuda.set_rng_state(state["rng_cuda"], proc.device)
    proc.say(f"resumed from {path} at iteration {state['iteration']}")
    return state["iteration"], state["best_miou"]


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, dataset, args, proc):
    """Metrics over the whole split: each rank takes images rank, rank + world, ... (none twice),
    the confusion matrices (and the extras' counts) are summed over ranks. Under DDP every rank
    first takes rank 0's buffers (plain BN on CPU keeps per-rank running statistics). Leaves the
    model in eval mode."""
    if proc.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    model.eval()
    tic, extras = time.time(), []                              # tools/: what an evaluation adds
    if args.boundary_f:
        extras.append(boundary_f.BoundaryF(dataset.num_classes, dataset.class_names, proc.device))
    if args.levels:
        extras.append(levels.LevelTables(model, dataset.num_classes, dataset.class_names, args.amp, proc.device))
    if args.save_maps:
        extras.append(predict.MapSaver(model, dataset, args))
    K, indices = dataset.num_classes, range(proc.rank, len(dataset), proc.world)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                         num_workers=args.workers, worker_init_fn=crash_safety.die_with_parent)
    cm = torch.zeros(K, K, dtype=torch.long, device=proc.device)
    views = f"scales {' '.join(map(str, args.eval_scales))}{' + flip' * args.flip}, {args.eval_mode}"
    bar = progress.Progress(f"evaluating {dataset.name} ({views}{', rank 0' * (proc.world > 1)})", len(indices),
                            proc.master)
    for index, (image, label) in zip(indices, loader):
        image, label = image.to(proc.device), label.to(proc.device)
        if args.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        pred = common.infer_as_flagged(model, image, label.shape[-2:], args).argmax(1)
        cm += common.confusion_matrix(pred, label, K)
        for extra in extras:
            extra.add(index, image, pred, label)
        bar.update()
    if proc.distributed:
        dist.all_reduce(cm)
    metrics = common.segmentation_metrics(cm.cpu(), dataset.class_names)
    for extra in extras:
        metrics.update(extra.result(proc.world))
    metrics["eval_img_per_s"] = round(len(dataset) / (time.time() - tic), 3)
    return metrics


def check_labels(dataset, proc):
    """One pass over the evaluation labels before training, so that a bad label stops the run now,
    not at its first evaluation hours later."""
    bar = progress.Progress(f"checking {dataset.name} evaluation labels", len(dataset), proc.master)
    for i in range(len(dataset)):
        dataset.load_label(i)
        bar.update()


def log(proc, args, record, line=None):
    """Rank 0: print the line and append the record to OUT/metrics.jsonl."""
    if proc.master:
        if line:
            print(line, flush=True)
        crash_safety.append_json_line(os.path.join(args.out, "metrics.jsonl"), record)


def write_summary(args, metrics, iteration):
    summary = {"method": args.method, "dataset": args.dataset, "iteration": iteration, **metrics}
    crash_safety.write_json(os.path.join(args.out, "summary.json"), summary)


def record_evaluation(raw_model, val_set, args, iteration, train_speed, proc):
    """Evaluate, then (rank 0) print, append to metrics.jsonl and write summary.json."""
    metrics = evaluate(raw_model, val_set, args, proc)
    metrics["train_it_per_s"] = train_speed
    log(proc, args, {"iter": iteration, **metrics}, f"eval at {iteration}: mIoU {metrics['mIoU']:.2f} "
        f"aAcc {metrics['aAcc']:.2f} mAcc {metrics['mAcc']:.2f}")
    if proc.master:
        write_summary(args, metrics, iteration)
    return metrics


def stored_train_speed(args):
    """train_it_per_s of OUT/summary.json (None without one): a finished run evaluated again."""
    path = os.path.join(args.out, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("train_it_per_s")


# ----------------------------------------------------------------------------------------------
# Training


def train_loader(args, train_set, start_iter, proc):
    """This rank's endless, resumable loader: common.TrainSampler, or tools/sampling.py's mix of
    class-uniform centres and --extra-data. Returns (loader, iterations per epoch)."""
    if sampling.used(args):
        train_set, sampler = sampling.mixed_training_data(args, train_set, start_iter, proc.rank, proc.world)
    else:
        sampler = common.TrainSampler(len(train_set), args.batch_size, proc.rank, proc.world, args.seed, start_iter)
    per_epoch = len(sampler.epoch_items(0)) // sampler.global_batch
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True, generator=torch.Generator(),
        num_workers=args.workers, persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None,
        pin_memory=proc.device.type == "cuda", worker_init_fn=crash_safety.die_with_parent)
    return loader, per_epoch


def set_training_mode(model, freeze_bn):
    """model.train(), with every BatchNorm kept in eval mode under --freeze-bn."""
    model.train()
    for m in batchnorms(model) if freeze_bn else []:
        m.eval()


def next_batch(batches, args, proc):
    """The loader's next (images, labels) on this process's device (NHWC with --channels-last)."""
    images, labels = next(batches)
    images, labels = images.to(proc.device, non_blocking=True), labels.to(proc.device, non_blocking=True)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def train_step(model, raw_model, optimizer, scaler, images, labels, args):
    """One SGD step; returns the loss terms as detached device tensors: nothing here waits for the
    GPU (train() reads them, and checks they are finite, only at logging and saving)."""
    with common.autocast(args.amp, images.device):
        outputs = model(images)
    losses = raw_model.loss(outputs, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["total"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return {k: v.detach() for k, v in losses.items()}


def progress_line(it, args, losses, lr, speed):
    terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
    eta = (args.iters - it - 1) / max(speed, 1e-9)
    return f"it {it + 1}/{args.iters} | {terms} | lr {lr:.2e} | {speed:.2f} it/s | ETA {progress.duration(eta)}"


@dataclass
class Start:
    """Where training begins: last.pt's iteration (0 for a fresh run), the best mIoU so far, and whether
    the evaluation due at that iteration is in metrics.jsonl (a stop may have come before it)."""
    iteration: int = 0
    best: float = -1.0
    evaluated: bool = True


def evaluate_and_keep_best(raw_model, val_set, args, done, speed, proc, best, optimizer, scaler):
    """record_evaluation; a new best mIoU (rank 0) writes best.pt and last.pt. Returns (metrics, best)."""
    metrics = record_evaluation(raw_model, val_set, args, done, speed, proc)
    if proc.master and metrics["mIoU"] > best:
        best = metrics["mIoU"]
        save_checkpoint(os.path.join(args.out, "best.pt"), raw_model, args, done, best)
        save_checkpoint(os.path.join(args.out, "last.pt"), raw_model, args, done, best, optimizer, scaler)
    return metrics, best


def log_progress(proc, args, it, losses, lr, speed, labelled):
    values = {k: v.item() for k, v in losses.items()}
    warning = "" if labelled else " | warning: no labelled pixel in these batches"
    log(proc, args, {"iter": it + 1, "lr": lr, **values}, progress_line(it, args, values, lr, speed) + warning)


def train(args, proc, model, optimizer, scaler, data, start, stop):
    """Iterations start.iteration .. --iters, evaluated every --eval-every and at the end; returns the
    last metrics. last.pt is written every --save-every, before every evaluation, at the end, and on
    SIGTERM / SIGINT after the step in progress (every rank stops after the same one: crash_safety.Stop),
    always after the loss, weights and buffers were checked finite. A resumed run first evaluates what
    its last.pt was due; one that had already finished is evaluated once (its training speed is the
    one its summary.json recorded)."""
    raw_model, (train_set, val_set) = model.module if isinstance(model, DDP) else model, data
    start_iter, best, last = start.iteration, start.best, os.path.join(args.out, "last.pt")
    eval_every, metrics, labelled_in_epoch = args.eval_every or args.iters, None, 0
    if start_iter >= args.iters:
        return record_evaluation(raw_model, val_set, args, start_iter, stored_train_speed(args), proc)
    during = lambda it: f" during the evaluation at iteration {it}: {last} (iteration {it}) is intact; " \
                        f"continue with --resume --out {args.out}"
    if start_iter > 0 and start_iter % eval_every == 0 and not start.evaluated:
        with stop.at_once(during(start_iter)):
            metrics, best = evaluate_and_keep_best(raw_model, val_set, args, start_iter, None, proc, best,
                                                   optimizer, scaler)
    loader, per_epoch = train_loader(args, train_set, start_iter, proc)
    batches, tic, health = iter(loader), time.time(), crash_safety.Health(proc.device)
    said = None                                                # when the last progress line was printed
    set_training_mode(raw_model, args.freeze_bn)
    with stop.deferring():
        for it in range(start_iter, args.iters):
            lr = common.poly_lr(args.lr, it, args.iters, args.poly_power, args.warmup_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = next_batch(batches, args, proc)
            losses = train_step(model, raw_model, optimizer, scaler, images, labels, args)
            health.add(it, losses["total"], labels)
            done, evaluating = it + 1, (it + 1) % eval_every == 0 or it + 1 == args.iters
            signum = stop.agreed(now=evaluating or done % args.save_every == 0)
            saving = evaluating or done % args.save_every == 0 or signum
            if done % args.log_every == 0 or saving or done - start_iter == per_epoch:
                labelled = health.check(args, proc.world, done, raw_model if saving else None)
                labelled_in_epoch += labelled
                if done % args.log_every == 0 or done == args.iters:
                    log_progress(proc, args, it, losses, lr, (done - start_iter) / (time.time() - tic), labelled)
                    said = time.time()
                if done - start_iter == per_epoch and labelled_in_epoch == 0:
                    raise common.InputError(f"a whole epoch ({per_epoch} iterations) of {train_set.name} held no "
                                            f"labelled pixel (every label is {common.IGNORE_INDEX}): nothing trains")
            if proc.master and (said is None or time.time() - said > progress.EVERY_S):   # screen only
                values = {k: v.item() for k, v in losses.items()}
                print(progress_line(it, args, values, lr, (done - start_iter) / (time.time() - tic)), flush=True)
                said = time.time()
            if proc.master and saving:
                save_checkpoint(last, raw_model, args, done, best, optimizer, scaler)
            if signum:
                if proc.distributed:
                    dist.barrier()                             # every rank ends after rank 0 wrote last.pt
                raise crash_safety.Stopped(signum, f" after iteration {done} of {args.iters}: {last} written; "
                                                   f"continue with --resume --out {args.out}")
            if evaluating:
                eval_start = time.time()
                speed = round((done - start_iter) / (eval_start - tic), 3)
                with stop.at_once(during(done)):
                    metrics, best = evaluate_and_keep_best(raw_model, val_set, args, done, speed, proc, best,
                                                           optimizer, scaler)
                set_training_mode(raw_model, args.freeze_bn)
                tic += time.time() - eval_start                # evaluation is not training time
    return metrics


def evaluate_checkpoint(args, proc):
    """--eval-only: the metrics of --checkpoint on the evaluated split, written to OUT/summary.json."""
    train_set, val_set = common.build_datasets(args)
    args.num_classes = train_set.num_classes
    raw_model = build(args, proc)
    metrics = evaluate(raw_model, val_set, args, proc)
    if proc.master:
        print(f"mIoU {metrics['mIoU']:.2f} aAcc {metrics['aAcc']:.2f} mAcc {metrics['mAcc']:.2f}")
        write_summary(args, metrics, None)
        say_written(proc, args.out)
    return raw_model, metrics


def train_run(args, proc, stop):
    """Training, from scratch, --checkpoint or OUT/last.pt (--resume); returns (model, last metrics)."""
    train_set, val_set = common.build_datasets(args)
    args.num_classes = train_set.num_classes
    last, start = os.path.join(args.out, "last.pt"), Start()
    raw_model = build(args, proc, resuming=args.resume and os.path.isfile(last))
    check_labels(val_set, proc)
    model = raw_model
    if proc.distributed:                                       # torchrun, even --nproc_per_node=1
        if proc.device.type == "cuda":
            raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        model = DDP(raw_model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=args.amp == "fp16")
    if args.resume and os.path.isfile(last):
        start.iteration, start.best = resume(last, raw_model, optimizer, scaler, proc)
    if args.resume:                                            # what a resumed run logs again is dropped
        start.evaluated = crash_safety.resume_log(os.path.join(args.out, "metrics.jsonl"), start.iteration,
                                                  rewrite=proc.master)
    if proc.world > 1:
        # each rank its own dropout masks: a seed from (--seed, start iteration, rank), set after the
        # model is built (DDP broadcasts rank 0's weights) and after a resume (the checkpoint holds
        # rank 0's RNG state only); one process keeps the stream of --seed (or of last.pt)
        torch.manual_seed((args.seed * 1000003 + start.iteration) * 1024 + proc.rank)
    n_params = sum(p.numel() for p in raw_model.parameters())
    proc.say(f"writing to {os.path.abspath(args.out)}")
    proc.say(f"{args.method} on {args.dataset}: {n_params / 1e6:.2f}M parameters, {proc.world} process(es)"
             f"{' (DDP)' if isinstance(model, DDP) else ''}, {proc.device}")
    metrics = train(args, proc, model, optimizer, scaler, (train_set, val_set), start, stop)
    say_written(proc, args.out)
    return raw_model, metrics


def say_written(proc, out):
    """'wrote best.pt, maps/, summary.json in OUT' (rank 0): what a run leaves in its folder."""
    written = sorted(name + "/" * os.path.isdir(os.path.join(out, name)) for name in os.listdir(out)
                     if not name.startswith("."))
    proc.say(f"wrote {', '.join(written)} in {out}")


def run(args, proc):
    """Train (or evaluate, or label) as the parsed flags say; returns (model, last metrics). SIGTERM and
    SIGINT end it in one line (crash_safety.Stop): training after its step, with last.pt written."""
    crash_safety.check_out_folder(args.out)
    with crash_safety.out_folder(args.out, proc.master), crash_safety.Stop(proc.device, proc.distributed) as stop:
        if args.predict:                                       # tools/predict.py: no dataset is read
            with stop.at_once(f" during --predict: the labels written so far stay in {args.out}"):
                args.num_classes = len(common.dataset_classes(args.dataset))
                model = build(args, proc)
                return model, predict.predict(model, args, proc.rank, proc.world, proc.device)
        if args.eval_only:
            with stop.at_once(" during --eval-only: nothing was written"):
                return evaluate_checkpoint(args, proc)
        with stop.at_once(f" before training began: {args.out} is as it was"):
            with crash_safety.claim_out_folder(args.out, args.resume, args.overwrite, proc.master):
                return train_run(args, proc, stop)


def main(argv=None):
    """Run as the flags say. Training or evaluation returns (model, last metrics); --predict returns
    (model, images labelled); --benchmark (model, its figures), with --against-paper (None, the table
    and each row's figures); --compare-methods (None, its rows)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    common.allow_image_pixels(args.max_image_pixels)
    proc = setup_distributed(args.device)
    if args.check_data:                                        # tools/check_data.py: every file read once
        return None, check_data.check_data(args, say=proc.say)
    if args.compare_methods:                                   # tools/costs.py: each method trained, one table
        return None, costs.compare_methods(args, compared_runs(args), lambda a: run(a, proc), proc.world, proc.master)
    if args.benchmark and args.against_paper:                  # tools/costs.py: the paper's table beside ours
        return None, costs.against_paper(args, argv, parse_args, lambda a: new_model(a, proc.device), proc.device,
                                         say=proc.say)
    if args.benchmark:                                         # tools/costs.py: parameters, FLOPs, memory, time
        model = new_model(args, proc.device)
        return model, costs.benchmark(model, args, proc.device, say=proc.say)
    return run(args, proc)


def error_message(e):
    """The user's message alone, also when a DataLoader worker wrapped it in its traceback."""
    text = str(e).strip()
    return text.splitlines()[-1].split("InputError: ", 1)[-1] if "Traceback" in text else text


def cli(argv=None):
    """The command line: bad input prints one line (`error: ...`) and exits with 2, no traceback; a
    run stopped by SIGTERM or SIGINT prints one line (rank 0) and exits with 128 + the signal's number."""
    try:
        main(argv)
        return 0
    except common.InputError as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    except crash_safety.Stopped as e:
        if os.environ.get("RANK", "0") == "0":
            print(e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:                                  # Ctrl-C outside a run: parsing, --benchmark
        print("stopped by SIGINT", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
