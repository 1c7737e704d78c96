"""The core of segpapers, in two halves.

The model half, what every method file stands on (a reader of a method needs this half only):
conventions -> small layers -> dilated ResNet -> HRNetV2 -> weights (--pretrained, checkpoints) ->
losses (CE, OHEM) -> metrics (confusion matrix, mIoU) -> poly LR -> the model interface and inference
(whole, sliding window, multi-scale) -> the FCN baseline.

The data half, below the divider "THE DATA HALF" (train.py and tools/ use it, no model does):
transforms -> datasets (synthetic, and the usual layouts on disk) -> the training sampler. The extras
(costs, prediction, boundary F-score, class-uniform sampling) live in tools/.

Conventions (one home each): IGNORE_INDEX, the ImageNet mean/std, the two interpolations (`resize`:
bilinear, align_corners=False, for images and pooled bins; `upsample_strided`: a strided network map
back to pixels, each sample where it was computed), `poly_lr`, `log_mean_softmax` (how test views
are averaged).

The method interface (README "The interface"): a method file has `add_args(parser)` and
`build_model(args)`; the model is a `SegModel` with
    forward(image)              -> dict: 'out' (B, K, H, W) logits at the image's size (in eval;
                                   in training only if a loss reads it), plus whatever else the
                                   method makes ('aux', 'maps', ...)
    loss(outputs, target)       -> dict of named scalar terms and 'total'
    predict(image, scales, flip)-> (B, K, H, W) logits; the default averages views, a method with
                                   its own multi-scale chain (HMSA) overrides it.
    maps(image, scales)         -> name -> (B, M, h, w) heat maps, each drawn on its own range (--save-maps)
"""
import argparse
import codecs
import math
import os
import re
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def ranged(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite `kind` (int or float) within [low, high] (open where asked), so a
    bad value stops at parse time with argparse's own one-line error naming the flag."""
    bounds = ("(" if low_open else "[") + ("-inf" if low is None else f"{low}") + ", " + \
        ("inf" if high is None else f"{high}") + (")" if high_open else "]")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must lie in {bounds}, got {text}")
        return value
    return parse


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


def upsample_strided(x, size, stride):
    """Up-sample a map made by convs of total stride `stride` (padding k // 2) to `size`, bilinearly,
    each coarse sample j on the fine pixel stride * j its kernels were centred on (the authors' GALD and
    Denoised NL code get this from align_corners=True at their stride * k + 1 crops; `resize` would put
    sample j at stride * j + (stride - 1) / 2). Past the last sample its value repeats.
    (B, C, h, w) -> (B, C, H, W) with h = ceil(H / stride), w = ceil(W / stride).

    align_corners=True onto stride * (n - 1) + 1 pixels reads fine pixel y at coarse position y / stride.
    A side that is not of that length gets one replicated sample appended, and the first H (W) pixels of
    the stride * n + 1 are kept, a view: one full-size map is allocated, at most stride - 1 rows and
    columns larger than (H, W).
    """
    H, W = size
    h, w = x.shape[-2:]
    if not (stride * (h - 1) < H <= stride * h and stride * (w - 1) < W <= stride * w):
        raise ValueError(f"a ({h}, {w}) map of stride {stride} does not cover ({H}, {W})")
    pad_h, pad_w = int(H != stride * (h - 1) + 1), int(W != stride * (w - 1) + 1)
    # the last row / column repeated by concatenation: F.pad(mode="replicate") would keep x alive for
    # its backward, a second map until the training step's peak
    if pad_h:
        x = torch.cat([x, x[..., -1:, :]], -2)                                # (B, C, h + 1, w)
    if pad_w:
        x = torch.cat([x, x[..., -1:]], -1)                                   # (B, C, h', w + 1)
    span = (stride * (h - 1 + pad_h) + 1, stride * (w - 1 + pad_w) + 1)
    x = F.interpolate(x, size=span, mode="bilinear", align_corners=True)
    return x[..., :H, :W]                                                     # (B, C, H, W)


def query_cell(pixel, size):
    """The cell (y, x) of an (h, w) map at relative position pixel = (y, x) in [0, 1] (corners: 0 and 1)."""
    return tuple(min(n - 1, max(0, round(r * (n - 1)))) for r, n in zip(pixel, size))


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


DILATION_STYLES = ("pspnet", "torchvision")


class ResNet(nn.Module):
    """Dilated ResNet-18/34/50/101 returning the four stage outputs, at strides (`.strides`) 4, 8,
    min(16, os) and os of the output stride os (8: 4, 8, 8, 8; 16: 4, 8, 16, 16; 32: 4, 8, 16, 32);
    sample j of a stride-s output is centred on input pixel s * j.

    stem='tv': 7x7 conv (torchvision keys conv1, bn1). stem='deep': three 3x3 convs 3->64->64->128
    (CSAIL keys conv1, bn1, conv2, bn2, conv3, bn3), as the GALD / Denoised NL / PSPNet line uses.
    dilation_style='pspnet' (the default) dilates EVERY block of a dilated stage (layer3 by 2 and
    layer4 by 4 at output stride 8), as PSPNet and the authors' trunks (lxtGH/GALD-DGCNet
    libs/models/GALDNet.py, the Denoised NL model.py, NVIDIA/semantic-segmentation network/utils.py);
    'torchvision' keeps the previous dilation in the first block of a dilated stage (layer3 = 1, 2, 2,
    ..., layer4 = 2, 4, 4), as torchvision's resnet(replace_stride_with_dilation=...). The two have
    the same parameters and state_dict: a pretrained file loads into either. multi_grid=(1, 2, 4)
    multiplies layer4's dilation per block, the first block included (GALD / DNL code: 4, 8, 16).
    """

    def __init__(self, depth=50, output_stride=8, stem="tv", multi_grid=None, dilation_style="pspnet"):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise InputError(f"ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        if output_stride not in (8, 16, 32):
            raise InputError(f"output stride must be 8, 16 or 32, got {output_stride}")
        if dilation_style not in DILATION_STYLES:
            raise InputError(f"dilation style must be one of {DILATION_STYLES}, got {dilation_style!r}")
        block, counts = RESNET_LAYOUTS[depth]
        self.stem, self.dilation_style = stem, dilation_style
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
        self.strides = (4, 8, min(16, output_stride), output_stride)   # of c1 .. c4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride, dilation, multi_grid):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        if multi_grid:
            dilations = [dilation * multi_grid[i % len(multi_grid)] for i in range(blocks)]
        elif self.dilation_style == "pspnet":
            dilations = [dilation] * blocks
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


# ----------------------------------------------------------------------------------------------
# HRNetV2: Wang et al., "Deep High-Resolution Representation Learning for Visual Recognition"
# (TPAMI 2020; [23] of Specialize and Fuse, the trunk of HRNet-OCR in Hierarchical Multi-Scale
# Attention Sec. 3.1). Sec. 3: a stem of two stride-2 3x3 convs, then stages that run parallel
# branches at strides 4, 8, 16, 32 and repeatedly fuse them; Fig. 4 (b): the HRNetV2 feature is every
# branch up-sampled to stride 4 and concatenated. Structure and key names as the authors' trunk,
# HRNet/HRNet-Image-Classification lib/models/cls_hrnet.py (HighResolutionNet without its
# classification head) and NVIDIA/semantic-segmentation network/hrnetv2.py: their files load as they are.

# --backbone -> the authors' experiments/cls_hrnet_*.yaml: branch widths, Bottlenecks of layer1 and
# their width, modules in stages 2/3/4, BasicBlocks per branch in each module.
HRNET_LAYOUTS = {
    "hrnet48": dict(widths=(48, 96, 192, 384)),
    "hrnet32": dict(widths=(32, 64, 128, 256)),
    "hrnet18": dict(widths=(18, 36, 72, 144)),
    "hrnet18-small": dict(widths=(16, 32, 64, 128), layer1_blocks=1, layer1_width=32, modules=(1, 1, 1),
                          blocks=2),                           # W18-small-v1, the authors' smallest
}
HRNET_IMAGENET_HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def conv_bn(in_ch, out_ch, kernel_size, stride=1):
    """Conv (no bias) -> BN, no ReLU: a fuse path, summed with the others before the ReLU."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_ch))


def fuse_path(widths, src, dst):
    """Branch src brought to branch dst's resolution and width (Sec. 3, "repeated multi-resolution
    fusions"; branches finest first). The same branch: as it is. A coarser one: 1x1 conv + BN (the
    up-sampling follows in HRModule.fuse). A finer one: dst - src stride-2 3x3 convs with BN, ReLU
    between them, the last one to dst's width."""
    if src == dst:
        return nn.Identity()
    if src > dst:
        return conv_bn(widths[src], widths[dst], 1)
    steps = [conv_bn_relu(widths[src], widths[src], 3, stride=2) for _ in range(dst - src - 1)]
    return nn.Sequential(*steps, conv_bn(widths[src], widths[dst], 3, stride=2))


class HRModule(nn.Module):
    """One HRNet module (Sec. 3): `blocks` BasicBlocks on every branch, then every branch i becomes
    ReLU(sum over j of branch j brought to branch i). widths: of the branches, finest first."""

    def __init__(self, widths, blocks):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(*[BasicBlock(w, w) for _ in range(blocks)]) for w in widths)
        self.fuse_layers = nn.ModuleList(nn.ModuleList(fuse_path(widths, j, i) for j in range(len(widths)))
                                         for i in range(len(widths)))

    def fuse(self, xs):
        """[(B, C_j, h_j, w_j) for each branch j] -> the same shapes, every branch fused."""
        outputs = []
        for i, paths in enumerate(self.fuse_layers):
            total = None
            for j, (path, x) in enumerate(zip(paths, xs)):
                y = path(x)                                    # (B, C_i, h_j, w_j)
                if j > i:
                    # NOTE(paper-gap): bilinear, align_corners=False, to branch i's exact size, as
                    # NVIDIA/semantic-segmentation network/hrnetv2.py (cfg.MODEL.ALIGN_CORNERS is False,
                    # no recipe in its scripts/ sets it), which trained the released HMSA weights;
                    # HRNet/HRNet-Image-Classification lib/models/cls_hrnet.py (the ImageNet file's
                    # training) up-samples by nearest neighbour instead.
                    y = resize(y, xs[i].shape[-2:])            # (B, C_i, h_i, w_i)
                total = y if total is None else total + y      # summed in the authors' order, j = 0, 1, ...
            outputs.append(F.relu(total))
        return outputs

    def forward(self, xs):
        return self.fuse([branch(x) for branch, x in zip(self.branches, xs)])


