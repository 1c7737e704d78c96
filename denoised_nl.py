"""Denoised NL: a non-local block whose attention map is denoised before it is used.

Paper: "Denoised Non-Local Neural Network for Semantic Segmentation", Q. Song, J. Li, H. Guo, R. Huang
(../shared/papers/denoised_nl.txt). Official model code: maggiesong7/DenoisedNL (model.py only).

Idea (Sec. I, III-C). The attention map A of a non-local block is noisy: it attends to pixels of other
classes (inter-class noise) and has holes inside the attended object (intra-class noise). The Global
Rectifying (GR) block multiplies A by a class-agreement map P_class = sigmoid(P^T P) built from coarse
class probabilities P (A' = A * P_class); the Local Retention (LR) block then replaces every weight
A'[i, j] by a sum over the k x k neighbours j + d of key j, weighted by the local similarity
S_l[j, d] = sigmoid(q_j . k_{j+d}) (A''). F' = gamma * A'' V + F. The block runs at 1/16 of the image.

Map from the code to the paper:
    reduction            Sec. III-B, Fig. 3 "Reduction": 3x3 conv, then a Basic Block with stride 2 -> F
    class_agreement      Sec. III-D, Fig. 4(a): P_class = sigmoid(P^T P)
    local_similarity     Sec. III-E, Fig. 4(b): S_l, sigmoid of query . key over a k x k window
    local_retention      Sec. III-E: A'' from the local windows of A' and S_l
    DenoisedNLBlock      Sec. III-C to III-E, Eqs. (3)-(4): Q, K, V, A, A', A'', F'
    DenoisedNLNet        Sec. III-B (head on concat(X, F', global context)), Sec. III-F (dilated
                         ResNet at 1/8, deep supervision on res2/res3, Eq. (5)); `block` swaps the
                         Denoised NL for Table III's PPM / ASPP (galdv1.py's modules) or for nothing

DenoisedNLNet.forward(image) -> dict
    'out'                      (B, K, H, W) logits
    'aux_layer2', 'aux_layer3' (B, K, H, W) deep-supervision logits (training only)
    'maps'                     eval with block='denoised': {'map1_A', 'map2_A_gr', 'map3_A_lr'}, each
                               (B, 1, h, w) on the 1/16 key grid: row i of A, A', A'' for the query
                               pixel `map_pixel` (Fig. 11, maps #1-#3), divided by its maximum
                               (A' = A with GR off, A'' = A' with LR off).

Index convention (DECISIONS.md, as the code): A[i, j] is query i attending to key j, softmax over j;
A''[i, j] = sum_d A'[i, j + d] * S_l[j, d], the window runs over the KEY index j, offsets d in
row-major (dy, dx) order, A' zero outside the key grid.
Memory: the code unfolds A' into a (B, N, k*k, N) tensor. local_retention computes the same sum as
k*k shifted copies of A' accumulated in place (no tensor above one padded (B, n, N) map), and the
queries are processed in chunks of `query_chunk` rows, so a whole 1024x2048 image (N = 8192) fits.

Eq. (4) as printed divides by a sum over the query index i; the text calls it a softmax over "all
possible positions" (Eq. 2) and the code normalises over the keys j, as we do (DECISIONS.md).
Paper gaps (marked NOTE(paper-gap) below): Q, K width 64 and no conv biases (code); P = softmax of
the 1x1 conv's logits and that conv has a bias; the Reduction's shortcut (code); window k = 3 (code);
the global context is GAP -> 1x1 conv to 512 channels (paper says GAP + 1x1 conv, not the width);
head width 512 (code); the Reduction's 3x3 conv and its width C = 512 (code; the paper says "a
convolution layer"); "res2/res3" of Sec. III-F are the outputs of layer2/layer3 (code; in ResNet's
own naming res2 would be layer1); "Baseline" (Tables II-V, --block none) keeps the Reduction and the
head and drops only the block (the paper says only "without any attention strategy"); Table III's
"+PPM" / "+ASPP" put galdv1.py's PSP (bins 1, 2, 3, 6) / ASPP (rates 6, 12, 18 at stride 16) where
the block was, F' = PPM(F), as the paper replaces "the Denoised NL with the corresponding module".
In paper mode no loss supervises P_coarse directly (Eq. (5) has no term for it): its 1x1 conv learns
only through GR, as a class-like gate on A; follow_code=True takes P from the supervised layer3 head.
"+NL" (Table IV) here is the paper's own non-local formulation, GR and LR off (Eqs. 3-4, Q/K of 64
channels and the gamma residual), not Wang et al.'s block with its W_z projection and BN. Table IV's
other rows (OCNet, CCNet, DANet, DRANet) are other papers' modules and are not implemented.
Deviations: bilinear resizing uses the project's align_corners=False (code: True); plain PyTorch
init (code: kaiming_normal_(a=1) on every conv); BN, not SyncBN, unless train.py converts it.

follow_code=True changes exactly (model.py, where it disagrees with the paper):
    - P for GR is the softmax of the layer3 aux logits resized to the 1/16 grid (so the layer3 aux
      head also runs in eval and GR trains it), not a 1x1 conv on F;
    - no global-average-pooling branch: the head sees concat(X, F') only;
    - F' is up-sampled and passed through a 3x3 conv + BN + ReLU before the concat;
    - Dropout2d(0.05) in the head; aux heads are 3x3 conv (64 / 512 ch) + BN + ReLU + Dropout2d(0.05)
      + 1x1, not the paper's "linear function" (a 1x1 conv).
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import BasicBlock, InputError, SegModel, build_backbone, conv_bn_relu, cross_entropy, resize, seg_head
from galdv1 import build_ga

BLOCKS = ("denoised", "psp", "aspp", "none")


def reduction(in_channels, channels):
    """Sec. III-B 'Reduction': 3x3 conv to `channels`, then a Basic Block whose first 3x3 conv has
    stride 2 (1/8 -> 1/16) and whose residual connection eases optimisation. Output: F."""
    # NOTE(paper-gap): the first conv is 3x3 to C = 512 and the Basic Block's shortcut is a 3x3 conv
    # with stride 2 + BN + ReLU (code); the paper says "a convolution layer" and "a Basic Block".
    shortcut = conv_bn_relu(channels, channels, 3, stride=2)
    return nn.Sequential(conv_bn_relu(in_channels, channels, 3),
                         BasicBlock(channels, channels, stride=2, downsample=shortcut))


def window_offsets(window):
    """The k*k offsets of a k x k window as (dy, dx) into a tensor padded by k // 2, row-major
    (the order of nn.Unfold); offset d = (dy - k // 2, dx - k // 2)."""
    return [(dy, dx) for dy in range(window) for dx in range(window)]


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
    sims = [(q * k[:, :, dy:dy + H, dx:dx + W]).sum(1) for dy, dx in window_offsets(window)]
    return torch.sigmoid(torch.stack(sims, 1)).flatten(2)              # (B, k*k, N)


def local_retention(a, s_l, size, window):
    """Sec. III-E: A''[i, j] = sum_d A'[i, j + d] * S_l[j, d] for rows a = A'[i0:i0+n] (B, n, N).
    Each row of A' is an H x W image over the keys; the window is extracted from it (zero padding)
    and weighted by S_l (B, k*k, N). Same value as unfolding A' into (B, n, k*k, N), computed as
    k*k shifted copies of A' accumulated in place: no tensor above one padded (B, n, N) map."""
    B, n, _ = a.shape
    H, W = size
    r = window // 2
    # NOTE(paper-gap): the window runs over the key index j, A' zero outside the grid (code, DECISIONS.md)
    a = F.pad(a.view(B, n, H, W), (r, r, r, r))                       # (B, n, H+2r, W+2r)
    s_l = s_l.view(B, -1, 1, H, W)                                     # (B, k*k, 1, H, W)
    out = None
    for d, (dy, dx) in enumerate(window_offsets(window)):
        shifted = a[:, :, dy:dy + H, dx:dx + W]                        # A'[i, j + d]  (B, n, H, W)
        out = shifted * s_l[:, d] if out is None else out.addcmul_(shifted, s_l[:, d])
    return out.flatten(2)                                              # (B, n, N)


class DenoisedNLBlock(nn.Module):
    """Sec. III-C to III-E: non-local attention A (Eq. 4), GR (A' = A * P_class), LR (A''), Eq. (3).
    With both GR and LR off it is the plain non-local block F' = gamma * softmax(Q K^T) V + F."""

    def __init__(self, channels, num_classes, *, key_channels=64, global_rectifying=True,
                 local_retention=True, window_size=3, class_conv=True, map_pixel=(0.5, 0.5),
                 query_chunk=2048):
        super().__init__()
        # NOTE(paper-gap): k = 3 (code; the paper only says k x k)
        if window_size < 1 or window_size % 2 == 0:
            raise InputError(f"--window-size must be odd and positive, got {window_size}")
        # NOTE(paper-gap): Q, K have C' = 64 = C/8 channels and no 1x1 conv has a bias (code).
        self.query = nn.Conv2d(channels, key_channels, 1, bias=False)
        self.key = nn.Conv2d(channels, key_channels, 1, bias=False)
        self.value = nn.Conv2d(channels, channels, 1, bias=False)
        # Sec. III-D: "we first predict the coarse segmentation result P_coarse via a 1x1 conv" on F.
        self.classifier = nn.Conv2d(channels, num_classes, 1) if global_rectifying and class_conv else None
        self.gamma = nn.Parameter(torch.zeros(1))                      # Eq. (3): gamma starts at 0
        self.global_rectifying, self.local_retention = global_rectifying, local_retention
        self.window_size, self.map_pixel, self.query_chunk = window_size, map_pixel, query_chunk

    def attention(self, q, k, p, s_l, size, rows):
        """Rows i in `rows` (a slice) of A, A', A'' (each (B, n, N)). q (B, N, C'), k (B, C', N);
        p (B, K, N) class probabilities (GR) or None; s_l (B, k*k, N) (LR) or None."""
        # NOTE(paper-gap): Eq. (4) normalises over the keys j (code; the printed sum runs over i)
        a = torch.softmax(q[:, rows] @ k, dim=-1)                      # Eq. (4): A, softmax over keys  (B, n, N)
        a_gr = a * class_agreement(p[:, :, rows].transpose(1, 2), p) if p is not None else a  # A' = A * P_class
        a_lr = local_retention(a_gr, s_l, size, self.window_size) if s_l is not None else a_gr  # A''
        return a, a_gr, a_lr

    def forward(self, f, coarse_logits=None):
        """f: F (B, C, H, W); coarse_logits (B, K, h', w') replace the 1x1 conv's P (follow_code).
        Returns F' (B, C, H, W) and, in eval, the maps of one query pixel (else None)."""
        B, C, H, W = f.shape
        q = self.query(f)                                              # (B, C', H, W)
        k = self.key(f)                                                # (B, C', H, W)
        v = self.value(f).flatten(2).transpose(1, 2)                   # (B, N, C)
        p = s_l = None
        if self.global_rectifying:
            logits = self.classifier(f) if coarse_logits is None else resize(coarse_logits, (H, W))
            # NOTE(paper-gap): P = softmax over classes of the coarse logits (code)
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
        y, x = (min(n - 1, max(0, round(r * (n - 1)))) for r, n in zip(self.map_pixel, (H, W)))
        with torch.no_grad():
            rows = self.attention(q, k, p, s_l, (H, W), slice(y * W + x, y * W + x + 1))  # 3 x (B, 1, N)
        rows = [m.float() / m.float().amax(-1, keepdim=True).clamp(min=1e-12) for m in rows]  # max 1
        names = ("map1_A", "map2_A_gr", "map3_A_lr")                   # Fig. 11: maps #1, #2, #3
        return f_out, {n: m.view(B, 1, H, W) for n, m in zip(names, rows)}


class DenoisedNLNet(SegModel):
    """Sec. III-B and III-F: dilated ResNet (X at 1/8) -> Reduction (F at 1/16) -> Denoised NL (F')
    -> head on concat(X, up(F'), GAP(X) -> 1x1 conv) -> 3x3 conv, BN, ReLU -> 1x1; deep supervision
    of the res2 (layer2) and res3 (layer3) outputs, Eq. (5).
    block: 'denoised' (ours), 'psp' / 'aspp' (Table III: the block replaced by PPM / ASPP, F' = M(F)),
    'none' (the "Baseline" of Tables II-V, F' = F). output_stride: the backbone's (F is at twice it)."""

    def __init__(self, backbone, num_classes, *, channels=512, key_channels=64, block="denoised",
                 global_rectifying=True, local_retention=True, window_size=3, aux_weights=(1.0, 1.0),
                 follow_code=False, map_pixel=(0.5, 0.5), query_chunk=2048, output_stride=8):
        super().__init__()
        if block not in BLOCKS:
            raise InputError(f"denoised_nl: block must be one of {BLOCKS}, got {block!r}")
        self.backbone = backbone
        _, c2, c3, c4 = backbone.channels
        self.reduction = reduction(c4, channels)
        self.p_from_aux = follow_code and block == "denoised" and global_rectifying
        self.dnl = DenoisedNLBlock(channels, num_classes, key_channels=key_channels,
                                   global_rectifying=global_rectifying, local_retention=local_retention,
                                   window_size=window_size, class_conv=not follow_code,
                                   map_pixel=map_pixel, query_chunk=query_chunk) if block == "denoised" else None
        # NOTE(paper-gap): Table III's PPM / ASPP at F's stride (2 x output_stride), width C (galdv1.py)
        self.multiscale = build_ga(block, channels, channels, 2 * output_stride) if block in ("psp", "aspp") else None
        # NOTE(paper-gap): the "Baseline" (no attention) keeps the Reduction and the head, F' = F
        # NOTE(paper-gap): head width 512 (code)
        if follow_code:
            self.post = conv_bn_relu(channels, channels, 3)            # code: 3x3 conv on up(F')
            self.head = seg_head(c4 + channels, 512, num_classes, dropout=0.05)
            self.aux2 = seg_head(c2, 64, num_classes, dropout=0.05)
            self.aux3 = seg_head(c3, 512, num_classes, dropout=0.05)
        else:
            # NOTE(paper-gap): the global context is GAP(X) -> 1x1 conv to `channels` (width not given)
            self.context = nn.Conv2d(c4, channels, 1)
            self.head = seg_head(c4 + 2 * channels, 512, num_classes, dropout=0.0)  # 3x3, BN, ReLU, 1x1
            self.aux2 = nn.Conv2d(c2, num_classes, 1)                  # Sec. III-F: "a linear function"
            self.aux3 = nn.Conv2d(c3, num_classes, 1)
        self.follow_code, self.aux_weights = follow_code, aux_weights

    def forward(self, image):
        size = image.shape[-2:]
        _, c2, c3, x = self.backbone(image)                            # x = X  (B, C4, H/8, W/8)
        aux3 = self.aux3(c3) if self.training or self.p_from_aux else None   # (B, K, H/8, W/8)
        f = self.reduction(x)                                          # F  (B, C, H/16, W/16)
        maps = None
        if self.dnl is not None:
            f, maps = self.dnl(f, aux3 if self.p_from_aux else None)  # F'  (B, C, H/16, W/16)
        elif self.multiscale is not None:
            f = self.multiscale(f)                                     # Table III: F' = PPM(F) / ASPP(F)
        f = resize(f, x.shape[-2:])                                    # (B, C, H/8, W/8)
        if self.follow_code:
            feats = [x, self.post(f)]
        else:
            g = self.context(x.mean((2, 3), keepdim=True))             # GAP -> 1x1  (B, C, 1, 1)
            feats = [x, f, g.expand(-1, -1, *x.shape[-2:])]
        out = {"out": resize(self.head(torch.cat(feats, 1)), size)}   # (B, K, H, W)
        if self.training:
            out["aux_layer2"] = resize(self.aux2(c2), size)            # (B, K, H, W)
            out["aux_layer3"] = resize(aux3, size)
        if maps is not None:
            out["maps"] = maps
        return out

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
    group.add_argument("--window-size", type=int, default=3,
                       help="k of the k x k local window of Local Retention (Sec. III-E; 3 in the code)")
    group.add_argument("--aux-weights", type=float, nargs=2, default=(1.0, 1.0), metavar=("L1", "L2"),
                       help="lambda1, lambda2 of Eq. (5): CE weights of the res2 (layer2) and res3 (layer3) outputs")
    group.add_argument("--map-pixel", type=float, nargs=2, default=(0.5, 0.5), metavar=("Y", "X"),
                       help="query pixel (relative position in [0, 1]) whose attention maps A, A', A'' "
                            "are returned as 'maps' (Fig. 11)")
    group.add_argument("--follow-code", action=onoff, default=False,
                       help="the official model.py where it differs from the paper: GR's P from the "
                            "layer3 aux logits, no GAP branch, 3x3 conv after up(F'), dropout 0.05, "
                            "3x3-conv aux heads")


def build_model(args):
    return DenoisedNLNet(build_backbone(args), args.num_classes, block=args.block,
                         global_rectifying=args.global_rectifying, local_retention=args.local_retention,
                         window_size=args.window_size, aux_weights=tuple(args.aux_weights),
                         follow_code=args.follow_code, map_pixel=tuple(args.map_pixel),
                         output_stride=args.output_stride)
