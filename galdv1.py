"""GALD v1: Global Aggregation then Local Distribution in Fully Convolutional Networks.

X. Li, L. Zhang, A. You, M. Yang, K. Yang, Y. Tong, BMVC 2019, https://arxiv.org/abs/1909.07229.
Authors' code: lxtGH/GALD-DGCNet, libs/models/GALDNet.py (model) and libs/core/loss.py (loss).

Idea (Sec. 3.2, Fig. 2). A Global Aggregation (GA) module (CGNL, Non-local, PSP, ASPP) pools features over
a large window, so large patterns dominate and small ones (boundaries, thin objects) get over-smoothed.
Local Distribution (LD) learns per channel ("pattern") a coarse mask M from the GA features with strided
depth-wise convs and re-weights them: X_gald = M * X_g + X_g. The head sees concat(X_gald, X).

Map from the code to the paper:
    PooledBatchNorm          the BN of a pooled 1x1 map (ASPP's image pooling, PSP's bins)
    CGNL, HalfResolution     GA "Compact Generalized Non-Local", run at half resolution (Sec. 3.2)
    NonLocal, PSP, ASPP      the other GA modules of Sec. 4.3.1, Table 1(a)/(b), Fig. 3(a)-(d)
    build_ga                 one GA module at the block width (galdv2.py and denoised_nl.py import it)
    LocalDistribution        LD, Sec. 3.2, Eqs. (1)-(2); the downsamplings of Table 1(e)
    GALDBlock                the arrangements GALD / LDGA / Parallel, Sec. 4.3.1, Table 1(c), Fig. 3(e)-(g)
    GALDHead, GALD           the network, Sec. 3.3, Fig. 2, Eq. (3); OHEM + aux loss
The trunk is common.ResNet at output stride 8, dilated as PSPNet (Sec. 4.2) and the authors' code.

GALD.forward(image) returns {'out': (B, K, H, W) logits, 'aux': (B, K, H, W) (training only),
'maps': {'ld_mask': (B, 1, H/8, W/8), the channel mean of M, Fig. 4} (eval only, LD on)}.

Paper gaps, each reasoned at its NOTE(paper-gap):
- one image per process: a pooled 1x1 map's BN uses its running statistics (pooled_conv_bn_relu)
- CGNL: grouped 1x1 output conv + GroupNorm, unscaled kernel (CGNL); halved by a depth-wise conv (HalfResolution)
- NL, PSP, ASPP (absent from the authors' code) as their own papers (NonLocal, PSP, ASPP, build_ga)
- NL, PSP, ASPP at full resolution; a 1x1 projection where a GA module's width differs (build_ga)
- W_d: three depth-wise 3x3 stride-2 convs, BN after each, ReLU between, padding 1 (LocalDistribution)
- every up-sampling puts coarse sample j on the fine pixel it was computed at (HalfResolution,
  LocalDistribution.forward, GALDHead.forward)
- 3x3 convs before and after the block, the head's 3x3 conv, Eq. (3)'s concat order (GALD, GALDHead)
- aux head on layer3 (weight 0.4) and OHEM (0.7, 100k) on 'out' (GALDHead)
follow_code=True is the released code where it differs from Eqs. (1)-(2) (LocalDistribution).
"""
import argparse
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (InputError, SegModel, build_backbone, conv_bn_relu, main_and_aux_loss, resize, seg_head,
                    upsample_strided)

GA_MODULES = ("cgnl", "nl", "psp", "aspp")              # Table 1(a)/(b), Fig. 3(a)-(d)
LD_DOWNSAMPLINGS = ("dwconv", "bilinear", "avgpool")    # Table 1(e)
ARRANGEMENTS = ("gald", "ldga", "parallel")             # Table 1(c), Fig. 3(e)-(g)


# ----------------------------------------------------------------------------------------------
# Helper: BatchNorm of a pooled map


class PooledBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d for a map made by pooling (ASPP's image pooling, PSP's bins).

    In training, a batch with one value per channel (one image on a 1x1 map) has no batch
    statistics; this BN then normalises with its running statistics, as in eval, and leaves them
    as they are. Otherwise, and always in eval, it is nn.BatchNorm2d (same parameters, buffers and
    state_dict; convert_sync_batchnorm turns it into a SyncBatchNorm like any other BN).
    """

    def forward(self, x):
        B, C, H, W = x.shape
        if self.training and B * H * W == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)                 # (B, C, 1, 1)
        return super().forward(x)


def pooled_conv_bn_relu(in_channels, out_channels):
    """1x1 conv -> PooledBatchNorm -> ReLU: common.conv_bn_relu for a branch that runs on a pooled map."""
    layer = conv_bn_relu(in_channels, out_channels, 1)
    # NOTE(paper-gap): with one image per process and plain BN, a 1x1 pooled map normalises with the
    # running statistics instead of crashing ("Expected more than 1 value per channel") because the
    # papers train only with SyncBN over 8 GPUs (lxtGH/GALD-DGCNet train_distribute.py), where this BN
    # sees 8 values. While every batch is one image the statistics stay at (0, 1), so the BN is the
    # affine gamma * x / sqrt(1 + eps) + beta, the same in training and eval.
    layer[1] = PooledBatchNorm(out_channels)
    return layer


# ----------------------------------------------------------------------------------------------
# Global Aggregation modules (Sec. 3.2, Table 1a)


class CGNL(nn.Module):
    """Compact Generalized Non-Local block (Yue et al., NeurIPS 2018, arXiv:1810.13125), the GA of Sec. 3.2.

    Channels of theta, phi, g are split into groups; within a group the dot-product kernel runs over
    all channel AND spatial positions at once, so per group and sample it is one scalar
    a = sum_{c,i} phi[c, i] * g[c, i], "multiplied back" onto theta: y = a * theta.
    Output: x + GN(W_z y), W_z a grouped 1x1 conv.
    """

    def __init__(self, channels, *, groups=8, inner_channels=None):
        super().__init__()
        inner = inner_channels or channels // 2
        self.groups = groups
        self.theta = nn.Conv2d(channels, inner, 1, bias=False)
        self.phi = nn.Conv2d(channels, inner, 1, bias=False)
        self.g = nn.Conv2d(channels, inner, 1, bias=False)
        # NOTE(paper-gap): grouped 1x1 output conv + GroupNorm(groups) and no scaling of the kernel
        # because the authors' SpatialCGNL does so (lxtGH/GALD-DGCNet libs/models/GALDNet.py)
        self.z = nn.Conv2d(inner, channels, 1, groups=groups, bias=False)
        self.norm = nn.GroupNorm(groups, channels)

    def forward(self, x):
        B, C, H, W = x.shape
        theta = self.theta(x)                                  # (B, C/2, H, W)
        phi = self.phi(x).reshape(B, self.groups, -1)          # (B, G, C/2/G * N)
        g = self.g(x).reshape(B, self.groups, -1)              # (B, G, C/2/G * N)
        a = (phi * g).sum(-1, keepdim=True)                    # (B, G, 1): one affinity per group
        y = a * theta.reshape(B, self.groups, -1)              # (B, G, C/2/G * N)
        y = y.reshape(theta.shape)                             # (B, C/2, H, W)
        return x + self.norm(self.z(y))                        # (B, C, H, W)


class HalfResolution(nn.Module):
    """Run a GA module at half resolution: "we downsample F by a factor of 2 for saving memory and
    computation cost" (Sec. 3.2). Depth-wise 3x3 stride-2 conv + BN + ReLU, GA, bilinear up with
    coarse sample j back on fine pixel 2j (upsample_strided)."""

    def __init__(self, ga, channels):
        super().__init__()
        # NOTE(paper-gap): a depth-wise 3x3 stride-2 conv + BN + ReLU downsamples because the authors'
        # GALDBlock does (lxtGH/GALD-DGCNet libs/models/GALDNet.py); padding 1 (theirs 0) because it
        # keeps sample j centred on pixel 2j, which the up-sampling below relies on
        self.down = conv_bn_relu(channels, channels, 3, stride=2, groups=channels)
        self.ga = ga

    def forward(self, x):
        B, C, H, W = x.shape
        y = self.ga(self.down(x))                              # (B, C, ceil(H/2), ceil(W/2))
        # NOTE(paper-gap): sample j goes back to pixel 2j because that is where it was computed;
        # common.resize would put it at 2j + 0.5 on even sizes
        return upsample_strided(y, (H, W), 2)                  # (B, C, H, W)


class NonLocal(nn.Module):
    """Non-local block, embedded Gaussian (Wang et al., CVPR 2018, arXiv:1711.07971), GA of Sec. 4.3.1,
    Table 1(a) "+NL"; GALD v2 (IEEE TIP 2021, arXiv:2107.13154) Sec. III-B, Eq. (4):
    X~ = softmax(X_theta X_phi^T) X_g.

    y_i = sum_j softmax_j(theta_i . phi_j) g_j, output x + BN(W y) with BN's gamma zero-initialised,
    so the block starts as the identity.
    """

    def __init__(self, channels, *, inner_channels=None):
        super().__init__()
        # NOTE(paper-gap): embedded Gaussian, C/2 inner channels, zero-initialised output BN because
        # the authors' repository has no NL and these are the NL paper's choices (Wang et al. Sec. 3.3, 4.1)
        inner = inner_channels or channels // 2
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.w = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.w[1].weight)

    def forward(self, x):
        B, C, H, W = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)           # (B, N, C/2)
        k = self.phi(x).flatten(2).transpose(1, 2)             # (B, N, C/2)
        v = self.g(x).flatten(2).transpose(1, 2)               # (B, N, C/2)
        # TIP Eq. (4): softmax over all positions j of theta_i . phi_j, unscaled as in the NL paper;
        # the fused kernel never stores the (B, N, N) affinity
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, N, C/2)
        y = y.transpose(1, 2).reshape(B, -1, H, W)             # (B, C/2, H, W)
        return x + self.w(y)                                   # (B, C, H, W)


class PSP(nn.Module):
    """Pyramid pooling (Zhao et al., CVPR 2017, arXiv:1612.01105; Sec. 2), GA of Sec. 4.3.1, Table 1(a)
    "+PSP": average pooling to bins x bins, 1x1 conv to C/len(bins), bilinear up, concat with the
    input, 3x3 conv to out_channels."""

    def __init__(self, in_channels, out_channels, *, bins=(1, 2, 3, 6)):
        super().__init__()
        # NOTE(paper-gap): C/4 channels per bin with BN + ReLU and no Dropout2d(0.1) after the projection
        # because that is PSPNet's module; the authors' PSPModule (lxtGH/GALD-DGCNet libs/models/PSPNet.py)
        # uses 512 per bin, no ReLU, and ends with the dropout
        branch = in_channels // len(bins)
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), pooled_conv_bn_relu(in_channels, branch))
                                    for b in bins)
        self.project = conv_bn_relu(in_channels + branch * len(bins), out_channels, 3)

    def forward(self, x):
        pyramid = [x] + [resize(stage(x), x.shape[-2:]) for stage in self.stages]  # each (B, *, H, W)
        return self.project(torch.cat(pyramid, 1))             # (B, C_out, H, W)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al., arXiv:1706.05587; Sec. 2), GA of Sec. 4.3.1,
    Table 1(a) "+ASPP": a 1x1 conv, three dilated 3x3 convs and image pooling, concatenated and
    projected with a 1x1 conv."""

    def __init__(self, in_channels, out_channels, *, rates=(12, 24, 36), inner_channels=256):
        super().__init__()
        # NOTE(paper-gap): 256 channels per branch because DeepLabv3 and the authors' ASPP in
        # lxtGH/SFSegNets network/nn/operators.py use 256
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, inner_channels, 1)] +
                                      [conv_bn_relu(in_channels, inner_channels, 3, dilation=r) for r in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), pooled_conv_bn_relu(in_channels, inner_channels))
        self.project = conv_bn_relu(inner_channels * (len(rates) + 2), out_channels, 1)

    def forward(self, x):
        feats = [branch(x) for branch in self.branches]        # each (B, 256, H, W)
        feats.append(resize(self.image_pool(x), x.shape[-2:]))  # (B, 256, H, W)
        return self.project(torch.cat(feats, 1))               # (B, C_out, H, W)


