"""Train and evaluate any method of segpapers: one plain loop, one code path.

    python train.py --method fcn --dataset synthetic --backbone resnet18 --iters 300      # CPU or 1 GPU
    torchrun --standalone --nproc_per_node=8 train.py --method galdv1 --dataset cityscapes ...  # DDP
    python train.py --method galdv1 --help                                              # its flags
    python train.py --method galdv2 --backbone resnet50 --crop-size 512 --benchmark --batch-size 1  # costs
    python train.py --compare-methods fcn,galdv1,galdv2 --dataset synthetic --backbone resnet18 --iters 300

Under torchrun (RANK is set) this is DDP: NCCL + SyncBatchNorm on CUDA, gloo + plain BN on CPU
(SyncBatchNorm does not run on CPU). Only rank 0 prints and writes. Outputs in --out: metrics.jsonl,
summary.json (last evaluation), last.pt and best.pt (written atomically; --resume continues last.pt).
--benchmark needs no dataset: random input of --crop-size. --compare-methods trains each method in
turn in this one process (DDP too) and writes OUT/comparison.md beside the run folders OUT/METHOD.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import denoised_nl
import galdv1
import galdv2
import hier_ms_attn
import specialize_fuse

# Every method: (add its argument group, build its model). train.py never branches on the name.
METHODS = {
    "fcn": (common.add_fcn_args, common.build_fcn),
    "galdv1": (galdv1.add_args, galdv1.build_model),
    "galdv2": (galdv2.add_args, galdv2.build_model),
    "denoised_nl": (denoised_nl.add_args, denoised_nl.build_model),
    "specialize_fuse": (specialize_fuse.add_args, specialize_fuse.build_model),
    "hier_ms_attn": (hier_ms_attn.add_args, hier_ms_attn.build_model),
}


# ----------------------------------------------------------------------------------------------
# Arguments


def add_common_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=["synthetic", *common.DATASETS])
    g.add_argument("--data-root", help="dataset folder in the layout README.md describes")
    g.add_argument("--val-split", default="val", help="split evaluated (val or test)")
    g.add_argument("--crop-size", type=int, nargs="+", default=[512], help="train crop: S or H W")
    g.add_argument("--scale-range", type=float, nargs=2, default=[0.5, 2.0], help="random scale range")
    g.add_argument("--jitter", type=float, default=0.25, help="photometric jitter strength (0 = off)")
    g.add_argument("--blur", action="store_true", help="random Gaussian blur (HMSA)")
    g.add_argument("--workers", type=int, default=2, help="data loader processes per GPU/process")
    g.add_argument("--synthetic-size", type=int, default=128, help="synthetic image side")
    g.add_argument("--synthetic-length", type=int, default=2000, help="synthetic training images")
    g.add_argument("--synthetic-val-length", type=int, default=50, help="synthetic evaluation images")
    g.add_argument("--class-uniform", type=float, default=0.0,
                   help="share of each epoch's crops centred on class centroids (HMSA Sec. 5.1: 0.5)")
    g.add_argument("--class-uniform-tile", type=int, default=1024, help="label tile of the centroid index")
    g.add_argument("--extra-data", help="folder with pairs.txt of extra (auto-labelled) images, train ids")
    g.add_argument("--extra-ratio", type=float, default=0.5, help="share of crops drawn from --extra-data")
    g = parser.add_argument_group("model")
    g.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    g.add_argument("--stem", default="tv", choices=["tv", "deep"], help="tv: 7x7 (torchvision keys); deep: 3x3 x3")
    g.add_argument("--pretrained", help="local ImageNet checkpoint for the backbone (nothing is downloaded)")
    g.add_argument("--output-stride", type=int, default=8, choices=[8, 16, 32])
    g.add_argument("--multi-grid", type=int, nargs="+", help="layer4 dilation multipliers, e.g. 1 2 4")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=8, help="images per process (global = this x processes)")
    g.add_argument("--iters", type=int, default=1000)
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--poly-power", type=float, default=0.9)
    g.add_argument("--warmup-iters", type=int, default=0, help="linear warm-up iterations")
    g.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (not the loss); eager, with a message, if it fails")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, help="iterations between evaluations (default: at the end)")
    g.add_argument("--eval-mode", default="whole", choices=["whole", "slide"])
    g.add_argument("--eval-crop", type=int, default=512, help="sliding-window size")
    g.add_argument("--eval-stride", type=int, default=341, help="sliding-window stride")
    g.add_argument("--eval-scales", type=float, nargs="+", default=[1.0], help="e.g. 0.5 1.0 2.0")
    g.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    g.add_argument("--boundary-f", action="store_true",
                   help="also boundary F-score at 3/5/9/12 px (GALDv2 Table V, GSCNN protocol)")
    g.add_argument("--save-maps", type=int, default=0, metavar="N",
                   help="write the model's maps and predictions of the first N evaluation images")
    g = parser.add_argument_group("prediction and auto-labelling")
    g.add_argument("--predict", nargs="+", metavar="PATH", help="images or folders to label with --checkpoint")
    g.add_argument("--min-confidence", type=float, default=0.0,
                   help="auto-labels: pixels whose max probability is below this become 255 (HMSA: 0.9)")
    g.add_argument("--label-ids", action="store_true", help="also write Cityscapes labelIds (test server)")
    g.add_argument("--out", help="run folder (default runs/METHOD_DATASET)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint and stop")
    g.add_argument("--checkpoint", help="model weights to evaluate (--eval-only) or to start from")
    g.add_argument("--finetune", action="store_true",
                   help="start from --checkpoint with another class count: mismatched layers start fresh")
    g.add_argument("--save-every", type=int, default=1000, help="iterations between last.pt writes")
    g.add_argument("--log-every", type=int, default=20)
    g = parser.add_argument_group("costs and comparison")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--benchmark", action="store_true",
                      help="print the costs of --method at --crop-size on random input (no dataset): parameters, "
                           "GFLOPs, median forward and forward+backward time, peak memory")
    mode.add_argument("--compare-methods", metavar="M1,M2,...",
                      help="train and evaluate each method with the same flags (its own flags at their defaults) "
                           "and write OUT/comparison.md")
    g.add_argument("--benchmark-iters", type=int, default=5, help="timed calls (the median is reported)")
    g.add_argument("--benchmark-warmup", type=int, default=2, help="untimed calls before them")
    g.add_argument("--num-classes", type=int, default=19,
                   help="classes of the benchmark's random target (training takes them from the dataset)")


def build_parser(method=None):
    """The common flags, and the method's own group when one is given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="fcn", choices=list(METHODS), help="the paper to run")
    add_common_args(parser)
    if method:
        METHODS[method][0](parser)
    return parser


