"""GALD v2: Global Aggregation then Local Distribution with the dynamic LD module (LDv2).

Paper: X. Li, L. Zhang, G. Cheng, K. Yang, Y. Tong, X. Zhu, T. Xiang, "Global Aggregation then Local
Distribution for Scene Parsing", IEEE TIP 2021, arXiv:2107.13154 (Sec. III-A, III-B, Eqs. 6-8, Fig. 5,
Tables I d, II b/c, IV, VI).

No official code exists for LDv2: the authors' repository (lxtGH/GALD-DGCNet) only announces it, and
its libs/models holds GALD v1 alone. This file is a reconstruction from Sec. III-B, Eqs. (6)-(8) and
Fig. 5, with the GA modules, LDv1 and the head of GALD v1 imported from galdv1.py.

Idea. GA (ASPP by default) gives every position global context X_g; LDv2 redistributes it with a
local attention: each position i attends to k x k neighbours sampled with dilation r from
x = concat(X_g, X_l), softmax over the k*k samples (Eq. 8), so the global context a position
receives depends on its local appearance.

Map from the paper to this file:
    Sec. III-A, Fig. 5 (a)   GA modules                          galdv1.build_ga
    Sec. III-A, Eqs. (1)-(2) LDv1 (Table IV "LDv1" row)           galdv1.LocalDistribution
    Sec. III-B, Eqs. (6)-(8) LDv2                                 DynamicLocalDistribution
    Sec. III-B, Fig. 5 (b)   X_gald and X_l "combined" -> head    GALDv2.distribute
    Sec. III-A, Eq. (3)      the v1 head and the aux head         galdv1.GALDHead
    Sec. IV-B                aux head on layer3, OHEM main loss   GALDv2.loss
    Fig. 9                   affinity of one pixel laid out       DynamicLocalDistribution.affinity_map

The network: dilated ResNet -> 3x3 conv 2048->512 (X_l, GALD v1's conva) -> GA (512 -> 512) = X_g
-> LD -> 3x3 conv 512 (v1's convb) -> concat with layer4 (Eq. 3) -> 3x3 conv 512 -> 1x1 classifier.
`ld` swaps only the LD step (Table IV): v2 = LDv2, v1 = galdv1's LocalDistribution, none = GA alone;
with v1 / none the network is galdv1.GALD with the same GA. `ga='none'` gives LDv2 the local
features alone (the "+LDv2" rows of Tables I d, II b).

Backbone. As GALD v1, the authors' convention (lxtGH/GALD-DGCNet libs/models/GALDNet.py): EVERY block
of layer3 dilated 2 and of layer4 dilated 4 (times the multi-grid), as PSPNet, which the paper says it
follows (Sec. IV-B); that is common.ResNet's default (`--dilation-style torchvision` for torchvision's).

Two readings of "we combine refined feature X_gald and original feature X_l for final segmentation
(Figure 5 (b))" (Sec. III-B), switch `combine`:
  - 'eq3' (default): X_gald goes into Eq. (3)'s concat with the backbone feature directly:
    convb(X_gald) ++ layer4. The sentence restates Eq. (3) ("the original input feature X and global
    aggregated feature ... are concatenated together for final segmentation head"), Fig. 5's caption
    has GALD output "a feature map with same size" as its input, and Table IV's rows then differ in
    the LD module alone. Costs (ResNet-50, 512 x 512, no aux head): +1.57M parameters (Table IV:
    +2.3M) and +12.9 GFLOPs over GA (Q/K width 64: +0.66M, +5.4 GFLOPs); Table VI's GALDv2 R101:
    72.26M against the paper's 66.8M.
  - 'local-first': concat(X_gald, X_l) first, so convb reads 1024 channels, then Eq. (3) concatenates
    layer4 as well: the head sees X_l twice. +3.93M, +32.2 GFLOPs (the widened convb alone is
    +2.36M, +19.3 GFLOPs: more than Table IV's whole +2.3M at any Q/K width); GALDv2 R101 74.62M.

Paper gaps (each marked NOTE(paper-gap) at its line):
  - X_l = the 3x3 conv of layer4 that also feeds the GA; the head is GALD v1's (the authors' code).
  - One width C' = C = 512 for Q, K and V: Eq. (4) gives W_theta, W_phi and W_g one width C', and
    W_g's output X_gald has X_g's size (Fig. 5: "a feature map with same size"). `key_channels`
    narrows Q/K alone (64 gives +0.66M).
  - The K conv has no bias: a key bias adds q_i . b to all k*k logits of position i and cancels in the
    softmax, so it could never learn. Q and V keep their bias.
  - No 1/sqrt(d) scaling of the logits: Eq. (8) has none.
  - Zero padding is of x, as the paper says ("zero padding is adopted to handle the border cases"):
    off-image samples are s(n) = 0, so their key is W_phi 0 = 0 (logit 0, they still take part in
    the softmax) and their value is W_g 0 + b_g = b_g. They are not masked out.
  - k = 5, r = 6: every Cityscapes figure (the 80.8 that Tables I d, II c, III and IV quote) is Table
    II (b)'s "+ASPP+LDv2 (k = 5, r = 6)"; "k = 5 and r = 3 is used for the remaining datasets", so the
    ADE20K, Pascal Context, COCO-Stuff and CamVid recipes pass `--ld-dilation 3`.
  - No residual around LDv2: Eq. (8) and Fig. 5 (b) have none; X_l reaches the head through LDv2's
    input and, with 'local-first', through the concat.
Implementation, not a deviation: the (B, C, k*k, H, W) tensor of sampled features is never built (see
DynamicLocalDistribution.forward); tests/test_galdv2.py proves the result equal, values and
gradients, to the explicit unfold form of Eqs. (6)-(8).

build_model refuses the LDv2 flags (--ld-combine, --ld-kernel, --ld-dilation, --ld-key-channels,
--key-input, --query-input, --affinity-pixel) with --ld v1 or none, where they change nothing, and
--ga none with --ld none, a model that no table has.

forward(image) returns {'out': (B, K, H, W) logits, 'aux': (B, K, H, W) in training,
'maps' in eval only: {'affinity': (B, 1, h, w)} for ld=v2, {'ld_mask': (B, 1, h, w)} for ld=v1}.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import InputError, SegModel, build_backbone, conv_bn_relu, main_and_aux_loss, query_cell, ranged
from galdv1 import GALDHead, LocalDistribution, build_ga


# ----------------------------------------------------------------------------------------------
# Sec. III-B: the dynamic Local Distribution module (LDv2)


class DynamicLocalDistribution(nn.Module):
    """LDv2, Sec. III-B, Eqs. (6)-(8): local attention over k x k neighbours sampled with dilation r.

    X_gald(i) = sum_n softmax_n(x_theta(i) . s_phi(n)) s_g(n), with s(n) = x(i + r * delta_n) the
    zero-padded samples of x = concat(X_g, X_l) (Eqs. 6-7), x_theta = W_theta x, s_phi = W_phi s,
    s_g = W_g s, all 1x1 convolutions of one width C' = C (Eq. 4; key_channels=None) unless
    key_channels narrows W_theta and W_phi. key_input / query_input = 'global' feed X_g alone to
    W_phi / W_theta instead of x (Table II c); the value always reads x (Eq. 6).
    forward(x_g, x_l) -> (X_gald (B, C, H, W), affinity (B, k*k, H, W)).
    """

    def __init__(self, channels, *, kernel_size=5, dilation=6, key_channels=None,
                 key_input="concat", query_input="concat"):
        super().__init__()
        # NOTE(paper-gap): Q/K width C' = C because Eq. (4) gives W_theta, W_phi and W_g one width C'
        # and W_g's output X_gald has X_g's C channels (Fig. 5: "a feature map with same size")
        key_channels = channels if key_channels is None else key_channels
        if kernel_size < 1 or kernel_size % 2 == 0 or dilation < 1:
            raise InputError(f"LDv2 needs an odd kernel size and dilation >= 1, got k={kernel_size}, r={dilation}")
        if key_channels < 1:
            raise InputError(f"LDv2 needs a query/key width >= 1, got {key_channels}")
        for name, choice in (("key_input", key_input), ("query_input", query_input)):
            if choice not in ("concat", "global"):
                raise InputError(f"LDv2 {name} must be concat or global, got {choice!r}")
        self.kernel_size, self.dilation = kernel_size, dilation
        self.key_input, self.query_input = key_input, query_input
        width = lambda choice: 2 * channels if choice == "concat" else channels
        self.query = nn.Conv2d(width(query_input), key_channels, 1)                 # W_theta
        # NOTE(paper-gap): no key bias because q_i . b is the same for all k*k logits and cancels in Eq. (8)
        self.key = nn.Conv2d(width(key_input), key_channels, 1, bias=False)        # W_phi
        self.value = nn.Conv2d(2 * channels, channels, 1)                           # W_g

    def offsets(self):
        """The k*k displacements r * delta_n of Eq. (7), row-major (the order of F.unfold)."""
        half = self.kernel_size // 2
        steps = [self.dilation * d for d in range(-half, half + 1)]
        return [(dy, dx) for dy in steps for dx in steps]

    def forward(self, x_g, x_l):
        B, C, H, W = x_g.shape
        x = torch.cat([x_g, x_l], 1)                                       # (B, 2C, H, W)
        q = self.query(x if self.query_input == "concat" else x_g)         # (B, D, H, W)
        # A 1x1 conv commutes with sampling, and W 0 = 0 without bias: project first, then sample
        # the projections with zero padding. That is Eqs. (6)-(7) on x at 1/(k*k) of the cost, with
        # no (B, C, k*k, H, W) tensor. The value bias is added after the sum: the weights sum to 1.
        # NOTE(paper-gap): x is zero-padded and off-image samples take part in the softmax, not masked
        # out, because the paper says "zero padding is adopted to handle the border cases"
        p = self.dilation * (self.kernel_size // 2)
        keys = F.pad(self.key(x if self.key_input == "concat" else x_g), (p, p, p, p))  # (B, D, H+2p, W+2p)
        values = F.pad(F.conv2d(x, self.value.weight), (p, p, p, p))      # (B, C, H+2p, W+2p)
        window = lambda t, dy, dx: t[:, :, p + dy:p + dy + H, p + dx:p + dx + W]  # s(n) for all i
        logits = torch.stack([(q * window(keys, dy, dx)).sum(1) for dy, dx in self.offsets()], 1)  # (B, k*k, H, W)
        # NOTE(paper-gap): no 1/sqrt(d) scaling of the logits because Eq. (8) has none
        affinity = logits.softmax(1)                                       # Eq. (8): delta = softmax over n
        x_gald = self.value.bias.view(1, C, 1, 1)
        for n, (dy, dx) in enumerate(self.offsets()):                      # Eq. (8): sum_n a_n s_g(n)
            x_gald = torch.addcmul(x_gald, affinity[:, n:n + 1], window(values, dy, dx))  # (B, C, H, W)
        return x_gald, affinity

    @torch.no_grad()
    def affinity_map(self, affinity, pixel=(0.5, 0.5)):
        """Fig. 9: the k*k weights of one pixel (relative (y, x) position) laid out on the feature map.
        affinity (B, k*k, H, W) -> (B, 1, H, W), zero off the sampled positions; padded samples, which
        fall outside the map, are not drawn."""
        B, _, H, W = affinity.shape
        y, x = query_cell(pixel, (H, W))
        canvas = affinity.new_zeros(B, 1, H, W)
        for n, (dy, dx) in enumerate(self.offsets()):
            if 0 <= y + dy < H and 0 <= x + dx < W:
                canvas[:, 0, y + dy, x + dx] = affinity[:, n, y, x]
        return canvas


# ----------------------------------------------------------------------------------------------
# The network: GA -> LD -> the GALD v1 head (Sec. III-A, Fig. 5)


class GALDv2(SegModel):
    """TIP Sec. III-A/B: dilated ResNet -> 3x3 conv (X_l) -> GA (X_g) -> LD -> 3x3 conv -> head on
    concat(., layer4) (Eq. 3).

    ld='v2': X_gald = LDv2(X_g, X_l); combine='eq3' feeds X_gald to Eq. (3) directly, 'local-first'
    feeds concat(X_gald, X_l) (Fig. 5 b, the two readings of the module docstring); ld='v1': galdv1's
    LD, Eqs. (1)-(2); ld='none': X_g alone. ga='none' feeds X_l as X_g (Table I d / II b "+LDv2" rows).
    key_channels=None: Q/K as wide as V, C' = C (Eq. 4). Training adds 'aux' (layer3 head); loss =
    OHEM CE on 'out' + aux_weight * CE on 'aux' (Sec. IV-B).
    Eval adds 'maps'; affinity_pixel: the (y, x) position, relative to the map, whose affinity it shows (Fig. 9).
    """

    def __init__(self, backbone, num_classes, *, ga="aspp", ld="v2", combine="eq3", kernel_size=5, dilation=6,
                 key_input="concat", query_input="concat", channels=512, key_channels=None,
                 output_stride=8, aux_weight=0.4, ohem=True, affinity_pixel=(0.5, 0.5)):
        super().__init__()
        if combine not in ("eq3", "local-first"):
            raise InputError(f"LDv2 combine must be eq3 or local-first, got {combine!r}")
        self.backbone = backbone
        c3, c4 = backbone.channels[2:]
        self.ld_kind, self.combine, self.affinity_pixel = ld, combine, tuple(affinity_pixel)
        # NOTE(paper-gap): X_l = a 3x3 conv 2048->512 of layer4 that also feeds the GA because that is
        # GALD v1's conva (lxtGH/GALD-DGCNet libs/models/GALDNet.py) and the paper names no other
        self.local = conv_bn_relu(c4, channels, 3)
        self.ga = nn.Identity() if ga == "none" else build_ga(ga, channels, channels, output_stride)
        if ld == "v2":
            self.ld = DynamicLocalDistribution(channels, kernel_size=kernel_size, dilation=dilation,
                                               key_channels=key_channels, key_input=key_input,
                                               query_input=query_input)
        elif ld == "v1":
            self.ld = LocalDistribution(channels)
        elif ld != "none":
            raise InputError(f"--ld must be v2, v1 or none, got {ld!r}")
        # NOTE(paper-gap): the GALD v1 head (convb, Eq. 3 with layer4, 3x3 conv, 1x1) because the paper
        # builds on GALD v1 and describes no other; convb reads 2 x 512 channels only for 'local-first'
        widened = ld == "v2" and combine == "local-first"
        self.decoder = GALDHead(2 * channels if widened else channels, c3, c4, num_classes, channels,
                                backbone.strides[2:])
        self.aux_weight, self.ohem = aux_weight, ohem

    def distribute(self, x_g, x_l):
        """The LD step: features for convb, and LDv2's affinity or LDv1's M (None without LD)."""
        if self.ld_kind == "v2":
            x_gald, affinity = self.ld(x_g, x_l)                       # Eqs. (6)-(8), (B, C, H, W)
            # NOTE(paper-gap): no residual X_g + LDv2 because Eq. (8) and Fig. 5 (b) have none
            if self.combine == "local-first":
                return torch.cat([x_gald, x_l], 1), affinity           # Fig. 5 (b) read literally: (B, 2C, H, W)
            # NOTE(paper-gap): X_gald enters Eq. (3)'s concat with layer4 directly ('eq3') because Sec.
            # III-B's "combine X_gald and original feature X_l for final segmentation" restates Eq. (3),
            # Fig. 5 has GALD output a map of its input's size, and Table IV's rows then differ in LD alone
            return x_gald, affinity                                    # (B, C, H, W)
        if self.ld_kind == "v1":
            return self.ld(x_g)                                        # Eqs. (1)-(2), (B, C, H, W)
        return x_g, None

    def ld_maps(self, weights):
        """'maps' from distribute's weights: the affinity of one pixel (Fig. 9) or the channel-mean of M."""
        if self.ld_kind == "v2":
            return {"affinity": self.ld.affinity_map(weights, self.affinity_pixel)}  # (B, 1, H, W)
        return {"ld_mask": weights.detach().mean(1, keepdim=True)}     # (B, 1, H, W)

    def forward(self, image):
        c1, c2, c3, c4 = self.backbone(image)                          # c4: (B, 2048, H/8, W/8) = X
        x_l = self.local(c4)                                           # (B, C, H/8, W/8)
        x_g = self.ga(x_l)                                             # (B, C, H/8, W/8)
        x_ld, weights = self.distribute(x_g, x_l)
        out = self.decoder(x_ld, c3, c4, image.shape[-2:])             # Eq. (3) and the heads
        if weights is not None and not self.training:                  # only --save-maps reads them (eval)
            out["maps"] = self.ld_maps(weights)
        return out

    def query_pixels(self):
        return {"affinity": self.affinity_pixel} if self.ld_kind == "v2" else {}

    def loss(self, outputs, target):
        return main_and_aux_loss(outputs, target, ohem=self.ohem, aux_weight=self.aux_weight)