def build_ga(kind, in_channels, channels, output_stride=8):
    """A GA module mapping (B, in_channels, H, W) -> (B, channels, H, W); kind one of GA_MODULES."""
    # NOTE(paper-gap): NL, PSP and ASPP run at full resolution because Sec. 3.2 halves it for CGNL only
    if kind == "psp":
        return PSP(in_channels, channels)
    if kind == "aspp":
        # NOTE(paper-gap): DeepLabv3's rates (6, 12, 18) at output stride 16, scaled with the stride,
        # because neither GALD paper gives rates (DeepLabv3 Sec. 4.1 doubles them at stride 8)
        return ASPP(in_channels, channels, rates=tuple(r * 16 // output_stride for r in (6, 12, 18)))
    if kind == "cgnl":
        ga = HalfResolution(CGNL(in_channels), in_channels)
    elif kind == "nl":
        ga = NonLocal(in_channels)
    else:
        raise InputError(f"unknown GA module {kind!r}, expected one of {', '.join(GA_MODULES)}")
    if in_channels == channels:
        return ga                                              # the code's GALD block: no projection
    # NOTE(paper-gap): a 1x1 conv + BN + ReLU projects to the block width because NL and CGNL keep
    # their input width and neither paper says how they meet a different one (our choice)
    return nn.Sequential(ga, conv_bn_relu(in_channels, channels, 1))


# ----------------------------------------------------------------------------------------------
# Local Distribution (Sec. 3.2, Eqs. 1-2)


class LocalDistribution(nn.Module):
    """LD, Sec. 3.2, Eqs. (1)-(2) (GALD v2, TIP Sec. III-A "LDv1"): M = sigmoid(up(W_d X_g)),
    X_gald = M * X_g + X_g; forward returns (X_gald, M).

    W_d downsamples by d = 8 per channel: "dwconv" = three depth-wise 3x3 stride-2 convs (the
    paper's choice), "bilinear" / "avgpool" = parameter-free resizing (Table 1e). "up" puts every
    coarse sample back where it was taken: fine pixel 8j for dwconv (upsample_strided), the centre
    of its bin for bilinear / avgpool (common.resize, the inverse of their align_corners=False
    sampling; within half a pixel for avgpool's uneven bins).
    follow_code=True: ReLU after W_d (M in [0.5, 1)) and output 2 * X_g + M * X_g (released code).
    """

    ratio = 8                                                  # d of Eq. (1): "the downsampling ratio is 8" (Table 1e)

    def __init__(self, channels, *, downsample="dwconv", follow_code=False):
        super().__init__()
        if downsample not in LD_DOWNSAMPLINGS:
            raise InputError(f"unknown LD downsampling {downsample!r}, "
                             f"expected one of {', '.join(LD_DOWNSAMPLINGS)}")
        self.downsample, self.follow_code = downsample, follow_code
        if downsample == "dwconv":
            steps = self.ratio.bit_length() - 1                # d = 2 ** steps stride-2 convs
            # NOTE(paper-gap): BN after every depth-wise conv and ReLU between them because the authors'
            # LocalAttenModule does (lxtGH/GALD-DGCNet libs/models/GALDNet.py); padding 1 (theirs 0:
            # 97 -> 48 -> 23 -> 11 at a 769 crop, no output below 15 px) because it keeps sample j
            # centred on fine pixel 8j and works on every map size
            layers = [conv_bn_relu(channels, channels, 3, stride=2, groups=channels) for _ in range(steps - 1)]
            layers += [nn.Conv2d(channels, channels, 3, 2, 1, groups=channels, bias=False),
                       nn.BatchNorm2d(channels)]
            self.w_d = nn.Sequential(*layers)

    def forward(self, x_g):
        B, C, H, W = x_g.shape
        small = (-(-H // self.ratio), -(-W // self.ratio))    # ceil(H/d), ceil(W/d), as the strided convs
        if self.downsample == "dwconv":
            w = self.w_d(x_g)                                  # (B, C, H/d, W/d): sample j from pixel 8j
        elif self.downsample == "bilinear":
            w = resize(x_g, small)                             # (B, C, H/d, W/d): sample j at its bin centre
        else:
            w = F.adaptive_avg_pool2d(x_g, small)              # (B, C, H/d, W/d): mean of bin j
        if self.follow_code:
            # the released code's ReLU after the last depth-wise conv; for the parameter-free
            # downsamplings of Table 1(e) (which the code lacks) we apply it too, so M >= 0.5 in every mode
            w = F.relu(w)
        if self.downsample == "dwconv":
            # NOTE(paper-gap): Eq. (1)'s "upsample" puts coarse sample j back on fine pixel 8j, where
            # W_d computed it, because M must weight the X_g it was computed from. common.resize would
            # shift it by +3.5 px on 104- and 128-px maps and by +3.2 to -3.2 px on a 97-px one; the
            # code (padding 0, align_corners=True) computes sample j at pixel 8j + 7 and puts it at
            # 9.6j on a 97-px map, a shift from -7 to +9 px
            up = upsample_strided(w, (H, W), self.ratio)       # (B, C, H, W)
        else:
            up = resize(w, (H, W))                             # (B, C, H, W)
        m = torch.sigmoid(up)                                  # Eq. (1): M = sigmoid(up(W_d X_g)), (B, C, H, W)
        residual = 2 * x_g if self.follow_code else x_g
        return m * x_g + residual, m                           # Eq. (2): X_gald = M * X_g + X_g, (B, C, H, W)


# ----------------------------------------------------------------------------------------------
# The block: GA and LD in one of the arrangements of Fig. 3(e)-(g)


class GALDBlock(nn.Module):
    """GA and LD arranged as GALD (LD after GA, Sec. 3.2, Fig. 3e), LDGA (GA after LD, Fig. 3f) or
    Parallel (concat of GA(X) and LD(X), Fig. 3g); Sec. 4.3.1, Table 1(c). ga="none" / ld=False make
    that part the identity. forward returns (features, M or None); out_channels is 2C for Parallel, else C."""

    def __init__(self, channels, *, ga="cgnl", ld=True, arrangement="gald", ld_downsample="dwconv",
                 follow_code=False, output_stride=8):
        super().__init__()
        if arrangement not in ARRANGEMENTS:
            raise InputError(f"unknown arrangement {arrangement!r}, expected one of {', '.join(ARRANGEMENTS)}")
        self.arrangement = arrangement
        self.ga = nn.Identity() if ga == "none" else build_ga(ga, channels, channels, output_stride)
        self.ld = LocalDistribution(channels, downsample=ld_downsample, follow_code=follow_code) if ld else None
        self.out_channels = 2 * channels if arrangement == "parallel" else channels

    def distribute(self, x):
        return (x, None) if self.ld is None else self.ld(x)

    def forward(self, x):
        if self.arrangement == "gald":
            return self.distribute(self.ga(x))                 # LD(GA(X))
        y, m = self.distribute(x)
        if self.arrangement == "ldga":
            return self.ga(y), m                               # GA(LD(X))
        return torch.cat([self.ga(x), y], 1), m                # concat(GA(X), LD(X)), (B, 2C, H, W)


# ----------------------------------------------------------------------------------------------
# The network (Sec. 3.3, Fig. 2)


class GALDHead(nn.Module):
    """Sec. 3.3, Eq. (3): a 3x3 conv of the block's output X_gald, concat with X (layer4), a 3x3
    conv and the 1x1 classifier; in training also the aux head on layer3. galdv2.py reuses it."""

    def __init__(self, block_channels, c3, c4, num_classes, channels=512, strides=(8, 8)):
        super().__init__()
        self.strides = strides                                 # of layer3 and layer4
        # NOTE(paper-gap): a 3x3 conv after the block and a head of 3x3 conv/BN/ReLU (no dropout) -> 1x1
        # because the authors' GALDHead has them (convb, bottleneck in lxtGH/GALD-DGCNet
        # libs/models/GALDNet.py). The concat follows Eq. (3), (X_gald, X); the code's bottleneck takes
        # (layer4, X_gald): the same layer up to the order of its input channels.
        self.convb = conv_bn_relu(block_channels, channels, 3)
        self.head = nn.Sequential(conv_bn_relu(channels + c4, channels, 3), nn.Conv2d(channels, num_classes, 1))
        # NOTE(paper-gap): aux head 3x3 conv/BN/ReLU/dropout 0.1 on layer3 with plain CE weight 0.4, and
        # OHEM (0.7, 100k) on the main output, because the authors' code does so (CriterionOhemDSN in
        # lxtGH/GALD-DGCNet libs/core/loss.py); Sec. 3.3 names OHEM only
        self.aux_head = seg_head(c3, channels, num_classes, dropout=0.1)

    def forward(self, x_gald, c3, c4, size):
        x_o = torch.cat([self.convb(x_gald), c4], 1)           # Eq. (3): concat(X_gald, X), (B, C + C4, h, w)
        # NOTE(paper-gap): logit j lands on pixel 8j, where the backbone computed it, as the authors' loss
        # (align_corners=True at their 8k + 1 crops, lxtGH/GALD-DGCNet libs/core/loss.py) puts it
        out = {"out": upsample_strided(self.head(x_o), size, self.strides[1])}        # (B, K, H, W)
        if self.training:
            out["aux"] = upsample_strided(self.aux_head(c3), size, self.strides[0])   # (B, K, H, W)
        return out


class GALD(SegModel):
    """Sec. 3.3, Fig. 2 (TIP Sec. III-A): dilated ResNet -> 3x3 conv -> GALD block -> GALDHead (Eq. 3).
    forward returns the dict of the module docstring ('maps' is what --save-maps writes);
    loss = OHEM CE on 'out' + aux_weight * CE on 'aux'."""

    def __init__(self, backbone, num_classes, *, ga="cgnl", ld=True, arrangement="gald",
                 ld_downsample="dwconv", follow_code=False, channels=512, output_stride=8,
                 aux_weight=0.4, ohem=True):
        super().__init__()
        self.backbone = backbone
        c3, c4 = backbone.channels[2:]
        # NOTE(paper-gap): a 3x3 conv to 512 before the block because the authors' GALDHead starts with
        # one (conva in lxtGH/GALD-DGCNet libs/models/GALDNet.py)
        self.conva = conv_bn_relu(c4, channels, 3)
        self.block = GALDBlock(channels, ga=ga, ld=ld, arrangement=arrangement, ld_downsample=ld_downsample,
                               follow_code=follow_code, output_stride=output_stride)
        self.decoder = GALDHead(self.block.out_channels, c3, c4, num_classes, channels, backbone.strides[2:])
        self.aux_weight, self.ohem = aux_weight, ohem

    def forward(self, image):
        c1, c2, c3, c4 = self.backbone(image)                  # c4: (B, 2048, H/8, W/8) = X
        x_gald, m = self.block(self.conva(c4))                 # (B, C, H/8, W/8), M: (B, C, H/8, W/8)
        out = self.decoder(x_gald, c3, c4, image.shape[-2:])
        if m is not None and not self.training:
            out["maps"] = {"ld_mask": m.detach().mean(1, keepdim=True)}  # (B, 1, H/8, W/8), Fig. 4
        return out

    def loss(self, outputs, target):
        return main_and_aux_loss(outputs, target, ohem=self.ohem, aux_weight=self.aux_weight)


# GALD's keyword defaults (the paper's), which the flags default to and build_model compares with
DEFAULTS = {name: p.default for name, p in inspect.signature(GALD).parameters.items() if p.kind is p.KEYWORD_ONLY}


def add_args(parser):
    group = parser.add_argument_group("galdv1: GALD (BMVC 2019)")
    group.add_argument("--ga", default=DEFAULTS["ga"], choices=[*GA_MODULES, "none"],
                       help="Global Aggregation module (Table 1a/b); none = LD alone ('+LD' row)")
    group.add_argument("--ld", default=DEFAULTS["ld"], action=argparse.BooleanOptionalAction,
                       help="Local Distribution, Eqs. (1)-(2) (--no-ld: the '+GA' rows of Table 1a)")
    group.add_argument("--arrangement", default=DEFAULTS["arrangement"], choices=ARRANGEMENTS,
                       help="GA then LD, LD then GA, or both in parallel (Table 1c, Fig. 3 e-g)")
    group.add_argument("--ld-downsample", default=DEFAULTS["ld_downsample"], choices=LD_DOWNSAMPLINGS,
                       help="how LD downsamples by d = 8 for the mask (Table 1e)")
    group.add_argument("--follow-code", default=DEFAULTS["follow_code"], action=argparse.BooleanOptionalAction,
                       help="released code: ReLU before the mask's sigmoid and residual 2*X_g + M*X_g")
    group.add_argument("--ohem", default=DEFAULTS["ohem"], action=argparse.BooleanOptionalAction,
                       help="OHEM cross-entropy on the main output (Sec. 3.3)")


def build_model(args):
    """GALD from the command line; refuses switches that change nothing (common.InputError): an LD option
    off its default with --no-ld, and --arrangement ldga with one of its modules off (that is gald)."""
    ld_options = [name for name in ("ld_downsample", "follow_code") if getattr(args, name) != DEFAULTS[name]]
    if ld_options and not args.ld:
        flags = " and ".join("--" + name.replace("_", "-") for name in ld_options)
        raise InputError(f"{flags} change(s) only LD, which --no-ld turns off")
    if args.arrangement == "ldga" and (args.ga == "none" or not args.ld):
        off = "--ga none" if args.ga == "none" else "--no-ld"
        raise InputError(f"--arrangement ldga with {off} is --arrangement gald: one module alone has no order")
    return GALD(build_backbone(args), args.num_classes, ga=args.ga, ld=args.ld, arrangement=args.arrangement,
                ld_downsample=args.ld_downsample, follow_code=args.follow_code, output_stride=args.output_stride,
                ohem=args.ohem)