class HRNet(nn.Module):
    """HRNetV2 returning its four branch outputs at strides (`.strides`) 4, 8, 16, 32, of widths
    `.channels` (C, 2C, 4C, 8C); sample j of a stride-s output is centred on input pixel s * j, and an
    (H, W) input gives ceil(H / s) x ceil(W / s) maps. `hrnet_features` makes the segmentation feature.

    Stem (Sec. 3): two 3x3 stride-2 convs of 64 with BN and ReLU. Stage 1 (layer1): Bottlenecks of
    width layer1_width (output 4x that). Each later stage adds one branch (transitionN: a stride-2 3x3
    conv from the coarsest branch; a 3x3 conv where a kept branch changes width) and runs `modules`
    HRModules. Defaults: W48, the trunk of both papers' HRNet48 rows.
    """

    def __init__(self, *, widths=(48, 96, 192, 384), layer1_blocks=4, layer1_width=64, modules=(1, 4, 3), blocks=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        stage1_width = layer1_width * Bottleneck.expansion
        self.layer1 = nn.Sequential(Bottleneck(64, layer1_width, downsample=conv_bn(64, stage1_width, 1)),
                                    *[Bottleneck(stage1_width, layer1_width) for _ in range(layer1_blocks - 1)])
        previous = (stage1_width,)
        for stage, n_modules in enumerate(modules, start=2):
            current = widths[:stage]
            setattr(self, f"transition{stage - 1}", self.transition(previous, current))
            setattr(self, f"stage{stage}", nn.Sequential(*[HRModule(current, blocks) for _ in range(n_modules)]))
            previous = current
        self.channels = tuple(widths)
        self.strides = (4, 8, 16, 32)                          # of the four branches
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # NOTE(paper-gap): He init (fan_out) as the project's ResNet and HRNet-Image-Classification
                # lib/models/cls_hrnet.py init_weights; NVIDIA network/hrnetv2.py init_weights draws
                # N(0, 0.001) instead, before loading the ImageNet file.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def transition(previous, current):
        """Kept branches: as they are, or a 3x3 conv to the new width; the new branch: a stride-2 3x3
        conv of the coarsest one (wrapped once more, as the authors' keys transitionN.K.0.0.*)."""
        kept = [nn.Identity() if p == c else conv_bn_relu(p, c, 3) for p, c in zip(previous, current)]
        new = nn.Sequential(conv_bn_relu(previous[-1], current[-1], 3, stride=2))
        return nn.ModuleList([*kept, new])

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))                 # (B, 64, H/2, W/2)
        x = self.relu(self.bn2(self.conv2(x)))                 # (B, 64, H/4, W/4)
        xs = [self.layer1(x)]                                  # [(B, 4 * layer1_width, H/4, W/4)]
        for stage in range(2, 5):
            transition = getattr(self, f"transition{stage - 1}")
            xs = [t(x) for t, x in zip(transition, xs + xs[-1:])]   # the new branch from the coarsest
            xs = getattr(self, f"stage{stage}")(xs)            # [(B, C_i, H/s_i, W/s_i)] s_i = 4, 8, ...
        return xs


