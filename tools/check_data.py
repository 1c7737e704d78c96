"""--check-data: is a dataset set up? Every image and label of every split of --dataset in
--data-root is read as training would read it, counted, and the first bad file stops the check in
one line naming it (a missing label, an unreadable image, a size mismatch, a label value out of
range). A split this layout has but the folder lacks (Cityscapes' test, train_extra) is reported
and skipped, unless it is --train-split or --val-split.

    python train.py --check-data --dataset camvid --data-root data/camvid
    camvid train: 367 images and labels read, 11 of 11 classes present, some pixels ignored
"""
import numpy as np

import common
from tools import progress


def add_args(parser):
    parser.add_argument_group("data check").add_argument(
        "--check-data", action="store_true",
        help="read every image and label of every split of --dataset in --data-root, count them, stop at the "
             "first bad file, and exit")


def check_data(args, say=print):
    """{split: images read} for every split found; an InputError names the first bad file."""
    if args.dataset == "synthetic":
        raise common.InputError("--check-data reads a dataset's files: --dataset synthetic has none")
    needed = set(args.train_split.split("+")) | set(args.val_split.split("+"))
    counts = {}
    for split in common.DATASETS[args.dataset][2]:
        try:
            dataset = common.file_dataset(args.dataset, args.data_root, split)
        except common.InputError as e:
            if split in needed:
                raise
            say(f"{args.dataset} {split}: not checked ({e})")
            continue
        counts[split] = len(dataset)
        say(f"{args.dataset} {split}: {len(dataset)} images and labels read, "
            f"{present_classes(dataset, f'checking {args.dataset} {split}')}")
    return counts


def present_classes(dataset, what):
    """Read every pair of the split (validated, as training reads them): which classes they hold."""
    seen = np.zeros(256, bool)
    bar = progress.Progress(what, len(dataset))
    for index in range(len(dataset)):
        seen[np.unique(dataset.load(index)[1])] = True
        bar.update()
    ignored = ", some pixels ignored" if seen[common.IGNORE_INDEX] else ""
    return f"{seen[:dataset.num_classes].sum()} of {dataset.num_classes} classes present{ignored}"
