"""Prediction and auto-labelling (HMSA Sec. 4), colour images of labels, and heat maps of a model's maps.

    python train.py --method hier_ms_attn --checkpoint best.pt --predict FOLDER --min-confidence 0.9
    python train.py --method galdv2 --checkpoint best.pt --eval-only --save-maps 4

--predict writes OUT/labels (train ids; 255 where the max probability < --min-confidence), OUT/color,
OUT/overlay, OUT/labelIds with --label-ids, OUT/pairs.txt, which --extra-data reads back, and
OUT/legend.png (each class's name beside its colour). --save-maps N writes, for the first N evaluated
images, OUT/maps/STEM_pred.png (STEM: the image's file name without its suffix; synthetic_NNNN for
--dataset synthetic), OUT/maps/legend.png, and STEM_NAME_M.png for channel M of each entry NAME of the
model's `maps` (LD masks, attention rows, scale attention, unity maps): the heat map, its colour bar
labelled with the map's own min (bottom) and max (top), and the map blended over the image.
"""
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

import common
from tools import progress
from tools.crash_safety import replacing, write_failed


def add_args(parser):
    g = parser.add_argument_group("prediction and auto-labelling")
    g.add_argument("--predict", nargs="+", metavar="PATH", help="images or folders to label with --checkpoint")
    g.add_argument("--min-confidence", type=common.ranged(float, 0, 1), default=0.0,
                   help="label pixels whose max probability is below this as ignore (auto-labels: 0.9, HMSA Sec. 4)")
    g.add_argument("--label-ids", action="store_true", help="also write Cityscapes labelIds (test server)")
    g.add_argument("--save-maps", type=common.ranged(int, 0), default=0, metavar="N",
                   help="write the prediction and the model's heat maps of the first N evaluated images")


# ----------------------------------------------------------------------------------------------
# Palettes (mmsegmentation 1.x METAINFO; CamVid: SegNet tutorial), colour images and heat maps