def hrnet_features(features):
    """HRNetV2's segmentation feature (Fig. 4 (b)): the branch outputs b2..b4 up-sampled to b1's size and
    concatenated with b1 (the 1x1 conv that mixes them belongs to the head that reads it).
    [(B, C1, h1, w1), (B, C2, h2, w2), ...] -> (B, C1 + C2 + C3 + C4, h1, w1): 720 channels for W48."""
    size = features[0].shape[-2:]
    # NOTE(paper-gap): bilinear with align_corners=False (`resize`), as NVIDIA/semantic-segmentation
    # network/hrnetv2.py forward does (cfg.MODEL.ALIGN_CORNERS False), so that its released weights give
    # its outputs; not upsample_strided's alignment.
    return torch.cat([features[0], *(resize(f, size) for f in features[1:])], dim=1)   # (B, sum C, h1, w1)


# ----------------------------------------------------------------------------------------------
# Weights: --pretrained into a trunk, the trunk of --backbone, checkpoints into a model


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
    """Load a local ImageNet checkpoint into `backbone` (a ResNet or an HRNet); any missing, unexpected
    or mis-shaped key raises InputError listing them (never a silent partial load). An HRNet file's
    classification head (cls_hrnet.py's incre_modules, downsamp_modules, final_layer, classifier) is
    dropped, and named in one printed line."""
    checkpoint = load_checkpoint(path, "pretrained weights")
    if isinstance(backbone, HRNet):
        state = backbone_state_from_checkpoint(checkpoint, stem=None)
        head = [k for k in state if k.startswith(HRNET_IMAGENET_HEAD)]
        state = {k: v for k, v in state.items() if k not in head}
        subject = (f"the HRNetV2 trunk of widths {backbone.channels} (an HRNet-Image-Classification "
                   f"hrnetv2_w<C>_imagenet_pretrained.pth fits --backbone hrnet<C>)")
    else:
        state, head = backbone_state_from_checkpoint(checkpoint, backbone.stem), []
        subject = (f"the stem={backbone.stem!r} backbone (torchvision files need --stem tv, "
                   f"deep-stem files --stem deep)")
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k, v in state.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    if missing or unexpected or shapes:
        raise key_mismatch(path, subject, (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)))
    backbone.load_state_dict(state, strict=True)
    if head:
        parts = ", ".join(dict.fromkeys(k.split(".")[0] for k in head))
        print(f"--pretrained {path}: {len(state)} trunk entries loaded; the ImageNet classification head "
              f"dropped ({len(head)} entries: {parts})")


def build_backbone(args, output_stride=None, hrnet=False):
    """The trunk of --backbone with --pretrained loaded: a ResNet of --stem/--output-stride (or
    `output_stride`)/--multi-grid/--dilation-style, or an HRNetV2 (--backbone hrnet*), which only a
    caller whose paper uses it at stride 4 accepts (hrnet=True); any other method refuses it."""
    if args.backbone in HRNET_LAYOUTS:
        if not hrnet:
            raise InputError(f"--method {args.method} is built on a dilated ResNet's stride-8 features and "
                             f"takes no --backbone {args.backbone} (HRNetV2 is for specialize_fuse and hier_ms_attn)")
        net = HRNet(**HRNET_LAYOUTS[args.backbone])
    else:
        net = ResNet(depth=int(args.backbone.replace("resnet", "")), stem=args.stem,
                     output_stride=output_stride or args.output_stride, multi_grid=args.multi_grid,
                     dilation_style=args.dilation_style)
    if args.pretrained:
        load_pretrained(net, args.pretrained)
    return net


def load_checkpoint(path, what="checkpoint"):
    """The dict of tensors (and plain data) saved in PATH, loaded safely (weights_only=True). A file
    that is missing, unreadable, unsafe to unpickle or not a dict is an InputError naming it."""
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                     # truncated, random bytes, a pickle of code
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]   # its first sentence
        reason = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
        raise InputError(f"{path} is not a {what} file torch.load(weights_only=True) can read ({reason})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path} is not a {what} file: it holds a {type(state).__name__}, not a dict of weights")
    return state


def weights_in(state, path):
    """The model's state_dict in a loaded checkpoint: its 'model' entry (what train.py writes), or
    the whole dict when that is a plain state_dict."""
    weights = state.get("model", state)
    if not isinstance(weights, dict) or not weights or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise InputError(f"{path} is not a checkpoint of this project: expected a state_dict of tensors "
                         f"(or a dict with one under 'model'), found {describe(weights)}")
    return weights


def describe(value):
    """'a dict of int' / 'a list': what a file held, for messages."""
    if isinstance(value, dict) and value:
        return f"a dict of {type(next(iter(value.values()))).__name__}"
    return f"{'an empty ' if isinstance(value, dict) else 'a '}{type(value).__name__}"


def some_keys(kind, keys, shown=3):
    """'2 missing keys (a, b)': a count and the first few, for one-line messages."""
    more = ", ..." if len(keys) > shown else ""
    return f"{len(keys)} {kind} key{'s' * (len(keys) != 1)} ({', '.join(keys[:shown])}{more})"


def key_mismatch(path, subject, kinds, hint=""):
    """InputError 'PATH does not fit SUBJECT: 2 missing keys (a, b); ...' for the non-empty (kind, keys)
    pairs: the first few keys of each kind in the one-line message, every key in a text file it names."""
    kinds = [(kind, keys) for kind, keys in kinds if keys]
    with tempfile.NamedTemporaryFile("w", prefix="key-mismatch-", suffix=".txt", delete=False) as listing:
        listing.write(f"{path} does not fit {subject}\n")
        for kind, keys in kinds:
            listing.write(f"\n{len(keys)} {kind}:\n")
            listing.writelines(f"{key}\n" for key in keys)
    summary = "; ".join(some_keys(kind, keys) for kind, keys in kinds)
    return InputError(f"{path} does not fit {subject}: {summary}{hint}; every key in {listing.name}")