def parse_args(argv=None):
    """Two passes: --method first, then the common flags plus that method's own group (no method's
    group with --compare-methods: every compared method keeps its own defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="fcn", choices=list(METHODS))
    pre.add_argument("--compare-methods")
    known = pre.parse_known_args(argv)[0]
    parser = build_parser(None if known.compare_methods else known.method)
    args = parser.parse_args(argv)
    if len(args.crop_size) > 2:
        parser.error("--crop-size takes one or two numbers")
    args.crop_size = args.crop_size * 2 if len(args.crop_size) == 1 else args.crop_size
    name = "compare" if args.compare_methods else args.method
    args.out = args.out or os.path.join("runs", f"{name}_{args.dataset}")
    check_flags(args)
    return args


def check_flags(args):
    """Flag combinations that cannot work, refused before any data or model is touched."""
    if args.eval_only and not args.checkpoint:
        raise common.InputError("--eval-only needs --checkpoint (the trained model)")
    if args.predict and not args.checkpoint:
        raise common.InputError("--predict needs --checkpoint (the trained model)")
    if args.predict and args.label_ids and args.dataset != "cityscapes":
        raise common.InputError("--label-ids writes Cityscapes labelIds: it needs --dataset cityscapes")
    if args.eval_mode == "slide":
        common.check_window(args.eval_crop, args.eval_stride)


# ----------------------------------------------------------------------------------------------
# Distributed set-up, checkpoints


def setup_distributed(device_arg):
    """(rank, world size, device). torchrun sets RANK; otherwise one plain process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and device_arg != "cpu":
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return rank, world, device


