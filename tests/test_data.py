"""Issue 3 on tiny fake data: every dataset layout and label encoding, class-uniform sampling, prediction
and auto-label files, the extra-data mix, boundary F-score against hand counts, saved maps."""
import itertools
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import train  # noqa: E402
from tools import boundary_f, predict, sampling  # noqa: E402

H, W = 20, 24                                                           # every fake dataset image is 24 x 20
TINY = ["--method", "fcn", "--dataset", "synthetic", "--backbone", "resnet18", "--head-channels", "32",
        "--crop-size", "32", "--batch-size", "2", "--synthetic-size", "40", "--synthetic-length", "16",
        "--synthetic-val-length", "4", "--workers", "0", "--device", "cpu", "--log-every", "1"]


# ----------------------------------------------------------------------------------------------
# Helpers: fake files


def write_image(path, size=(W, H), seed=0):
    """Random RGB image of size (W, H); JPEG or PNG from the suffix."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_label(path, raw, palette=False):
    """Single-channel PNG with exactly these raw values (an 8-bit palette PNG for Mapillary)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(np.asarray(raw, np.uint8))
    if palette:
        image.putpalette([c for rgb in predict.MAPILLARY_V12_PALETTE for c in rgb])
        assert image.mode == "P"
    image.save(path)


def stripes(values, shift=0):
    """(H, W) raw label: column j holds values[(j + shift) % len(values)], so every value occurs."""
    values = np.asarray(values, np.uint8)
    return np.tile(values[(np.arange(W) + shift) % len(values)], (H, 1))


def mapped(raw, mapping):
    return np.vectorize(mapping.__getitem__)(raw)


CITIES = ("aachen", "bochum")


