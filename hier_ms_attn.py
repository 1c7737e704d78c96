"""Hierarchical Multi-Scale Attention for Semantic Segmentation (Tao, Sapra, Catanzaro, NVIDIA 2020).

Idea (Sec. 3, Fig. 2): predictions at different image scales fail in different ways (thin posts are
best at 2.0x, large regions at 0.5x). Instead of averaging them, a head predicts a dense attention
a in [0, 1] from the features of the LOWER of two adjacent scales and mixes the pair:
    Eq. (1): L(r=1) = U(L(r=0.5) * a(r=0.5)) + (1 - U(a(r=0.5))) * L(r=1).
The network is trained with the pair {0.5, 1.0} only (training cost 0.5^2 + 1 = 1.25x), yet at
inference any list of scales is chained pair by pair, lower scales first (Fig. 2 right bottom), so a
model trained once is evaluated with 0.25x or 2.0x it never saw (Table 1).

Map from the code to the paper
    rmi_loss ............... RMI [42], "the primary loss function under default settings" (Sec. 5.1),
                             with the settings of the authors' code (0.5 * sigmoid BCE + 0.5 * RMI)
    prediction_head ........ Sec. 3.1 semantic head; the attention head is the same with 1 output
    scale_weights .......... Fig. 3: each scale's share of the chained result ('maps')
    HierarchicalMultiScaleAttention
      ._trunk .............. one image scale through the shared trunk (Fig. 2)
      ._hierarchical ....... Eq. (1), chained over any list of scales (Fig. 2 right)
      ._explicit ........... the "explicit" baseline of Chen et al. [1] (Fig. 2 left, Table 1)
      ._average ............ the "Single Scale" / "AvgPool" baselines of Table 1
      .predict ............. multi-scale inference at evaluation time (+ flip), Table 1 / Sec. 5.1
    build_model ............ --ms-mode, --train-scales, --loss, --scale-loss-weight, --head-channels

forward(image, scales=None) -> dict
    'out'           (B, K, H, W) logits at the image's size: training mode fuses the training scales
                    (default 0.5 1.0), eval mode returns the single-scale (1.0) prediction.
    'maps'          eval only: {"attn_<scale>": (B, 1, H, W)} (hierarchical or explicit mode, when more
                    than one scale ran; average mode has none): how much each
                    scale contributes to 'out' at every pixel; they sum to 1 over scales (Fig. 3).
    'scale_logits'  training only: {"<scale>": (B, K, H, W)} each scale's own prediction, supervised
                    with weight 0.05 (code).

Choices and deviations (see also DECISIONS.md, hier_ms_attn)
- Trunk and heads as Sec. 3.1 (dilated ResNet-50, output stride 8, heads on the last stage). Table 1
  itself used DeepLab V3+ around the ResNet-50; we keep the plain Sec. 3.1 heads (no ASPP/decoder).
- NOTE(paper-gap): heads are 256 channels wide, final 1x1 convs without bias (code make_attn_head).
- NOTE(paper-gap): each scale's logits and attention are first up-sampled to that scale's input size,
  a * L is taken there, and the chain runs at the image's size (code _fwd / nscale_forward). Scales
  need not contain 1.0; the output is always at the image's size.
- NOTE(paper-gap): the attention head runs only where its output is used (the lower scale of each
  pair); the code also runs it, unused, on the 1.0x training branch, so our attention BN running
  statistics see only 0.5x features in training.
- NOTE(paper-gap): per-scale supervision 0.05 x CE on each training scale's own output (weight from
  the code recipes' supervised_mscale_loss_wt; the code uses sigmoid BCE there, we use CE as the paper
  says "cross-entropy for the auxiliary loss"). No OCR aux head: the ResNet-50 model of Sec. 3.1 has none.
- RMI is shifted by the constant -0.5 * log det(5e-4 * I) / 9 per class so that it is >= 0 (at most
  0.5 * log 2 per class for a perfect prediction); the gradients are exactly the code's.
- Explicit attention (Chen et al. [1], the code's ASDV3P with softmax): the trunk features of all
  training scales, resized to the 1.0x feature size and concatenated, feed a head of the same shape
  as ours with one output per scale; softmax over scales; out = sum_s w_s * L_s. It can only be
  evaluated with its training scales (or one scale alone), as the paper says of [1].
- Table 1's "AvgPool" averages the logits of a single-scale-trained net (code multi_scale_inference);
  predict() averages logits over scales and flips in every mode (code eval_minibatch).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (IGNORE_INDEX, InputError, SegModel, build_backbone, conv_bn_relu, cross_entropy,
                    resize, scaled_size)

DEFAULT_TRAIN_SCALES = {"hierarchical": (0.5, 1.0), "explicit": (0.5, 1.0, 2.0), "average": (1.0,)}


# ----------------------------------------------------------------------------------------------
# Loss: region mutual information [42], as the HMSA code runs it (Sec. 5.1)


def region_vectors(x, radius):
    """(B, K, H, W) -> (B, K, D, N) with D = radius^2: every radius x radius window (no padding) as a
    D-dim point, N = (H - radius + 1) * (W - radius + 1) windows."""
    B, K, H, W = x.shape
    h, w = H - radius + 1, W - radius + 1
    shifted = [x[:, :, dy:dy + h, dx:dx + w] for dy in range(radius) for dx in range(radius)]
    return torch.stack(shifted, 2).reshape(B, K, radius * radius, h * w)   # (B, K, D, N)


# NOTE(paper-gap): the paper names RMI [42] without settings; radius 3, 4x4 average pooling, alpha 5e-4,
# lambda 0.5 and the sum over classes are the authors' code (loss/rmi.py, DECISIONS.md).
def rmi_loss(logits, target, *, radius=3, pool=4, alpha=5e-4):
    """Returns (bce, rmi); the paper's loss is 0.5 * bce + 0.5 * rmi (code: lambda 0.5).

    bce: sigmoid BCE against one-hot labels, summed over classes, / (#valid pixels + 1).
    rmi: per class, the labels Y and sigmoid probabilities P are 4x4 average-pooled, each 3x3 window
    becomes a 9-dim point, and the conditional covariance Sigma_Y|P = Sigma_Y - Sigma_YP Sigma_P^-1
    Sigma_YP^T (Sigma_P + alpha I for stability) bounds the mutual information from below;
    rmi = 0.5 * log det(I + Sigma_Y|P / alpha) / 9, mean over the batch, summed over classes.
    Computed in float64, which autocast never lowers (Cholesky of near-singular matrices fails in
    fp16/fp32); the BCE in float32.
    """
    B, K, H, W = logits.shape
    valid = (target != IGNORE_INDEX).unsqueeze(1)                            # (B, 1, H, W)
    onehot = F.one_hot(target * valid[:, 0], K).permute(0, 3, 1, 2) * valid  # (B, K, H, W)
    bce = F.binary_cross_entropy_with_logits(logits.float(), onehot.float(), weight=valid.float(),
                                             reduction="sum") / (valid.sum() + 1)
    prob = logits.double().sigmoid() * valid + 1e-6                         # (B, K, H, W)
    label = F.avg_pool2d(onehot.double(), pool, pool, pool // 2)             # (B, K, H', W')
    prob = F.avg_pool2d(prob, pool, pool, pool // 2)
    if min(label.shape[-2:]) < radius:                                       # too small for a window
        return bce, bce.new_zeros(())
    y = region_vectors(label, radius)                                        # (B, K, D, N)
    p = region_vectors(prob, radius)
    y = y - y.mean(-1, keepdim=True)
    p = p - p.mean(-1, keepdim=True)
    eye = torch.eye(radius * radius, dtype=torch.float64, device=logits.device)
    cov_y = y @ y.transpose(-1, -2)                                          # (B, K, D, D)
    cov_yp = y @ p.transpose(-1, -2)
    cov_p = p @ p.transpose(-1, -2) + alpha * eye
    cond = cov_y - cov_yp @ torch.linalg.solve(cov_p, cov_yp.transpose(-1, -2))
    cond = 0.5 * (cond + cond.transpose(-1, -2))                             # exact symmetry for Cholesky
    chol = torch.linalg.cholesky(cond + alpha * eye)
    log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)              # (B, K)
    # the code's 0.5 * log det(cond + alpha I), minus its minimum 0.5 * log det(alpha I)
    rmi = 0.5 * (log_det - radius * radius * math.log(alpha))
    rmi = (rmi.mean(0) / (radius * radius)).sum()
    return bce, rmi.float()


# ----------------------------------------------------------------------------------------------
# Heads (Sec. 3.1)


def prediction_head(in_ch, out_ch, mid_ch=256):
    """Sec. 3.1 semantic head: (3x3 conv -> BN -> ReLU) x 2 -> 1x1 conv to out_ch. The attention head
    is "structurally identical ... except for the final convolution, which outputs a single channel"."""
    # NOTE(paper-gap): 256 inner channels, final 1x1 conv without bias (code make_attn_head).
    return nn.Sequential(conv_bn_relu(in_ch, mid_ch, 3), conv_bn_relu(mid_ch, mid_ch, 3),
                         nn.Conv2d(mid_ch, out_ch, 1, bias=False))


def scale_weights(up, scales):
    """Fig. 3: each scale's weight in the result of Eq. (1) chained, from the upsampled attention
    maps up[s] (B, 1, H, W) of every scale but the top one; the weights sum to 1 at every pixel."""
    maps, remaining = {}, 1.0
    for s in scales[:-1]:
        a = up[s].detach()                                                    # (B, 1, H, W)
        maps[f"attn_{s}"], remaining = remaining * a, remaining * (1 - a)
    maps[f"attn_{scales[-1]}"] = remaining                                   # what no lower scale took
    return maps


# ----------------------------------------------------------------------------------------------
# The model


class HierarchicalMultiScaleAttention(SegModel):
    """Dilated ResNet trunk shared by every scale, semantic head and attention head (Sec. 3.1),
    combined across scales by `ms_mode`:
      hierarchical  Eq. (1) chained over any scales (ours, Fig. 2 right); trained with 0.5, 1.0
      explicit      one attention map per scale, softmax over scales (Chen et al. [1], Fig. 2 left);
                    trained with all its evaluation scales (default 0.5, 1.0, 2.0)
      average       single-scale training; multi-scale inference averages logits (Table 1 rows 1-3)
    """

    def __init__(self, backbone, num_classes, *, ms_mode="hierarchical", train_scales=None,
                 head_channels=256, loss="rmi", scale_loss_weight=0.05):
        super().__init__()
        scales = tuple(sorted(set(train_scales or DEFAULT_TRAIN_SCALES[ms_mode])))
        if min(scales) <= 0:
            raise InputError(f"training scales must be positive, got {scales}")
        if ms_mode == "average" and scales != (1.0,):
            raise InputError(f"--ms-mode average trains at scale 1.0 only, got --train-scales {scales}")
        if ms_mode != "average" and len(scales) < 2:
            raise InputError(f"--ms-mode {ms_mode} needs at least two training scales, got {scales}")
        if ms_mode == "explicit" and 1.0 not in scales:
            raise InputError(f"--ms-mode explicit needs 1.0 among its training scales, got {scales}")
        self.ms_mode, self.train_scales = ms_mode, scales
        self.loss_type, self.scale_loss_weight = loss, scale_loss_weight
        self.backbone = backbone
        C4 = backbone.channels[3]
        self.seg_head = prediction_head(C4, num_classes, head_channels)
        if ms_mode == "hierarchical":
            self.attn_head = prediction_head(C4, 1, head_channels)
        elif ms_mode == "explicit":
            self.attn_head = prediction_head(len(scales) * C4, len(scales), head_channels)

    def _trunk(self, image, scale):
        """The image resized by `scale` through the shared trunk: ((h, w) of that input, last stage)."""
        x = resize(image, scaled_size(image.shape[-2:], scale))               # (B, 3, h, w)
        return x.shape[-2:], self.backbone(x)[3]                             # (B, C4, h/8, w/8)

    def _average(self, image, scales):
        """Table 1 "Single Scale" (one scale) and "AvgPool": the mean of the scales' logits (code)."""
        size = image.shape[-2:]
        logits = {}
        for s in scales:
            in_size, c4 = self._trunk(image, s)
            logits[s] = resize(resize(self.seg_head(c4), in_size), size)      # (B, K, H, W)
        return {"out": sum(logits.values()) / len(scales)}, logits

    def _hierarchical(self, image, scales):
        """Fig. 2 right: with scales s1 < ... < sn, P = L_sn; then for s = s(n-1) down to s1,
        P = U(L_s * a_s) + (1 - U(a_s)) * P, so a lower scale's attention decides how much of
        itself to keep versus the finer result (attention 1 everywhere -> L_s1, 0 -> L_sn)."""
        size = image.shape[-2:]
        logits, attention = {}, {}
        for s in scales:
            in_size, c4 = self._trunk(image, s)
            logits[s] = resize(self.seg_head(c4), in_size)                    # (B, K, h, w)
            if s != scales[-1]:
                # NOTE(paper-gap): attention only where used, not on the top scale (code runs it unused)
                attention[s] = resize(self.attn_head(c4).sigmoid(), in_size)  # (B, 1, h, w)
        up = {s: resize(a, size) for s, a in attention.items()}                # U(a_s): (B, 1, H, W)
        out = resize(logits[scales[-1]], size)                                # (B, K, H, W)
        for s in reversed(scales[:-1]):
            # NOTE(paper-gap): L_s * a_s at the scale's input size, then U to the image's size (code)
            out = resize(logits[s] * attention[s], size) + (1 - up[s]) * out  # Eq. (1)
        result = {"out": out}
        if not self.training:
            result["maps"] = scale_weights(up, scales)
        return result, {s: resize(v, size) for s, v in logits.items()}

    def _explicit(self, image, scales):
        """Chen et al. [1]: features of all scales -> one attention map per scale, softmax over
        scales, out = sum_s w_s * L_s. Only its training scales can be evaluated (Sec. 2)."""
        if scales != self.train_scales:
            raise InputError(f"explicit attention was trained with scales {self.train_scales} and can "
                             f"only combine exactly those (or run one scale alone), got {scales}")
        size = image.shape[-2:]
        logits, feats = {}, []
        for s in scales:
            in_size, c4 = self._trunk(image, s)
            logits[s] = resize(resize(self.seg_head(c4), in_size), size)      # (B, K, H, W)
            feats.append(c4)
        ref = feats[scales.index(1.0)].shape[-2:]                             # 1.0x feature size (code)
        feats = torch.cat([resize(f, ref) for f in feats], 1)                 # (B, S*C4, h, w)
        # NOTE(paper-gap): softmax over the S maps as Chen et al. (the code's variant is un-normalised)
        weights = resize(self.attn_head(feats).softmax(1), size)              # (B, S, H, W)
        out = sum(weights[:, i:i + 1] * logits[s] for i, s in enumerate(scales))
        result = {"out": out}
        if not self.training:
            result["maps"] = {f"attn_{s}": weights[:, i:i + 1].detach() for i, s in enumerate(scales)}
        return result, logits

    def fuse(self, image, scales):
        """Run `scales` through the shared trunk and combine them by ms_mode.
        Returns ({'out', 'maps' (eval, more than one scale)}, {scale: (B, K, H, W) own logits})."""
        scales = tuple(sorted(set(float(s) for s in scales)))
        if not scales or min(scales) <= 0:
            raise InputError(f"scales must be positive, got {scales}")
        if self.ms_mode == "average" or len(scales) == 1:
            return self._average(image, scales)
        if self.ms_mode == "explicit":
            return self._explicit(image, scales)
        return self._hierarchical(image, scales)

    def maps(self, image, scales=(1.0,)):
        """Each scale's attention (Fig. 3) over the evaluation scales, or the training scales when
        only one scale is evaluated."""
        scales = tuple(sorted(scales)) if len(scales) > 1 else self.train_scales
        return self(image, scales=scales).get("maps", {})

    def forward(self, image, scales=None):
        """Training: the training scales fused (Sec. 3); eval: `scales` (default 1.0 alone)."""
        if scales is None:
            scales = self.train_scales if self.training else (1.0,)
        out, scale_logits = self.fuse(image, scales)
        if self.training:
            out["scale_logits"] = {str(s): v for s, v in scale_logits.items()}
        return out

    def loss(self, outputs, target):
        """0.5 * sigmoid BCE + 0.5 * RMI on the fused output (or CE with loss='ce'), plus
        scale_loss_weight * CE on each training scale's own prediction (code)."""
        if self.loss_type == "rmi":
            bce, rmi = rmi_loss(outputs["out"], target)
            terms = {"bce": bce, "rmi": rmi}
            total = 0.5 * bce + 0.5 * rmi
        else:
            terms = {"ce": cross_entropy(outputs["out"], target)}
            total = terms["ce"]
        # NOTE(paper-gap): each scale's own output supervised with CE x 0.05 (code recipes)
        if len(outputs["scale_logits"]) > 1 and self.scale_loss_weight > 0:
            for s, logits in outputs["scale_logits"].items():
                terms[f"scale_{s}"] = cross_entropy(logits, target)
                total = total + self.scale_loss_weight * terms[f"scale_{s}"]
        terms["total"] = total
        return terms

    def predict(self, image, scales=(1.0,), flip=False):
        """(B, K, H, W) logits at the image's size for ANY list of scales (hierarchical; the
        explicit mode only its training scales), logits averaged with the h-flipped view (code)."""
        out = self.fuse(image, scales)[0]["out"]
        if flip:
            out = 0.5 * (out + self.fuse(image.flip(-1), scales)[0]["out"].flip(-1))
        return out


def add_args(parser):
    group = parser.add_argument_group("hier_ms_attn: Hierarchical Multi-Scale Attention")
    group.add_argument("--ms-mode", choices=("hierarchical", "explicit", "average"), default="hierarchical",
                       help="how scales are combined (Table 1): hierarchical = ours, Eq. (1) chained over "
                            "any --eval-scales; explicit = Chen et al. [1], one attention map per scale, "
                            "softmax, trained with all scales; average = single-scale training, logits "
                            "averaged over --eval-scales ('Single Scale' with 1.0, 'AvgPool' with more)")
    group.add_argument("--train-scales", type=float, nargs="+", default=None,
                       help="image scales used in training (default: 0.5 1.0 for hierarchical, Sec. 3; "
                            "0.5 1.0 2.0 for explicit, Table 1; 1.0 for average)")
    group.add_argument("--loss", choices=("rmi", "ce"), default="rmi",
                       help="loss on the fused output: rmi = 0.5 sigmoid BCE + 0.5 RMI [42] (Sec. 5.1, "
                            "code settings), ce = plain cross-entropy")
    group.add_argument("--scale-loss-weight", type=float, default=0.05,
                       help="weight of the cross-entropy on each training scale's own prediction "
                            "(code recipe supervised_mscale_loss_wt; 0 = off)")
    group.add_argument("--head-channels", type=int, default=256,
                       help="inner width of the semantic and attention heads (Sec. 3.1; 256 in the code)")


def build_model(args):
    return HierarchicalMultiScaleAttention(
        build_backbone(args), args.num_classes, ms_mode=args.ms_mode, train_scales=args.train_scales,
        head_channels=args.head_channels, loss=args.loss, scale_loss_weight=args.scale_loss_weight)
