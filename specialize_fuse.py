"""Specialize and Fuse: Pyramidal Output Representation for Semantic Segmentation.

C.-W. Hsiao, C. Sun, H.-T. Chen, M. Sun, ICCV 2021, https://arxiv.org/abs/2108.01866. No official code
has been released: this file is a reconstruction from Secs. 3-5 of the paper.

Besides the per-pixel output, predict two pyramids of L levels (cells of 32, 16, 8, 4 pixels): unity (is
every pixel of this cell one class?) and semantic (the class of each cell). In training, a cell under a
unity ancestor that the network already gets right is "done by coarser" and ignored, so each level
specialises in what coarser levels leave (Specialize, Sec. 3.2). At inference each pixel takes the class
of its coarsest confident unity cell, the finest level filling what is left (Fuse, Sec. 3.3).

    working_size, pyramid_ground_truth   Sec. 3.1: input size, unity and semantic ground truth
    done_by_coarser, SpecializeFuse.loss Sec. 3.2, Table 7: relabelling; Eq. (1)
    fuse, to_image, level_to_image       Sec. 3.3, Eq. (2), Table 8: fusion; the stride-4 grid to pixels
    UnityHead                            Sec. 4.1, Fig. 2b
    pyramid_pool, ContextAggregation     Sec. 4.2, Eqs. (6), (8)-(10), Fig. 2d; also Table 6's ANL [34]
    ContextUpdating, SemanticHead        Sec. 4.2, Eqs. (3)-(7), (10)-(11), Figs. 2c, 2e, Table 6
    LightDecoder                         Sec. 5.1.2: a ResNet's stages fused at stride 4, D = 720
    SpecializeFuse                       Fig. 2a, on HRNetV2's stride-4 concat or a ResNet + LightDecoder
    SpecializeFuse.level_outputs         Sec. 5.5: each level as 'out' would be (Table 9: tools/levels.py)

forward(image) returns ((H', W') the working size of Sec. 3.1, levels coarsest first):
    'semantic' [(B, K, H'/s, W'/s)] logits per level (output_format 'single': the finest only)
    'unity'    [(B, H'/s, W'/s)] unity logits of the L-1 coarser levels (pyramidal only)
    eval mode only (Eq. (1) reads the pyramids alone, so training builds none of these):
    'out'      (B, K, H, W) logits of the Eq. (2) fusion (or of the finest level) at the image's pixels
    'level'    (B, H, W) int64, the level that weighs most in each pixel's 'out', 0 = coarsest (pyramidal)
    'maps'     {'level': (B, 1, h, w) level / (L-1), 'unity': (B, L-1, h, w)} at the finest level (Fig. 1)

Deviation, a switch: finest_target 'pixels' (at SpecializeFuse.loss). Gaps filled, each at its
NOTE(paper-gap): unlabelled pixels (pyramid_ground_truth); true positives, 'naive' (done_by_coarser); Up,
pixel 4j (fuse, to_image); the 1x1 convs (UnityHead); average pooling (pyramid_pool); key width
(ContextAggregation); projection, Eq. (3) at L = 2, single output, ANL-multi, last CU (SemanticHead);
the ResNet decoder (LightDecoder); BCE weights (unity_bce); Table 6's ANL (SpecializeFuse); labels at the
working size (loss); Table 8's "aux. supervision" row (add_args).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (HRNet, IGNORE_INDEX, InputError, SegModel, build_backbone, conv_bn_relu, cross_entropy,
                    hrnet_features, ranged, resize, upsample_strided)

FINEST_STRIDE = 4                              # s_L, the backbone's output stride (Sec. 3.1, 5.1.3)
STRIDES = {2: (32, FINEST_STRIDE), 4: (32, 16, 8, FINEST_STRIDE)}   # cell sizes s_l, coarsest first (5.1.3, 5.4)
TAU = 0.9                                      # unity threshold of Eq. (2) and of the relabelling (Sec. 5.1.3)
PYRAMID_BINS = (1, 3, 6, 8)                    # PyramidPool output sizes (Sec. 4.2)
UNITY_CHANNELS, SEMANTIC_CHANNELS = 64, 512    # D_u, D_s (Sec. 5.1.3)
DECODER_CHANNELS = (48, 96, 192, 384)          # LightDecoder's stage widths, D = 720 (Sec. 5.1.2)
# the switches, first the paper's setting: Table 6 (output format, context), 7 (relabel), 8 (inference)
OUTPUT_FORMATS = ("pyramidal", "single")
CONTEXTS = ("ours", "anl", "anl-multi", "none")
RELABEL_POLICIES = ("true-positive", "simple", "naive")
INFERENCES = ("fuse", "finest")
FINEST_TARGETS = ("cells", "pixels")           # Sec. 3.1, or a deviation (SpecializeFuse.loss)


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


def done_by_coarser(unity, unity_prob, strides, policy="true-positive", tau=TAU):
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


def fuse(semantic, unity_prob, strides, tau=TAU):
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
    Conv1x1_cls shared by the levels; U^(l) = MinPool(X_unity^(l)) per cell. The pooled side and the
    pixel side each have their own conv (the NOTE at self.pixel).

    Input X (B, D, h, w) at the finest level; output: list over the L-1 coarser levels of
    (B, H/s, W/s) unity logits (sigmoid gives U^(l)).
    """

    def __init__(self, in_channels, *, channels=UNITY_CHANNELS, strides=STRIDES[4]):
        super().__init__()
        self.factors = [s // strides[-1] for s in strides[:-1]]
        # NOTE(paper-gap): the four 1x1 convs are plain convs, no BN/ReLU, because Sec. 4.1 names none. Only the
        # classifier has a bias: a bias in the other three adds a constant to X_diff, which it absorbs
        self.reduce = nn.Conv2d(in_channels, channels, 1, bias=False)    # X -> X_u
        self.centroid = nn.Conv2d(channels, channels, 1, bias=False)     # pooled side, shared by the levels
        # NOTE(paper-gap): one pixel-side Conv1x1(X_u) for every level, because Sec. 4.1 subtracts each level's
        # centroids from the same Conv1x1(X_u); it is not the pooled side's conv, which would cancel: average
        # pooling commutes with a 1x1 conv, X_diff would average to zero over each cell and no unity logit could
        # exceed the classifier's bias
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

    def __init__(self, in_channels, num_classes, *, channels=SEMANTIC_CHANNELS, strides=STRIDES[4], context="ours",
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

    def __init__(self, in_channels, in_strides, *, channels=DECODER_CHANNELS):
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
    """Fig. 2a: a backbone (HRNetV2's stride-4 concat, or a ResNet + LightDecoder), the unity and semantic
    heads; Eq. (1) loss, Eq. (2) inference. The keywords default to the paper's setting: output_format
    (Table 6 rows), context (Table 6 columns), relabel (Table 7), inference (Table 8), levels (L, Sec.
    5.4), tau (Sec. 5.1.3), finest_target (Sec. 3.1's 'cells', or a deviation: see loss), D_u, D_s.
    """

    def __init__(self, backbone, num_classes, *, output_format="pyramidal", context="ours",
                 relabel="true-positive", inference="fuse", levels=4, tau=TAU, finest_target="cells",
                 decoder_channels=DECODER_CHANNELS, unity_channels=UNITY_CHANNELS,
                 semantic_channels=SEMANTIC_CHANNELS):
        super().__init__()
        for name, value, allowed in (("output format", output_format, OUTPUT_FORMATS), ("context", context, CONTEXTS),
                                     ("relabel", relabel, RELABEL_POLICIES), ("inference", inference, INFERENCES),
                                     ("levels", levels, tuple(STRIDES)), ("finest target", finest_target, FINEST_TARGETS)):
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
        # Table 8: 'finest' skips the fusion
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

    @staticmethod
    def level_outputs(semantic, size):
        """Sec. 5.5 (Table 9, Fig. 3): each level of the semantic pyramid ([(B, K, H'/s, W'/s)], coarsest first)
        at the image's (B, K, H, W), one level at a time, as 'out' would be had Eq. (2) taken that level
        everywhere: nearest Up to the finest cells, then to_image. A method, so that tools reach it
        through the model."""
        finest = semantic[-1].shape[-1]
        for logits in semantic:
            yield to_image(nearest_up(logits, finest // logits.shape[-1]), size)   # (B, K, H, W)


# ----------------------------------------------------------------------------------------------
# The command line: flags default to the constructor's keywords (the paper's setting)


DEFAULTS = SpecializeFuse.__init__.__kwdefaults__
UNITY_FLAGS = ("relabel", "inference", "tau", "finest_target", "unity_channels")   # read by the pyramids alone


def add_args(parser):
    group = parser.add_argument_group("specialize_fuse: Specialize and Fuse (ICCV 2021)")
    group.add_argument("--output-format", choices=OUTPUT_FORMATS, default=DEFAULTS["output_format"],
                       help="pyramidal output (ours) or the standard single finest-level output (Table 6 rows)")
    group.add_argument("--context", choices=CONTEXTS, default=DEFAULTS["context"],
                       help="coarse-to-fine CA/CU, one ANL on the backbone, one ANL per level, none (Table 6)")
    group.add_argument("--relabel", choices=RELABEL_POLICIES, default=DEFAULTS["relabel"],
                       help="ignore descendants of true-positive (ours) / all ground-truth / no unity cells (Table 7)")
    # NOTE(paper-gap): Table 8's "aux. supervision" row is --relabel naive --inference finest, because Sec. 5.4
    # calls the multi-level supervision auxiliary and the row scores above the single output, while with
    # true-positive relabelling a perfect unity head leaves the finest level few targets (12.2 % of the
    # finest cells of CamVid train at its working size 192 x 256; naive: 84.5 %)
    group.add_argument("--inference", choices=INFERENCES, default=DEFAULTS["inference"],
                       help="fuse the pyramids by Eq. (2), or the finest level only (Table 8; its \"aux. "
                            "supervision\" row is --relabel naive --inference finest)")
    group.add_argument("--pyramid-levels", type=int, choices=tuple(STRIDES), default=DEFAULTS["levels"],
                       help="L: 4 levels of strides {32,16,8,4} or 2 of strides {32,4} (Sec. 5.4)")
    group.add_argument("--tau", type=ranged(float, 0, 1), default=DEFAULTS["tau"],
                       help="unity threshold of Eq. (2) and of the true-positive relabelling (Sec. 5.1.3)")
    group.add_argument("--finest-target", choices=FINEST_TARGETS, default=DEFAULTS["finest_target"],
                       help="supervise the finest level per 4x4 cell with mix cells ignored (Sec. 3.1, Eq. 1), "
                            "or per pixel (a deviation: mix cells' pixels keep their labels)")
    group.add_argument("--unity-channels", type=ranged(int, 1), default=DEFAULTS["unity_channels"],
                       help="D_u of the unity head (Sec. 5.1.3)")
    group.add_argument("--semantic-channels", type=ranged(int, 1), default=DEFAULTS["semantic_channels"],
                       help="D_s of the semantic head (Sec. 5.1.3)")


def build_model(args):
    # A flag that would change nothing is an error, not silently ignored (one given at its default passes).
    if args.output_format == "single":
        unused = [f"--{dest.replace('_', '-')}" for dest in UNITY_FLAGS if getattr(args, dest) != DEFAULTS[dest]]
        if args.context != "ours" and args.pyramid_levels != DEFAULTS["levels"]:
            unused.append("--pyramid-levels")                 # the single output without our module: one level
        if unused:
            raise InputError(f"specialize_fuse: {', '.join(unused)} would change nothing: --output-format single "
                             f"predicts the finest level alone, with no unity pyramid")
        if args.context == "anl-multi":
            raise InputError("specialize_fuse: --output-format single --context anl-multi has no paper row (Table 6 "
                             "marks it \"-\"): ANL-multi applies ANL to each level of the pyramidal output")
    if args.tau != DEFAULTS["tau"] and args.inference == "finest" and args.relabel != "true-positive":
        raise InputError(f"specialize_fuse: --tau would change nothing: --inference finest never fuses and "
                         f"--relabel {args.relabel} never reads the unity prediction")
    # the paper uses HRNetV2, or the standard ResNet (output stride 32) decoded to stride 4 (Sec. 5.1.2)
    return SpecializeFuse(build_backbone(args, output_stride=32, hrnet=True), args.num_classes,
                          output_format=args.output_format, context=args.context, relabel=args.relabel,
                          inference=args.inference, levels=args.pyramid_levels, tau=args.tau,
                          finest_target=args.finest_target, unity_channels=args.unity_channels,
                          semantic_channels=args.semantic_channels)