def save_checkpoint(path, model, optimizer, scaler, iteration, best_miou, args):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint. The
    CUDA RNG state is that of the model's GPU (None on CPU)."""
    device = next(model.parameters()).device
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "iteration": iteration, "best_miou": best_miou, "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
             "args": {k: v for k, v in vars(args).items()}}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise common.InputError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def resume(path, raw_model, optimizer, scaler, device, rank):
    """Continue last.pt: weights, optimiser, GradScaler (kept fresh when the saved state is empty:
    the run had --amp off or bf16), RNG state. Returns (iteration, best mIoU)."""
    state = load_checkpoint(path)
    raw_model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and isinstance(state["rng_cuda"], torch.Tensor):
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    if rank == 0:
        print(f"resumed from {path} at iteration {state['iteration']}")
    return state["iteration"], state["best_miou"]


def load_weights(model, path, finetune=False):
    """Load --checkpoint into model. A missing or unexpected key is an error; a key whose shape
    differs (a classifier when the class count changes) is an error unless finetune, which keeps
    those layers freshly initialised and lists them."""
    state, own = model_weights(path), model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    reshaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or (reshaped and not finetune):
        raise common.InputError(f"{path} does not fit this model: missing {missing}, unexpected {unexpected}, "
                                f"different shapes {reshaped}" + (" (--finetune keeps those new)" if reshaped else ""))
    if reshaped:
        print(f"--finetune: kept freshly initialised (shapes differ): {reshaped}")
    model.load_state_dict({k: v for k, v in state.items() if k not in reshaped}, strict=not reshaped)


def model_weights(path):
    state = load_checkpoint(path)
    return state["model"] if "model" in state else state


# ----------------------------------------------------------------------------------------------
# Evaluation


def eval_logits(model, image, out_size, args, device):
    """common.infer as the flags say (--eval-mode, --eval-crop, --eval-stride, --eval-scales, --flip, --amp)."""
    with autocast(args, device):
        return common.infer(model, image, out_size, args.eval_mode, args.eval_crop, args.eval_stride,
                            tuple(args.eval_scales), args.flip)


@torch.no_grad()
def evaluate(model, dataset, args, rank, world, device):
    """Metrics over the whole split: each rank takes images rank, rank + world, ... (none twice),
    the confusion matrices (and boundary counts) are summed over ranks. Under DDP every rank first
    takes rank 0's buffers (plain BN on CPU keeps per-rank running statistics)."""
    if world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    model.eval()
    tic = time.time()
    K, indices = dataset.num_classes, range(rank, len(dataset), world)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1,
                                         num_workers=args.workers)
    cm = torch.zeros(K, K, dtype=torch.long, device=device)
    bf = torch.zeros(len(common.BOUNDARY_TOLERANCES), K, 4, dtype=torch.long, device=device)
    for index, (image, label) in zip(indices, loader):
        image, label = image.to(device), label.to(device)
        if args.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        pred = eval_logits(model, image, label.shape[-2:], args, device).argmax(1)
        cm += common.confusion_matrix(pred, label, K)
        if args.boundary_f:
            bf += common.boundary_f_counts(pred[0], label[0], K)
        if index < args.save_maps:
            save_maps(model, image, pred[0], index, dataset, args, device)
    if world > 1:
        dist.all_reduce(cm)
        dist.all_reduce(bf)
    model.train()
    metrics = common.segmentation_metrics(cm.cpu(), dataset.class_names)
    if args.boundary_f:
        metrics["boundary_f"] = common.boundary_f_scores(bf.cpu(), class_names=dataset.class_names)
    metrics["eval_img_per_s"] = round(len(dataset) / (time.time() - tic), 3)
    return metrics


def save_maps(model, image, pred, index, dataset, args, device):
    """OUT/maps/NNNN_pred.png and one heat map per channel of each entry of the model's 'maps'."""
    folder = os.path.join(args.out, "maps")
    os.makedirs(folder, exist_ok=True)
    common.colorize(pred.cpu(), dataset.palette).save(os.path.join(folder, f"{index:04d}_pred.png"))
    with autocast(args, device):
        maps = model.maps(image, tuple(args.eval_scales))
    for name, value in maps.items():
        value = common.resize(value.float(), pred.shape[-2:])[0]              # (M, H, W)
        for m, channel in enumerate(value.clamp(0, 1).cpu()):
            common.heatmap(channel.numpy()).save(os.path.join(folder, f"{index:04d}_{name}_{m}.png"))