def cityscapes_files(root, split, i):
    city = CITIES[i % 2]
    stem = f"{city}_{i:06d}_000019"
    return (os.path.join(root, "leftImg8bit", split, city, stem + "_leftImg8bit.png"),
            os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelIds.png"))


def ade20k_files(root, split, i):
    folder = {"train": "training", "val": "validation"}[split]
    return (os.path.join(root, "images", folder, f"ADE_{folder}_{i:08d}.jpg"),
            os.path.join(root, "annotations", folder, f"ADE_{folder}_{i:08d}.png"))


def pascal_id(split, i):
    return f"2008_{(split == 'val') * 100 + i:06d}"


def pascal_split_file(root, split):
    return os.path.join(root, "ImageSets", "SegmentationContext", split + ".txt")


def pascal_files(root, split, i):
    return (os.path.join(root, "JPEGImages", pascal_id(split, i) + ".jpg"),
            os.path.join(root, "SegmentationClassContext", pascal_id(split, i) + ".png"))


def coco_files(train_folder, val_folder, prefix):
    def files(root, split, i):
        folder = {"train": train_folder, "val": val_folder}[split]
        stem = f"{prefix.format(folder)}{i:012d}"
        return (os.path.join(root, "images", folder, stem + ".jpg"),
                os.path.join(root, "annotations", folder, stem + "_labelTrainIds.png"))
    return files


def camvid_files(root, split, i):
    return (os.path.join(root, split, f"0001TP_{i:06d}.png"),
            os.path.join(root, split + "annot", f"0001TP_{i:06d}.png"))


def mapillary_files(root, split, i):
    folder = {"train": "training", "val": "validation"}[split]
    return (os.path.join(root, folder, "images", f"key{i:04d}.jpg"),
            os.path.join(root, folder, "v1.2", "labels", f"key{i:04d}.png"))


# name: files(root, split, i) -> (image, label); raw value -> expected train id (ecosystem.md A1); a raw
# value outside the classes; the class count; the path whose absence makes the val split missing.
LAYOUTS = {
    "cityscapes": dict(files=cityscapes_files, mapping={0: 255, 1: 255, 7: 0, 8: 1, 26: 13, 33: 18},
                       bad=34, classes=19, missing=lambda r: os.path.join(r, "gtFine", "val"),
                       error=r"values \[34\] where a cityscapes label file of its kind holds only 0..33"),
    "ade20k": dict(files=ade20k_files, mapping={0: 255, 1: 0, 75: 74, 150: 149, 255: 255},
                   bad=151, classes=150, missing=lambda r: os.path.join(r, "annotations", "validation")),
    "pascal_context59": dict(files=pascal_files, mapping={0: 255, 1: 0, 30: 29, 59: 58, 255: 255}, bad=60,
                             classes=59, missing=lambda r: pascal_split_file(r, "val")),
    "pascal_context60": dict(files=pascal_files, mapping={0: 0, 1: 1, 30: 30, 59: 59, 255: 255}, bad=60,
                             classes=60, missing=lambda r: pascal_split_file(r, "val")),
    "coco_stuff10k": dict(files=coco_files("train2014", "test2014", "COCO_{}_"),
                          mapping={0: 255, 1: 0, 100: 99, 171: 170, 255: 255}, bad=172, classes=171,
                          missing=lambda r: os.path.join(r, "annotations", "test2014")),
    "coco_stuff164k": dict(files=coco_files("train2017", "val2017", ""),
                           mapping={0: 0, 1: 1, 100: 100, 170: 170, 255: 255}, bad=171, classes=171,
                           missing=lambda r: os.path.join(r, "annotations", "val2017")),
    "camvid": dict(files=camvid_files, mapping={0: 0, 3: 3, 10: 10, 11: 255}, bad=12, classes=11,
                   missing=lambda r: os.path.join(r, "valannot")),
    "mapillary": dict(files=mapillary_files, mapping={0: 0, 13: 13, 64: 64, 65: 255}, bad=66, classes=65,
                      missing=lambda r: os.path.join(r, "validation", "v1.2", "labels")),
    # Road, Lane Marking - General, Sidewalk, Curb, Bicyclist, On Rails, Bird, Unlabeled
    "mapillary_cityscapes19": dict(files=mapillary_files, mapping={13: 0, 24: 0, 15: 1, 2: 1, 20: 12, 58: 16,
                                                                   0: 255, 65: 255}, bad=66, classes=19,
                                   missing=lambda r: os.path.join(r, "validation", "v1.2", "labels")),
}


def make_tree(name, root, counts=(("train", 3), ("val", 2))):
    """A tiny tree of `name` in its exact layout; returns {split: [(image, label, raw label)]}."""
    spec, written = LAYOUTS[name], {}
    for s, (split, n) in enumerate(counts):
        written[split] = []
        for i in range(n):
            image, label = spec["files"](root, split, i)
            raw = stripes(list(spec["mapping"]), shift=i + 3 * s)
            write_image(image, seed=10 * s + i)
            write_label(label, raw, palette=name.startswith("mapillary"))
            written[split].append((image, label, raw))
        if name.startswith("pascal_context"):                           # the split file lists the ids
            list_file = pascal_split_file(root, split)
            os.makedirs(os.path.dirname(list_file), exist_ok=True)
            with open(list_file, "w") as f:
                f.writelines(pascal_id(split, i) + "\n" for i in range(n))
    return written


# ----------------------------------------------------------------------------------------------
# 1. Every dataset in its layout


def test_every_dataset_has_a_fake_tree_here():
    assert set(LAYOUTS) == set(common.DATASETS), "a dataset was added to common.DATASETS without a layout test"


@pytest.mark.parametrize("name", sorted(common.DATASETS))
def test_loader_finds_the_pairs_and_maps_raw_values_to_train_ids(name, tmp_path):
    spec, root = LAYOUTS[name], str(tmp_path / name)
    written = make_tree(name, root)
    for split, items in written.items():
        ds = common.file_dataset(name, root, split)
        assert ds.num_classes == spec["classes"] == len(predict.PALETTES[name])
        assert sorted((os.path.normpath(i), os.path.normpath(l)) for i, l in ds.pairs) == \
            sorted((os.path.normpath(i), os.path.normpath(l)) for i, l, _ in items), f"{name} {split}: wrong pairs"
        raw_of = {os.path.normpath(label): raw for _, label, raw in items}
        for k, (_, label_path) in enumerate(ds.pairs):
            image, label = ds.load(k)
            expected = mapped(raw_of[os.path.normpath(label_path)], spec["mapping"])
            assert image.size == (W, H) and image.mode == "RGB"
            np.testing.assert_array_equal(label, expected, err_msg=f"{name}: raw value -> train id")
            np.testing.assert_array_equal(ds.load_label(k), expected, err_msg=f"{name}: load_label")


@pytest.mark.parametrize("name", sorted(common.DATASETS))
def test_an_unknown_raw_value_is_an_input_error_naming_the_file(name, tmp_path):
    spec, root = LAYOUTS[name], str(tmp_path / name)
    (image, label, raw), = make_tree(name, root, (("train", 1),))["train"]
    raw = raw.copy()
    raw[5, 7] = spec["bad"]
    write_label(label, raw, palette=name.startswith("mapillary"))
    ds = common.file_dataset(name, root, "train")
    for read in (ds.load, ds.load_label):
        with pytest.raises(common.InputError, match=spec.get("error", f"outside the {spec['classes']} classes")) as e:
            read(0)
        assert label in str(e.value), f"{name}: the error does not name the label file: {e.value}"


def test_a_16_bit_label_beyond_the_lookup_table_is_an_input_error_naming_the_file(tmp_path):
    root = str(tmp_path / "camvid")
    (image, label, raw), = make_tree("camvid", root, (("train", 1),))["train"]      # CamVid has a LUT
    raw = raw.astype(np.uint16)
    raw[5, 7] = 300
    Image.fromarray(raw).save(label)                                    # a 16-bit PNG
    ds = common.file_dataset("camvid", root, "train")
    for read in (ds.load, ds.load_label):
        with pytest.raises(common.InputError, match=r"has values \[300\] outside the 11 classes") as e:
            read(0)
        assert label in str(e.value)


@pytest.mark.parametrize("name", sorted(common.DATASETS))
def test_a_missing_split_or_file_names_the_exact_path(name, tmp_path):
    spec, root = LAYOUTS[name], str(tmp_path / name)
    written = make_tree(name, root)
    missing = spec["missing"](root)
    shutil.rmtree(missing) if os.path.isdir(missing) else os.remove(missing)
    with pytest.raises(common.InputError, match="missing") as e:
        common.file_dataset(name, root, "val")
    assert missing in str(e.value), f"{name}: the message does not name {missing}: {e.value}"
    assert len(common.file_dataset(name, root, "train")) == 3             # the other split still loads
    _, label, _ = written["train"][1]
    os.remove(label)                                                     # one image loses its label
    with pytest.raises(common.InputError) as e:
        common.file_dataset(name, root, "train")
    assert label in str(e.value), f"{name}: the message does not name {label}: {e.value}"
    with pytest.raises(common.InputError, match="--data-root"):
        common.file_dataset(name, str(tmp_path / "nowhere"), "train")


def test_cityscapes_reads_label_train_ids_as_is_and_prefers_them(tmp_path):
    root = str(tmp_path)
    items = make_tree("cityscapes", root)["train"]
    train_ids = {}
    for i, (_, label, _) in enumerate(items):                            # trainIds unlike the labelIds mapping
        path = label.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png")
        train_ids[path] = stripes([0, 5, 13, 18, 255], shift=i)
        write_label(path, train_ids[path])
    ds = common.file_dataset("cityscapes", root, "train")
    assert [p[1] for p in ds.pairs] == sorted(train_ids) and ds.lut is None
    for k, (_, path) in enumerate(ds.pairs):
        np.testing.assert_array_equal(ds.load(k)[1], train_ids[path], err_msg="trainIds not read as is")
    os.remove(sorted(train_ids)[0])                                      # not every image has trainIds:
    ds = common.file_dataset("cityscapes", root, "train")                # labelIds mapped on the fly
    raw_of = {label: raw for _, label, raw in items}
    for k, (_, path) in enumerate(ds.pairs):
        np.testing.assert_array_equal(ds.load(k)[1], mapped(raw_of[path], LAYOUTS["cityscapes"]["mapping"]))
    table = common.CITYSCAPES_ID_TO_TRAIN_ID
    assert (table[7], table[26], table[33], len(table)) == (0, 13, 18, 19) and 0 not in table


# ----------------------------------------------------------------------------------------------
# 2. Class-uniform sampling (HMSA Sec. 5.1)

SKY, POLE = 0, 2                                                        # CamVid ids
POLE_XS = list(range(0, 12)) + list(range(16, 22))                       # 3x3 patches that stay in one 16-tile


def pole_corner(i):
    """Top-left corner of image i's 3x3 Pole patch; image 0's patch straddles the row-16 tile border."""
    return (14, 5) if i == 0 else (4 + (3 * i) % 10, POLE_XS[(5 * i) % len(POLE_XS)])


def camvid_rare_class_tree(root, n):
    """CamVid tree: void (11) everywhere, Sky on rows 0-3, a 3x3 Pole patch per image; one val image."""
    for split, count in (("train", n), ("val", 1)):
        for i in range(count):
            image, label = camvid_files(root, split, i)
            raw = np.full((H, W), 11, np.uint8)
            raw[0:4] = SKY
            y0, x0 = pole_corner(i)
            raw[y0:y0 + 3, x0:x0 + 3] = POLE
            write_image(image, seed=i)
            write_label(label, raw)


def expected_centroids(n, tile):
    """Hand computation: Sky rows 0-3 -> row int(1.5) = 1, columns 0-15 -> 7 and 16-23 -> 19 (one tile:
    0-23 -> 11); a 3x3 patch -> its middle pixel; image 0's patch (rows 14-16, columns 5-7) splits
    into rows 14-15 (int(14.5) = 14) and row 16 at tile 16."""
    index = [[] for _ in common.CAMVID_CLASSES]
    for i in range(n):
        y0, x0 = pole_corner(i)
        if tile == 16:
            index[SKY] += [[i, 1, 7], [i, 1, 19]]
            index[POLE] += [[0, 14, 6], [0, 16, 6]] if i == 0 else [[i, y0 + 1, x0 + 1]]
        else:
            index[SKY].append([i, 1, 11])
            index[POLE].append([i, y0 + 1, x0 + 1])
    return index


def test_class_centroids_match_a_hand_computation_with_and_without_tiling(tmp_path):
    camvid_rare_class_tree(str(tmp_path), 5)
    ds = common.file_dataset("camvid", str(tmp_path), "train")
    for tile in (16, 1024):
        assert sampling.class_centroids(ds, tile=tile, progress=False) == expected_centroids(5, tile), f"tile {tile}"


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_class_index_merges_to_the_single_process_index(tmp_path, world):
    camvid_rare_class_tree(str(tmp_path), 5)
    ds = common.file_dataset("camvid", str(tmp_path), "train")
    shards = [sampling.class_centroids(ds, tile=16, progress=False, images=range(r, 5, world)) for r in range(world)]
    assert {c[0] for centroids in shards[1] for c in centroids} == set(range(1, 5, world))   # its images only
    assert sampling.merge_centroids(shards) == expected_centroids(5, 16)   # two Sky tiles per image: order kept


def test_class_uniform_crops_contain_their_class(tmp_path):
    n, P = 24, 0.5
    camvid_rare_class_tree(str(tmp_path), n)
    transform = common.TrainTransform(8, scale_range=(0.5, 2.0), jitter=0.0)   # crops far smaller than images
    ds = common.file_dataset("camvid", str(tmp_path), "train", transform)
    index = sampling.class_centroids(ds, tile=16, progress=False)
    class_of = {tuple(c[1:]) + (c[0],): k for k, centroids in enumerate(index) for c in centroids}
    sampler = sampling.MixSampler(n, 4, 0, 1, seed=3, class_index=index, class_uniform=P)
    centred, uniform_with_pole = 0, []
    for index_, seed, center in itertools.islice(iter(sampler), 30 * n):   # 30 epochs, as the loader sees them
        x, y = ds[(index_, seed, center)]
        assert x.shape == (3, 8, 8) and y.shape == (8, 8)
        if center is None:
            uniform_with_pole.append(bool((y == POLE).any()))
            continue
        cls = class_of[tuple(center) + (index_,)]
        centred += 1
        assert (y == cls).any(), f"crop around {center} of image {index_} misses class {cls}"
    assert centred == 30 * int(n * P / len(index)) * 2                  # Sky and Pole present: 1 each per epoch
    assert not all(uniform_with_pole), "uniform crops always hold the Pole: the test cannot tell centring apart"


@pytest.mark.parametrize("P", [0.25, 0.5, 0.9])
def test_class_uniform_share_per_epoch_is_int_n_p_over_k_per_present_class(P):
    n, K = 1000, 4
    index = [[[c, c, c]] * 3 for c in range(K - 1)] + [[]]               # class 3 never occurs
    sampler = sampling.MixSampler(n, 4, 0, 1, seed=1, class_index=index, class_uniform=P)
    per_class = int(n * P / K)
    for epoch in range(2):
        items = sampler.epoch_items(epoch)
        centres = [c for _, c in items if c is not None]
        uniform = [i for i, c in items if c is None]
        assert len(items) == n
        assert [centres.count((c, c)) for c in range(K - 1)] == [per_class] * (K - 1)
        assert len(uniform) == n - (K - 1) * per_class == len(set(uniform))


def class_uniform_run(root, out):
    """A one-iteration class-uniform run in `out` (a run there before is replaced; its caches stay)."""
    train.main(["--dataset", "camvid", "--data-root", root, "--backbone", "resnet18", "--head-channels", "16",
                "--crop-size", "16", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--iters", "1",
                "--class-uniform", "1.0", "--class-uniform-tile", "16", "--overwrite", "--out", out])
    return sorted(f for f in os.listdir(out) if f.startswith("class_uniform_camvid_6_16_"))


def test_class_uniform_index_is_cached_in_the_run_folder_not_the_data(tmp_path):
    root, out = str(tmp_path / "camvid"), str(tmp_path / "run")
    camvid_rare_class_tree(root, 6)
    before = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    cache, = class_uniform_run(root, out)
    with open(os.path.join(out, cache)) as f:
        assert json.load(f) == expected_centroids(6, 16)
    assert sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs) == before