def load_state(model, weights, path, finetune=False, can_finetune=True):
    """Load the state_dict `weights` (read from PATH) into model. Every key must fit, except with
    finetune: then the layers the file lacks (an attention head that a pre-trained model never had)
    or holds in another shape (a classifier of another class count) start freshly initialised, and
    are listed. Keys of the file that the model does not have are always an error (the wrong model).
    can_finetune=False: the caller cannot start layers fresh (evaluation, a resume), so the message
    does not suggest --finetune."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [k for k in weights if k in own and weights[k].shape != own[k].shape]
    if unexpected or ((missing or reshaped) and not finetune):
        hint = " (--finetune starts missing and mis-shaped layers fresh)" if can_finetune and not unexpected else ""
        raise key_mismatch(path, "this model", (("unexpected", unexpected), ("missing", missing),
                                                ("mis-shaped", reshaped)), hint)
    fresh = missing + reshaped
    if fresh:
        print(f"--finetune: {len(fresh)} keys start freshly initialised: {', '.join(fresh)}")
    model.load_state_dict({k: v for k, v in weights.items() if k not in reshaped}, strict=not fresh)


def load_weights(model, path, finetune=False, can_finetune=True):
    """load_state with the weights of checkpoint PATH (a train.py checkpoint or a plain state_dict)."""
    load_state(model, weights_in(load_checkpoint(path), path), path, finetune, can_finetune)


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


def main_and_aux_loss(outputs, target, *, ohem, aux_weight):
    """The PSPNet-style loss of FCN and GALD: (OHEM) CE on 'out' + aux_weight * CE on the layer3 'aux'."""
    main = ohem_cross_entropy(outputs["out"], target) if ohem else cross_entropy(outputs["out"], target)
    aux = cross_entropy(outputs["aux"], target)
    return {"main": main, "aux": aux, "total": main + aux_weight * aux}


# ----------------------------------------------------------------------------------------------
# Metrics (mmseg definitions, from one confusion matrix summed over the split)


def confusion_matrix(pred, label, num_classes):
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ignore pixels skipped. Every
    prediction and label of a counted pixel must lie in [0, K): a ValueError names the values that do
    not (one would otherwise be filed in a wrong cell, or past the matrix)."""
    valid = label != IGNORE_INDEX
    pred, label = pred[valid].long(), label[valid].long()
    outside = lambda v: (v < 0) | (v >= num_classes)
    if (outside(pred) | outside(label)).any():                # one sync
        bad_pred, bad_label = (torch.unique(v[outside(v)])[:5].tolist() for v in (pred, label))
        raise ValueError(f"confusion_matrix(num_classes={num_classes}): predictions and labels must lie in "
                         f"[0, {num_classes}) ({IGNORE_INDEX} = ignore in labels); found predictions {bad_pred}, "
                         f"labels {bad_label}")
    index = label * num_classes + pred
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
    """lr = base * (1 - it/max_it) ** power, times a linear warm-up factor (it + 1) / warmup_iters
    during the first warmup_iters iterations: composed as mmseg does, so the lr does not jump when
    the warm-up ends."""
    warmup = (iteration + 1) / warmup_iters if iteration < warmup_iters else 1.0
    return base_lr * (1 - iteration / max_iters) ** power * warmup


# ----------------------------------------------------------------------------------------------
# The model interface and inference


def autocast(amp, device):
    """The autocast context of --amp off | bf16 | fp16 on `device`."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def log_mean_softmax(views):
    """The log of the mean softmax probability of an iterable of (B, K, H, W) logits, taken one view
    at a time: the one rule by which several test views (scales, flips) are averaged."""
    total, n = 0, 0
    for logits in views:
        total, n = total + logits.softmax(1), n + 1
    return (total / n).clamp(min=1e-12).log()


class SegModel(nn.Module):
    """Base of every model: subclasses set self.backbone, define forward() and loss()."""

    def forward(self, image):
        raise NotImplementedError

    def loss(self, outputs, target):
        raise NotImplementedError

    def maps(self, image, scales=(1.0,)):
        """The heat maps of `image` for --save-maps: name -> (B, M, h, w), drawn on their own range."""
        return self(image).get("maps", {})

    def query_pixels(self):
        """name -> relative (y, x) query pixel of the maps that show one pixel's attention (the
        saved heat map marks query_cell(pixel, (h, w)) there); none by default."""
        return {}

    def predict(self, image, scales=(1.0,), flip=False):
        """(B, K, H, W) logits at the image's size. One view returns its logits; several views
        (scales x flips) average their softmax probabilities and return their log."""
        views = [(s, f) for s in scales for f in ([False, True] if flip else [False])]
        if len(views) == 1 and views[0] == (1.0, False):
            return self(image)["out"]

        def view_logits(scale, flipped):                       # (B, K, H, W) at the image's size
            x = resize(image, scaled_size(image.shape[-2:], scale))
            logits = self(x.flip(-1) if flipped else x)["out"]
            return resize((logits.flip(-1) if flipped else logits).float(), image.shape[-2:])
        return log_mean_softmax(view_logits(scale, flipped) for scale, flipped in views)


def check_window(crop, stride):
    """Sliding windows cover every pixel only if 0 < stride <= crop."""
    if not 0 < stride <= crop:
        raise InputError(f"--eval-stride {stride} must be between 1 and --eval-crop ({crop}): a larger "
                         f"stride leaves pixels between the sliding windows without a prediction")


def slide_inference(predict_fn, image, crop, stride):
    """Sliding window as mmseg: windows of `crop` every `stride`, clamped to the image, logits of
    overlapping windows averaged. predict_fn maps a (B, 3, h, w) crop to (B, K, h, w) logits."""
    check_window(crop, stride)
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


def multiscale_slide_inference(model, image, crop, stride, scales=(1.0,), flip=False):
    """The multi-scale crop test (mmseg aug_test; DANet / CCNet / GALD predict_multiscale): for each
    scale the whole image is resized, crop x crop windows slide over it (each window through
    model.predict at its own size, with its flipped view if flip), the logits are resized back to
    the image's size, and several scales average their softmax probabilities (the log returned)."""
    size = image.shape[-2:]
    predict_fn = lambda x: model.predict(x, scales=(1.0,), flip=flip)
    views = (resize(slide_inference(predict_fn, resize(image, scaled_size(size, scale)), crop, stride), size)
             for scale in scales)                              # (B, K, H, W) each
    return next(views) if len(scales) == 1 else log_mean_softmax(views)


@torch.no_grad()
def infer(model, image, out_size, mode="whole", crop=512, stride=341, scales=(1.0,), flip=False):
    """Logits at the label's resolution `out_size`.
    whole: model.predict(image, scales, flip) takes the whole image and handles scales and flip
           itself (the default averages softmax over the views; HMSA chains its scales, Eq. 1).
    slide: scales outside the windows (multiscale_slide_inference): the network only ever sees
           windows of at most crop x crop, whatever the scale; each window is predicted at one
           scale, so a model's own scale fusion (HMSA) does not apply, its scales are averaged."""
    if mode == "slide":
        logits = multiscale_slide_inference(model, image, crop, stride, scales, flip)
    else:
        logits = model.predict(image, scales=scales, flip=flip)
    return resize(logits.float(), out_size)


