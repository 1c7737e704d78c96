"""Specialize and Fuse: Pyramidal Output Representation for Semantic Segmentation.

C.-W. Hsiao, C. Sun, H.-T. Chen, M. Sun, ICCV 2021, arXiv:2108.01866. No official code has been
released: this file is our reference reconstruction from Secs. 3-5 of the paper; every gap it fills is
marked NOTE(paper-gap) at its line, with the reason.

Idea. Besides the usual per-pixel output, predict two pyramids of L levels (cells of 32, 16, 8, 4
pixels): a unity pyramid (is every pixel of this cell one class?) and a semantic pyramid (the class
of each cell). In training, a cell whose ancestor is a unity cell the network already gets right is
"done by coarser" and ignored, so each level specialises in what coarser levels leave (Specialize,
Sec. 3.2). At inference each pixel takes the class of its coarsest confident unity cell, the finest
level filling what is left (Fuse, Sec. 3.3).

Map from the code to the paper
    working_size, pyramid_ground_truth   Sec. 3.1 (input sizes, unity and semantic ground truth)
    done_by_coarser                      Sec. 3.2, Table 7 (naive / simple fix / true positive)
    SpecializeFuse.loss                  Sec. 3.2, Eq. (1) with the relabelled ground truth
    fuse                                 Sec. 3.3, Eq. (2), Table 8 (fuse / finest only)
    to_image, level_to_image             Sec. 3.3: the fused stride-4 grid brought to the image's pixels
    UnityHead                            Sec. 4.1, Fig. 2b
    pyramid_pool                         Sec. 4.2, Eqs. (6), (10): PyramidPool, bins (1, 3, 6, 8)
    ContextAggregation                   Sec. 4.2, Eqs. (4), (8), (9), Fig. 2d; also the ANL block [34]
    ContextUpdating                      Sec. 4.2, Eqs. (5), (10), (11), Fig. 2e
    SemanticHead                         Sec. 4.2, Eqs. (3)-(7), Fig. 2c, Table 6 (context switch)
    LightDecoder                         Sec. 5.1.2: ResNet stages fused at output stride 4, D = 720
    SpecializeFuse                       Fig. 2a: backbone + decoder + unity head + semantic head
    level_confusion, level_tables        Sec. 5.5: Table 9 (level l' on the pixels fused from l), Fig. 3

Table 8's rows: "single output" = output_format 'single'; "aux. supervision" = relabel 'naive' with
inference 'finest' (the literal reading: the coarser levels are plain auxiliary losses on their Sec. 3.1
targets; see add_args); "specialize & fuse" = the defaults.

Backbone (Sec. 5.1.2): HRNetV2 (`--backbone hrnet48`, the HRNet48 rows of Tables 1-5; `hrnet32`, the
ablations of Tables 6-9), the heads reading its stride-4 concat (common.hrnet_features, D = 720 / 480),
or a standard ResNet (ResNet101 rows of Tables 1-4) with the LightDecoder below.

forward(image) returns a dict ((H', W') the working size of Sec. 3.1, levels coarsest first)
    'semantic' list of (B, K, H'/s, W'/s) logits per level (the single output: the finest only)
    'unity'    list of (B, H'/s, W'/s) unity logits of the L-1 coarser levels (pyramidal only)
    eval mode only (Eq. (1) reads the pyramids alone, so training builds none of these):
    'out'      (B, K, H, W) logits: the Eq. (2) fusion (or the finest level), finest sample j on working
               pixel 4j (to_image), resized to (H, W) when the working size differs
    'level'    (B, H, W) int64, the level each pixel was taken from (the one that weighs most in its
               'out'), 0 = coarsest (pyramidal)
    'maps'     {'level': (B, 1, h, w) level / (L-1), 'unity': (B, L-1, h, w) unity probabilities at
               the finest level} (Fig. 1; pyramidal)

Table 9 and Fig. 3 of a checkpoint that train.py wrote (the model's flags come from the checkpoint;
--val-split on whole images at one scale):
    python specialize_fuse.py --checkpoint OUT/best.pt [--data-root DIR] [--val-split S] [--device D]
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (HRNet, IGNORE_INDEX, InputError, SegModel, autocast, build_backbone, build_datasets, confusion_matrix,
                    conv_bn_relu, cross_entropy, file_dataset, hrnet_features, load_checkpoint, load_weights, ranged, resize,
                    segmentation_metrics, upsample_strided)

FINEST_STRIDE = 4                              # s_L, the backbone's output stride (Sec. 3.1, 5.1.3)
STRIDES = {2: (32, FINEST_STRIDE), 4: (32, 16, 8, FINEST_STRIDE)}   # cell sizes s_l, coarsest first (5.1.3, 5.4)
PYRAMID_BINS = (1, 3, 6, 8)                    # PyramidPool output sizes (Sec. 4.2)


def nearest_up(x, factor):
    """Repeat every cell of (..., h, w) into a factor x factor block: (..., h*factor, w*factor)."""
    return x.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def min_pool(x, factor):
    """Minimum over factor x factor cells of (B, C, h, w)."""
    return -F.max_pool2d(-x, factor)


# ----------------------------------------------------------------------------------------------
# Sec. 3: pyramidal ground truth (3.1), Specialize by relabelling (3.2, Table 7), Fuse (3.3, Table 8)


def working_size(size, coarsest_stride):
    """(H, W) rounded to the nearest multiples of the coarsest cell, at least one cell (Sec. 3.1)."""
    return tuple(max(1, int(s / coarsest_stride + 0.5)) * coarsest_stride for s in size)


def pyramid_ground_truth(target, strides):
    """Semantic and unity ground truth of every level from a (B, H, W) label map (Sec. 3.1).

    A cell is a unity cell when all its non-ignored pixels share one label (semantic label = that
    label, unity = 1), a mix cell otherwise (semantic = ignore, unity = 0); an all-ignored cell is
    ignore in both. Returns two lists over all L levels, coarsest first, of (B, H/s, W/s) int64 (the
    finest unity level is never predicted, Sec. 3.2, but done_by_coarser reads the coarser ones).
    """
    # NOTE(paper-gap): ignore pixels do not break unity and an all-ignored cell is ignored, because Sec. 3.1
    # defines unity by the labels of the covered pixels and says nothing of unlabelled ones
    valid = target != IGNORE_INDEX
    label = target.float().unsqueeze(1)                                       # (B, 1, H, W)
    high = torch.where(valid.unsqueeze(1), label, torch.full_like(label, -1))
    low = torch.where(valid.unsqueeze(1), label, torch.full_like(label, IGNORE_INDEX + 1))
    semantic, unity = [], []
    for s in strides:
        cell_max = F.max_pool2d(high, s)[:, 0]                                # (B, H/s, W/s)
        cell_min = min_pool(low, s)[:, 0]
        seen = cell_max >= 0                                                  # some valid pixel
        one_class = seen & (cell_max == cell_min)
        semantic.append(torch.where(one_class, cell_max, torch.full_like(cell_max, IGNORE_INDEX)).long())
        unity.append(torch.where(seen, one_class.float(), torch.full_like(cell_max, IGNORE_INDEX)).long())
    return semantic, unity


def done_by_coarser(unity, unity_prob, strides, policy="true-positive", tau=0.9):
    """The cells "done by coarser" (Sec. 3.2): one (B, H/s, W/s) bool mask per level, coarsest first.

    unity: the L ground-truth unity levels of pyramid_ground_truth; unity_prob: the L-1 predicted
    (B, H/s, W/s) unity probabilities (no gradient needed). An ancestor settles its descendants under
    policy 'naive': never; 'simple': when it is a ground-truth unity cell; 'true-positive' (ours): when
    it is a ground-truth unity cell AND predicted unity (>= tau), i.e. a true positive.
    """
    done = [torch.zeros_like(unity[0], dtype=torch.bool)]                  # nothing above level 1
    for l in range(1, len(strides)):
        settled = unity[l - 1] == 1                                         # (B, H/s_(l-1), W/s_(l-1))
        if policy == "true-positive":
            # NOTE(paper-gap): "correctly classified as unity-cells (true positives)" is read as the unity
            # prediction alone, the ancestor's predicted class unchecked, because the sentence speaks of
            # the unity classifier's true positives
            settled = settled & (unity_prob[l - 1] >= tau)
        elif policy == "naive":
            # NOTE(paper-gap): 'naive' = the Sec. 3.1 pyramids, mix cells ignored, not Sec. 5.4's "full
            # semantic segmentation map" at every level, because Sec. 3.2 defines the naive setting as
            # training "with their ground-truth counterparts" Y^(l), U^(l)
            settled = torch.zeros_like(settled)
        done.append(nearest_up(done[-1] | settled, strides[l - 1] // strides[l]))   # (B, H/s_l, W/s_l)
    return done


def fuse(semantic, unity_prob, strides, tau=0.9):
    """Eq. (2): each finest cell takes the logits of its coarsest ancestor predicted unity (>= tau);
    the finest level, taken as unity everywhere, fills what is left.

    semantic: list over L levels of (B, K, H/s, W/s) logits; unity_prob: list over the L-1 coarser
    levels of (B, H/s, W/s). Returns the fused (B, K, H/sL, W/sL) logits and the (B, H/sL, W/sL)
    int64 index of the level each cell was taken from (0 = coarsest).
    """
    finest = semantic[-1]
    fused = torch.zeros_like(finest)                                          # (B, K, h, w)
    level = torch.full_like(finest[:, 0], len(strides) - 1, dtype=torch.long)  # (B, h, w)
    remaining = torch.ones_like(level, dtype=torch.bool)                      # prod_k 1[Up(U^k) < tau]
    # NOTE(paper-gap): Up(.) is nearest, a cell's value to all its finest cells, because Eq. (2) selects
    # whole cells; to_image then brings the fused finest grid to the pixels bilinearly, as any stride-4 output
    for l, (logits, stride) in enumerate(zip(semantic, strides)):
        factor = stride // strides[-1]
        unity = nearest_up(unity_prob[l], factor) >= tau if l < len(unity_prob) else remaining
        take = remaining & unity                                              # (B, h, w)
        # Eq. (2): the indicator masks are disjoint, so their sum is a selection
        fused = torch.where(take.unsqueeze(1), nearest_up(logits, factor), fused)
        level = level.masked_fill(take, l)
        remaining = remaining & ~take
    return fused, level


def to_image(x, size):
    """A finest-level map (B, C, h, w) of the working image (H', W') = (4h, 4w) to the image's (B, C, H, W)."""
    working = (FINEST_STRIDE * x.shape[-2], FINEST_STRIDE * x.shape[-1])
    # NOTE(paper-gap): finest sample j lands on working pixel 4j, where the backbone's kernels computed it
    # (bilinear between samples, the last repeated), because the paper does not say how the stride-4 output
    # reaches the pixels; the Sec. 3.1 ground-truth cell j covers pixels 4j .. 4j+3 (centre 4j + 1.5)
    x = upsample_strided(x, working, FINEST_STRIDE)                           # (B, C, H', W')
    # Sec. 3.1 resized the image to the working size: resize back only when that changed it
    return x if working == tuple(size) else resize(x, size)                   # (B, C, H, W)


