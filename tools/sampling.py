"""Class-uniform sampling (--class-uniform, HMSA Sec. 5.1) and extra training data mixed in
(--extra-data, e.g. the auto-labels --predict wrote, HMSA Sec. 4).

    python train.py --method hier_ms_attn ... --class-uniform 0.5 --extra-data runs/teacher/predict

Class-uniform: a share p of each epoch's crops is centred on a class centroid, drawn class by class
(each class as often), from an index of per-class centroids of 1024 x 1024 label tiles, built once
and cached in the run folder.
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist

import common
from tools.crash_safety import replacing
from tools.predict import read_pairs


def add_args(parser):
    g = parser.add_argument_group("class-uniform sampling and extra data")
    g.add_argument("--class-uniform", type=common.ranged(float, 0, 1), default=0.0,
                   help="share of crops centred on a class centroid, classes drawn uniformly (HMSA: 0.5)")
    g.add_argument("--class-uniform-tile", type=common.ranged(int, 1), default=1024,
                   help="label tile of the centroid index")
    g.add_argument("--extra-data", help="folder with pairs.txt of extra (auto-labelled) images, train ids")
    g.add_argument("--extra-ratio", type=common.ranged(float, 0, 1, high_open=True), default=0.5,
                   help="share of crops drawn from --extra-data")


def used(args):
    """True when the flags ask for class-uniform crops or extra data."""
    return args.class_uniform > 0 or bool(args.extra_data)


# ----------------------------------------------------------------------------------------------
# --extra-data


def extra_dataset(folder, class_names, transform):
    """--extra-data DIR: DIR/pairs.txt lists an image and its label per line (paths absolute or
    relative to DIR), labels already in train ids with 255 = ignore (what --predict writes)."""
    list_file = os.path.join(folder, "pairs.txt")
    if not os.path.isfile(list_file):
        raise common.InputError(f"--extra-data: missing {list_file} (one image/label pair per line, as "
                                f"--predict writes)")
    pairs = [tuple(os.path.join(folder, p) for p in pair) for pair in read_pairs(list_file)]
    return common.SegDataset(pairs, class_names, transform, name="extra data")


class MixedDataset(torch.utils.data.Dataset):
    """The main training set followed by the extra (e.g. auto-labelled) set: index >= len(main) is extra."""

    def __init__(self, main, extra):
        self.main, self.extra = main, extra
        self.num_classes, self.class_names = main.num_classes, main.class_names

    def __len__(self):
        return len(self.main) + len(self.extra)

    def __getitem__(self, item):
        index, seed, center = item
        if index < len(self.main):
            return self.main[item]
        return self.extra[(index - len(self.main), seed, center)]


def class_centroids(dataset, tile=1024, progress=True, images=None):
    """HMSA Sec. 5.1 class-uniform index: for every tile x tile tile of every label (of `images`,
    default all) and every class in it, the centroid (y, x) of that class's pixels. Returns one list
    of [image, y, x] per class, by image."""
    images = range(len(dataset)) if images is None else images
    index = [[] for _ in range(dataset.num_classes)]
    for done, i in enumerate(images, 1):
        label = dataset.load_label(i)
        for top in range(0, label.shape[0], tile):
            for left in range(0, label.shape[1], tile):
                part = label[top:top + tile, left:left + tile]
                for cls in np.unique(part[part != common.IGNORE_INDEX]):
                    ys, xs = np.nonzero(part == cls)
                    index[cls].append([i, top + int(ys.mean()), left + int(xs.mean())])
        if progress and (done % 100 == 0 or done == len(images)):
            print(f"class-uniform index: {done}/{len(images)} labels", flush=True)
    return index


def merge_centroids(shards):
    """One index from class_centroids of disjoint image sets (DDP shards): the same lists, in the
    same order, as one class_centroids over all of them (a stable sort by image keeps tile order)."""
    return [sorted((c for shard in shards for c in shard[k]), key=lambda c: c[0]) for k in range(len(shards[0]))]


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
    shard = class_centroids(train_set, args.class_uniform_tile, progress=rank == 0,
                            images=range(rank, len(train_set), world))
    shards = [shard]
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, shard)
    index = merge_centroids(shards)
    if rank == 0:
        with replacing(path) as tmp:
            with open(tmp, "w") as f:
                json.dump(index, f)
    return index


# ----------------------------------------------------------------------------------------------
# The sampler


class MixSampler(common.TrainSampler):
    """common.TrainSampler whose epochs also hold class-centroid crops and extra images: a share
    `class_uniform` of an epoch are per-class centroids, and extra items (index >= num_items) are
    added so that they make `extra_ratio` of it."""

    def __init__(self, num_items, batch_size, rank, world_size, seed, start_iter=0,
                 class_index=None, class_uniform=0.0, num_extra=0, extra_ratio=0.0):
        super().__init__(num_items, batch_size, rank, world_size, seed, start_iter)
        if not (0 <= class_uniform <= 1 and 0 <= extra_ratio < 1):
            raise common.InputError(f"--class-uniform must lie in [0, 1] and --extra-ratio in [0, 1), "
                                    f"got {class_uniform} and {extra_ratio}")
        self.class_index, self.class_uniform = class_index, class_uniform
        self.num_extra, self.extra_ratio = num_extra, extra_ratio

    def more_items(self, items, g):
        if self.class_uniform > 0:
            present = [c for c in self.class_index if c]
            per_class = int(self.n * self.class_uniform / len(self.class_index))
            items = items[: self.n - per_class * len(present)]
            for centroids in present:
                for j in torch.randint(len(centroids), (per_class,), generator=g).tolist():
                    items.append((centroids[j][0], tuple(centroids[j][1:])))
        if self.num_extra and self.extra_ratio > 0:
            count = round(len(items) * self.extra_ratio / (1 - self.extra_ratio))
            items += [(self.n + j, None) for j in torch.randint(self.num_extra, (count,), generator=g).tolist()]
        return items


def mixed_training_data(args, train_set, start_iter, rank, world):
    """(dataset, sampler) of the training loader with --class-uniform and --extra-data."""
    centroids, num_extra, dataset = None, 0, train_set
    if args.class_uniform > 0:
        centroids = class_index(args, train_set, rank, world)
    if args.extra_data:
        extra = extra_dataset(args.extra_data, train_set.class_names, train_set.transform)
        dataset, num_extra = MixedDataset(train_set, extra), len(extra)
    sampler = MixSampler(len(train_set), args.batch_size, rank, world, args.seed, start_iter,
                         centroids, args.class_uniform, num_extra, args.extra_ratio)
    return dataset, sampler