CITYSCAPES_PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                      (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                      (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
                      (0, 80, 100), (0, 0, 230), (119, 11, 32)]
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
# mmseg/datasets/ade.py ADE20KDataset palette (150 RGB; (140, 140, 140) is used twice, idx 6 and 48)
ADE20K_PALETTE = [
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61),
    (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230),
    (220, 220, 220), (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71),
    (255, 41, 10), (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8),
    (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0),
    (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0),
    (194, 255, 0), (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255),
    (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0),
    (255, 0, 20), (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163),
    (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0),
    (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255),
    (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255),
    (71, 255, 0), (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255),
    (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255),
    (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
]
# mmseg/datasets/mapillary.py MapillaryDataset_v1 palette (66 RGB)
MAPILLARY_V12_PALETTE = [
    (165, 42, 42), (0, 192, 0), (196, 196, 196), (190, 153, 153), (180, 165, 180), (90, 120, 150),
    (102, 102, 156), (128, 64, 255), (140, 140, 200), (170, 170, 170), (250, 170, 160), (96, 96, 96),
    (230, 150, 140), (128, 64, 128), (110, 110, 110), (244, 35, 232), (150, 100, 100), (70, 70, 70),
    (150, 120, 90), (220, 20, 60), (255, 0, 0), (255, 0, 100), (255, 0, 200), (200, 128, 128),
    (255, 255, 255), (64, 170, 64), (230, 160, 50), (70, 130, 180), (190, 255, 255), (152, 251, 152),
    (107, 142, 35), (0, 170, 30), (255, 255, 128), (250, 0, 30), (100, 140, 180), (220, 220, 220),
    (220, 128, 128), (222, 40, 40), (100, 170, 30), (40, 40, 40), (33, 33, 33), (100, 128, 160), (142, 0, 0),
    (70, 100, 150), (210, 170, 100), (153, 153, 153), (128, 128, 128), (0, 0, 80), (250, 170, 30),
    (192, 192, 192), (220, 220, 0), (140, 140, 20), (119, 11, 32), (150, 0, 255), (0, 60, 100), (0, 0, 142),
    (0, 0, 90), (0, 0, 230), (0, 80, 100), (128, 64, 64), (0, 0, 110), (0, 0, 70), (0, 0, 192), (32, 32, 32),
    (120, 10, 10), (0, 0, 0),
]

# the synthetic classes sky, ground, building, car, sign, pole
SYNTHETIC_PALETTE = [(70, 130, 180), (128, 64, 128), (70, 70, 70), (0, 0, 142), (220, 220, 0), (153, 153, 153)]


def generated_palette(n):
    """The PASCAL VOC bit-interleaved colour map (used where a dataset has no palette of its own)."""
    palette = []
    for i in range(n):
        r = g = b = 0
        for bit in range(8):
            r |= ((i >> (3 * bit)) & 1) << (7 - bit)
            g |= ((i >> (3 * bit + 1)) & 1) << (7 - bit)
            b |= ((i >> (3 * bit + 2)) & 1) << (7 - bit)
        palette.append((r, g, b))
    return palette


# --dataset NAME -> colours in label order
PALETTES = {
    "synthetic": SYNTHETIC_PALETTE, "cityscapes": CITYSCAPES_PALETTE, "ade20k": ADE20K_PALETTE,
    "pascal_context59": ADE20K_PALETTE[:59], "pascal_context60": ADE20K_PALETTE[:60],
    "coco_stuff10k": generated_palette(171), "coco_stuff164k": generated_palette(171),
    "camvid": CAMVID_PALETTE, "mapillary": MAPILLARY_V12_PALETTE[:65], "mapillary_cityscapes19": CITYSCAPES_PALETTE,
}


def colorize(label, palette):
    """(H, W) train ids -> PIL RGB with the dataset's palette (ignore = black)."""
    table = np.zeros((256, 3), np.uint8)
    table[:len(palette)] = palette
    return Image.fromarray(table[np.asarray(label, dtype=np.uint8)])


LEGEND_ROW, SWATCH = 14, (20, 10)                             # pixels: a row of legend(), its swatch (w, h)


def legend(class_names, palette):
    """One row of LEGEND_ROW pixels per class, top down in label order: a SWATCH of its palette colour at
    x 2.., then its name; a last row for ignore (255, black)."""
    rows = list(zip(class_names, palette)) + [("ignore", (0, 0, 0))]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    out = Image.new("RGB", (SWATCH[0] + 8 + int(max(draw.textlength(n) for n, _ in rows)),
                            LEGEND_ROW * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for k, (name, colour) in enumerate(rows):
        top = k * LEGEND_ROW + (LEGEND_ROW - SWATCH[1]) // 2
        draw.rectangle((2, top, 1 + SWATCH[0], top + SWATCH[1] - 1), fill=tuple(colour))
        draw.text((SWATCH[0] + 6, k * LEGEND_ROW), name, fill="black")
    return out


def heatmap(values):
    """(H, W) floats in [0, 1] -> PIL RGB, dark blue -> cyan -> yellow -> red."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * v - 3), 0, 1), np.clip(1.5 - np.abs(4 * v - 2), 0, 1),
                    np.clip(1.5 - np.abs(4 * v - 1), 0, 1)], -1)
    return Image.fromarray((rgb * 255 + 0.5).astype(np.uint8))


COLOUR_BAR = 12                                                # pixels wide, plus a 2-pixel gap
QUERY_RING = 4                                                 # pixels, the radius of the query marker


def bar_labels(lo, hi):
    """(hi, lo) in "%.Ng", N significant digits: 3, or one more than the fewest that tell them apart."""
    differ = next((n for n in range(1, 8) if f"{hi:.{n}g}" != f"{lo:.{n}g}"), 7)
    return f"{hi:.{max(3, differ + 1)}g}", f"{lo:.{max(3, differ + 1)}g}"


def with_colour_bar(values, lo=None, hi=None, query=None, image=None):
    """The heat map of (H, W) `values`, then a colour bar, then (given the PIL RGB `image` it shows) the
    map blended 50% over that image. One rule for every map: colours run linearly from lo (dark blue,
    the bar's bottom) to hi (dark red, its top), by default the values' own min and max, and the bar's
    labels are hi and lo (bar_labels), so that a colour reads back as a value (a constant map is all
    dark blue). A map of one query pixel's attention rings query = (y, x) in the map's pixels."""
    values = np.asarray(values, dtype=np.float32)
    lo, hi = float(values.min()) if lo is None else lo, float(values.max()) if hi is None else hi
    heat = heatmap((values - lo) / max(hi - lo, 1e-30))
    H, W = values.shape
    if query is not None:
        y, x = query
        for radius, colour in ((QUERY_RING + 1, "black"), (QUERY_RING, "white")):   # white ring, black edge
            ImageDraw.Draw(heat).ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour)
    labels = bar_labels(lo, hi)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    right = W + COLOUR_BAR + 6 + int(max(draw.textlength(t) for t in labels))     # where the blend goes
    out = Image.new("RGB", (right + W * (image is not None), H), "white")
    out.paste(heat, (0, 0))
    out.paste(heatmap(np.repeat(np.linspace(1, 0, H, dtype=np.float32)[:, None], COLOUR_BAR, 1)), (W + 2, 0))
    if image is not None:
        out.paste(Image.blend(image, heat, 0.5), (right, 0))
    draw = ImageDraw.Draw(out)
    draw.text((W + 3 + COLOUR_BAR, 0), labels[0], fill="black")
    draw.text((W + 3 + COLOUR_BAR, max(H - 11, 0)), labels[1], fill="black")
    return out


def denormalized(x):
    """A (3, H, W) tensor of common.to_normalized_tensor back to the PIL RGB image (rounded)."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (common.IMAGENET_MEAN, common.IMAGENET_STD))
    rgb = ((x.detach().float().cpu() * std + mean) * 255).round().clamp(0, 255).byte()
    return Image.fromarray(np.ascontiguousarray(rgb.permute(1, 2, 0).numpy()))


def displayed_centre(cell, map_size, size):
    """Where resize() (bilinear, align_corners=False) draws the centre of `cell` of an (h, w) map
    shown at `size` = (H, W): ((i + 0.5) * H / h - 0.5, ...), rounded."""
    return tuple(round((i + 0.5) * n / m - 0.5) for i, m, n in zip(cell, map_size, size))


# ----------------------------------------------------------------------------------------------
# --predict


def image_files(paths):
    """[(image path, output name)]: a folder's images keep their sub-folders in the output name."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = [f for f in common.walk_files(path) if f.lower().endswith(common.IMAGE_SUFFIXES)]
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


def write_pairs(path, pairs):
    """pairs.txt: one JSON [image, label] pair per line, so that any file name (spaces, tabs,
    newlines) survives the round trip to --extra-data."""
    with replacing(path) as tmp:
        with open(tmp, "w") as f:
            f.writelines(json.dumps([image, label]) + "\n" for image, label in pairs)


def read_pairs(path):
    """The pairs of pairs.txt: JSON lines as write_pairs writes, or `image label` separated by
    whitespace (a list written by hand, UTF-8 or UTF-16)."""
    lines = common.read_text_lines(path)
    pairs = []
    for number, line in enumerate(lines, 1):
        pair = json.loads(line) if line.startswith("[") else line.split()[:2]
        if len(pair) != 2:
            raise common.InputError(f"{path} line {number}: expected an image and a label, got {line[:100]!r}")
        pairs.append(tuple(pair))
    return pairs


def save_png(image, path, done, total):
    """image.save(path); a failed write (a full disk) removes the partial file and is an InputError
    naming it: the images written before it stay."""
    try:
        image.save(path)
    except OSError as e:
        if os.path.exists(path):
            os.remove(path)
        raise write_failed(path, e, f"the {done} of {total} images labelled before it are kept") from None


def label_one(model, path, args, device):
    """(PIL RGB image, (H, W) uint8 train ids with 255 below --min-confidence, pixels below it)."""
    image = common.read_image(path)
    x = common.to_normalized_tensor(image)[None].to(device)
    confidence, label = common.infer_as_flagged(model, x, x.shape[-2:], args).softmax(1).max(1)
    unsure = confidence < args.min_confidence
    label[unsure] = common.IGNORE_INDEX
    return image, label[0].byte().cpu().numpy(), int(unsure.sum())


def unsure_note(args, unsure, world, device):
    """--label-ids with --min-confidence: the pixels below it are written as id 0 (unlabeled) in
    labelIds/, which the Cityscapes evaluator counts as misses; said when any was (summed over ranks)."""
    count = torch.tensor(unsure, device=device)
    if world > 1:
        dist.all_reduce(count)
    if not (args.label_ids and count.item()):
        return ""
    return (f"note: {count.item():,} pixels below --min-confidence {args.min_confidence} are id 0 (unlabeled) "
            f"in labelIds/, which the Cityscapes evaluator counts as misses: for a submission use --min-confidence 0")


@torch.no_grad()
def predict(model, args, rank, world, device):
    """Label every image of --predict into --out (see the module's docstring); returns the count."""
    model.eval()
    files = image_files(args.predict)
    palette = PALETTES[args.dataset]
    kinds = ["labels", "color", "overlay"] + ["labelIds"] * args.label_ids
    for kind in kinds:
        for folder in {os.path.dirname(os.path.join(args.out, kind, n)) for _, n in files}:
            os.makedirs(folder, exist_ok=True)
    unsure, mine = 0, files[rank::world]
    bar = progress.Progress(f"labelling{' (rank 0)' * (world > 1)}", len(mine), rank == 0)
    for done, (path, name) in enumerate(mine):
        image, label, below = label_one(model, path, args, device)
        unsure += below
        color = colorize(label, palette)
        outputs = {"labels": Image.fromarray(label), "color": color, "overlay": Image.blend(image, color, 0.5)}
        if args.label_ids:
            outputs["labelIds"] = Image.fromarray(common.CITYSCAPES_TRAIN_ID_TO_ID[label])
        for kind, output in outputs.items():
            save_png(output, os.path.join(args.out, kind, name), done, len(mine))
        bar.update()
    note = unsure_note(args, unsure, world, device)
    if rank == 0:
        write_pairs(os.path.join(args.out, "pairs.txt"), [(os.path.abspath(p), f"labels/{n}") for p, n in files])
        legend(common.dataset_classes(args.dataset), palette).save(os.path.join(args.out, "legend.png"))
        results = f" (for cityscapesScripts: CITYSCAPES_RESULTS={os.path.join(args.out, 'labelIds')})" * args.label_ids
        print(f"labelled {len(files)} images into {args.out}{results}")
        if note:
            print(note)
    return len(files)


# ----------------------------------------------------------------------------------------------
# --save-maps


class MapSaver:
    """An evaluation extra (train.evaluate): the prediction and heat maps of the first N images, and the
    legend (written with image 0, so by rank 0 alone); `dataset` the evaluated one (its image stems
    name the files)."""

    def __init__(self, model, dataset, args):
        self.model, self.palette, self.args, self.dataset = model, PALETTES[args.dataset], args, dataset
        self.folder = os.path.join(args.out, "maps")

    def add(self, index, image, pred, label):
        if index >= self.args.save_maps:
            return
        os.makedirs(self.folder, exist_ok=True)
        if index == 0:
            legend(self.dataset.class_names, self.palette).save(os.path.join(self.folder, "legend.png"))
        stem = os.path.join(self.folder, self.dataset.image_stem(index))
        colorize(pred[0].cpu(), self.palette).save(f"{stem}_pred.png")
        with common.autocast(self.args.amp, image.device):
            maps = self.model.maps(image, tuple(self.args.eval_scales))
        queries, picture = self.model.query_pixels(), denormalized(image[0])
        for name, value in maps.items():
            query = None
            if name in queries:
                query = displayed_centre(common.query_cell(queries[name], value.shape[-2:]), value.shape[-2:],
                                         pred.shape[-2:])
            value = value[0].float().cpu()                                          # (M, h, w)
            shown = common.resize(value[None], pred.shape[-2:])[0]                  # (M, H, W), within each range
            for m, channel in enumerate(shown):
                lo, hi = value[m].min().item(), value[m].max().item()
                with_colour_bar(channel.numpy(), lo, hi, query, picture).save(f"{stem}_{name}_{m}.png")

    def result(self, world):
        return {}