def infer_as_flagged(model, image, out_size, args):
    """infer() as the evaluation flags say: --eval-mode, --eval-crop, --eval-stride, --eval-scales,
    --flip, under --amp."""
    with autocast(args.amp, image.device):
        return infer(model, image, out_size, args.eval_mode, args.eval_crop, args.eval_stride,
                     tuple(args.eval_scales), args.flip)


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
        s3, s4 = self.backbone.strides[2:]
        out = {"out": upsample_strided(self.head(c4), image.shape[-2:], s4)}   # (B, K, H, W)
        if self.training:
            out["aux"] = upsample_strided(self.aux_head(c3), image.shape[-2:], s3)
        return out

    def loss(self, outputs, target):
        return main_and_aux_loss(outputs, target, ohem=self.ohem, aux_weight=self.aux_weight)


def add_fcn_args(parser):
    group = parser.add_argument_group("fcn (baseline)")
    group.add_argument("--head-channels", type=ranged(int, 1), default=512, help="width of the 3x3 head conv")
    group.add_argument("--aux-weight", type=ranged(float, 0), default=0.4, help="weight of the layer3 aux CE")
    group.add_argument("--ohem", default=False, action=argparse.BooleanOptionalAction,
                       help="OHEM cross-entropy on the main output")


def build_fcn(args):
    return FCN(build_backbone(args), args.num_classes, head_channels=args.head_channels,
               aux_weight=args.aux_weight, ohem=args.ohem)


# ==============================================================================================
# THE DATA HALF: transforms, datasets, the training sampler. No model reads what follows (a reader
# of a method can stop here); train.py and tools/ do.
# ==============================================================================================


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
    """Random scale -> photometric jitter -> Gaussian blur (if blur) -> normalise -> pad (image 0,
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
        if self.blur:
            # NOTE(paper-gap): every crop blurred, sigma = 0.15 + U(0, 1) * 1.15 (NVIDIA/semantic-
            # segmentation transforms/joint_transforms.py, the Mapillary recipe's gblur): the paper is silent.
            image = image.filter(ImageFilter.GaussianBlur(radius=0.15 + rng.random() * 1.15))
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

    def __init__(self, pairs, class_names, transform=None, lut=None, name="dataset"):
        if not pairs:
            raise InputError(f"{name}: the split is empty (no image/label pairs found)")
        self.pairs, self.class_names = pairs, list(class_names)
        self.num_classes, self.transform, self.lut, self.name = len(class_names), transform, lut, name

    def __len__(self):
        return len(self.pairs)

    def image_stem(self, index):
        """Image `index`'s file name without its folder and suffix (--save-maps names its files by it)."""
        return os.path.splitext(os.path.basename(self.pairs[index][0]))[0]

    def load(self, index):
        """(PIL RGB image, uint8 label array of train ids), validated."""
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), self.load_label(index)
        if image.size != (label.shape[1], label.shape[0]):
            raise InputError(f"image {image_path} is {image.size[0]}x{image.size[1]} but its label "
                             f"{label_path} is {label.shape[1]}x{label.shape[0]}")
        return image, label

    def load_label(self, index):
        """The label alone in train ids (raw values through the LUT), validated."""
        path = self.pairs[index][1]
        label = read_image(path, mode=None)
        label = np.asarray(label, dtype=np.uint8 if label.mode == "1" else None)   # a 1-bit PNG: values 0 / 1
        if label.ndim != 2:
            raise InputError(f"label {path} is not a single-channel image (shape {label.shape})")
        if self.lut is not None:
            label = self.map_raw(label, path)
        check_label_values(label, self.num_classes, path)
        return label

    def map_raw(self, label, path):
        """Raw label values -> train ids through the LUT. A value past the table (a 16-bit PNG) or one
        that the table marks -1 (no value of this kind of label file: 34 and up in Cityscapes labelIds)
        is an InputError naming the file and the values."""
        unknown = (label < 0) | (label >= len(self.lut))
        mapped = self.lut[np.where(unknown, 0, label)]
        unknown |= mapped < 0
        if not unknown.any():
            return mapped.astype(np.uint8)
        bad = np.unique(label[unknown])
        held = np.flatnonzero(self.lut >= 0)
        if len(held) == len(self.lut):
            raise label_values_error(bad, self.num_classes, path)
        raise InputError(f"label {path} has values {bad.tolist()} where a {self.name} label file of its kind "
                         f"holds only {held[0]}..{held[-1]}")

    def __getitem__(self, item):
        """item: an index (evaluation) or (index, seed, crop centre or None) from TrainSampler."""
        index, seed, center = item if isinstance(item, tuple) else (item, None, None)
        image, label = self.load(index)
        if self.transform is None:
            return eval_transform(image, label)
        return self.transform(image, label, np.random.default_rng(seed), center)


def read_image(path, mode="RGB"):
    """Open an image fully (so a truncated file fails here), naming the file on failure. A 16-bit
    grayscale image (Pillow's I;16 modes, or I: microscopy, thermal, medical) read as RGB keeps its
    full range, v / 257 (Pillow's own conversion clips every value past 255 to white). An image
    larger than the pixel limit (allow_image_pixels) is refused, saying how to allow it."""
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "RGB" and im.mode.startswith("I"):
                return eight_bit(im).convert(mode)
            return im.convert(mode) if mode else im.copy()
    except Image.DecompressionBombError as e:
        raise too_many_pixels(path, e) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def eight_bit(image):
    """A 16-bit (or 32-bit integer) grayscale image as 8-bit L: 0..65535 -> 0..255, by v / 257."""
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8))


DEFAULT_IMAGE_PIXELS = int(2 * Image.MAX_IMAGE_PIXELS)         # what Pillow opens: 178,956,970


