"""Denoised NL: a non-local block whose attention map is denoised before it is used.

Paper: "Denoised Non-Local Neural Network for Semantic Segmentation", Q. Song, J. Li, H. Guo, R. Huang,
IEEE Transactions on Neural Networks and Learning Systems (TNNLS) 2023, https://arxiv.org/abs/2110.14200.
Authors' code: maggiesong7/DenoisedNL, model.py (the model only, no training code; "model.py" below).

Idea (Sec. I, III-C). A non-local block's attention A attends to other classes (inter-class noise) and
has holes inside the attended object (intra-class noise). Global Rectifying (GR) multiplies A by the class
agreement sigmoid(P^T P) of coarse class probabilities P (A'); Local Retention (LR) sums A' over the k x k
neighbours of each key, weighted by their similarity to it (A''). F' = gamma * A'' V + F (Eq. 3) at 1/16.

    reduction           Sec. III-B, Fig. 3 "Reduction": 3x3 conv, Basic Block with stride 2 -> F
    class_agreement     Sec. III-D, Fig. 4(a): P_class = sigmoid(P^T P)
    local_similarity    Sec. III-E, Fig. 4(b): S_l[j, d] = sigmoid(q_j . k_{j+d})
    local_retention     Sec. III-E, Fig. 4(b): A'' (LocalRetention: its forward and one-buffer backward)
    DenoisedNLBlock     Sec. III-C to III-E, Eqs. (3)-(4): Q, K, V, A, A', A'', F'
    DenoisedNLNet       Sec. III-B head on concat(X, F', GAP context), Sec. III-F deep supervision, Eq. (5)

DenoisedNLNet.forward(image) -> dict
    'out'                      (B, K, H, W) logits
    'aux_layer2', 'aux_layer3' (B, K, H, W) deep-supervision logits (training only)
    'maps'                     eval, block='denoised': {'map1_A', 'map2_A_gr', 'map3_A_lr'}, each (B, 1, h, w)
                               at 1/16: row i of A, A', A'' for the query pixel `map_pixel`, unscaled (Fig. 11)

Deviations and gaps, each reasoned at its NOTE(paper-gap) in:
    reduction           3x3 conv to C = 512; the Basic Block's shortcut is a 3x3 stride-2 conv
    WINDOW_SIZE         k = 3
    local_retention     the window runs over the key index j, A' zero outside the key grid
    DenoisedNLBlock     C' = 64, no conv bias; Eq. (4) normalised over the keys j (attention); P a softmax
    DenoisedNLNet       GR's P from the layer3 aux head (class_map='aux'), read at F's samples; plain init;
                        Table III's PPM / ASPP at F's stride; the Baseline keeps the Reduction and the
                        head; head width 512; GAP -> 1x1 to C; res2 / res3 = layer2 / layer3
BN, not SyncBN, unless train.py converts it; model.py's backbone is --multi-grid 1 2 4.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from common import (BasicBlock, InputError, SegModel, build_backbone, conv_bn_relu, cross_entropy, query_cell,
                    ranged, seg_head, upsample_strided)
from galdv1 import build_ga

BLOCKS = ("denoised", "psp", "aspp", "none")
CLASS_MAPS = ("aux", "conv")
MAP_NAMES = ("map1_A", "map2_A_gr", "map3_A_lr")                        # rows of A, A', A'' (Fig. 11)
WINDOW_SIZE = 3   # NOTE(paper-gap): k = 3 because model.py uses a 3x3 nn.Unfold; the paper only says k x k
MAP_PIXEL = (0.5, 0.5)                                                 # the query pixel of 'maps': the centre
AUX_WEIGHTS = (1.0, 1.0)                                               # Sec. III-F: lambda1 = lambda2 = 1.0


# ----------------------------------------------------------------------------------------------
# Helpers


def window_offsets(window):
    """The k*k offsets d = (oy, ox) of a k x k window, row-major (the order of nn.Unfold)."""
    r = window // 2
    return [(oy, ox) for oy in range(-r, r + 1) for ox in range(-r, r + 1)]


def window_overlaps(size, window):
    """For each offset d (row-major): d's index, the (rows, cols) slices of the pixels j whose
    neighbour j + d lies inside the H x W grid, and the slices of those neighbours j + d.
    Offsets with no such pixel (k // 2 >= H or W) are left out: their terms are all zero padding."""
    H, W = size
    for d, (oy, ox) in enumerate(window_offsets(window)):
        y0, y1, x0, x1 = max(0, -oy), min(H, H - oy), max(0, -ox), min(W, W - ox)
        if y1 > y0 and x1 > x0:
            yield d, (slice(y0, y1), slice(x0, x1)), (slice(y0 + oy, y1 + oy), slice(x0 + ox, x1 + ox))


def class_map_step(strides):
    """How far apart F's samples lie on the layer3 logits' grid, from the backbone's four strides:
    F (the Reduction's stride 2 on layer4) has stride 2 * s4, layer3 s3. Sample step * i of the
    layer3 logits is F's sample i (every second one when layer3 and layer4 share a stride)."""
    s3, s4 = strides[2:]
    if 2 * s4 % s3:
        raise InputError(f"denoised_nl: GR reads P at F's samples, but F's stride {2 * s4} is not a multiple "
                         f"of layer3's stride {s3}; take P from a conv on F (class_map='conv')")
    return 2 * s4 // s3


# ----------------------------------------------------------------------------------------------
# Blocks, in the paper's order


def reduction(in_channels, channels):
    """Sec. III-B 'Reduction': 3x3 conv to `channels`, then a Basic Block whose first 3x3 conv has
    stride 2 (1/8 -> 1/16) and whose residual connection eases optimisation. Output: F."""
    # NOTE(paper-gap): the first conv is 3x3 to C = 512 and the Basic Block's shortcut is a 3x3 conv
    # with stride 2 + BN + ReLU because maggiesong7/DenoisedNL model.py does so; the paper says only
    # "a convolution layer" and "a Basic Block".
    shortcut = conv_bn_relu(channels, channels, 3, stride=2)
    return nn.Sequential(conv_bn_relu(in_channels, channels, 3),
                         BasicBlock(channels, channels, stride=2, downsample=shortcut))


def class_agreement(p_rows, p):
    """Sec. III-D: P_class = sigmoid(P^T P) for some query rows. p_rows (B, n, K) = rows of P^T,
    p (B, K, N) class probabilities -> (B, n, N); P_class[i, j] is high when i and j share a class."""
    return torch.sigmoid(p_rows @ p)                                  # (B, n, N)


def local_similarity(q, k, window):
    """Sec. III-E: S_l[j, d] = sigmoid(q_j . k_{j+d}) for the k*k offsets d around pixel j.
    q, k: (B, C', H, W) -> (B, k*k, N). K is zero outside the grid (S_l = 0.5 there, but it only
    ever multiplies the zero padding of A')."""
    B, _, H, W = q.shape
    r = window // 2
    k = F.pad(k, (r, r, r, r))                                         # (B, C', H+2r, W+2r)
    sims = [(q * k[:, :, r + oy:r + oy + H, r + ox:r + ox + W]).sum(1) for oy, ox in window_offsets(window)]
    return torch.sigmoid(torch.stack(sims, 1)).flatten(2)              # (B, k*k, N)


class LocalRetention(torch.autograd.Function):
    """Sec. III-E: A''[i, j] = sum_d A'[i, j + d] * S_l[j, d], A' zero outside the key grid.
    model.py unfolds A' into a (B, N, k*k, N) tensor; here the forward is one multiply-add per
    offset d on the overlapping part of the grid, into one output. Backward (the same sums transposed):
        dA'[i, j + d] += dA''[i, j] * S_l[j, d]      one (B, n, H, W) buffer, accumulated in place
        dS_l[j, d]     = sum_i A'[i, j + d] * dA''[i, j]
    so no zero-filled padded copy is made per offset, as autograd of shifted slices would."""

    @staticmethod
    def forward(ctx, a, s_l, size, window):
        B, n, _ = a.shape
        H, W = size
        a4 = a.reshape(B, n, H, W)                                     # each row of A' as an image over keys
        s4 = s_l.reshape(B, -1, 1, H, W)                               # (B, k*k, 1, H, W)
        out = torch.zeros_like(a4)                                     # A''  (B, n, H, W)
        for d, at, nb in window_overlaps(size, window):
            out[..., at[0], at[1]].addcmul_(a4[..., nb[0], nb[1]], s4[:, d, :, at[0], at[1]])
        ctx.save_for_backward(a, s_l)
        ctx.size, ctx.window = size, window
        return out.flatten(2)                                          # (B, n, N)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, s_l = ctx.saved_tensors
        B, n, _ = a.shape
        H, W = ctx.size
        g = grad.reshape(B, n, H, W)                                   # dA''  (B, n, H, W)
        a4, s4 = a.reshape(B, n, H, W), s_l.reshape(B, -1, 1, H, W)
        grad_a = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.zeros_like(a4)                              # dA'  (B, n, H, W), one buffer
            for d, at, nb in window_overlaps(ctx.size, ctx.window):
                grad_a[..., nb[0], nb[1]].addcmul_(g[..., at[0], at[1]], s4[:, d, :, at[0], at[1]])
            grad_a = grad_a.flatten(2)
        if ctx.needs_input_grad[1]:
            grad_s = torch.zeros_like(s4)                              # dS_l  (B, k*k, 1, H, W)
            for d, at, nb in window_overlaps(ctx.size, ctx.window):
                grad_s[:, d, :, at[0], at[1]] = (a4[..., nb[0], nb[1]] * g[..., at[0], at[1]]).sum(1, keepdim=True)
            grad_s = grad_s.view_as(s_l)
        return grad_a, grad_s, None, None


def local_retention(a, s_l, size, window):
    """Sec. III-E: A'' for rows a = A'[i0:i0+n] (B, n, N) and S_l (B, k*k, N) -> (B, n, N).
    Same value as unfolding A' into (B, n, k*k, N) and summing against S_l (model.py), with no
    tensor above one (B, n, N) map in the forward or the backward."""
    # NOTE(paper-gap): the window runs over the key index j and A' is zero outside the grid because
    # maggiesong7/DenoisedNL model.py unfolds each row A'[i, :] as an image over the keys (padding 1)
    return LocalRetention.apply(a, s_l, tuple(size), window)


class DenoisedNLBlock(nn.Module):
    """Sec. III-C to III-E: non-local attention A (Eq. 4), GR (A' = A * P_class), LR (A''), Eq. (3).
    With both GR and LR off it is the paper's own non-local block F' = gamma * softmax(Q K^T) V + F
    (Table IV's "+NL"; not Wang et al.'s block with its W_z projection and BN).
    class_conv: GR's P from the block's own 1x1 conv on F (Sec. III-D as printed); otherwise from
    the coarse logits on F's grid that forward is given. Queries run in chunks of `query_chunk` rows,
    so a whole 1024 x 2048 image (N = 8192) fits."""

    def __init__(self, channels, num_classes, *, key_channels=64, global_rectifying=True,
                 local_retention=True, window_size=WINDOW_SIZE, class_conv=False, map_pixel=MAP_PIXEL,
                 query_chunk=2048):
        super().__init__()
        if window_size < 1 or window_size % 2 == 0:
            raise InputError(f"--window-size must be odd and positive, got {window_size}")
        # NOTE(paper-gap): Q, K have C' = 64 = C/8 channels and no 1x1 conv has a bias because
        # model.py builds them so; the paper says only "C' is less than C".
        self.query = nn.Conv2d(channels, key_channels, 1, bias=False)
        self.key = nn.Conv2d(channels, key_channels, 1, bias=False)
        self.value = nn.Conv2d(channels, channels, 1, bias=False)
        # Sec. III-D: "we first predict the coarse segmentation result P_coarse via a 1x1 conv" (on F)
        self.classifier = nn.Conv2d(channels, num_classes, 1) if global_rectifying and class_conv else None
        self.gamma = nn.Parameter(torch.zeros(1))                      # Eq. (3): gamma starts at 0
        self.global_rectifying, self.local_retention = global_rectifying, local_retention
        self.window_size, self.map_pixel, self.query_chunk = window_size, map_pixel, query_chunk

    def attention(self, q, k, p, s_l, size, rows):
        """Rows i in `rows` (a slice) of A, A', A'' (each (B, n, N)). q (B, N, C'), k (B, C', N);
        p (B, K, N) class probabilities (GR) or None; s_l (B, k*k, N) (LR) or None."""
        # NOTE(paper-gap): Eq. (4) normalises over the keys j because model.py does and the text
        # calls it a softmax over all positions; the printed sum runs over the queries i
        a = torch.softmax(q[:, rows] @ k, dim=-1)                      # Eq. (4): A, softmax over keys  (B, n, N)
        a_gr = a * class_agreement(p[:, :, rows].transpose(1, 2), p) if p is not None else a  # A' = A * P_class
        a_lr = local_retention(a_gr, s_l, size, self.window_size) if s_l is not None else a_gr  # A''
        return a, a_gr, a_lr

    def forward(self, f, coarse_logits=None):
        """f: F (B, C, H, W); coarse_logits (B, K, H, W), read at F's samples: GR's P when the
        block has no 1x1 conv.
        Returns F' (B, C, H, W) and, in eval, the maps of one query pixel (else None)."""
        B, C, H, W = f.shape
        q = self.query(f)                                              # (B, C', H, W)
        k = self.key(f)                                                # (B, C', H, W)
        v = self.value(f).flatten(2).transpose(1, 2)                   # (B, N, C)
        p = s_l = None
        if self.global_rectifying:
            if self.classifier is None and (coarse_logits is None or coarse_logits.shape[-2:] != (H, W)):
                raise ValueError(f"DenoisedNLBlock without its 1x1 class conv needs coarse_logits on F's "
                                 f"{H} x {W} grid for GR")
            logits = self.classifier(f) if self.classifier is not None else coarse_logits   # (B, K, H, W)
            # NOTE(paper-gap): P = softmax over classes of the coarse logits because model.py does so
            # (the paper calls P_coarse a segmentation result, not a distribution)
            p = logits.softmax(1).flatten(2)                           # (B, K, N)
        if self.local_retention:
            s_l = local_similarity(q, k, self.window_size)             # (B, k*k, N)
        q, k = q.flatten(2).transpose(1, 2), k.flatten(2)              # (B, N, C'), (B, C', N)
        N, c = H * W, self.query_chunk                                 # chunks of queries bound the memory
        context = torch.cat([self.attention(q, k, p, s_l, (H, W), slice(i, i + c))[2] @ v
                             for i in range(0, N, c)], 1)              # A'' V  (B, N, C)
        # Eq. (3): F'_i = gamma * sum_j A''[i, j] V_j + F_i (the paper names the output pixel j)
        f_out = self.gamma * context.transpose(1, 2).reshape(B, C, H, W) + f     # (B, C, H, W)
        if self.training:
            return f_out, None
        y, x = query_cell(self.map_pixel, (H, W))
        with torch.no_grad():
            rows = self.attention(q, k, p, s_l, (H, W), slice(y * W + x, y * W + x + 1))  # 3 x (B, 1, N)
        return f_out, {n: m.float().view(B, 1, H, W) for n, m in zip(MAP_NAMES, rows)}   # Fig. 11: maps #1-#3


# ----------------------------------------------------------------------------------------------
# The model


class DenoisedNLNet(SegModel):
    """Sec. III-B and III-F: dilated ResNet (X at 1/8) -> Reduction (F at 1/16) -> Denoised NL (F')
    -> head on concat(X, up(F'), GAP(X) -> 1x1 conv) -> 3x3 conv, BN, ReLU -> 1x1; deep supervision
    of the res2 (layer2) and res3 (layer3) outputs, Eq. (5).
    block: 'denoised' (ours), 'psp' / 'aspp' (Table III: the block replaced by PPM / ASPP, F' = M(F)),
    'none' (the "Baseline" of Tables II-V, F' = F). class_map: GR's P from the supervised layer3 aux
    head ('aux') or from a 1x1 conv on F ('conv', Sec. III-D as printed).
    follow_code=True changes exactly these (model.py, where it disagrees with the paper):
        - no global-average-pooling branch: the head sees concat(X, F') only;
        - F' is up-sampled and passed through a 3x3 conv + BN + ReLU before the concat;
        - Dropout2d(0.05) in the head;
        - the aux heads are 3x3 conv (64 / 512 ch) + BN + ReLU + Dropout2d(0.05) + 1x1, not the paper's
          "linear function" (a 1x1 conv); with class_map='aux' GR's P comes from this layer3 head.
    output_stride: the backbone's (F is at twice it)."""

    def __init__(self, backbone, num_classes, *, channels=512, key_channels=64, block="denoised",
                 global_rectifying=True, local_retention=True, window_size=WINDOW_SIZE, class_map="aux",
                 aux_weights=AUX_WEIGHTS, follow_code=False, map_pixel=MAP_PIXEL, query_chunk=2048,
                 output_stride=8):
        super().__init__()
        # NOTE(paper-gap): PyTorch's default init, not model.py's kaiming_normal_(a=1) on every conv,
        # because the paper names none and every method here starts from the same
        if block not in BLOCKS:
            raise InputError(f"denoised_nl: block must be one of {BLOCKS}, got {block!r}")
        if class_map not in CLASS_MAPS:
            raise InputError(f"denoised_nl: class_map must be one of {CLASS_MAPS}, got {class_map!r}")
        self.backbone = backbone
        _, c2, c3, c4 = backbone.channels
        self.reduction = reduction(c4, channels)
        # NOTE(paper-gap): GR's P is the softmax of the supervised layer3 aux head by default because
        # Table V's +7.83 GFLOPs is the non-local block plus P^T P with P from outside the block (a 1x1
        # conv on F, which no loss of Eq. (5) supervises, would make it 7.87) and model.py does so;
        # Sec. III-D's conv on F is class_map='conv'. GR's gradient then trains that head, run in eval too.
        self.p_from_aux = block == "denoised" and global_rectifying and class_map == "aux"
        self.class_map_step = class_map_step(backbone.strides) if self.p_from_aux else None
        self.dnl = DenoisedNLBlock(channels, num_classes, key_channels=key_channels,
                                   global_rectifying=global_rectifying, local_retention=local_retention,
                                   window_size=window_size, class_conv=class_map == "conv",
                                   map_pixel=map_pixel, query_chunk=query_chunk) if block == "denoised" else None
        # NOTE(paper-gap): Table III's PPM / ASPP run at F's stride (2 x output_stride) and width C
        # because the paper replaces the Denoised NL, which sits there, "with the corresponding module"
        self.multiscale = build_ga(block, channels, channels, 2 * output_stride) if block in ("psp", "aspp") else None
        # NOTE(paper-gap): the "Baseline" keeps the Reduction and the head, F' = F, because the paper
        # says only "without any attention strategy"
        # NOTE(paper-gap): head width 512 because model.py uses it; the paper gives no width
        # NOTE(paper-gap): Sec. III-F's res2 / res3 are the outputs of layer2 / layer3 because model.py
        # supervises those (in ResNet's own naming res2 would be layer1)
        if follow_code:
            self.post = conv_bn_relu(channels, channels, 3)            # model.py: 3x3 conv on up(F')
            self.head = seg_head(c4 + channels, 512, num_classes, dropout=0.05)
            self.aux2 = seg_head(c2, 64, num_classes, dropout=0.05)
            self.aux3 = seg_head(c3, 512, num_classes, dropout=0.05)
        else:
            # NOTE(paper-gap): the global context is GAP(X) -> 1x1 conv to `channels` because the
            # paper says "global average pooling followed with a 1x1 convolution" but gives no width
            self.context = nn.Conv2d(c4, channels, 1)
            self.head = seg_head(c4 + 2 * channels, 512, num_classes, dropout=0.0)  # 3x3, BN, ReLU, 1x1
            self.aux2 = nn.Conv2d(c2, num_classes, 1)                  # Sec. III-F: "a linear function"
            self.aux3 = nn.Conv2d(c3, num_classes, 1)
        self.follow_code, self.aux_weights = follow_code, aux_weights
        self.strides = backbone.strides                                # of layer1 .. layer4

    def forward(self, image):
        size = image.shape[-2:]
        _, s2, s3, s4 = self.strides
        _, c2, c3, x = self.backbone(image)                            # x = X  (B, C4, H/8, W/8)
        aux3 = self.aux3(c3) if self.training or self.p_from_aux else None   # (B, K, H/8, W/8)
        f = self.reduction(x)                                          # F  (B, C, H/16, W/16)
        maps = None
        if self.dnl is not None:
            # NOTE(paper-gap): P is read at F's own samples (no interpolation) because the
            # align_corners=True resize of the layer3 logits in maggiesong7/DenoisedNL model.py
            # returns exactly these at its 8k+1 crops; the paper does not say how P reaches F's grid
            step = self.class_map_step
            p_logits = aux3[..., ::step, ::step] if self.p_from_aux else None   # (B, K, H/16, W/16)
            f, maps = self.dnl(f, p_logits)                            # F'  (B, C, H/16, W/16)
        elif self.multiscale is not None:
            f = self.multiscale(f)                                     # Table III: F' = PPM(F) / ASPP(F)
        f = upsample_strided(f, x.shape[-2:], 2)                       # F's i on X's 2i  (B, C, H/8, W/8)
        if self.follow_code:
            feats = [x, self.post(f)]
        else:
            g = self.context(x.mean((2, 3), keepdim=True))             # GAP -> 1x1  (B, C, 1, 1)
            feats = [x, f, g.expand(-1, -1, *x.shape[-2:])]
        out = {"out": upsample_strided(self.head(torch.cat(feats, 1)), size, s4)}   # (B, K, H, W)
        if self.training:
            out["aux_layer2"] = upsample_strided(self.aux2(c2), size, s2)            # (B, K, H, W)
            out["aux_layer3"] = upsample_strided(aux3, size, s3)
        if maps is not None:
            out["maps"] = maps
        return out

    def query_pixels(self):
        return {name: self.dnl.map_pixel for name in MAP_NAMES} if self.dnl is not None else {}

    def loss(self, outputs, target):
        main = cross_entropy(outputs["out"], target)
        l2 = cross_entropy(outputs["aux_layer2"], target)
        l3 = cross_entropy(outputs["aux_layer3"], target)
        total = main + self.aux_weights[0] * l2 + self.aux_weights[1] * l3   # Eq. (5)
        return {"main": main, "aux_layer2": l2, "aux_layer3": l3, "total": total}


def add_args(parser):
    group = parser.add_argument_group("denoised_nl: Denoised Non-Local Network (Song et al.)")
    onoff = argparse.BooleanOptionalAction
    group.add_argument("--block", choices=BLOCKS, default="denoised",
                       help="the context block on F: the Denoised NL (ours); psp / aspp, Table III's "
                            "'+PPM' / '+ASPP' (galdv1.py's modules); none, the 'Baseline' of Tables "
                            "II-V (no attention strategy: F' = F)")
    group.add_argument("--global-rectifying", action=onoff, default=True,
                       help="Global Rectifying block, A' = A * sigmoid(P^T P) (Sec. III-D, Table II 'GR')")
    group.add_argument("--local-retention", action=onoff, default=True,
                       help="Local Retention block, A'' from k x k windows of A' (Sec. III-E, Table II 'LR'); "
                            "with GR and LR off the block is the paper's own non-local formulation "
                            "(Eqs. 3-4; our '+NL' of Table IV)")
    group.add_argument("--class-map", choices=CLASS_MAPS, default="aux",
                       help="where GR's class probabilities P come from: aux, the softmax of the supervised "
                            "layer3 (res3) aux head, as the official model.py; conv, a 1x1 conv on F "
                            "(Sec. III-D as printed), which no loss supervises")
    group.add_argument("--window-size", type=ranged(int, 1), default=WINDOW_SIZE,
                       help="k of the k x k local window of Local Retention (Sec. III-E), odd")
    group.add_argument("--aux-weights", type=ranged(float, 0), nargs=2, default=AUX_WEIGHTS, metavar=("L1", "L2"),
                       help="lambda1, lambda2 of Eq. (5): CE weights of the res2 (layer2) and res3 (layer3) outputs")
    group.add_argument("--map-pixel", type=ranged(float, 0, 1), nargs=2, default=MAP_PIXEL, metavar=("Y", "X"),
                       help="query pixel (relative position in [0, 1]) whose attention maps A, A', A'' are "
                            "returned as 'maps' (Fig. 11)")
    group.add_argument("--follow-code", action=onoff, default=False,
                       help="the official model.py's heads where they differ from the paper (listed in "
                            "DenoisedNLNet's docstring); GR's P stays --class-map's")


def build_model(args):
    map_pixel = tuple(args.map_pixel)
    # A flag of the block moved off its default where it would change nothing is refused, not ignored.
    moved = {"--[no-]global-rectifying": not args.global_rectifying,
             "--[no-]local-retention": not args.local_retention, "--class-map": args.class_map != "aux",
             "--window-size": args.window_size != WINDOW_SIZE, "--map-pixel": map_pixel != MAP_PIXEL}
    named = [flag for flag, off_default in moved.items() if off_default]
    if args.block != "denoised" and named:
        raise InputError(f"denoised_nl: {', '.join(named)} would change nothing: --block {args.block} "
                         f"has no Denoised NL")
    for flag, part in (("--class-map", "global-rectifying"), ("--window-size", "local-retention")):
        if moved[flag] and moved[f"--[no-]{part}"]:
            raise InputError(f"denoised_nl: {flag} would change nothing with --no-{part}")
    return DenoisedNLNet(build_backbone(args), args.num_classes, block=args.block,
                         global_rectifying=args.global_rectifying, local_retention=args.local_retention,
                         window_size=args.window_size, class_map=args.class_map,
                         aux_weights=tuple(args.aux_weights), follow_code=args.follow_code,
                         map_pixel=map_pixel, output_stride=args.output_stride)