def test_class_uniform_cache_of_another_data_root_is_not_reused(tmp_path):
    first, second, out = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "run")
    camvid_rare_class_tree(first, 6)
    shutil.copytree(first, second)
    for i in range(6):                                                  # same names and count, no Pole in b
        label = camvid_files(second, "train", i)[1]
        write_label(label, np.where(png(label) == POLE, 11, png(label)))
    cache_a, = class_uniform_run(first, out)
    cache_b, = set(class_uniform_run(second, out)) - {cache_a}          # one cache per data root
    with open(os.path.join(out, cache_a)) as fa, open(os.path.join(out, cache_b)) as fb:
        assert json.load(fa)[POLE] != [] and json.load(fb)[POLE] == []


# ----------------------------------------------------------------------------------------------
# 3. Prediction and auto-labels (HMSA Sec. 4)


def model_for(argv, checkpoint=None):
    """The model train.main builds for these flags (with the checkpoint's weights), in eval mode."""
    args = train.parse_args(argv)
    args.num_classes = len(common.dataset_classes(args.dataset))
    model = train.METHODS[args.method][1](args)
    if checkpoint:
        common.load_weights(model, checkpoint)
    return model.eval()


def probabilities(model, path):
    """(K, H, W) softmax of the model on one image, as --predict computes it."""
    x = common.to_normalized_tensor(common.read_image(path))[None]
    return common.infer(model, x, x.shape[-2:])[0].softmax(0)