def allow_image_pixels(limit=DEFAULT_IMAGE_PIXELS):
    """Open images of up to `limit` pixels (--max-image-pixels). Pillow refuses an image of more than
    twice its MAX_IMAGE_PIXELS as a decompression bomb and warns past MAX_IMAGE_PIXELS: the limit is
    set to limit / 2 and the warning silenced. Set in the main process; loader workers fork from it."""
    Image.MAX_IMAGE_PIXELS = limit / 2
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def too_many_pixels(path, error):
    """The InputError of an image past the pixel limit: its size, the limit, and the flag that allows it."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = int(found.group(1)) if found else None
    size = f"{pixels:,} pixels" if pixels else "more pixels"
    return InputError(f"image {path} has {size}, over the limit of {int(2 * Image.MAX_IMAGE_PIXELS):,} "
                      f"(Pillow's guard against decompression bombs): tile it, or allow it deliberately "
                      f"with --max-image-pixels {pixels or 'N'}")


def label_values_error(bad, num_classes, where):
    return InputError(f"label {where} has values {bad.tolist()} outside the {num_classes} classes "
                      f"(0..{num_classes - 1}, {IGNORE_INDEX} = ignore)")


def check_label_values(label, num_classes, where):
    bad = np.unique(label[(label >= num_classes) & (label != IGNORE_INDEX)])
    if bad.size:
        raise label_values_error(bad, num_classes, where)


def lut_from_pairs(mapping, only=False):
    """A 256-entry lookup table raw value -> train id. Unmapped values stay as they are (so an
    unknown class is caught by check_label_values), or with only=True are -1: no value of this kind
    of label file (SegDataset.map_raw refuses them)."""
    lut = np.full(256, -1, np.int16) if only else np.arange(256, dtype=np.int16)
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
    return (xx % 2) * 2.0 - 1                                              # pole: fine vertical stripes


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
        cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), max(2.0, H * rng.uniform(0.04, 0.07))
        masks.append((4, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r))
    for _ in range(rng.integers(1, 4)):                                    # thin poles / wires
        x0, width = rng.uniform(0, W), max(2, H // 40) + rng.integers(0, 2)
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
        super().__init__([None] * length, SYNTHETIC_CLASSES, transform, name="synthetic")
        self.size, self.seed = size, seed

    def load(self, index):
        image, label = synthetic_sample(index, self.seed, self.size)
        return Image.fromarray(image), label

    def load_label(self, index):
        return synthetic_sample(index, self.seed, self.size)[1]

    def image_stem(self, index):
        return f"synthetic_{index:04d}"


# Datasets read in the layouts users already have (mmsegmentation's, and the SegNet tutorial's for
# CamVid). Each layout function returns (image/label pairs, label lookup table) for one split.


def require_dir(path, dataset, layout):
    if not os.path.isdir(path):
        raise InputError(f"{dataset}: missing folder {path} (expected layout: {layout})")


def walk_files(folder):
    """Every file under `folder`, sorted, following symbolic links (a Cityscapes split made of linked
    city folders) but entering each real folder once: a link loop ends, and two links to one folder
    do not count its images twice (the first name, in sorted order, is kept)."""
    seen, found = set(), []
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [os.path.join(top, name) for name in files]
    return sorted(found)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def matched_pairs(image_dir, label_dir, image_suffix, label_suffix, dataset, layout):
    """Every image under image_dir (recursively, links followed) ending in image_suffix, with the label
    at the same relative path under label_dir ending in label_suffix. A folder that holds images of
    another type only is an InputError saying which type the layout expects."""
    require_dir(image_dir, dataset, layout)
    require_dir(label_dir, dataset, layout)
    files = walk_files(image_dir)
    images = [f for f in files if f.endswith(image_suffix)]
    others = sorted({os.path.splitext(f)[1] for f in files if f.lower().endswith(IMAGE_SUFFIXES)})
    if not images and others:
        raise InputError(f"{dataset}: no *{image_suffix} image in {image_dir}, only {', '.join(others)} files: "
                         f"the layout expects {image_suffix} (expected layout: {layout})")
    pairs = []
    for image in images:
        rel = os.path.relpath(image, image_dir)
        label = os.path.join(label_dir, rel[: -len(image_suffix)] + label_suffix)
        if not os.path.isfile(label):
            raise InputError(f"{dataset}: no label {label} for image {image} (expected layout: {layout})")
        pairs.append((image, label))
    return pairs


def read_text_lines(path):
    """The non-empty lines of a text file as any usual editor saves it: UTF-8 with or without a byte
    order mark, or UTF-16 with one (Windows' Notepad, PowerShell's `>`); Windows line ends too."""
    with open(path, "rb") as f:
        data = f.read()
    encoding = "utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 or UTF-16 text ({e.reason} at byte {e.start})") from None
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def listed_pairs(root, list_file, image_pattern, label_pattern, dataset, layout):
    """Pairs named by the ids in a split file, one id per line."""
    if not os.path.isfile(list_file):
        raise InputError(f"{dataset}: missing split file {list_file} (expected layout: {layout})")
    ids = [line.split()[0] for line in read_text_lines(list_file)]
    pairs = [(os.path.join(root, image_pattern.format(i)), os.path.join(root, label_pattern.format(i))) for i in ids]
    for path in (p for pair in pairs for p in pair):
        if not os.path.isfile(path):
            raise InputError(f"{dataset}: {list_file} names {path}, which does not exist")
    return pairs


def reduce_zero_label_lut():
    """mmseg's reduce_zero_label: 0 -> ignore, v -> v - 1."""
    return lut_from_pairs({0: IGNORE_INDEX, **{v: v - 1 for v in range(1, 255)}})


# Cityscapes labelIds -> trainIds (cityscapesScripts); the other ids 0..33 are ignored.
CITYSCAPES_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


CITYSCAPES_TRAIN_ID_TO_ID = np.zeros(256, np.uint8)                     # ignore -> 0 (unlabeled)
CITYSCAPES_TRAIN_ID_TO_ID[list(CITYSCAPES_ID_TO_TRAIN_ID.values())] = list(CITYSCAPES_ID_TO_TRAIN_ID)


def cityscapes(root, split):
    """train / val / test read gtFine; train_extra (the 19,998 coarsely annotated images) reads gtCoarse."""
    kind = "gtCoarse" if split == "train_extra" else "gtFine"
    layout = (f"ROOT/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png, ROOT/{kind}/SPLIT/CITY/*_{kind}_labelTrainIds.png "
              f"(or _labelIds.png; gtCoarse for train_extra)")
    images, labels = os.path.join(root, "leftImg8bit", split), os.path.join(root, kind, split)
    pairs = lambda suffix: matched_pairs(images, labels, "_leftImg8bit.png", suffix, "cityscapes", layout)
    try:
        return pairs(f"_{kind}_labelTrainIds.png"), None
    except InputError:                                         # no trainIds files: map labelIds on the fly
        return pairs(f"_{kind}_labelIds.png"), lut_from_pairs({i: CITYSCAPES_ID_TO_TRAIN_ID.get(i, IGNORE_INDEX)
                                                               for i in range(34)}, only=True)


def ade20k(root, split):
    layout = ("ROOT (= ADEChallengeData2016)/images/{training,validation}/*.jpg, "
              "ROOT/annotations/{training,validation}/*.png")
    folder = {"train": "training", "val": "validation"}.get(split, split)
    return matched_pairs(os.path.join(root, "images", folder), os.path.join(root, "annotations", folder),
                         ".jpg", ".png", "ade20k", layout), reduce_zero_label_lut()