def level_to_image(level, size, levels):
    """The (B, h, w) level of each finest cell (fuse) to (B, H, W): at each pixel, the level whose logits
    weigh most in that pixel's 'out' (to_image of the one-hot levels; a tie goes to the coarser level)."""
    one_hot = F.one_hot(level, levels).permute(0, 3, 1, 2).float()            # (B, L, h, w)
    return to_image(one_hot, size).argmax(1)                                  # (B, H, W)


# ----------------------------------------------------------------------------------------------
# Sec. 4: unity head (4.1), semantic head with the coarse-to-fine contextual module (4.2)


class UnityHead(nn.Module):
    """Unity pyramid (Sec. 4.1, Fig. 2b): an entry of a cell is unity-like when its embedding is close
    to the cell's centroid; a cell is unity when its most deviating entry is (min pooling).

    X_u = Conv1x1(X); X_centroid^(l) = Conv1x1_centroid(AvgPool(X_u)), one conv shared by the levels;
    X_diff^(l) = Conv1x1_pixel(X_u) - Up_nearest(X_centroid^(l)); X_unity^(l) = sigmoid(Conv1x1_cls(X_diff^(l))),
    Conv1x1_cls shared by the levels; U^(l) = MinPool(X_unity^(l)) per cell.

    Why two convs: the pooled side and the pixel side each have their own, as Sec. 4.1 applies "a shared
    Conv1x1" (shared across the levels) to the pooled X_u and subtracts from "Conv1x1(X_u)". One conv on
    both would cancel: average pooling commutes with a 1x1 conv, so X_diff would be that conv of X_u minus
    its cell mean, which averages to zero over the cell, and no cell's logit could exceed the classifier's
    bias. With two convs an entry's logit is a . x - c . (mean of x over its cell) + b, and a uniform cell
    scores (a - c) . x + b, as high as its features make it.

    Input X (B, D, h, w) at the finest level; output: list over the L-1 coarser levels of
    (B, H/s, W/s) unity logits (sigmoid gives U^(l)).
    """

    def __init__(self, in_channels, *, channels=64, strides=STRIDES[4]):
        super().__init__()
        self.factors = [s // strides[-1] for s in strides[:-1]]
        # NOTE(paper-gap): the four 1x1 convs are plain convs, no BN/ReLU, because Sec. 4.1 names none. Only the
        # classifier has a bias: a bias in the other three adds a constant to X_diff, which it absorbs
        self.reduce = nn.Conv2d(in_channels, channels, 1, bias=False)    # X -> X_u
        self.centroid = nn.Conv2d(channels, channels, 1, bias=False)     # pooled side, shared by the levels
        # NOTE(paper-gap): one pixel-side Conv1x1(X_u) for every level, because Sec. 4.1 subtracts each level's
        # centroids from the same Conv1x1(X_u)
        self.pixel = nn.Conv2d(channels, channels, 1, bias=False)
        self.classify = nn.Conv2d(channels, 1, 1)                        # shared, followed by the sigmoid

    def forward(self, x):
        x_u = self.reduce(x)                                   # (B, Du, h, w)
        pixels = self.pixel(x_u)                               # Conv1x1(X_u) (B, Du, h, w)
        unity = []
        for f in self.factors:
            centroid = self.centroid(F.avg_pool2d(x_u, f))     # X_centroid (B, Du, h/f, w/f)
            diff = pixels - nearest_up(centroid, f)            # X_diff (B, Du, h, w)
            logit = self.classify(diff)                        # (B, 1, h, w) logit of X_unity
            # min pooling of sigmoid(logit) == sigmoid of min-pooled logits (monotone): keep logits for BCE
            unity.append(min_pool(logit, f)[:, 0])             # (B, h/f, w/f)
        return unity


def pyramid_pool(x, bins=PYRAMID_BINS):
    """PyramidPool (Eqs. 6, 10): average-pool (B, C, h, w) to 1x1, 3x3, 6x6, 8x8 and flatten the cells
    into S = 110 context tokens, kept as (B, C, S, 1) so 1x1 convs and BN apply unchanged."""
    # NOTE(paper-gap): average pooling because Eq. (6) and [15] do not say which, and ANL's pyramid
    # sampling [34], which Eq. (6) follows, averages
    return torch.cat([F.adaptive_avg_pool2d(x, b).flatten(2) for b in bins], 2).unsqueeze(-1)


class ContextAggregation(nn.Module):
    """CA (Sec. 4.2, Eqs. 8-9, Fig. 2d): the cells of X^(l) attend to the S = 110 context tokens theta^(l-1).

    Also the ANL block of Table 6 [34] when theta is the PyramidPool of the block's own input.

    Computed exactly, with the 1x1 convs that act per cell moved onto the S tokens where they are linear:
    Eq. (8)'s scores (W_q x + b_q)^T k = x^T (W_q^T k) + b_q^T k, and Eq. (9)'s 1x1 conv over concat(X_att, X)
    is W_att X_att + W_x X with W_att X_att = A (W_att V). Per cell this costs C*S + S*C + C*C
    multiply-adds instead of C*Ck + Ck*S + S*C + 2C*C (half at C = 512, Ck = 256, S = 110; fewer
    whenever C > S/3), plus C*Ck*S + S*C*C once per image on the tokens. Parameters and state_dict
    are the literal form's.
    """

    def __init__(self, channels, *, key_channels=None):
        super().__init__()
        # NOTE(paper-gap): query/key width D_s/2 (as ANL's key width), values keep D_s, because Sec. 4.2
        # gives no widths for the attention
        self.key_channels = key_channels or channels // 2
        self.query = nn.Conv2d(channels, self.key_channels, 1)
        self.key = nn.Conv2d(channels, self.key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.aggregate = conv_bn_relu(2 * channels, channels, 1)   # Conv1x1_agg: 2 D_s -> D_s, BN, ReLU

    def forward(self, x, theta):
        B, C, H, W = x.shape
        k = self.key(theta).flatten(2) * self.key_channels ** -0.5   # (B, Ck, S), scaled as in [22]
        v = self.value(theta).flatten(2)                             # (B, C, S)
        w_q = self.query.weight[:, :, 0, 0]                          # (Ck, C)
        keys = w_q.t() @ k                                           # W_q^T k (B, C, S)
        offset = (self.query.bias @ k).unsqueeze(1)                  # b_q^T k (B, 1, S)
        scores = x.flatten(2).transpose(1, 2) @ keys + offset        # q . k / sqrt(Ck) (B, N, S)
        attn = scores.softmax(-1)                                    # Eq. (8): softmax over the S tokens
        conv, bn, relu = self.aggregate
        w_att, w_x = conv.weight.split(C, 1)                         # (C, C, 1, 1) each: concat order (X_att, X)
        values = (w_att[:, :, 0, 0] @ v).transpose(1, 2)             # W_att V (B, S, C)
        att = (attn @ values).transpose(1, 2).reshape(B, C, H, W)    # W_att X_att (B, C, H, W)
        return relu(bn(att + F.conv2d(x, w_x)))                      # Eq. (9): X'^(l) (B, C, H, W)


class ContextUpdating(nn.Module):
    """CU (Sec. 4.2, Eqs. 10-11, Fig. 2e): fold the refined level X'^(l) into the context tokens."""

    def __init__(self, channels):
        super().__init__()
        self.update = conv_bn_relu(2 * channels, channels, 1)      # Conv1x1_upd: 2 D_s -> D_s

    def forward(self, x, theta):
        theta_init = pyramid_pool(x)                               # Eq. (10): (B, C, S, 1)
        return self.update(torch.cat([theta_init, theta], 1))     # Eq. (11): theta^(l) (B, C, S, 1)


class SemanticHead(nn.Module):
    """Semantic pyramid (Sec. 4.2, Fig. 2c): project X to D_s, pool to every level (Eq. 3), refine the
    levels with the chosen context module (Table 6), predict each with its own ConvBlock (Eq. 7).

    context 'none' / 'anl' (the ANL sits on the backbone, outside this head): X'^(l) = X^(l);
    'anl-multi': one ANL block per level; 'ours': the coarse-to-fine module, Eqs. (4)-(6).
    pyramidal=False predicts the finest level only. Output: list of (B, K, H/s, W/s), coarsest first.
    """

    def __init__(self, in_channels, num_classes, *, channels=512, strides=STRIDES[4], context="ours",
                 pyramidal=True):
        super().__init__()
        # NOTE(paper-gap): a single output with context 'ours' still refines every level coarse to fine
        # and predicts with ConvBlock^(L) only, because Table 6 gives that row without its design (the
        # supplementary that has it is not available); without our module it never needs coarser levels
        self.strides = strides if pyramidal or context == "ours" else strides[-1:]
        self.context = context
        levels = len(self.strides)
        # NOTE(paper-gap): the projection D -> D_s is a plain 1x1 conv with bias because Sec. 4.2 names no BN/ReLU
        self.project = nn.Conv2d(in_channels, channels, 1)
        if context in ("anl-multi", "ours"):
            # NOTE(paper-gap): "ANL-multi" = one ANL per level, written as our CA attending to PyramidPool of
            # its own level (ANL's asymmetric sampling; ANL's extra BN/ReLU, output conv, dropout left out),
            # because Table 6 names the baseline without its design; the same block keeps the rows comparable
            self.aggregate = nn.ModuleList(ContextAggregation(channels) for _ in range(levels))
        if context == "ours":
            # NOTE(paper-gap): no CU at the finest level because theta^(L) would feed nothing
            self.update = nn.ModuleList(ContextUpdating(channels) for _ in range(levels - 1))
        self.blocks = nn.ModuleList(                           # Eq. (7): ConvBlock^(l), one per predicted level
            nn.Sequential(conv_bn_relu(channels, channels, 1), nn.Conv2d(channels, num_classes, 1))
            for _ in range(levels if pyramidal else 1))

    def forward(self, x):
        x = self.project(x)                                    # X^(L) (B, Ds, h, w)
        finest = self.strides[-1]
        # NOTE(paper-gap): Eq. (3) pools by s_l / s_L (= 2^(L-l) for L = 4), so L = 2 pools by 8, because
        # level l's cells are s_l pixels wide (Sec. 3.1) and 2^(L-l) would give L = 2 a stride-8 level 1
        # Eq. (3): X^(l) (B, Ds, h*sL/s, w*sL/s); X^(L) is X itself (a pool of kernel 1 would only copy it)
        features = [F.avg_pool2d(x, s // finest) if s != finest else x for s in self.strides]
        if self.context == "anl-multi":
            features = [ca(f, pyramid_pool(f)) for ca, f in zip(self.aggregate, features)]
        elif self.context == "ours":
            features = self.coarse_to_fine(x, features)
        return [block(f) for block, f in zip(self.blocks, features[-len(self.blocks):])]

    def coarse_to_fine(self, x, features):
        theta = pyramid_pool(x)                                # Eq. (6): theta^(0) (B, Ds, S, 1)
        refined = []
        for l, feature in enumerate(features):
            feature = self.aggregate[l](feature, theta)        # Eq. (4): X'^(l) = CA(X^(l), theta^(l-1))
            if l < len(self.update):
                theta = self.update[l](feature, theta)         # Eq. (5): theta^(l) = CU(X'^(l), theta^(l-1))
            refined.append(feature)
        return refined


# ----------------------------------------------------------------------------------------------
# Sec. 5.1.2: ResNet with a light decoder to output stride 4


class LightDecoder(nn.Module):
    """The four ResNet stages, their channels reduced, brought to stride 4 and concatenated (Sec. 5.1.2):
    (B, 256/512/1024/2048, H/4 ... H/32, ...) -> (B, D = 720, H/4, W/4) for ResNet-50/101.
    in_strides: the backbone's stage strides (4, 8, 16, 32); stage i's sample j lies on c1's sample
    j * in_strides[i] / in_strides[0], since both are centred on input pixel in_strides[i] * j."""

    def __init__(self, in_channels, in_strides, *, channels=(48, 96, 192, 384)):
        super().__init__()
        self.ratios = [s // in_strides[0] for s in in_strides]
        # NOTE(paper-gap): "reduce the number of channels of each stage" = 1x1 conv + BN + ReLU to
        # 48/96/192/384, because these HRNet-W48 widths sum to the paper's D = 720 for both backbones
        self.lateral = nn.ModuleList(conv_bn_relu(i, o, 1) for i, o in zip(in_channels, channels))
        # NOTE(paper-gap): HRNet's fusion module [23] (strided 3x3 convs down, 1x1 conv + upsampling up,
        # summed per branch) is replaced by bilinear upsampling + concat, no conv after it, because the
        # paper leaves its ResNet decoder to the supplementary, which is not available; the concat is
        # HRNetV2's final representation [23], the D = 720 features the heads read

    def forward(self, features):
        size = features[0].shape[-2:]
        # each coarse sample on the c1 sample it was computed at: every later layer is 1x1 and could
        # not re-align the branches
        up = [upsample_strided(lat(f), size, r) if r > 1 else lat(f)
              for lat, f, r in zip(self.lateral, features, self.ratios)]       # (B, C_i, H/4, W/4) each
        return torch.cat(up, 1)                                                 # (B, D, H/4, W/4)


# ----------------------------------------------------------------------------------------------
# The model


def unity_bce(logits, target):
    """Mean binary cross-entropy (fp32) over the cells whose unity target is not ignore."""
    # NOTE(paper-gap): BCE unweighted because Eq. (1) names no positive/negative balancing
    valid = target != IGNORE_INDEX
    loss = F.binary_cross_entropy_with_logits(logits.float(), (target == 1).float(), reduction="none")
    return (loss * valid).sum() / valid.sum().clamp(min=1)


class SpecializeFuse(SegModel):
    """ResNet + light decoder + unity and semantic heads (Fig. 2a), Eq. (1) loss, Eq. (2) inference.

    output_format 'pyramidal' (ours) or 'single' (Table 6 rows); context 'ours', 'anl', 'anl-multi',
    'none' (Table 6 columns); relabel 'true-positive', 'simple', 'naive' (Table 7); inference 'fuse'
    or 'finest' (Table 8; its "aux. supervision" row is relabel 'naive' with inference 'finest'); levels 4
    or 2 (Sec. 5.4); tau the unity threshold (Sec. 5.1.3);
    finest_target 'cells' (Sec. 3.1, Eq. 1) or 'pixels' (a deviation): how the finest level is
    supervised (see loss).
    """

    def __init__(self, backbone, num_classes, *, output_format="pyramidal", context="ours",
                 relabel="true-positive", inference="fuse", levels=4, tau=0.9, finest_target="cells",
                 decoder_channels=(48, 96, 192, 384), unity_channels=64, semantic_channels=512):
        super().__init__()
        for name, value, allowed in (("output format", output_format, ("pyramidal", "single")),
                                     ("context", context, ("ours", "anl", "anl-multi", "none")),
                                     ("relabel", relabel, ("true-positive", "simple", "naive")),
                                     ("inference", inference, ("fuse", "finest")), ("levels", levels, (2, 4)),
                                     ("finest target", finest_target, ("pixels", "cells"))):
            if value not in allowed:
                raise InputError(f"specialize_fuse: {name} must be one of {allowed}, got {value!r}")
        self.backbone = backbone
        self.strides = STRIDES[levels]
        self.relabel_policy, self.inference, self.tau, self.finest_target = relabel, inference, tau, finest_target
        # Sec. 5.1.2: HRNet's heads read its stride-4 concat directly; a ResNet gets the light decoder
        hrnet = isinstance(backbone, HRNet)
        self.decoder = None if hrnet else LightDecoder(backbone.channels, backbone.strides, channels=decoder_channels)
        dim = sum(backbone.channels if hrnet else decoder_channels)   # D = 720 (HRNet-W48 or the decoder), 480 W32
        # NOTE(paper-gap): Table 6 "ANL" = one ANL block appended to the backbone feature X (D channels),
        # because "ANL" there is a contextual module of the backbone, as in the HRNet48 + ANL rows of Tables 1-5
        self.anl = ContextAggregation(dim) if context == "anl" else None
        pyramidal = output_format == "pyramidal"
        self.semantic_head = SemanticHead(dim, num_classes, channels=semantic_channels, strides=self.strides,
                                          context=context, pyramidal=pyramidal)
        self.unity_head = UnityHead(dim, channels=unity_channels, strides=self.strides) if pyramidal else None

    def forward(self, image):
        H, W = image.shape[-2:]
        x = resize(image, working_size((H, W), self.strides[0]))   # Sec. 3.1: sides divisible by s_1
        features = self.backbone(x)
        x = hrnet_features(features) if self.decoder is None else self.decoder(features)   # X (B, D, H'/4, W'/4)
        if self.anl is not None:
            x = self.anl(x, pyramid_pool(x))
        outputs = {"semantic": self.semantic_head(x)}          # [(B, K, H'/s, W'/s)] coarsest first
        if self.unity_head is not None:
            outputs["unity"] = self.unity_head(x)              # [(B, H'/s, W'/s)] for the L-1 coarser levels
        if self.training:                                      # Eq. (1) reads the pyramids alone
            return outputs
        semantic = outputs["semantic"]
        if self.unity_head is None:                            # single (standard) output
            outputs["out"] = to_image(semantic[-1], (H, W))    # (B, K, H, W)
            return outputs
        prob = [u.detach().float().sigmoid() for u in outputs["unity"]]   # U^(l), compared with tau
        # Table 8: 'finest' skips the fusion (its "aux. supervision" row, read literally, also trains
        # with --relabel naive: see add_args)
        tau = self.tau if self.inference == "fuse" else float("inf")
        fused, level = fuse(semantic, prob, self.strides, tau)          # (B, K, h, w), (B, h, w)
        outputs["out"] = to_image(fused, (H, W))               # (B, K, H, W)
        outputs["level"] = level_to_image(level, (H, W), len(self.strides))   # (B, H, W) Table 9
        up = [nearest_up(p, s // self.strides[-1]) for p, s in zip(prob, self.strides)]   # to the finest level
        outputs["maps"] = {"level": level.unsqueeze(1).float() / (len(self.strides) - 1),  # (B, 1, h, w) Fig. 1
                           "unity": torch.stack(up, 1)}                                     # (B, L-1, h, w)
        return outputs

    def loss(self, outputs, target):
        semantic = list(outputs["semantic"])
        size = [n * self.strides[-1] for n in semantic[-1].shape[-2:]]           # (H', W')
        # NOTE(paper-gap): the label map follows the resized image (Sec. 3.1) with nearest neighbour, because
        # labels cannot be interpolated; every per-pixel CE (the single output's, 'pixels') is taken at this size
        target = resize(target.unsqueeze(1).float(), size, "nearest")[:, 0].long()   # (B, H', W')
        if self.unity_head is None:                            # the standard per-pixel loss, at 'out''s positions
            ce = cross_entropy(to_image(semantic[-1], size), target)
            return {"semantic": ce, "total": ce}
        semantic_gt, unity_gt = pyramid_ground_truth(target, self.strides)
        prob = [u.detach().float().sigmoid() for u in outputs["unity"]]
        done = done_by_coarser(unity_gt, prob, self.strides, self.relabel_policy, self.tau)
        # Sec. 3.2: Y_relabeled, U_relabeled: the cells done by coarser are ignored in both pyramids
        semantic_gt = [y.masked_fill(d, IGNORE_INDEX) for y, d in zip(semantic_gt, done)]
        unity_gt = [u.masked_fill(d, IGNORE_INDEX) for u, d in zip(unity_gt[:-1], done)]
        # 'cells' (the paper): Sec. 3.1 defines Y^(l) alike at every level, mix cells ignored, and Eq. (1)
        # takes every CE at its level's H/s_l
        if self.finest_target == "pixels":
            # Deviation, not the paper: the finest level is trained on the labels of its pixels, so that the
            # pixels of finest mix cells still teach it (on CamVid train at 192 x 256, 89 % of Pole and 57 %
            # of Pedestrian pixels lie in mixed 4 x 4 cells, which 'cells' never supervises). Each cell's
            # logits are replicated to its s_L x s_L pixels, so a cell done by coarser gets no gradient
            semantic[-1] = nearest_up(semantic[-1], self.strides[-1])                   # (B, K, H', W')
            semantic_gt[-1] = target.masked_fill(nearest_up(done[-1], self.strides[-1]), IGNORE_INDEX)
        L = len(self.strides)
        # Eq. (1): mean CE over the L semantic levels + mean BCE over the L-1 unity levels
        ce = sum(cross_entropy(y, t) for y, t in zip(semantic, semantic_gt)) / L
        bce = sum(unity_bce(u, t) for u, t in zip(outputs["unity"], unity_gt)) / (L - 1)
        return {"semantic": ce, "unity": bce, "total": ce + bce}


# ----------------------------------------------------------------------------------------------
# Sec. 5.5: does each level specialise? (Table 9, Fig. 3)


def level_confusion(outputs, target, num_classes):
    """(L, L, K, K) int64: [l, l'] is the confusion matrix (rows ground truth) of level l''s semantic
    prediction over the pixels of `target` (B, H, W) that the fusion took from level l (outputs['level'],
    eval mode). Level l' is brought to the pixels as the evaluated 'out' is (Eq. 2's nearest Up to the
    finest level, then to_image), so where the fusion takes l' everywhere the two agree.
    Ignore pixels are skipped. Sum it over a split."""
    semantic, level = outputs["semantic"], outputs["level"]                     # level (B, H, W)
    L, finest = len(semantic), semantic[-1].shape[-1]
    confusion = target.new_zeros(L, L, num_classes, num_classes)
    for l_sem, logits in enumerate(semantic):
        up = nearest_up(logits, finest // logits.shape[-1])                     # (B, K, h, w) finest cells
        pred = to_image(up, target.shape[-2:]).argmax(1)                        # (B, H, W) as 'out'
        for l in range(L):
            group = level == l
            confusion[l, l_sem] = confusion_matrix(pred[group], target[group], num_classes)
    return confusion


def level_tables(confusion, fused, class_names=None):
    """Table 9: mIoU[l'][l] of level l' on the pixels taken from level l, and each group's share of
    the pixels (%). Fig. 3: per-class IoU of each level l' over all pixels, and of the fused output
    (`fused`: the (K, K) confusion matrix of 'out'). Percentages; NaN / None where a class or group is empty."""
    L = len(confusion)
    table9 = [[segmentation_metrics(confusion[l, l_sem])["mIoU"] for l in range(L)] for l_sem in range(L)]
    share = [100 * confusion[l, 0].sum().item() / max(confusion[:, 0].sum().item(), 1) for l in range(L)]
    per_level = [segmentation_metrics(confusion[:, l_sem].sum(0), class_names)["IoU"] for l_sem in range(L)]
    return table9, share, per_level, segmentation_metrics(fused, class_names)["IoU"]


def markdown_tables(table9, share, per_level, fused):
    """Table 9 (rows l', columns l) and Fig. 3 (per class: the fused IoU, then each level's IoU minus
    it) as Markdown, levels numbered as the paper (1 = coarsest) and listed finest first."""
    levels = list(reversed(range(len(table9))))
    fmt = lambda v: "-" if v is None or v != v else f"{v:.2f}"
    row = lambda cells: "| " + " | ".join(cells) + " |"
    lines = ["Table 9: mIoU of semantic level l' (rows) on the pixels fused from level l (columns)", "",
             row(["l' \\ l"] + [str(l + 1) for l in levels]), row(["---"] * (len(levels) + 1))]
    lines += [row([str(r + 1)] + [fmt(table9[r][l]) for l in levels]) for r in levels]
    lines += [row(["pixels (%)"] + [fmt(share[l]) for l in levels]), "",
              "Fig. 3: per-class IoU of the fused output, and of each level l' minus it", "",
              row(["class", "fused"] + [f"l'={r + 1}" for r in levels]), row(["---"] * (len(levels) + 2))]
    for name, iou in fused.items():
        deltas = [None if iou is None or per_level[r][name] is None else per_level[r][name] - iou for r in levels]
        lines.append(row([name, fmt(iou)] + [fmt(d) for d in deltas]))
    return "\n".join(lines)


@torch.no_grad()
def level_analysis(model, dataset, device):
    """(level_confusion, confusion matrix of 'out') summed over `dataset` (eval items), one whole
    image at a time, one scale."""
    model.eval()
    confusion = fused = 0
    for index in range(len(dataset)):
        image, label = dataset[index]
        outputs, label = model(image[None].to(device)), label[None].to(device)
        confusion = confusion + level_confusion(outputs, label, dataset.num_classes)
        fused = fused + confusion_matrix(outputs["out"].argmax(1), label, dataset.num_classes)
    return confusion, fused


def add_args(parser):
    group = parser.add_argument_group("specialize_fuse: Specialize and Fuse (ICCV 2021)")
    group.add_argument("--output-format", choices=("pyramidal", "single"), default="pyramidal",
                       help="pyramidal output (ours) or the standard single finest-level output (Table 6 rows)")
    group.add_argument("--context", choices=("ours", "anl", "anl-multi", "none"), default="ours",
                       help="coarse-to-fine CA/CU, one ANL on the backbone, one ANL per level, none (Table 6)")
    group.add_argument("--relabel", choices=("true-positive", "simple", "naive"), default=None,
                       help="ignore descendants of true-positive (ours, the default) / all ground-truth / no "
                            "unity cells (Table 7)")
    # NOTE(paper-gap): Table 8's "aux. supervision" row is --relabel naive --inference finest, because Sec. 5.4
    # calls the multi-level supervision auxiliary and the row scores above the single output, while with
    # true-positive relabelling a perfect unity head leaves the finest level few targets (12.2 % of the
    # finest cells of CamVid train at its working size 192 x 256; naive: 84.5 %)
    group.add_argument("--inference", choices=("fuse", "finest"), default=None,
                       help="fuse the pyramids by Eq. (2) (the default), or the finest level only (Table 8; its "
                            "\"aux. supervision\" row is --relabel naive --inference finest)")
    group.add_argument("--pyramid-levels", type=int, choices=(2, 4), default=None,
                       help="L: 4 levels of strides {32,16,8,4} (the default) or 2 of strides {32,4} (Sec. 5.4)")
    group.add_argument("--tau", type=ranged(float, 0, 1), default=None,
                       help="unity threshold of Eq. (2) and of the true-positive relabelling (Sec. 5.1.3; 0.9)")
    group.add_argument("--finest-target", choices=("cells", "pixels"), default=None,
                       help="supervise the finest level per 4x4 cell with mix cells ignored (Sec. 3.1, Eq. 1; "
                            "the default), or per pixel (a deviation: mix cells' pixels keep their labels)")
    group.add_argument("--unity-channels", type=ranged(int, 1), default=None, help="D_u of the unity head (Sec. 5.1.3; 64)")
    group.add_argument("--semantic-channels", type=ranged(int, 1), default=512, help="D_s of the semantic head (Sec. 5.1.3)")


def given_or(value, default):
    """A flag's value, or its default when it was not given (None)."""
    return default if value is None else value


def build_model(args):
    # A flag that would change nothing is an error, not silently ignored.
    unity_flags = (("--relabel", args.relabel), ("--inference", args.inference), ("--tau", args.tau),
                   ("--finest-target", args.finest_target), ("--unity-channels", args.unity_channels))
    given = [flag for flag, value in unity_flags if value is not None]
    if args.output_format == "single" and args.context != "ours" and args.pyramid_levels is not None:
        given.append("--pyramid-levels")                    # the single output without our module: one level
    if args.output_format == "single" and given:
        raise InputError(f"specialize_fuse: {', '.join(given)} would change nothing: --output-format single "
                         f"predicts the finest level alone, with no unity pyramid")
    if args.output_format == "single" and args.context == "anl-multi":
        raise InputError("specialize_fuse: --output-format single --context anl-multi has no paper row (Table 6 "
                         "marks it \"-\"): ANL-multi applies ANL to each level of the pyramidal output")
    relabel, inference = given_or(args.relabel, "true-positive"), given_or(args.inference, "fuse")
    if args.tau is not None and inference == "finest" and relabel != "true-positive":
        raise InputError(f"specialize_fuse: --tau would change nothing: --inference finest never fuses and "
                         f"--relabel {relabel} never reads the unity prediction")
    # the paper uses HRNetV2, or the standard ResNet (output stride 32) decoded to stride 4 (Sec. 5.1.2)
    return SpecializeFuse(build_backbone(args, output_stride=32, hrnet=True), args.num_classes,
                          output_format=args.output_format, context=args.context, relabel=relabel,
                          inference=inference, levels=given_or(args.pyramid_levels, 4),
                          tau=given_or(args.tau, 0.9), finest_target=given_or(args.finest_target, "cells"),
                          unity_channels=given_or(args.unity_channels, 64), semantic_channels=args.semantic_channels)


# ----------------------------------------------------------------------------------------------
# python specialize_fuse.py --checkpoint PATH: Table 9 and Fig. 3 of a trained model


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="specialize_fuse.py", description="Table 9 and Fig. 3 (Sec. 5.5) of a pyramidal model that train.py "
        "trained: whole images of the validation split, one scale. The model's flags come from the checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt of a train.py run")
    parser.add_argument("--data-root", help="the dataset's folder (default: the one the run was trained with)")
    parser.add_argument("--val-split", help="the split analysed (default: the run's --val-split)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return parser.parse_args(argv)


def print_level_analysis(argv):
    """Rebuild the model from the flags saved in the checkpoint (state['args'], what train.py writes),
    load its weights, and print Table 9 and Fig. 3 of the validation split as Markdown."""
    cli = parse_args(argv)
    state = load_checkpoint(cli.checkpoint)
    if not isinstance(state.get("args"), dict):
        raise InputError(f"{cli.checkpoint} holds no training flags ('args'): give a checkpoint that train.py wrote")
    args = argparse.Namespace(**state["args"])
    if getattr(args, "method", None) != "specialize_fuse" or getattr(args, "output_format", None) != "pyramidal":
        raise InputError(f"{cli.checkpoint} is not a pyramidal specialize_fuse model (--method "
                         f"{getattr(args, 'method', None)}, --output-format {getattr(args, 'output_format', None)})")
    for name in ("data_root", "val_split", "device"):
        if getattr(cli, name) is not None:
            setattr(args, name, getattr(cli, name))
    args.pretrained = None                                 # the checkpoint holds every weight
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: no CUDA device here (give --device cpu)")
    try:
        dataset = build_datasets(args)[1] if args.dataset == "synthetic" else \
            file_dataset(args.dataset, args.data_root, args.val_split)
        args.num_classes = dataset.num_classes
        model = build_model(args).to(device)
    except AttributeError as e:                            # a flag that the run's train.py did not have yet
        raise InputError(f"{cli.checkpoint}: its saved flags lack {e.name!r} (written by an older train.py)") from None
    load_weights(model, cli.checkpoint)
    with autocast(args.amp, device):
        confusion, fused = level_analysis(model, dataset, device)
    print(markdown_tables(*level_tables(confusion.cpu(), fused.cpu(), dataset.class_names)))


if __name__ == "__main__":
    import sys
    try:
        print_level_analysis(sys.argv[1:])
    except InputError as e:
        sys.exit(f"error: {e}")
