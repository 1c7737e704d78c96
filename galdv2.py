"""GALD v2: Global Aggregation then Local Distribution with the dynamic LD module (LDv2).

Paper: X. Li, L. Zhang, G. Cheng, K. Yang, Y. Tong, X. Zhu, T. Xiang, "Global Aggregation then Local
Distribution for Scene Parsing", IEEE TIP 2021, https://arxiv.org/abs/2107.13154
Authors' code: none for LDv2 (lxtGH/GALD-DGCNet holds GALD v1 alone). This file is a reconstruction
from Sec. III-B, Eqs. (6)-(8) and Fig. 5, on galdv1.py's GA modules, LDv1 and head.

Idea. GA (ASPP by default) gives every position global context X_g; LDv2 redistributes it with a local
attention: position i attends to k x k neighbours sampled with dilation r from x = concat(X_g, X_l),
softmax over the k*k samples (Eq. 8), so the context a position receives depends on its appearance.

    Sec. III-A, Fig. 5 (a)    GA modules (Table I d)                galdv1.build_ga
    Sec. III-A, Eqs. (1)-(2)  LDv1 (Table IV's "LDv1" row)          galdv1.LocalDistribution
    Sec. III-B, Eqs. (6)-(8)  LDv2                                  DynamicLocalDistribution
    Fig. 9                    the affinity of one pixel             DynamicLocalDistribution.affinity_map
    Sec. III-B, Fig. 5 (b)    X_gald and X_l "combined"             GALDv2.distribute
    Sec. III-A, Eq. (3)       the head and the aux head             galdv1.GALDHead
    Sec. IV-B                 OHEM main loss + aux loss             GALDv2.loss
    Tables I d, II b/c, IV    the switches; refusals (InputError)   add_args, build_model

forward(image) returns {'out': (B, K, H, W) logits, 'aux': (B, K, H, W) in training only, 'maps' in
eval only: {'affinity': (B, 1, H/8, W/8)} with ld='v2', {'ld_mask': (B, 1, H/8, W/8)} with ld='v1'}.

Deviations and gap fills (the reason is written at each NOTE(paper-gap)):
  - X_l is GALD v1's first 3x3 conv; the head is GALD v1's              GALDv2.__init__
  - X_gald enters Eq. (3)'s concat directly (combine='eq3')             GALDv2.distribute
  - one width C' = C for Q, K and V                                     DynamicLocalDistribution
  - no key bias; no 1/sqrt(d) scaling of the logits                     DynamicLocalDistribution
  - off-image samples are zero-padded x, not masked                     DynamicLocalDistribution.forward
  - k = 5, r = 6 (Cityscapes; the other datasets' recipes pass r = 3)   DILATION
  - no residual around LDv2                                             GALDv2.distribute
Not a deviation: the (B, C, k*k, H, W) samples are never built (DynamicLocalDistribution.forward);
tests/test_galdv2.py checks values and gradients against the unfold form of Eqs. (6)-(8).
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import InputError, SegModel, build_backbone, conv_bn_relu, main_and_aux_loss, query_cell, ranged
from galdv1 import GALDHead, LocalDistribution, build_ga

CHANNELS = 512                         # C, the width of X_l, X_g and X_gald (GALD v1's conva)
KERNEL_SIZE = 5                        # k: k x k samples per position (Table II b)
# NOTE(paper-gap): r = 6 because every Cityscapes figure (80.8 in Tables I d, II c, III, IV) is Table
# II (b)'s k = 5, r = 6 row; the text's r = 3 is "for the remaining datasets", whose recipes pass 3
DILATION = 6                           # r: the sampling dilation rate
AFFINITY_PIXEL = (0.5, 0.5)            # relative (y, x) of the pixel whose affinity 'maps' shows (Fig. 9)


# ----------------------------------------------------------------------------------------------
# Sec. III-B: the dynamic Local Distribution module (LDv2)


class DynamicLocalDistribution(nn.Module):
    """LDv2, Sec. III-B, Eqs. (6)-(8): local attention over k x k neighbours sampled with dilation r.

    X_gald(i) = sum_n softmax_n(x_theta(i) . s_phi(n)) s_g(n), with s(n) = x(i + r * delta_n) the
    zero-padded samples of x = concat(X_g, X_l) (Eqs. 6-7), x_theta = W_theta x, s_phi = W_phi s,
    s_g = W_g s, all 1x1 convolutions; key_channels narrows W_theta and W_phi (None: C' = C).
    key_input / query_input = 'global' feed X_g alone to W_phi / W_theta instead of x (Table II c);
    the value always reads x (Eq. 6). forward(x_g, x_l) -> (X_gald (B, C, H, W), affinity (B, k*k, H, W)).
    """

    def __init__(self, channels, *, kernel_size=KERNEL_SIZE, dilation=DILATION, key_channels=None,
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
        # NOTE(paper-gap): no key bias because q_i . b is the same for all k*k logits of position i and
        # cancels in Eq. (8)'s softmax, so it could never learn; Q and V keep their bias
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
        q = self.query(x if self.query_input == "concat" else x_g)         # (B, C', H, W)
        # A 1x1 conv commutes with sampling, and W 0 = 0 without bias: project first, then sample
        # the projections with zero padding. That is Eqs. (6)-(7) on x at 1/(k*k) of the cost, with
        # no (B, C, k*k, H, W) tensor. The value bias is added after the sum: the weights sum to 1.
        # NOTE(paper-gap): x is zero-padded and off-image samples take part in the softmax (key
        # W_phi 0 = 0, so logit 0; value W_g 0 + b_g = b_g), not masked out, because the paper says
        # "zero padding is adopted to handle the border cases"
        p = self.dilation * (self.kernel_size // 2)
        keys = F.pad(self.key(x if self.key_input == "concat" else x_g), (p, p, p, p))  # (B, C', H+2p, W+2p)
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
    def affinity_map(self, affinity, pixel=AFFINITY_PIXEL):
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
    """Sec. III-A/B, Fig. 5: dilated ResNet -> 3x3 conv (X_l) -> GA (X_g) -> LD -> GALD v1's head (Eq. 3).

    ga: a galdv1 GA module, or 'none' (X_g = X_l: the "+LDv2" rows of Tables I d, II b).
    ld: 'v2' (LDv2), 'v1' (galdv1's LD, Eqs. 1-2) or 'none' (Table IV's rows); with v1 / none the
    network is galdv1.GALD with the same GA. combine: what of LDv2 reaches the head, 'eq3' (X_gald)
    or 'local-first' (concat(X_gald, X_l), Fig. 5 b read literally). key_channels: C' (None: C).
    affinity_pixel: the relative (y, x) pixel of 'maps'['affinity'] (Fig. 9).
    """

    def __init__(self, backbone, num_classes, *, ga="aspp", ld="v2", combine="eq3", kernel_size=KERNEL_SIZE,
                 dilation=DILATION, key_input="concat", query_input="concat", channels=CHANNELS, key_channels=None,
                 output_stride=8, aux_weight=0.4, ohem=True, affinity_pixel=AFFINITY_PIXEL):
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
            # Fig. 5 has GALD output a map of its input's size, Table IV's rows then differ in LD alone,
            # and it is the closer reading to Table VI's size ('local-first' sees X_l twice)
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


def add_args(parser):
    group = parser.add_argument_group("galdv2: GALD v2 with dynamic Local Distribution (TIP 2021)")
    group.add_argument("--ga", default="aspp", choices=["aspp", "psp", "nl", "cgnl", "none"],
                       help="Global Aggregation module (Table I d); none = LD alone (the '+LDv2' rows)")
    group.add_argument("--ld", default="v2", choices=["v2", "v1", "none"],
                       help="Local Distribution: LDv2 (Sec. III-B), LDv1 (Eqs. 1-2) or none (Table IV rows)")
    group.add_argument("--ld-combine", default="eq3", choices=["eq3", "local-first"],
                       help="LDv2 output into the head: eq3 = X_gald into Eq. (3)'s concat with layer4; "
                            "local-first = concat(X_gald, X_l) before it (Fig. 5 b)")
    group.add_argument("--ld-kernel", type=ranged(int, 1), default=KERNEL_SIZE,
                       help="LDv2 local kernel size k, k*k samples (Table II b)")
    group.add_argument("--ld-dilation", type=ranged(int, 1), default=DILATION,
                       help="LDv2 sampling dilation rate r (Table II b's Cityscapes row; 3 for the other datasets)")
    group.add_argument("--ld-key-channels", type=ranged(int, 1), default=CHANNELS,
                       help="LDv2 query/key width C' (= C, the block width: one width for Q, K and V, Eq. 4)")
    group.add_argument("--key-input", default="concat", choices=["concat", "global"],
                       help="LDv2 key from concat(X_g, X_l) or from X_g only (Table II c 'Key' row)")
    group.add_argument("--query-input", default="concat", choices=["concat", "global"],
                       help="LDv2 query from concat(X_g, X_l) or from X_g only (Table II c 'Query' row)")
    group.add_argument("--ohem", default=True, action=argparse.BooleanOptionalAction,
                       help="OHEM cross-entropy on the main output (Sec. IV-B)")
    group.add_argument("--affinity-pixel", type=ranged(float, 0, 1), nargs=2, default=AFFINITY_PIXEL,
                       metavar=("Y", "X"),
                       help="relative position of the pixel whose LDv2 affinity --save-maps draws (Fig. 9)")


# The LDv2 flags and the GALDv2 keywords they set: with --ld v1 or none they change nothing.
LDV2_FLAGS = {"ld_combine": "combine", "ld_kernel": "kernel_size", "ld_dilation": "dilation",
              "ld_key_channels": "key_channels", "key_input": "key_input", "query_input": "query_input",
              "affinity_pixel": "affinity_pixel"}


def build_model(args):
    if args.ga == "none" and args.ld == "none":
        raise InputError("--ga none --ld none: neither GA nor LD, a model that no table of the paper has")
    if args.ld != "v2":
        defaults = argparse.ArgumentParser()
        add_args(defaults)
        changed = ["--" + flag.replace("_", "-") for flag in LDV2_FLAGS
                   if getattr(args, flag) != defaults.get_default(flag)]
        if changed:
            raise InputError(f"{', '.join(changed)}: LDv2 options, which --ld {args.ld} does not use")
    return GALDv2(build_backbone(args), args.num_classes, ga=args.ga, ld=args.ld, output_stride=args.output_stride,
                  ohem=args.ohem, **{keyword: getattr(args, flag) for flag, keyword in LDV2_FLAGS.items()})