# The LDv2 flags and the GALDv2 keywords they set. They default to None ("not given"): build_model
# passes only the given ones (GALDv2's own defaults are the paper's) and refuses them without LDv2.
LDV2_FLAGS = {"ld_combine": "combine", "ld_kernel": "kernel_size", "ld_dilation": "dilation",
              "ld_key_channels": "key_channels", "key_input": "key_input", "query_input": "query_input",
              "affinity_pixel": "affinity_pixel"}


def add_args(parser):
    group = parser.add_argument_group("galdv2: GALD v2 with dynamic Local Distribution (TIP 2021)")
    group.add_argument("--ga", default="aspp", choices=["aspp", "psp", "nl", "cgnl", "none"],
                       help="Global Aggregation module (Table I d); none = LD alone (the '+LDv2' rows)")
    group.add_argument("--ld", default="v2", choices=["v2", "v1", "none"],
                       help="Local Distribution: LDv2 (Sec. III-B), LDv1 (Eqs. 1-2) or none (Table IV rows)")
    group.add_argument("--ld-combine", default=None, choices=["eq3", "local-first"],
                       help="LDv2 output into the head: eq3 = X_gald into Eq. (3)'s concat with layer4 "
                            "(default); local-first = concat(X_gald, X_l) before it (Fig. 5 b)")
    group.add_argument("--ld-kernel", type=ranged(int, 1), default=None,
                       help="LDv2 local kernel size k, k*k samples (Table II b; default 5)")
    # NOTE(paper-gap): r = 6 because every Cityscapes figure (80.8 in Tables I d, II c, III, IV) is Table
    # II (b)'s k = 5, r = 6 row; the text's r = 3 is "for the remaining datasets", whose recipes pass 3
    group.add_argument("--ld-dilation", type=ranged(int, 1), default=None,
                       help="LDv2 sampling dilation rate r (Table II b; default 6, Cityscapes; "
                            "3 for the remaining datasets)")
    group.add_argument("--ld-key-channels", type=ranged(int, 1), default=None,
                       help="LDv2 query/key width C' (default C = 512, one width for Q, K and V as "
                            "in Eq. 4; 64 gives +0.66M instead of +1.57M)")
    group.add_argument("--key-input", default=None, choices=["concat", "global"],
                       help="LDv2 key from concat(X_g, X_l) (default) or from X_g only (Table II c 'Key' row)")
    group.add_argument("--query-input", default=None, choices=["concat", "global"],
                       help="LDv2 query from concat(X_g, X_l) (default) or from X_g only (Table II c 'Query' row)")
    group.add_argument("--ohem", default=True, action=argparse.BooleanOptionalAction,
                       help="OHEM cross-entropy on the main output (Sec. IV-B)")
    group.add_argument("--affinity-pixel", type=ranged(float, 0, 1), nargs=2, default=None, metavar=("Y", "X"),
                       help="relative position of the pixel whose LDv2 affinity 'maps' shows (Fig. 9; default 0.5 0.5)")


def build_model(args):
    if args.ga == "none" and args.ld == "none":
        raise InputError("--ga none --ld none: neither GA nor LD, a model that no table of the paper has")
    ldv2 = {kw: getattr(args, flag) for flag, kw in LDV2_FLAGS.items() if getattr(args, flag) is not None}
    if ldv2 and args.ld != "v2":
        flags = ", ".join("--" + flag.replace("_", "-") for flag in LDV2_FLAGS if getattr(args, flag) is not None)
        raise InputError(f"{flags}: LDv2 options, which --ld {args.ld} does not use")
    return GALDv2(build_backbone(args), args.num_classes, ga=args.ga, ld=args.ld, output_stride=args.output_stride,
                  ohem=args.ohem, **ldv2)