def pascal_context(root, split, with_background):
    """Pascal-Context 60 (background is class 0) or 59 (background ignored, the rest shifted down)."""
    layout = ("ROOT (= VOCdevkit/VOC2010)/JPEGImages/ID.jpg, ROOT/SegmentationClassContext/ID.png, "
              "ROOT/ImageSets/SegmentationContext/{train,val}.txt")
    pairs = listed_pairs(root, os.path.join(root, "ImageSets", "SegmentationContext", split + ".txt"),
                         "JPEGImages/{}.jpg", "SegmentationClassContext/{}.png", "pascal_context", layout)
    return pairs, (None if with_background else reduce_zero_label_lut())


def coco_stuff(root, split, version):
    train, val = {"10k": ("train2014", "test2014"), "164k": ("train2017", "val2017")}[version]
    layout = f"ROOT/images/{{{train},{val}}}/*.jpg, ROOT/annotations/{{{train},{val}}}/*_labelTrainIds.png"
    folder = {"train": train, "val": val}.get(split, split)
    pairs = matched_pairs(os.path.join(root, "images", folder), os.path.join(root, "annotations", folder),
                          ".jpg", "_labelTrainIds.png", f"coco_stuff{version}", layout)
    # NOTE(paper-gap): the 10k converter writes 1..171 with 0 = unlabelled (mmseg reduce_zero_label=True),
    # the 164k converter 0..170 with 255 = unlabelled (mmseg ecosystem notes, A1).
    return pairs, reduce_zero_label_lut() if version == "10k" else None


def pascal_context59(root, split):
    return pascal_context(root, split, with_background=False)


def pascal_context60(root, split):
    return pascal_context(root, split, with_background=True)


def coco_stuff10k(root, split):
    return coco_stuff(root, split, "10k")


def coco_stuff164k(root, split):
    return coco_stuff(root, split, "164k")


def camvid(root, split):
    layout = "ROOT/{train,val,test}/*.png and ROOT/{train,val,test}annot/*.png (SegNet tutorial)"
    pairs = matched_pairs(os.path.join(root, split), os.path.join(root, split + "annot"), ".png", ".png", "camvid",
                          layout)
    return pairs, lut_from_pairs({11: IGNORE_INDEX})           # void 11 -> ignore


def mapillary(root, split):
    layout = "ROOT/{training,validation}/images/*.jpg, ROOT/{training,validation}/v1.2/labels/*.png"
    folder = os.path.join(root, {"train": "training", "val": "validation"}.get(split, split))
    pairs = matched_pairs(os.path.join(folder, "images"), os.path.join(folder, "v1.2", "labels"),
                          ".jpg", ".png", "mapillary", layout)
    # NOTE(paper-gap): 65 classes, 'Unlabeled' (65) ignored, as the HMSA code (mmseg counts 66).
    return pairs, lut_from_pairs({65: IGNORE_INDEX})


# NOTE(paper-gap): GALD v1 Sec. 6.1.2 trains on Mapillary with "only 19 classes of 65 labels which are
# in cityscape category" without listing them; this map takes each Cityscapes class's namesake, and
# folds in the Mapillary classes that Cityscapes annotates as part of one (lane markings, bike and
# service lanes, plain crosswalks into road; curbs, curb cuts and pedestrian areas into sidewalk;
# street lights, utility poles and sign frames into pole; every rider into rider). All else is ignored.
MAPILLARY_TO_CITYSCAPES = {
    "road": ("Road", "Lane Marking - General", "Lane Marking - Crosswalk", "Crosswalk - Plain", "Bike Lane",
             "Service Lane"),
    "sidewalk": ("Sidewalk", "Curb", "Curb Cut", "Pedestrian Area"), "building": ("Building",),
    "wall": ("Wall",), "fence": ("Fence",), "pole": ("Pole", "Utility Pole", "Street Light", "Traffic Sign Frame"),
    "traffic light": ("Traffic Light",), "traffic sign": ("Traffic Sign (Front)",),
    "vegetation": ("Vegetation",), "terrain": ("Terrain",), "sky": ("Sky",), "person": ("Person",),
    "rider": ("Bicyclist", "Motorcyclist", "Other Rider"), "car": ("Car",), "truck": ("Truck",), "bus": ("Bus",),
    "train": ("On Rails",), "motorcycle": ("Motorcycle",), "bicycle": ("Bicycle",),
}


def mapillary_cityscapes19(root, split):
    """Mapillary v1.2 in the layout of `mapillary`, its labels mapped to the 19 Cityscapes train ids."""
    pairs, _ = mapillary(root, split)
    to_train_id = {MAPILLARY_V12_CLASSES.index(m): CITYSCAPES_CLASSES.index(c)
                   for c, names in MAPILLARY_TO_CITYSCAPES.items() for m in names}
    return pairs, lut_from_pairs({v: to_train_id.get(v, IGNORE_INDEX) for v in range(len(MAPILLARY_V12_CLASSES))})


# Class names, in label order (mmsegmentation 1.x METAINFO; CamVid: SegNet tutorial)

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")

# mmseg/datasets/ade.py ADE20KDataset (150 classes; mmseg's 'bed ' written 'bed')
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence',
    'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
    'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray',
    'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator',
    'glass', 'clock', 'flag',
)


# mmseg/datasets/coco_stuff.py COCOStuffDataset (171 classes: 80 things, then 91 stuff)
COCO_STUFF_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee',
    'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
    'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush', 'banner', 'blanket', 'branch', 'bridge', 'building-other',
    'bush', 'cabinet', 'cage', 'cardboard', 'carpet', 'ceiling-other', 'ceiling-tile', 'cloth', 'clothes',
    'clouds', 'counter', 'cupboard', 'curtain', 'desk-stuff', 'dirt', 'door-stuff', 'fence', 'floor-marble',
    'floor-other', 'floor-stone', 'floor-tile', 'floor-wood', 'flower', 'fog', 'food-other', 'fruit',
    'furniture-other', 'grass', 'gravel', 'ground-other', 'hill', 'house', 'leaves', 'light', 'mat', 'metal',
    'mirror-stuff', 'moss', 'mountain', 'mud', 'napkin', 'net', 'paper', 'pavement', 'pillow', 'plant-other',
    'plastic', 'platform', 'playingfield', 'railing', 'railroad', 'river', 'road', 'rock', 'roof', 'rug',
    'salad', 'sand', 'sea', 'shelf', 'sky-other', 'skyscraper', 'snow', 'solid-other', 'stairs', 'stone',
    'straw', 'structural-other', 'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable', 'wall-brick',
    'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone', 'wall-tile', 'wall-wood', 'water-other',
    'waterdrops', 'window-blind', 'window-other', 'wood',
)