# ----------------------------------------------------------------------------------------------
# Prediction and auto-labelling (HMSA Sec. 4)


def image_files(paths):
    """[(image path, output name)]: a folder's images keep their sub-folders in the output name."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                           if f.lower().endswith((".png", ".jpg", ".jpeg")))
            files += [(f, os.path.splitext(os.path.relpath(f, path))[0] + ".png") for f in found]
        elif os.path.isfile(path):
            files.append((path, os.path.splitext(os.path.basename(path))[0] + ".png"))
        else:
            raise common.InputError(f"--predict: no such file or folder {path}")
    if not files:
        raise common.InputError(f"--predict: no .png/.jpg images in {paths}")
    names = [n for _, n in files]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise common.InputError(f"--predict: several images would be written to {clash[:5]}")
    return files


@torch.no_grad()
def predict(model, args, rank, world, device):
    """Label every image: OUT/labels (train ids; 255 where the max probability < --min-confidence),
    OUT/color, OUT/overlay, OUT/labelIds with --label-ids, and OUT/pairs.txt for --extra-data."""
    model.eval()
    files = image_files(args.predict)
    _, palette = common.dataset_classes(args.dataset)
    kinds = ["labels", "color", "overlay"] + ["labelIds"] * args.label_ids
    for kind in kinds:
        for folder in {os.path.dirname(os.path.join(args.out, kind, n)) for _, n in files}:
            os.makedirs(folder, exist_ok=True)
    for path, name in files[rank::world]:
        image = common.read_image(path)
        x = common.to_normalized_tensor(image)[None].to(device)
        confidence, label = eval_logits(model, x, x.shape[-2:], args, device).softmax(1).max(1)
        label[confidence < args.min_confidence] = common.IGNORE_INDEX
        label = label[0].byte().cpu().numpy()
        Image.fromarray(label).save(os.path.join(args.out, "labels", name))
        color = common.colorize(label, palette)
        color.save(os.path.join(args.out, "color", name))
        Image.blend(image, color, 0.5).save(os.path.join(args.out, "overlay", name))
        if args.label_ids:
            Image.fromarray(common.CITYSCAPES_TRAIN_ID_TO_ID[label]).save(os.path.join(args.out, "labelIds", name))
    if rank == 0:
        with open(os.path.join(args.out, "pairs.txt"), "w") as f:
            f.writelines(f"{os.path.abspath(p)} labels/{n}\n" for p, n in files)
        print(f"labelled {len(files)} images into {args.out}")


# ----------------------------------------------------------------------------------------------
# Training


def autocast(args, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_step(model, raw_model, optimizer, scaler, images, labels, args, device, world):
    """One SGD step; returns the loss terms as floats. Stops on a non-finite loss on any rank."""
    with autocast(args, device):
        outputs = model(images)
    losses = raw_model.loss(outputs, labels)
    finite = torch.isfinite(losses["total"].detach()).float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() == 0:
        last = os.path.join(args.out, "last.pt")
        kept = f"the last good checkpoint is {last}" if os.path.isfile(last) else \
            f"no checkpoint was written yet (--save-every {args.save_every})"
        raise common.InputError(f"the loss is not finite ({losses['total'].item()}): training stopped; {kept}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["total"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return {k: v.item() for k, v in losses.items()}


def strict_json(value):
    """value with every non-finite float (an empty split's NaN mIoU) as None: valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def log(rank, args, record, line=None):
    if rank != 0:
        return
    if line:
        print(line, flush=True)
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")


def progress_line(it, args, losses, lr, speed):
    terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
    eta = (args.iters - it - 1) / max(speed, 1e-9)
    return f"it {it + 1}/{args.iters} | {terms} | lr {lr:.2e} | {speed:.2f} it/s | ETA {eta / 60:.1f} min"


def class_index_path(args, num_images):
    """The cache file of the class-uniform index, keyed by dataset, data (--data-root, or the
    synthetic seed and size), image count and tile."""
    data = os.path.abspath(args.data_root) if args.data_root else f"seed {args.seed} size {args.synthetic_size}"
    key = hashlib.sha1(data.encode()).hexdigest()[:8]
    return os.path.join(args.out, f"class_uniform_{args.dataset}_{num_images}_{args.class_uniform_tile}_{key}.json")


def class_index(args, train_set, rank, world):
    """The class-uniform centroid index, cached in the run folder. Each rank indexes its share of
    the images (rank, rank + world, ...), the shares are merged on every rank (all_gather_object),
    and rank 0 writes the cache: no rank waits alone past NCCL's timeout."""
    path = class_index_path(args, len(train_set))
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    shard = common.class_centroids(train_set, args.class_uniform_tile, progress=rank == 0,
                                   images=range(rank, len(train_set), world))
    shards = [shard]
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, shard)
    index = common.merge_centroids(shards)
    if rank == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(index, f)
        os.replace(path + ".tmp", path)
    return index