def threshold_between(probs):
    """A confidence threshold in the widest gap of the middle half of the pixels' max probabilities,
    so that a clear part of the pixels falls on each side."""
    conf = np.sort(np.concatenate([p.max(0).values.flatten().numpy() for p in probs]))
    middle = conf[len(conf) // 4: 3 * len(conf) // 4]
    j = int(np.diff(middle).argmax())
    return float(middle[j] + middle[j + 1]) / 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny FCN trained for one iteration, and images to label: a folder (with a sub-folder) and a file."""
    base = tmp_path_factory.mktemp("predict")
    train.main(TINY + ["--iters", "1", "--out", str(base / "run")])
    images = [str(base / "images" / "a.png"), str(base / "images" / "sub" / "b.jpg"), str(base / "c  d\tx.png")]
    for k, (path, size) in enumerate(zip(images, [(W, H), (30, 18), (20, 20)])):
        write_image(path, size, seed=k)
    return dict(base=base, checkpoint=str(base / "run" / "last.pt"), images=images,
                predict=[str(base / "images"), images[2]],
                names=["a.png", os.path.join("sub", "b.png"), "c  d\tx.png"])  # sub-folders kept; spaces too


@pytest.fixture(scope="module")
def auto_labels(trained):
    """--predict with --min-confidence T, T chosen from the model's own probabilities."""
    model = model_for(TINY, trained["checkpoint"])
    probs = [probabilities(model, p) for p in trained["images"]]
    T = threshold_between(probs)
    out = str(trained["base"] / "auto")
    train.main(TINY + ["--predict", *trained["predict"], "--checkpoint", trained["checkpoint"],
                       "--min-confidence", repr(T), "--out", out])
    return dict(out=out, probs=probs, T=T)


def png(path):
    with Image.open(path) as im:
        return np.asarray(im.copy())


def palette_image(label, palette):
    """(H, W, 3) uint8 colours by hand: class k -> palette[k], ignore (255) -> black."""
    label, out = np.asarray(label), np.zeros(np.shape(label) + (3,), np.uint8)
    for k, colour in enumerate(palette):
        out[label == k] = colour
    return out


def test_predict_writes_raw_colour_and_overlay_pngs_with_the_threshold(trained, auto_labels):
    out, T = auto_labels["out"], auto_labels["T"]
    palette = predict.PALETTES["synthetic"]
    ignored = kept = 0
    for path, prob, name in zip(trained["images"], auto_labels["probs"], trained["names"]):
        image = common.read_image(path)
        label = png(os.path.join(out, "labels", name))
        confidence, expected = prob.max(0)
        expected[confidence < T] = common.IGNORE_INDEX
        assert label.shape == (image.size[1], image.size[0]) and label.dtype == np.uint8
        np.testing.assert_array_equal(label, expected.numpy(), err_msg=f"{name}: argmax / 255 below T={T}")
        color = palette_image(label, palette)
        np.testing.assert_array_equal(png(os.path.join(out, "color", name)), color)
        overlay = Image.blend(image, Image.fromarray(color), 0.5)
        np.testing.assert_array_equal(png(os.path.join(out, "overlay", name)), np.asarray(overlay))
        ignored, kept = ignored + (label == 255).sum(), kept + (label != 255).sum()
    assert ignored > 0 and kept > 0, "the threshold should leave pixels on both sides"
    legend = predict.legend(common.dataset_classes("synthetic"), palette)           # tests/test_maps.py reads it
    np.testing.assert_array_equal(png(os.path.join(out, "legend.png")), np.asarray(legend))
    assert sorted(os.listdir(os.path.join(out, "labels"))) == ["a.png", "c  d\tx.png", "sub"]
    with open(os.path.join(out, "pairs.txt")) as f:
        lines = f.read().splitlines()
    assert sorted(json.loads(line) for line in lines) == \
        sorted([os.path.abspath(p), f"labels/{n}"] for p, n in zip(trained["images"], trained["names"]))


def test_predict_with_zero_confidence_keeps_every_argmax(trained, auto_labels):
    out = str(trained["base"] / "zero")
    train.main(TINY + ["--predict", *trained["predict"], "--checkpoint", trained["checkpoint"],
                       "--min-confidence", "0", "--out", out])
    for name, prob in zip(trained["names"], auto_labels["probs"]):
        label = png(os.path.join(out, "labels", name))
        assert (label != 255).all()
        np.testing.assert_array_equal(label, prob.argmax(0).numpy())


def test_predict_keeps_images_with_the_same_name_apart(trained, tmp_path):
    folder = tmp_path / "same_name"
    write_image(str(folder / "x" / "frame.png"), seed=1)
    write_image(str(folder / "y" / "frame.png"), (30, 18), seed=2)
    out = str(tmp_path / "out")
    train.main(TINY + ["--predict", str(folder), "--checkpoint", trained["checkpoint"], "--out", out])
    with open(os.path.join(out, "pairs.txt")) as f:
        labels = [line.split()[1] for line in f]
    assert len(set(labels)) == 2, (f"two images named frame.png were written to the same label file {labels}: "
                                   f"one auto-label overwrites the other and pairs.txt gives both images one label")


def test_predict_label_ids_for_the_cityscapes_server(tmp_path, capsys):
    argv = ["--method", "fcn", "--dataset", "cityscapes", "--backbone", "resnet18", "--head-channels", "16",
            "--workers", "0", "--device", "cpu"]
    torch.manual_seed(0)
    model = model_for(argv)
    image = str(tmp_path / "images" / "frankfurt_000000_000294_leftImg8bit.png")
    write_image(image, seed=4)
    classifier = model.head[-1]
    with torch.no_grad():                                                # only train ids 0 and 13 can win,
        classifier.bias.fill_(-100.0)                                    # each on about half the pixels
        classifier.bias[[0, 13]] = 0.0
        logits = probabilities(model, image).log()
        classifier.bias[0] -= (logits[0] - logits[13]).median()
    checkpoint = str(tmp_path / "city.pt")
    torch.save(model.state_dict(), checkpoint)
    T = threshold_between([probabilities(model, image)])
    out = str(tmp_path / "out")
    train.main(argv + ["--predict", image, "--checkpoint", checkpoint, "--min-confidence", repr(T),
                       "--label-ids", "--out", out])
    name = "frankfurt_000000_000294_leftImg8bit.png"
    label, ids = png(os.path.join(out, "labels", name)), png(os.path.join(out, "labelIds", name))
    assert set(np.unique(label)) == {0, 13, 255}, f"setup: expected train ids 0, 13 and 255, got {np.unique(label)}"
    assert (ids[label == 0] == 7).all() and (ids[label == 13] == 26).all() and (ids[label == 255] == 0).all()
    printed = capsys.readouterr().out                                    # id 0 counts as a miss: said
    assert f"note: {(label == 255).sum():,} pixels below --min-confidence {T} are id 0 (unlabeled)" in printed
    assert f"CITYSCAPES_RESULTS={os.path.join(out, 'labelIds')}" in printed


# ----------------------------------------------------------------------------------------------
# 4. Extra (auto-labelled) data


def test_extra_dataset_reads_the_pairs_that_predict_writes(trained, auto_labels, tmp_path):
    out = auto_labels["out"]
    classes = common.dataset_classes("synthetic")
    ds = sampling.extra_dataset(out, classes, None)
    assert sorted(ds.pairs) == sorted((os.path.abspath(p), os.path.join(out, "labels", n))
                                      for p, n in zip(trained["images"], trained["names"]))
    for k, (image_path, label_path) in enumerate(ds.pairs):
        image, label = ds.load(k)
        assert image.size == Image.open(image_path).size
        np.testing.assert_array_equal(label, png(label_path))
    with pytest.raises(common.InputError, match="pairs.txt"):
        sampling.extra_dataset(str(tmp_path), classes, None)


def test_extra_data_also_reads_a_hand_written_list_and_names_a_bad_line(tmp_path):
    (tmp_path / "pairs.txt").write_text("img/a.png lab/a.png\n\n/abs/b.png lab/b.png extra words\n")
    ds = sampling.extra_dataset(str(tmp_path), common.dataset_classes("synthetic"), None)
    assert ds.pairs == [(str(tmp_path / "img/a.png"), str(tmp_path / "lab/a.png")), ("/abs/b.png", str(tmp_path / "lab/b.png"))]
    (tmp_path / "pairs.txt").write_text("only-one-path.png\n")
    with pytest.raises(common.InputError, match=r"pairs.txt line 1: expected an image and a label"):
        sampling.extra_dataset(str(tmp_path), common.dataset_classes("synthetic"), None)


@pytest.mark.parametrize("r", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_extra_ratio_holds_per_epoch(r):
    n, num_extra = 40, 7
    for class_uniform, index in ((0.0, None), (0.5, [[[0, 1, 1]], [[3, 2, 2]]])):
        sampler = sampling.MixSampler(n, 4, 0, 1, seed=2, class_index=index, class_uniform=class_uniform,
                                      num_extra=num_extra, extra_ratio=r)
        for epoch in range(3):
            items = sampler.epoch_items(epoch)
            extra = [i for i, _ in items if i >= n]
            assert abs(len(extra) / len(items) - r) <= 1 / len(items), f"r={r}: {len(extra)}/{len(items)} extra"
            assert set(extra) <= set(range(n, n + num_extra)) and len(items) - len(extra) == n


def test_extra_ratio_of_one_means_only_extra_data_or_a_clear_error():
    try:
        items = sampling.MixSampler(10, 2, 0, 1, seed=0, num_extra=3, extra_ratio=1.0).epoch_items(0)
    except common.InputError:
        return
    except Exception as e:
        pytest.fail(f"--extra-ratio 1.0 crashes with {type(e).__name__}: {e} (want an InputError or extra data only)")
    assert all(i >= 10 for i, _ in items)


class Recorder(torch.utils.data.Dataset):
    def __init__(self, name, n):
        self.name, self.n, self.num_classes, self.class_names = name, n, 6, list(common.SYNTHETIC_CLASSES)

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        return self.name, item


def test_mixed_dataset_routes_indices():
    mixed = sampling.MixedDataset(Recorder("main", 5), Recorder("extra", 3))
    assert len(mixed) == 8 and mixed.num_classes == 6
    assert mixed[(0, 11, None)] == ("main", (0, 11, None))
    assert mixed[(4, 12, (3, 4))] == ("main", (4, 12, (3, 4)))
    assert mixed[(5, 13, None)] == ("extra", (0, 13, None))
    assert mixed[(7, 14, (1, 2))] == ("extra", (2, 14, (1, 2)))


def test_training_with_extra_data_from_predict(trained, auto_labels, tmp_path, monkeypatch):
    read, real_load = [], common.SegDataset.load

    def recording_load(self, index):
        read.append((self.name, index))
        return real_load(self, index)

    monkeypatch.setattr(common.SegDataset, "load", recording_load)
    _, metrics = train.main(TINY + ["--iters", "2", "--extra-data", auto_labels["out"], "--extra-ratio", "0.9",
                                    "--out", str(tmp_path / "run")])
    assert 0 <= metrics["mIoU"] <= 100
    assert any(name == "extra data" for name, _ in read), "no auto-labelled image was read in training"


# ----------------------------------------------------------------------------------------------
# 5. Boundary F-score (GALDv2 Table V, GSCNN protocol)


def square(size, top, left, h, w, value=1):
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[top:top + h, left:left + w] = value
    return mask


def test_boundary_pixels_of_a_square_by_hand():
    edge = boundary_f.boundaries((square(6, 2, 2, 2, 2) == 1)[None])[0]
    # pixels whose right, lower or lower-right neighbour differs (GSCNN seg2bmap): the corner above-left,
    # left of and above the square, and the square's own right/bottom rim
    assert {tuple(p) for p in edge.nonzero().tolist()} == {(1, 1), (2, 1), (3, 1), (1, 2), (1, 3), (2, 3),
                                                           (3, 3), (3, 2)}


def test_identical_masks_score_100_at_every_tolerance_and_absent_classes_are_none():
    label = torch.randint(0, 3, (12, 12), generator=torch.Generator().manual_seed(0))
    tolerances = (0, 1, 3, 5)
    scores = boundary_f.boundary_f_scores(boundary_f.boundary_f_counts(label, label, 4, tolerances), tolerances)
    for t in tolerances:
        assert scores[f"{t}px"]["mBF"] == 100.0
        assert scores[f"{t}px"]["per_class"] == {"0": 100.0, "1": 100.0, "2": 100.0, "3": None}


def test_a_one_pixel_shift_passes_at_3px_and_fails_at_0():
    label, pred = square(10, 3, 3, 4, 4), square(10, 3, 4, 4, 4)
    scores = boundary_f.boundary_f_scores(boundary_f.boundary_f_counts(pred, label, 2, (0, 3)), (0, 3))
    assert scores["3px"]["mBF"] == 100.0 and scores["3px"]["per_class"] == {"0": 100.0, "1": 100.0}
    assert scores["0px"]["mBF"] < 100.0 and all(v < 100.0 for v in scores["0px"]["per_class"].values())


def test_boundary_counts_of_small_cases_by_hand():
    label = square(6, 2, 2, 2, 2)                                        # true edges (8): see the test above
    # shifted right by one: predicted edges (1,2),(2,2),(3,2),(1,3),(1,4),(2,4),(3,4),(3,3); 4 coincide at
    # 0 px ((1,2),(3,2),(1,3),(3,3)), all 8 are within 1 px; the same for both classes (the background's
    # edges are the square's)
    counts = boundary_f.boundary_f_counts(square(6, 2, 3, 2, 2), label, 2, (0, 1))
    assert counts.tolist() == [[[8, 4, 8, 4]] * 2, [[8, 8, 8, 8]] * 2]
    scores = boundary_f.boundary_f_scores(counts, (0, 1))
    assert scores["0px"]["per_class"] == {"0": 50.0, "1": 50.0} and scores["1px"]["mBF"] == 100.0
    # one column too wide (2x3): predicted edges (1,1),(1,2),(1,3),(1,4),(2,1),(2,4),(3,1),(3,2),(3,3),(3,4);
    # 7 are true edges, 7 of the 8 true edges are predicted ((2,3) is not): F = 2*7 / (10+8) = 77.78%
    counts = boundary_f.boundary_f_counts(square(6, 2, 2, 2, 3), label, 3, (0, 1))
    assert counts.tolist() == [[[10, 7, 8, 7]] * 2 + [[0, 0, 0, 0]], [[10, 10, 8, 8]] * 2 + [[0, 0, 0, 0]]]
    scores = boundary_f.boundary_f_scores(counts, (0, 1))
    assert scores["0px"]["per_class"] == {"0": 77.78, "1": 77.78, "2": None} and scores["0px"]["mBF"] == 77.78


def test_a_prediction_right_on_every_valid_pixel_scores_100():
    label = torch.zeros(6, 6, dtype=torch.long)
    label[:, 3:] = common.IGNORE_INDEX                                   # right half ignored
    pred = torch.zeros(6, 6, dtype=torch.long)
    pred[:, 4:] = 1                                                      # anything under the ignored half
    assert torch.equal(pred[label != 255], label[label != 255])
    scores = boundary_f.boundary_f_scores(boundary_f.boundary_f_counts(pred, label, 2, (0, 3)), (0, 3))
    assert scores["3px"]["mBF"] == 100.0, (
        f"boundary F {scores} for a prediction equal to the label on every valid pixel: the label's "
        f"class/ignore border counts as a true boundary but the prediction's edge there is dropped "
        f"(GSCNN zeroes both masks under the ignore region before seg2bmap)")


def test_boundary_f_in_evaluation_goes_to_summary_json(trained, tmp_path):
    out = str(tmp_path / "eval")
    _, metrics = train.main(TINY + ["--eval-only", "--checkpoint", trained["checkpoint"], "--boundary-f",
                                    "--out", out])
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary["boundary_f"]) == {"3px", "5px", "9px", "12px"}
    assert summary["boundary_f"] == metrics["boundary_f"]
    model = model_for(TINY, trained["checkpoint"])                      # recount over the same val images
    val = common.build_datasets(train.parse_args(TINY))[1]
    counts = 0
    for k in range(len(val)):
        image, label = val[k]
        pred = common.infer(model, image[None], label.shape).argmax(1)[0]
        counts = counts + boundary_f.boundary_f_counts(pred, label, 6)
    assert summary["boundary_f"] == json.loads(json.dumps(boundary_f.boundary_f_scores(
        counts, class_names=list(common.SYNTHETIC_CLASSES))))


# ----------------------------------------------------------------------------------------------
# 6. Maps


def test_save_maps_writes_predictions_of_the_first_n_images(trained, tmp_path):
    out = str(tmp_path / "eval")
    train.main(TINY + ["--eval-only", "--checkpoint", trained["checkpoint"], "--save-maps", "2", "--out", out])
    assert sorted(os.listdir(os.path.join(out, "maps"))) == [                      # FCN: no maps
        "legend.png", "synthetic_0000_pred.png", "synthetic_0001_pred.png"]
    model = model_for(TINY, trained["checkpoint"])
    image, label = common.build_datasets(train.parse_args(TINY))[1][1]
    pred = common.infer(model, image[None], label.shape).argmax(1)[0]
    expected = palette_image(pred.numpy(), predict.SYNTHETIC_PALETTE)
    np.testing.assert_array_equal(png(os.path.join(out, "maps", "synthetic_0001_pred.png")), expected)
    legend = predict.legend(common.dataset_classes("synthetic"), predict.SYNTHETIC_PALETTE)
    np.testing.assert_array_equal(png(os.path.join(out, "maps", "legend.png")), np.asarray(legend))


def test_save_maps_writes_heat_maps_of_a_model_with_maps(tmp_path):
    out = str(tmp_path / "run")
    argv = ["--method", "galdv1"] + TINY[2:6] + TINY[8:]                 # TINY without --head-channels 32
    model, _ = train.main(argv + ["--iters", "1", "--save-maps", "2", "--out", out])
    assert sorted(os.listdir(os.path.join(out, "maps"))) == ["legend.png", "synthetic_0000_ld_mask_0.png",
        "synthetic_0000_pred.png", "synthetic_0001_ld_mask_0.png", "synthetic_0001_pred.png"]
    val_set = common.build_datasets(train.parse_args(argv))[1]
    with torch.no_grad():
        ld_mask = model.eval()(val_set[0][0][None])["maps"]["ld_mask"]  # (1, 1, 5, 5)
    lo, hi = ld_mask.min().item(), ld_mask.max().item()                 # after 1 iteration: constant, 0.49988
    shown = common.resize(ld_mask, (40, 40))[0, 0].numpy()
    expected = predict.heatmap((shown - lo) / max(hi - lo, 1e-30))
    saved = png(os.path.join(out, "maps", "synthetic_0000_ld_mask_0.png"))
    np.testing.assert_array_equal(saved[:, :40], np.asarray(expected))             # the map, then its colour bar
    bar = saved[:, 42:42 + predict.COLOUR_BAR]
    assert bar[0].tolist() == [[128, 0, 0]] * predict.COLOUR_BAR and bar[-1].tolist() == [[0, 0, 128]] * predict.COLOUR_BAR
    assert bar_says(saved, 40, predict.bar_labels(lo, hi))              # labelled with the map's own range
    overlay = Image.blend(val_set.load(0)[0], expected, 0.5)             # the map over the evaluated image
    np.testing.assert_array_equal(saved[:, -40:], np.asarray(overlay))


def bar_says(saved, width, labels):
    """Whether the bar right of a map `width` pixels wide is labelled labels = (top, bottom)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    x, shown = width + 3 + predict.COLOUR_BAR, []
    for text, y in zip(labels, (0, len(saved) - 11)):
        ref = Image.new("RGB", (int(draw.textlength(text)), 12), "white")
        ImageDraw.Draw(ref).text((0, 0), text, fill="black")
        crop = saved[y:y + 12, x:x + ref.size[0]]
        shown.append(np.array_equal(crop, np.asarray(ref)[:len(crop)]))
    return all(shown)


@pytest.mark.parametrize("map_size,size", [((5, 5), (40, 40)), ((12, 15), (180, 240)), ((7, 3), (97, 50))])
def test_displayed_centre_is_the_peak_of_a_resized_impulse(map_size, size):
    """The marker's position: where resize() draws a one-cell impulse at its brightest (cells off the
    border: a border cell's value stays flat from its centre to the edge)."""
    for cell in [(1, 1), (map_size[0] // 2, map_size[1] - 2), (map_size[0] - 2, map_size[1] // 2)]:
        impulse = torch.zeros(1, 1, *map_size)
        impulse[0, 0, cell[0], cell[1]] = 1
        shown = common.resize(impulse, size)[0, 0]
        assert shown[predict.displayed_centre(cell, map_size, size)] >= shown.max() - 1e-6, cell  # ties: 1e-6


@pytest.mark.parametrize("method,flags,names", [
    ("galdv2", ["--affinity-pixel", "0.25", "0.75"], ["affinity"]),
    ("denoised_nl", ["--map-pixel", "0.25", "0.75"], ["map1_A", "map2_A_gr", "map3_A_lr"])])
def test_single_query_maps_ring_their_query_pixel(method, flags, names, tmp_path):
    """LDv2's affinity (Fig. 9) and Denoised NL's attention rows (Fig. 11): a white ring with a black
    edge around the query pixel, and the map untouched elsewhere."""
    out = str(tmp_path / "run")
    argv = ["--method", method] + TINY[2:6] + TINY[8:] + flags
    model, _ = train.main(argv + ["--iters", "1", "--save-maps", "1", "--out", out])
    image, _ = common.build_datasets(train.parse_args(argv))[1][0]
    with torch.no_grad():
        maps = model.eval()(image[None])["maps"]
    assert sorted(model.query_pixels()) == names
    for name in names:
        cell = common.query_cell((0.25, 0.75), maps[name].shape[-2:])
        y, x = predict.displayed_centre(cell, maps[name].shape[-2:], (40, 40))
        whole = png(os.path.join(out, "maps", f"synthetic_0000_{name}_0.png"))
        saved, r = whole[:, :40], predict.QUERY_RING
        assert [saved[y + dy, x + dx].tolist() for dy, dx in [(-r, 0), (r, 0), (0, -r), (0, r)]] == [[255] * 3] * 4
        assert [saved[y + dy, x + dx].tolist() for dy, dx in [(-r - 1, 0), (0, r + 1)]] == [[0] * 3] * 2
        lo, hi = maps[name].min().item(), maps[name].max().item()        # the map's own range
        assert hi > lo and bar_says(whole, 40, predict.bar_labels(lo, hi))
        plain = np.asarray(predict.heatmap((common.resize(maps[name], (40, 40))[0, 0].numpy() - lo) / (hi - lo)))
        assert (saved != plain).any(-1).sum() < 80 and (saved[y - 2:y + 3, x - 2:x + 3] == plain[y - 2:y + 3, x - 2:x + 3]).all()


def test_heatmap_is_the_jet_colour_map_clipped_to_0_1():
    colours = np.asarray(predict.heatmap(np.array([[0.0, 0.25, 0.5, 0.75, 1.0, -1.0, 2.0]])))[0]
    # jet by hand (r, g, b = 1.5 - |4v - 3|, |4v - 2|, |4v - 1|, clipped to [0, 1]): dark blue (0, 0, 0.5),
    # (0, 0.5, 1), (0.5, 1, 0.5), (1, 0.5, 0), dark red (0.5, 0, 0); 0.5 -> 128
    assert colours[:5].tolist() == [[0, 0, 128], [0, 128, 255], [128, 255, 128], [255, 128, 0], [128, 0, 0]]
    assert (colours[5] == colours[0]).all() and (colours[6] == colours[4]).all()   # clipped to [0, 1]


def test_colorize_maps_each_class_to_its_palette_colour_and_ignore_to_black():
    palette = [(10, 20, 30), (40, 50, 60), (70, 80, 90)]
    colours = np.asarray(predict.colorize(np.array([[2, 0], [255, 1]], np.uint8), palette))
    assert colours.tolist() == [[[70, 80, 90], [10, 20, 30]], [[0, 0, 0], [40, 50, 60]]]


def test_cityscapes_train_extra_reads_the_coarse_annotations(tmp_path):
    """GALD v2 Table VII's coarse stage: train_extra pairs leftImg8bit/train_extra with gtCoarse/train_extra
    (labelTrainIds as they are, labelIds through the 34 -> 19 map), and the fine splits never read gtCoarse."""
    root = str(tmp_path)
    raw = stripes([7, 26, 33, 0, 1])
    for city in CITIES:
        stem = os.path.join(city, f"{city}_000001_000019")
        write_image(os.path.join(root, "leftImg8bit", "train_extra", stem + "_leftImg8bit.png"))
        write_label(os.path.join(root, "gtCoarse", "train_extra", stem + "_gtCoarse_labelIds.png"), raw)
    ds = common.file_dataset("cityscapes", root, "train_extra")
    assert len(ds) == 2 and all("gtCoarse" in label for _, label in ds.pairs)
    np.testing.assert_array_equal(ds.load(0)[1], mapped(raw, LAYOUTS["cityscapes"]["mapping"]))
    with pytest.raises(common.InputError, match="gtFine"):
        common.file_dataset("cityscapes", root, "train")


# ----------------------------------------------------------------------------------------------
# 5. Real data as users have it (issue 26)


def test_a_16_bit_grayscale_image_keeps_its_range_instead_of_turning_white(tmp_path):
    values = (np.arange(20 * 24).reshape(20, 24) * 137 % 65536).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "thermal.png")
    assert Image.open(tmp_path / "thermal.png").mode.startswith("I")
    rgb = np.asarray(common.read_image(str(tmp_path / "thermal.png")))
    expected = np.rint(values / 257).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)


def test_cityscapes_city_folders_that_are_links_are_followed_once(tmp_path):
    """A small Cityscapes made of linked city folders: every linked city is read, a link loop ends, and
    two links to one city do not count its images twice."""
    full, small = str(tmp_path / "full"), tmp_path / "small"
    make_tree("cityscapes", full)                                        # val: aachen (0), bochum (1)
    for kind in ("leftImg8bit", "gtFine"):
        os.makedirs(small / kind / "val")
        for city in CITIES:
            os.symlink(os.path.join(full, kind, "val", city), small / kind / "val" / city)
        os.symlink(os.path.join(full, kind, "val", "aachen"), small / kind / "val" / "zz_aachen_again")
        os.symlink(small / kind / "val", os.path.join(full, kind, "val", "bochum", "loop"))
    ds = common.file_dataset("cityscapes", str(small), "val")
    assert [os.path.basename(i) for i, _ in ds.pairs] == ["aachen_000000_000019_leftImg8bit.png",
                                                          "bochum_000001_000019_leftImg8bit.png"]


@pytest.mark.parametrize("encoding,bom", [("utf-8-sig", b""), ("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff")])
def test_split_lists_saved_by_windows_editors_read_as_their_ids(tmp_path, encoding, bom):
    """Notepad's UTF-8 with a byte order mark, PowerShell's `>` (UTF-16 with one), Windows line ends."""
    root = str(tmp_path / "pc")
    make_tree("pascal_context59", root)
    text = "".join(pascal_id("train", i) + "\r\n" for i in range(3))
    with open(pascal_split_file(root, "train"), "wb") as f:
        f.write(bom + text.encode(encoding))
    assert len(common.file_dataset("pascal_context59", root, "train")) == 3
    pairs = tmp_path / "pairs.txt"
    pairs.write_bytes(("a.png labels/a.png\r\n").encode("utf-16"))
    assert predict.read_pairs(str(pairs)) == [("a.png", "labels/a.png")]


def test_ade20k_with_png_images_says_that_jpg_is_expected(tmp_path):
    root = str(tmp_path / "ade")
    make_tree("ade20k", root)
    folder = os.path.join(root, "images", "training")
    for name in os.listdir(folder):
        Image.open(os.path.join(folder, name)).save(os.path.join(folder, name[:-4] + ".png"))
        os.remove(os.path.join(folder, name))
    with pytest.raises(common.InputError, match=r"ade20k: no \*\.jpg image in .*training, only \.png files: the "
                                                r"layout expects \.jpg"):
        common.file_dataset("ade20k", root, "train")


@pytest.mark.parametrize("value", [40, 255])
def test_a_label_ids_file_with_a_value_past_the_34_ids_names_them(tmp_path, value):
    root = str(tmp_path / "cs")
    (image, label, raw), = make_tree("cityscapes", root, (("train", 1),))["train"]
    raw = raw.copy()
    raw[3, 4] = value
    write_label(label, raw)
    with pytest.raises(common.InputError, match=rf"{label}.*values \[{value}\] where a cityscapes label file of "
                                                r"its kind holds only 0..33"):
        common.file_dataset("cityscapes", root, "train").load_label(0)
