"""The flags a checkpoint carries, and what train.parse_args takes from them.

A train.py checkpoint holds the flags it was written with. --resume takes every flag of OUT/last.pt
but RUN_ONLY, so that a pre-empted job continues with `--resume --out DIR` alone; --eval-only and
--predict take the model flags and, unless another --dataset is given, the split evaluated and how
(EVALUATED_ON, EVALUATED_WITH). A flag given always wins, but a model flag given with --eval-only /
--predict must agree with the checkpoint. What a taken flag cannot mean here (a method, backbone or
device this version or machine lacks, a data folder not here) is refused in one line naming the file.
"""
import argparse
import os

import torch

import common

RUN_ONLY = ("out", "resume", "overwrite")
EVALUATED_ON = ("dataset", "data_root", "val_split", "synthetic_size", "synthetic_val_length", "seed")
EVALUATED_WITH = ("eval_mode", "eval_crop", "eval_stride", "eval_scales", "flip")


def flag(dest):
    return dest.replace("_", "-")


def pre_parse(argv):
    """train.parse_args' first pass: the flags that pick the parser and the checkpoint whose flags are taken."""
    pre = argparse.ArgumentParser(add_help=False)
    for name in ("--method", "--compare-methods", "--checkpoint", "--out", "--dataset"):
        pre.add_argument(name)
    for name in ("--eval-only", "--resume"):
        pre.add_argument(name, action="store_true")
    pre.add_argument("--predict", nargs="+")
    return pre.parse_known_args(argv)[0]


def source(known):
    """(path, saved flags) of the checkpoint this run starts from: --checkpoint with --eval-only or
    --predict, OUT/last.pt with --resume (when it exists); (None, {}) otherwise. The None an earlier
    version saved for a flag not given stands for today's default: it is left out."""
    if known.checkpoint and (known.eval_only or known.predict):
        path = known.checkpoint
    elif known.resume and not known.compare_methods:
        out = known.out or os.path.join("runs", f"{known.method or 'fcn'}_{known.dataset or 'synthetic'}")
        path = os.path.join(out, "last.pt")
    else:
        return None, {}
    return path, {dest: value for dest, value in checkpoint_flags(path).items() if value is not None}


def taken(parser, known, saved, source):
    """The saved flags this run starts from (see RUN_ONLY); a value this version does not offer (a
    method or backbone it does not have) is refused in one line naming the checkpoint."""
    if known.resume:
        wanted = {a.dest for a in parser._actions} - set(RUN_ONLY)
    else:
        wanted = set(parser.model_flags)
        if known.dataset in (None, saved.get("dataset")):
            wanted |= set(EVALUATED_ON + EVALUATED_WITH)
    taken = {dest: value for dest, value in saved.items() if dest in wanted}
    for action in parser._actions:
        if action.dest in taken and action.choices is not None:
            values = taken[action.dest] if isinstance(taken[action.dest], list) else [taken[action.dest]]
            unknown = [v for v in values if v not in action.choices]
            if unknown:
                raise common.InputError(f"{source} was written with --{flag(action.dest)} {unknown[0]}, which this "
                                        f"version does not have (it has {', '.join(map(str, action.choices))})")
    return taken


def check_agreement(args, model_flags, saved, source):
    """--eval-only / --predict: a model flag given on the command line must equal the checkpoint's."""
    for dest in model_flags:
        if dest in saved and getattr(args, dest) != saved[dest]:
            raise common.InputError(f"--{flag(dest)} {getattr(args, dest)} differs from {source}'s {saved[dest]}: "
                                    f"leave the model flags out, the checkpoint carries them")


def given(parser, argv):
    """The dests the command line sets: parsed again over a namespace of markers, which argparse
    leaves in place for every flag not given."""
    marker = object()
    seen = parser.parse_args(argv, argparse.Namespace(**{a.dest: marker for a in parser._actions}))
    return {dest for dest, value in vars(seen).items() if value is not marker}


def check_taken(args, source, saved, taken):
    """What the flags taken from a checkpoint (`taken`, not given again) mean on this machine: a
    --device it lacks, a --data-root that is not a folder here (an earlier version saved it relative),
    and for --eval-only / --predict a --dataset of another class count."""
    origin = lambda dest: f" (from {source}; give --{flag(dest)} to override)" if dest in taken else ""
    check_device(args.device, origin("device"))
    if "data_root" in taken and args.dataset != "synthetic" and not args.predict and not os.path.isdir(args.data_root):
        relative = "" if os.path.isabs(args.data_root) else ", a relative path read from the current folder"
        raise common.InputError(f"--data-root {args.data_root} is not a folder here: it comes from {source}"
                                f"{relative}; give --data-root")
    trained, classes = saved.get("num_classes"), len(common.dataset_classes(args.dataset))
    mode = "--eval-only" if args.eval_only else "--predict"
    if (args.eval_only or args.predict) and trained and trained != classes:
        raise common.InputError(f"{source} was trained on {trained} classes (--dataset {saved.get('dataset')}) and "
                                f"--dataset {args.dataset} has {classes}: {mode} needs the classes it was trained on "
                                f"(training on {args.dataset} from it is --checkpoint {source} --finetune, "
                                f"without {mode})")


def note_unrecorded(args, source, saved, given):
    """--eval-only / --predict: say which flags that define what is evaluated the checkpoint does not
    record (a plain state_dict, an earlier version's file) and were not given: their defaults stand."""
    if "dataset" in given and args.dataset != saved.get("dataset", args.dataset):
        return                                                 # another dataset: its own flags
    data = ("synthetic_size", "synthetic_val_length", "seed") if args.dataset == "synthetic" else ("data_root",
                                                                                                  "val_split")
    wanted = ("dataset",) + (() if args.predict else data) + EVALUATED_WITH
    missing = [f"--{flag(dest)}" for dest in wanted if dest not in saved and dest not in given]
    if not missing or os.environ.get("RANK", "0") != "0":
        return
    if not saved:
        print(f"note: {source} records no flags (a plain state_dict): the defaults stand for those not given",
              flush=True)
    else:
        print(f"note: {source} does not record {', '.join(missing)}: the default{'s' * (len(missing) > 1)} stand"
              f"{'s' * (len(missing) == 1)}", flush=True)


def checkpoint_flags(path):
    """The flags a train.py checkpoint was written with; none for a plain state_dict or a missing
    file (which loading the weights then reports)."""
    saved = common.load_checkpoint(path).get("args") if os.path.isfile(path) else None
    return saved if isinstance(saved, dict) else {}


def check_device(name, origin=""):
    """--device NAME (if given) must name a device this machine has: refused in one line otherwise."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise common.InputError(f"--device {name}{origin} is not a device: cpu, cuda, cuda:N or mps") from None
    count = {"cpu": 1, "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
             "mps": int(torch.backends.mps.is_available())}.get(device.type)
    if count is None:
        raise common.InputError(f"--device {name}{origin}: segpapers runs on cpu, cuda or mps")
    if (device.index or 0) >= count:
        has = f"{count} {device.type.upper()} device(s)" if count else f"no {device.type.upper()} device"
        raise common.InputError(f"--device {name}{origin}: this machine has {has} (torch {torch.__version__}); "
                                f"leave --device out to use what it has, or give --device cpu")