def train_loader(args, train_set, start_iter, rank, world, device):
    """This rank's endless, resumable loader: TrainSampler over the training set (class-uniform
    centres with --class-uniform, the --extra-data mix)."""
    main_set, centroids, num_extra = train_set, None, 0
    if args.class_uniform > 0:
        centroids = class_index(args, train_set, rank, world)
    if args.extra_data:
        extra = common.extra_dataset(args.extra_data, train_set.class_names, train_set.palette, train_set.transform)
        train_set, num_extra = common.MixedDataset(train_set, extra), len(extra)
    sampler = common.TrainSampler(len(main_set), args.batch_size, rank, world, args.seed, start_iter,
                                  centroids, args.class_uniform, num_extra, args.extra_ratio)
    return torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                       num_workers=args.workers, pin_memory=device.type == "cuda",
                                       drop_last=True, generator=torch.Generator())


def train(args, model, raw_model, optimizer, scaler, train_set, val_set, start_iter, best, rank, world, device):
    """Iterations start_iter .. --iters, evaluated every --eval-every and at the end; returns the last
    metrics. A resumed run that had already finished is evaluated once (its training speed is the
    one its summary.json recorded)."""
    if start_iter >= args.iters:
        return record_evaluation(raw_model, val_set, args, start_iter, stored_train_speed(args), rank, world, device)
    batches, tic, metrics = iter(train_loader(args, train_set, start_iter, rank, world, device)), time.time(), None
    eval_every = args.eval_every or args.iters
    for it in range(start_iter, args.iters):
        lr = common.poly_lr(args.lr, it, args.iters, args.poly_power, args.warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        losses = train_step(model, raw_model, optimizer, scaler, images, labels, args, device, world)
        if (it + 1) % args.log_every == 0 or it + 1 == args.iters:
            speed = (it + 1 - start_iter) / (time.time() - tic)
            log(rank, args, {"iter": it + 1, "lr": lr, **losses}, progress_line(it, args, losses, lr, speed))
        if (it + 1) % eval_every == 0 or it + 1 == args.iters:
            eval_start = time.time()
            speed = round((it + 1 - start_iter) / (eval_start - tic), 3)
            metrics = record_evaluation(raw_model, val_set, args, it + 1, speed, rank, world, device)
            if rank == 0 and metrics["mIoU"] > best:
                best = metrics["mIoU"]
                save_checkpoint(os.path.join(args.out, "best.pt"), raw_model, optimizer, scaler, it + 1, best, args)
            tic += time.time() - eval_start                    # evaluation is not training time
        if rank == 0 and ((it + 1) % args.save_every == 0 or it + 1 == args.iters):
            save_checkpoint(os.path.join(args.out, "last.pt"), raw_model, optimizer, scaler, it + 1, best, args)
    return metrics


def record_evaluation(raw_model, val_set, args, iteration, train_speed, rank, world, device):
    """Evaluate, then (rank 0) print, append to metrics.jsonl and write summary.json."""
    metrics = evaluate(raw_model, val_set, args, rank, world, device)
    metrics["train_it_per_s"] = train_speed
    log(rank, args, {"iter": iteration, **metrics}, f"eval at {iteration}: mIoU {metrics['mIoU']:.2f} "
        f"aAcc {metrics['aAcc']:.2f} mAcc {metrics['mAcc']:.2f}")
    if rank == 0:
        write_summary(args, metrics, iteration)
    return metrics


def stored_train_speed(args):
    """train_it_per_s of OUT/summary.json (None without one)."""
    path = os.path.join(args.out, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("train_it_per_s")


def write_summary(args, metrics, iteration):
    """OUT/summary.json, written to a temporary file and renamed, as the checkpoints."""
    summary = {"method": args.method, "dataset": args.dataset, "iteration": iteration, **metrics}
    path = os.path.join(args.out, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(strict_json(summary), f, indent=1, allow_nan=False)
    os.replace(path + ".tmp", path)


def seed_ranks(args, rank, world, start_iter):
    """Under DDP each rank draws its own dropout masks: a seed from (--seed, start iteration, rank),
    set after the model is built (DDP broadcasts rank 0's weights anyway) and after a resume (the
    checkpoint holds rank 0's RNG state only). One process keeps the stream of --seed (or of last.pt)."""
    if world > 1:
        torch.manual_seed((args.seed * 1000003 + start_iter) * 1024 + rank)


def run(args):
    """Train (or evaluate, or label) as the parsed flags say; returns (model, last metrics)."""
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    if args.predict:
        train_set = val_set = None
        args.num_classes = len(common.dataset_classes(args.dataset)[0])
    else:
        train_set, val_set = common.build_datasets(args)
        args.num_classes = train_set.num_classes
    os.makedirs(args.out, exist_ok=True)
    raw_model = METHODS[args.method][1](args).to(device)
    if args.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    if args.compile:
        common.compile_forward(raw_model, log=print if rank == 0 else lambda line: None)
    if args.checkpoint:
        load_weights(raw_model, args.checkpoint, args.finetune)
    if args.predict:
        return raw_model, predict(raw_model, args, rank, world, device)
    if args.eval_only:
        metrics = evaluate(raw_model, val_set, args, rank, world, device)
        if rank == 0:
            print(f"mIoU {metrics['mIoU']:.2f} aAcc {metrics['aAcc']:.2f} mAcc {metrics['mAcc']:.2f}")
            write_summary(args, metrics, None)
        return raw_model, metrics
    model = raw_model
    if world > 1:
        if device.type == "cuda":
            raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_iter, best = 0, -1.0
    last = os.path.join(args.out, "last.pt")
    if args.resume and os.path.isfile(last):
        start_iter, best = resume(last, raw_model, optimizer, scaler, device, rank)
    seed_ranks(args, rank, world, start_iter)
    if rank == 0:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{args.method} on {args.dataset}: {n_params / 1e6:.2f}M parameters, {world} process(es), {device}")
    metrics = train(args, model, raw_model, optimizer, scaler, train_set, val_set, start_iter, best, rank, world, device)
    return raw_model, metrics


# ----------------------------------------------------------------------------------------------
# Costs (--benchmark) and the side-by-side comparison (--compare-methods)


def random_batch(args, device, batch_size):
    """A random image batch of --crop-size and a random target of --num-classes: no dataset needed."""
    H, W = args.crop_size
    x = torch.randn(batch_size, 3, H, W, device=device)
    y = torch.randint(args.num_classes, (batch_size, H, W), device=device)
    return (x.contiguous(memory_format=torch.channels_last) if args.channels_last else x), y


def inference(model, x, args, device):
    """The evaluation forward as the eval flags say (--eval-mode, --eval-scales, --flip), as a call."""
    def call():
        model.eval()
        return eval_logits(model, x, x.shape[-2:], args, device)
    return call


def training_step(model, x, y, args, device):
    """A training step without the optimiser: forward in training mode, the loss, backward."""
    def call():
        model.train()
        model.zero_grad(set_to_none=True)
        with autocast(args, device):
            outputs = model(x)
        model.loss(outputs, y)["total"].backward()
    return call


def benchmark(args):
    """Parameters, forward GFLOPs (eval flags applied) and training-step GFLOPs, median times and
    peak memory of --method on a random --batch-size x 3 x --crop-size input. FLOPs and memory are
    measured eagerly; the times with --compile when it is given. A model that cannot train on this
    batch (BatchNorm after a global pooling at batch 1) gets the forward figures only."""
    rank, _, device = setup_distributed(args.device)
    say = print if rank == 0 else lambda line: None
    torch.manual_seed(args.seed)
    model = METHODS[args.method][1](args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = random_batch(args, device, args.batch_size)
    phases = {"forward": inference(model, x, args, device), "train_step": training_step(model, x, y, args, device)}
    r = {"method": args.method, "backbone": args.backbone, "input": [args.batch_size, 3, *args.crop_size],
         "eval": f"{args.eval_mode}, scales {' '.join(map(str, args.eval_scales))}" + ", flip" * args.flip,
         "amp": args.amp, "channels_last": args.channels_last, "device": str(device),
         **{f"params_{k}": v for k, v in common.parameter_counts(model).items()}}
    for name in list(phases):
        try:
            r[f"gflops_{name}"] = common.count_flops(phases[name]) / 1e9
        except ValueError as e:                               # "Expected more than 1 value per channel"
            say(f"benchmark: the {name.replace('_', ' ')} fails at --batch-size {args.batch_size} ({e}): "
                f"its figures are left empty")
            r[f"gflops_{name}"], r[f"{name}_peak_mib"], r[f"{name}_ms"] = None, None, None
            del phases[name]
    held = [*model.parameters(), *model.buffers(), x, y]
    for name, fn in phases.items():
        model.zero_grad(set_to_none=True)
        r[f"{name}_peak_mib"] = common.peak_memory(fn, device, held) / 2 ** 20
    if args.compile:
        common.compile_forward(model, log=say)
    for name, fn in phases.items():
        r[f"{name}_ms"] = 1000 * common.median_seconds(fn, args.benchmark_iters, args.benchmark_warmup, device)
    r["compiled"] = common.is_compiled(model)
    r["memory"] = "CUDA allocator peak" if device.type == "cuda" else "live CPU tensors (eager)"
    say(benchmark_table(r))
    say(json.dumps(r))
    return model, r


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


def method_args(args, method):
    """One --compare-methods run: the common flags as given, the method's own at their defaults,
    the boundary F-score on, OUT/METHOD as its run folder."""
    defaults = vars(build_parser(method).parse_args([]))
    return argparse.Namespace(**{**defaults, **vars(args), "method": method, "compare_methods": None,
                                 "boundary_f": True, "out": os.path.join(args.out, method)})


COMPARISON_COLUMNS = ("method", "mIoU", "aAcc", "BF 3px", "params (M)", "GFLOPs", "train it/s", "eval img/s")
COMPARISON_FORMATS = ("{}",) + ("{:.2f}",) * 7


def comparison_row(model, metrics, args):
    """One line of comparison.md; GFLOPs of one --crop-size image with the eval flags."""
    device = next(model.parameters()).device
    x, _ = random_batch(args, device, 1)
    gflops = common.count_flops(inference(model, x, args, device)) / 1e9
    values = (metrics["mIoU"], metrics["aAcc"], metrics["boundary_f"]["3px"]["mBF"],
              common.parameter_counts(model)["total"] / 1e6, gflops, metrics["train_it_per_s"],
              metrics["eval_img_per_s"])
    return dict(zip(COMPARISON_COLUMNS, (args.method, *values)))


def compare_methods(args):
    """Train and evaluate each method of --compare-methods with the same data, backbone, seed and
    iterations; rank 0 writes OUT/comparison.md. Returns the rows."""
    methods = [m.strip() for m in args.compare_methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise common.InputError(f"--compare-methods: unknown method(s) {unknown}; choose from {list(METHODS)}")
    rank, world, _ = setup_distributed(args.device)
    rows = []
    for i, method in enumerate(methods):
        if rank == 0:
            print(f"== compare {i + 1}/{len(methods)}: {method} ==", flush=True)
        margs = method_args(args, method)
        model, metrics = run(margs)
        rows.append(comparison_row(model, metrics, margs))
    if rank == 0:
        write_comparison(os.path.join(args.out, "comparison.md"), rows, args, world)
    return rows


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


def main(argv=None):
    """Run as the flags say. Training or evaluation returns (model, last metrics); --benchmark
    returns (model, its figures); --compare-methods returns (None, one row per method)."""
    args = parse_args(argv)
    if args.compare_methods:
        return None, compare_methods(args)
    if args.benchmark:
        return benchmark(args)
    return run(args)


def error_message(e):
    """The user's message alone, also when a DataLoader worker wrapped it in its traceback."""
    text = str(e).strip()
    return text.splitlines()[-1].split("InputError: ", 1)[-1] if "Traceback" in text else text


if __name__ == "__main__":
    try:
        main()
    except common.InputError as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