# mmseg/datasets/pascal_context.py PascalContextDataset59 (59 classes)
PASCAL_CONTEXT59_CLASSES = (
    'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle', 'building',
    'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow', 'cup', 'curtain', 'dog',
    'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse', 'keyboard', 'light', 'motorbike',
    'mountain', 'mouse', 'person', 'plate', 'platform', 'pottedplant', 'road', 'rock', 'sheep', 'shelves',
    'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck', 'tvmonitor',
    'wall', 'water', 'window', 'wood',
)


# mmseg/datasets/pascal_context.py PascalContextDataset (60 classes: 'background' + the 59)
PASCAL_CONTEXT60_CLASSES = ('background',) + PASCAL_CONTEXT59_CLASSES


# mmseg/datasets/mapillary.py MapillaryDataset_v1 (Mapillary Vistas v1.2, 66 classes)
MAPILLARY_V12_CLASSES = (
    'Bird', 'Ground Animal', 'Curb', 'Fence', 'Guard Rail', 'Barrier', 'Wall', 'Bike Lane',
    'Crosswalk - Plain', 'Curb Cut', 'Parking', 'Pedestrian Area', 'Rail Track', 'Road', 'Service Lane',
    'Sidewalk', 'Bridge', 'Building', 'Tunnel', 'Person', 'Bicyclist', 'Motorcyclist', 'Other Rider',
    'Lane Marking - Crosswalk', 'Lane Marking - General', 'Mountain', 'Sand', 'Sky', 'Snow', 'Terrain',
    'Vegetation', 'Water', 'Banner', 'Bench', 'Bike Rack', 'Billboard', 'Catch Basin', 'CCTV Camera',
    'Fire Hydrant', 'Junction Box', 'Mailbox', 'Manhole', 'Phone Booth', 'Pothole', 'Street Light', 'Pole',
    'Traffic Sign Frame', 'Utility Pole', 'Traffic Light', 'Traffic Sign (Back)', 'Traffic Sign (Front)',
    'Trash Can', 'Bicycle', 'Boat', 'Bus', 'Car', 'Caravan', 'Motorcycle', 'On Rails', 'Other Vehicle',
    'Trailer', 'Truck', 'Wheeled Slow', 'Car Mount', 'Ego Vehicle', 'Unlabeled',
)


# --dataset NAME -> (class names, layout function, split names): the literal table of what can be read.
DATASETS = {
    "cityscapes": (CITYSCAPES_CLASSES, cityscapes, ("train", "val", "test", "train_extra")),
    "ade20k": (ADE20K_CLASSES, ade20k, ("train", "val")),
    "pascal_context59": (PASCAL_CONTEXT59_CLASSES, pascal_context59, ("train", "val")),
    "pascal_context60": (PASCAL_CONTEXT60_CLASSES, pascal_context60, ("train", "val")),
    "coco_stuff10k": (COCO_STUFF_CLASSES, coco_stuff10k, ("train", "val")),
    "coco_stuff164k": (COCO_STUFF_CLASSES, coco_stuff164k, ("train", "val")),
    "camvid": (CAMVID_CLASSES, camvid, ("train", "val", "test")),
    "mapillary": (MAPILLARY_V12_CLASSES[:65], mapillary, ("train", "val")),
    "mapillary_cityscapes19": (CITYSCAPES_CLASSES, mapillary_cityscapes19, ("train", "val")),
}


def dataset_classes(name):
    """The class names of --dataset NAME, without touching any file."""
    return SYNTHETIC_CLASSES if name == "synthetic" else DATASETS[name][0]


def file_dataset(name, root, split, transform=None):
    """One split of a dataset on disk, in its usual layout (README: Datasets); 'a+b' joins splits."""
    if root is None:
        raise InputError(f"--dataset {name} needs --data-root, the folder of its layout (README.md, Datasets)")
    if not os.path.isdir(root):
        raise InputError(f"--data-root {root} is not a folder; --dataset {name} expects the layout "
                         f"described in README.md (Datasets)")
    classes, layout, splits = DATASETS[name]
    unknown = [part for part in split.split("+") if part not in splits]
    if unknown:
        raise InputError(f"{name} has no split {unknown[0]!r}: its splits are {', '.join(splits)} "
                         f"(join two with '+', e.g. train+val)")
    pairs, lut = [], None
    for part in split.split("+"):                              # 'train+val': both splits as one
        part_pairs, lut = layout(root, part)
        pairs += part_pairs
    if not pairs:
        raise InputError(f"{name}: the {split} split under {root} is empty")
    return SegDataset(pairs, classes, transform, lut, name)


def build_datasets(args):
    """(train dataset with TrainTransform, evaluation dataset) for --dataset / --data-root."""
    transform = TrainTransform(args.crop_size, tuple(args.scale_range), args.jitter, args.blur)
    if args.dataset == "synthetic":
        size = (args.synthetic_size, args.synthetic_size)
        return (SyntheticDataset(args.synthetic_length, size, args.seed, transform),
                SyntheticDataset(args.synthetic_val_length, size, args.seed + 10 ** 6))
    return (file_dataset(args.dataset, args.data_root, args.train_split, transform),
            file_dataset(args.dataset, args.data_root, args.val_split))


# ----------------------------------------------------------------------------------------------
# The training sampler


class TrainSampler(torch.utils.data.Sampler):
    """Endless, resumable training order. Epoch e is a shuffled list of (index, crop centre or None)
    drawn from a generator seeded by (seed, e); iteration `it` takes global batch `it % per_epoch` of
    epoch `it // per_epoch`, and this rank its slice, so a resumed run continues the same order.
    Yields (index, augmentation seed, centre). tools/sampling.py adds items through `more_items`."""

    def __init__(self, num_items, batch_size, rank, world_size, seed, start_iter=0):
        self.global_batch = batch_size * world_size
        if num_items < self.global_batch:
            raise InputError(f"the training split has {num_items} images, fewer than one global batch "
                             f"({batch_size} per process x {world_size} processes)")
        self.n, self.batch, self.rank, self.seed, self.start = num_items, batch_size, rank, seed, start_iter

    def more_items(self, items, generator):
        """The epoch's items before the final shuffle: here all images once (centre None)."""
        return items

    def epoch_items(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        items = self.more_items([(i, None) for i in torch.randperm(self.n, generator=g).tolist()], g)
        return [items[j] for j in torch.randperm(len(items), generator=g).tolist()]

    def __iter__(self):
        per_epoch = len(self.epoch_items(0)) // self.global_batch
        it, epoch, items = self.start, None, None
        while True:
            if it // per_epoch != epoch:
                epoch = it // per_epoch
                items = self.epoch_items(epoch)
            first = (it % per_epoch) * self.global_batch + self.rank * self.batch
            for slot, (index, center) in enumerate(items[first:first + self.batch]):
                yield index, (self.seed * 1000003 + it) * 1024 + self.rank * self.batch + slot, center
            it += 1
