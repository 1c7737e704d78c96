"""Hierarchical Multi-Scale Attention for Semantic Segmentation (Tao, Sapra, Catanzaro; NVIDIA,
arXiv:2005.10821, 2020).

Idea (Sec. 3, Fig. 2): predictions at different image scales fail in different ways (thin posts are
best at 2.0x, large regions at 0.5x). Instead of averaging them, a head predicts a dense attention
a in [0, 1] from the features of the LOWER of two adjacent scales and mixes the pair:
    Eq. (1): L(r=1) = U(L(r=0.5) * a(r=0.5)) + (1 - U(a(r=0.5))) * L(r=1).
The network is trained with the pair {0.5, 1.0} only (training cost 0.5^2 + 1 = 1.25x), yet at
inference any list of scales is chained pair by pair, lower scales having the last word (Fig. 2 right
bottom), so a model trained once is evaluated with 0.25x or 2.0x it never saw (Table 1).

Map from the code to the paper
    sigmoid_bce ............ the binary part of the RMI criterion; alone, the per-scale loss
    rmi_loss ............... RMI [42], "the primary loss function under default settings" (Sec. 5.1),
                             with the settings of the authors' code (0.5 * sigmoid BCE + 0.5 * RMI)
    prediction_head ........ Sec. 3.1 semantic head; the attention head is the same with 1 output
    hierarchical_chain ..... Eq. (1) chained over any list of scales (Fig. 2 right bottom)
    HierarchicalMultiScaleAttention
      ._trunk .............. one image scale through the shared trunk (Fig. 2)
      ._hierarchical ....... Eq. (1): training pair and n-scale inference (Sec. 3, Fig. 2 right)
      ._explicit ........... the "explicit" baseline of Chen et al. [1] (Fig. 2 left, Table 1)
      ._average ............ the "Single Scale" / "AvgPool" baselines of Table 1
      .maps ................ each scale's share of the result (Fig. 3)
      .predict ............. multi-scale inference at evaluation time (+ flip), Table 1 / Sec. 5.1
    build_model ............ --ms-mode, --train-scales, --loss, --scale-loss-weight, --head-channels

forward(image, scales=None) -> dict
    'out'           (B, K, H, W) logits at the image's size: training mode fuses the training scales
                    (default 0.5 1.0), eval mode returns the single-scale (1.0) prediction.
    'maps'          eval only, more than one scale (hierarchical or explicit mode): {"attn_<scale>":
                    (B, 1, H, W)}, each scale's weight in 'out' at every pixel; they sum to 1 (Fig. 3).
    'scale_logits'  training only, when scale_loss_weight > 0 and more than one scale ran:
                    {"<scale>": (B, K, H, W)} each scale's own prediction at the image's size.
predict(image, scales, flip) builds only 'out': no maps, no per-scale full-size logits.

Choices and deviations (paper gaps are marked NOTE(paper-gap) at their lines)
- Trunk and heads as Sec. 3.1 (dilated ResNet-50, output stride 8, heads on the last stage). The
  authors dilate EVERY block of layer3 by 2 and of layer4 by 4 (NVIDIA/semantic-segmentation
  network/utils.py, the conv2 of each block), which is common.ResNet's default dilation style.
  Table 1 itself used DeepLab V3+ around the ResNet-50; we keep the plain Sec. 3.1 heads.
- Heads 256 channels wide, final 1x1 convs without bias (network/utils.py make_attn_head).
- n-scale order of NVIDIA/semantic-segmentation network/ocrnet.py MscaleOCR.nscale_forward: from the
  largest scale down, a scale >= 1.0 is fused at its own input size (the running result is resized
  to it first), a scale < 1.0 at the image's size. With one scale above 1.0 this is the same as
  fusing everything at the image's size; with 1.5 and 2.0 it is not.
- The attention head also runs on the top training scale (1.0x), output unused, so that its BN
  running statistics see the same scales as the code's two_scale_forward.
- Per-scale supervision: scale_loss_weight x the fused output's criterion without RMI (sigmoid BCE;
  plain CE with loss='ce') on each scale's own output, as two_scale_forward with do_rmi=False;
  0.05 in scripts/train_cityscapes*.yml, 0 (unset) in scripts/train_mapillary.yml.
- RMI is shifted by the constant -0.5 * log det(5e-4 * I) / 9 per class so that it is >= 0 (at most
  0.5 * log 2 per class for a perfect prediction); the gradients are exactly the code's.
- No OCR aux head: the ResNet-50 model of Sec. 3.1 has none.
- Explicit attention (Chen et al. [1], network/attnscale.py ASDV3P, with a softmax): the trunk
  features of all training scales, resized to the 1.0x feature size and concatenated, feed a head of
  the same shape as ours with one output per scale; softmax over scales; out = sum_s w_s * L_s. It
  can only be evaluated with its training scales (or one scale alone), as the paper says of [1].
- Table 1's "AvgPool" averages the logits of a single-scale-trained net; predict() averages logits
  over scales and flips in every mode (utils/trnval_utils.py eval_minibatch).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (IGNORE_INDEX, InputError, SegModel, build_backbone, conv_bn_relu, cross_entropy,
                    ranged, resize, scaled_size)

DEFAULT_TRAIN_SCALES = {"hierarchical": (0.5, 1.0), "explicit": (0.5, 1.0, 2.0), "average": (1.0,)}
CITYSCAPES_SCALE_LOSS_WEIGHT = 0.05        # scripts/train_cityscapes.yml supervised_mscale_loss_wt


# ----------------------------------------------------------------------------------------------
# Loss: region mutual information [42], as the HMSA code runs it (Sec. 5.1)


def region_vectors(x, radius):
    """(B, K, H, W) -> (B, K, D, N) with D = radius^2: every radius x radius window (no padding) as a
    D-dim point, N = (H - radius + 1) * (W - radius + 1) windows."""
    B, K, H, W = x.shape
    windows = F.unfold(x.reshape(B * K, 1, H, W), radius)                    # (B*K, D, N), D row-major
    return windows.view(B, K, radius * radius, -1)                           # (B, K, D, N)


def one_hot_valid(target, num_classes):
    """(B, H, W) labels -> float32 (one-hot (B, K, H, W), ignored pixels all 0; valid mask (B, 1, H, W))."""
    valid = (target != IGNORE_INDEX).unsqueeze(1)                            # (B, 1, H, W)
    classes = torch.arange(num_classes, device=target.device).view(1, -1, 1, 1)
    onehot = (target.unsqueeze(1) == classes) & valid                        # (B, K, H, W)
    return onehot.float(), valid.float()


def sigmoid_bce(logits, target, onehot_valid=None):
    """Sigmoid BCE against one-hot labels, summed over classes and valid pixels, / (#valid + 1): the
    RMI criterion of NVIDIA/semantic-segmentation loss/rmi.py with do_rmi=False. In float32."""
    onehot, valid = onehot_valid or one_hot_valid(target, logits.shape[1])
    return F.binary_cross_entropy_with_logits(logits.float(), onehot, weight=valid,
                                              reduction="sum") / (valid.sum() + 1)


# NOTE(paper-gap): radius 3, 4x4 average pooling, alpha 5e-4, lambda 0.5 and the sum over classes are
# the authors' settings (NVIDIA/semantic-segmentation loss/rmi.py) because the paper names RMI [42] only.
def rmi_loss(logits, target, *, radius=3, pool=4, alpha=5e-4):
    """Returns (bce, rmi); the paper's loss is 0.5 * bce + 0.5 * rmi (code: lambda 0.5).

    bce: sigmoid_bce. rmi: per class, the labels Y and sigmoid probabilities P are 4x4 average-pooled,
    each 3x3 window becomes a 9-dim point, and the conditional covariance
    Sigma_Y|P = Sigma_Y - Sigma_YP Sigma_P^-1 Sigma_YP^T (Sigma_P + alpha I for stability) bounds the
    mutual information from below; rmi = 0.5 * log det(I + Sigma_Y|P / alpha) / 9, mean over the
    batch, summed over classes. Sigmoid, mask and pooling run in float32 on the (B, K, H, W) maps;
    only the pooled 9-dim region vectors, the covariances and the Cholesky are float64 (Cholesky of
    near-singular matrices fails in fp16/fp32), as loss/rmi.py. Autocast is off throughout.
    """
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()                                              # (B, K, H, W)
        B, K, H, W = logits.shape
        onehot, valid = one_hot_valid(target, K)                             # (B, K, H, W), (B, 1, H, W)
        bce = sigmoid_bce(logits, target, (onehot, valid))
        prob = logits.sigmoid() * valid + 1e-6                               # (B, K, H, W) float32
        label = F.avg_pool2d(onehot, pool, pool, pool // 2)                  # (B, K, H', W')
        prob = F.avg_pool2d(prob, pool, pool, pool // 2)
        if min(label.shape[-2:]) < radius:                                   # too small for a window
            return bce, bce.new_zeros(())
        y = region_vectors(label.double(), radius)                           # (B, K, D, N) float64
        p = region_vectors(prob.double(), radius)
        y = y - y.mean(-1, keepdim=True)
        p = p - p.mean(-1, keepdim=True)
        eye = torch.eye(radius * radius, dtype=torch.float64, device=logits.device)
        cov_y = y @ y.transpose(-1, -2)                                      # (B, K, D, D)
        cov_yp = y @ p.transpose(-1, -2)
        cov_p = p @ p.transpose(-1, -2) + alpha * eye
        cond = cov_y - cov_yp @ torch.linalg.solve(cov_p, cov_yp.transpose(-1, -2))
        cond = 0.5 * (cond + cond.transpose(-1, -2))                         # exact symmetry for Cholesky
        chol = torch.linalg.cholesky(cond + alpha * eye)
        log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)          # (B, K)
        # the code's 0.5 * log det(cond + alpha I), minus its minimum 0.5 * log det(alpha I)
        rmi = 0.5 * (log_det - radius * radius * math.log(alpha))
        rmi = (rmi.mean(0) / (radius * radius)).sum()
        return bce, rmi.float()


# ----------------------------------------------------------------------------------------------
# Heads (Sec. 3.1) and the hierarchical chain (Sec. 3, Eq. 1)


def prediction_head(in_ch, out_ch, mid_ch=256):
    """Sec. 3.1 semantic head: (3x3 conv -> BN -> ReLU) x 2 -> 1x1 conv to out_ch. The attention head
    is "structurally identical ... except for the final convolution, which outputs a single channel"."""
    # NOTE(paper-gap): 256 inner channels, final 1x1 conv without bias because the paper gives no
    # widths (NVIDIA/semantic-segmentation network/utils.py make_attn_head).
    return nn.Sequential(conv_bn_relu(in_ch, mid_ch, 3), conv_bn_relu(mid_ch, mid_ch, 3),
                         nn.Conv2d(mid_ch, out_ch, 1, bias=False))


def hierarchical_chain(preds, attention, size):
    """Eq. (1) chained over scales (Fig. 2 right bottom). preds[s] (B, C, h_s, w_s) and attention[s]
    (B, 1, h_s, w_s) at scale s's input size (no attention for the top scale); size = the image's
    (H, W). With s1 < ... < sn: P = p_sn; for s = s(n-1) down to s1, at a size z_s,
        P = U(a_s * p_s) + (1 - U(a_s)) * U(P),  U = bilinear resize to z_s;
    returns P resized to the image's size, (B, C, H, W). Linear in preds."""
    scales = sorted(preds)
    out = preds[scales[-1]]                                                  # (B, C, h_sn, w_sn)
    for s in reversed(scales[:-1]):
        # NOTE(paper-gap): z_s = the scale's own input size for s >= 1.0 and the image's size below
        # 1.0, because the paper does not say where the chain runs (NVIDIA/semantic-segmentation
        # network/ocrnet.py MscaleOCR.nscale_forward; a list without 1.0 still ends at the image's size).
        at = preds[s].shape[-2:] if s >= 1.0 else size
        a = attention[s]                                                     # (B, 1, h_s, w_s)
        out = resize(preds[s] * a, at) + (1 - resize(a, at)) * resize(out, at)   # Eq. (1)
    return resize(out, size)                                                 # (B, C, H, W)


# ----------------------------------------------------------------------------------------------
# The model


class HierarchicalMultiScaleAttention(SegModel):
    """Dilated ResNet trunk shared by every scale, semantic head and attention head (Sec. 3.1),
    combined across scales by `ms_mode`:
      hierarchical  Eq. (1) chained over any scales (ours, Fig. 2 right); trained with 0.5, 1.0
      explicit      one attention map per scale, softmax over scales (Chen et al. [1], Fig. 2 left);
                    trained with all its evaluation scales (default 0.5, 1.0, 2.0)
      average       single-scale training; multi-scale inference averages logits (Table 1 rows 1-3)
    scale_loss_weight weighs each training scale's own loss (0.05: Cityscapes recipe, 0: Mapillary's).
    """

    def __init__(self, backbone, num_classes, *, ms_mode="hierarchical", train_scales=None,
                 head_channels=256, loss="rmi", scale_loss_weight=CITYSCAPES_SCALE_LOSS_WEIGHT):
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
        if scale_loss_weight < 0:
            raise InputError(f"--scale-loss-weight must be >= 0, got {scale_loss_weight}")
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

    def _per_scale(self, logits, size):
        """Training with a per-scale loss: {"<scale>": (B, K, H, W)}; otherwise nothing is built."""
        if not (self.training and self.scale_loss_weight > 0 and len(logits) > 1):
            return {}
        return {"scale_logits": {str(s): resize(v, size) for s, v in logits.items()}}

    def _average(self, image, scales):
        """Table 1 "Single Scale" (one scale) and "AvgPool": the mean of the scales' logits."""
        size = image.shape[-2:]
        total = 0
        for s in scales:
            in_size, c4 = self._trunk(image, s)
            total = total + resize(resize(self.seg_head(c4), in_size), size)  # (B, K, H, W)
        return {"out": total / len(scales)}

    def _hierarchical(self, image, scales, with_maps):
        """Fig. 2 right: every scale's logits L_s and (all but the top scale) attention a_s at that
        scale's input size, chained by hierarchical_chain (Eq. 1)."""
        size = image.shape[-2:]
        logits, attention = {}, {}
        for s in scales:
            in_size, c4 = self._trunk(image, s)
            logits[s] = resize(self.seg_head(c4), in_size)                    # (B, K, h, w)
            if s != scales[-1]:
                attention[s] = resize(self.attn_head(c4).sigmoid(), in_size)  # (B, 1, h, w)
            elif self.training:
                # NOTE(paper-gap): the attention head also runs, output unused, on the top scale so
                # that its BN running statistics mix the scales as the code's do (two_scale_forward
                # in NVIDIA/semantic-segmentation network/ocrnet.py runs it on the 1.0x branch too),
                # because the paper only says each scale "produces ... an attention mask". No grad:
                # nothing flows back from an unused output anyway.
                with torch.no_grad():
                    self.attn_head(c4)
        result = {"out": hierarchical_chain(logits, attention, size)}       # (B, K, H, W)
        if with_maps:
            # each scale's weight: the chain run on a one-hot indicator of the scale (Fig. 3)
            indicator = {}
            for i, s in enumerate(scales):
                indicator[s] = logits[s].new_zeros(image.shape[0], len(scales), *logits[s].shape[-2:])
                indicator[s][:, i] = 1                                        # (B, S, h, w)
            weights = hierarchical_chain(indicator, {s: a.detach() for s, a in attention.items()}, size)
            result["maps"] = {f"attn_{s}": weights[:, i:i + 1] for i, s in enumerate(scales)}
        return {**result, **self._per_scale(logits, size)}

    def _explicit(self, image, scales, with_maps):
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
        # NOTE(paper-gap): softmax over the S maps as Chen et al. [1], because the code's variant
        # (NVIDIA/semantic-segmentation network/attnscale.py ASDV3P) is un-normalised.
        weights = resize(self.attn_head(feats).softmax(1), size)              # (B, S, H, W)
        result = {"out": sum(weights[:, i:i + 1] * logits[s] for i, s in enumerate(scales))}
        if with_maps:
            result["maps"] = {f"attn_{s}": weights[:, i:i + 1].detach() for i, s in enumerate(scales)}
        return {**result, **self._per_scale(logits, size)}

    def fuse(self, image, scales, with_maps=False):
        """Run `scales` through the shared trunk and combine them by ms_mode: {'out' (B, K, H, W),
        'maps' (with_maps, more than one scale), 'scale_logits' (training with a per-scale loss)}."""
        scales = tuple(sorted(set(float(s) for s in scales)))
        if not scales or min(scales) <= 0:
            raise InputError(f"scales must be positive, got {scales}")
        if self.ms_mode == "average" or len(scales) == 1:
            return self._average(image, scales)
        if self.ms_mode == "explicit":
            return self._explicit(image, scales, with_maps)
        return self._hierarchical(image, scales, with_maps)

    def maps(self, image, scales=(1.0,)):
        """Each scale's weight in the result (Fig. 3) over the evaluation scales, or the training
        scales when only one scale is evaluated."""
        scales = tuple(sorted(scales)) if len(scales) > 1 else self.train_scales
        return self.fuse(image, scales, with_maps=True).get("maps", {})

    def forward(self, image, scales=None):
        """Training: the training scales fused (Sec. 3); eval: `scales` (default 1.0 alone), with maps."""
        if scales is None:
            scales = self.train_scales if self.training else (1.0,)
        return self.fuse(image, scales, with_maps=not self.training)

    def loss(self, outputs, target):
        """0.5 * sigmoid BCE + 0.5 * RMI on the fused output (or CE with loss='ce'), plus
        scale_loss_weight * the same criterion without RMI on each training scale's own output."""
        if self.loss_type == "rmi":
            bce, rmi = rmi_loss(outputs["out"], target)
            terms = {"bce": bce, "rmi": rmi}
            total = 0.5 * bce + 0.5 * rmi
        else:
            terms = {"ce": cross_entropy(outputs["out"], target)}
            total = terms["ce"]
        # NOTE(paper-gap): each scale's own output supervised with the criterion without RMI
        # (sigmoid BCE, or CE with loss='ce') x scale_loss_weight, because the paper never mentions
        # it (NVIDIA/semantic-segmentation network/ocrnet.py two_scale_forward, do_rmi=False; weight
        # supervised_mscale_loss_wt: 0.05 in scripts/train_cityscapes.yml, unset = 0 in
        # scripts/train_mapillary.yml). Sec. 5.1's "cross-entropy for the auxiliary loss" is about
        # HRNet-OCR's auxiliary head, which this ResNet model has not.
        per_scale = sigmoid_bce if self.loss_type == "rmi" else cross_entropy
        for s, logits in outputs.get("scale_logits", {}).items():
            terms[f"scale_{s}"] = per_scale(logits, target)
            total = total + self.scale_loss_weight * terms[f"scale_{s}"]
        terms["total"] = total
        return terms

    def predict(self, image, scales=(1.0,), flip=False):
        """(B, K, H, W) logits at the image's size for ANY list of scales (hierarchical; the
        explicit mode only its training scales), logits averaged with the h-flipped view (code)."""
        out = self.fuse(image, scales)["out"]
        if flip:
            out = 0.5 * (out + self.fuse(image.flip(-1), scales)["out"].flip(-1))
        return out


# Table 1 (Mapillary, ResNet-50, training cost relative to single scale; V100 minibatch times) for
# --benchmark --against-paper, at 1 x 3 x 256 x 256 (the ratios do not depend on the size).
PAPER_COSTS = dict(
    title="HMSA Table 1: training FLOPs and minibatch time relative to single-scale training, ResNet-50",
    flags=["--backbone", "resnet50", "--crop-size", "256", "--batch-size", "1"],
    quantities={"FLOPS": ("gflops_train_step", "relative"), "minibatch time": ("train_step_ms", "relative"),
                "peak memory (MiB)": ("train_step_peak_mib", "absolute")},
    rows=[("Single Scale", ["--ms-mode", "average"], {"FLOPS": 1.00, "minibatch time": 0.80}),
          ("Hierarchical (ours), 0.5 1.0", [], {"FLOPS": 1.25, "minibatch time": 1.17}),
          ("Explicit, 0.5 1.0 2.0", ["--ms-mode", "explicit"], {"FLOPS": 5.25, "minibatch time": 3.08})])


def add_args(parser):
    group = parser.add_argument_group("hier_ms_attn: Hierarchical Multi-Scale Attention")
    group.add_argument("--ms-mode", choices=("hierarchical", "explicit", "average"), default="hierarchical",
                       help="how scales are combined (Table 1): hierarchical = ours, Eq. (1) chained over "
                            "any --eval-scales; explicit = Chen et al. [1], one attention map per scale, "
                            "softmax, trained with all scales; average = single-scale training, logits "
                            "averaged over --eval-scales ('Single Scale' with 1.0, 'AvgPool' with more)")
    group.add_argument("--train-scales", type=ranged(float, 0, low_open=True), nargs="+", default=None,
                       help="image scales used in training (default: 0.5 1.0 for hierarchical, Sec. 3; "
                            "0.5 1.0 2.0 for explicit, Table 1; average trains at 1.0 and takes none)")
    group.add_argument("--loss", choices=("rmi", "ce"), default="rmi",
                       help="loss on the fused output: rmi = 0.5 sigmoid BCE + 0.5 RMI [42] (Sec. 5.1, "
                            "code settings), ce = plain cross-entropy")
    group.add_argument("--scale-loss-weight", type=ranged(float, 0), default=None,
                       help="weight of the loss without RMI (sigmoid BCE; CE with --loss ce) on each "
                            "training scale's own prediction (code recipes' supervised_mscale_loss_wt: "
                            "0.05 for Cityscapes, the default; 0 for Mapillary); not with --ms-mode average")
    group.add_argument("--head-channels", type=ranged(int, 1), default=256,
                       help="inner width of the semantic and attention heads (Sec. 3.1; 256 in the code)")


def build_model(args):
    if args.ms_mode == "average":
        given = [flag for flag, value in (("--train-scales", args.train_scales),
                                          ("--scale-loss-weight", args.scale_loss_weight)) if value is not None]
        if given:
            raise InputError(f"hier_ms_attn: {', '.join(given)} would change nothing: --ms-mode average "
                             f"trains one scale (1.0), so there are no scales to choose or supervise")
    weight = CITYSCAPES_SCALE_LOSS_WEIGHT if args.scale_loss_weight is None else args.scale_loss_weight
    return HierarchicalMultiScaleAttention(
        build_backbone(args), args.num_classes, ms_mode=args.ms_mode, train_scales=args.train_scales,
        head_channels=args.head_channels, loss=args.loss, scale_loss_weight=weight)
