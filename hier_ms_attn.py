"""Hierarchical Multi-Scale Attention for Semantic Segmentation (A. Tao, K. Sapra, B. Catanzaro, 2020),
https://arxiv.org/abs/2005.10821. Authors' code: NVIDIA/semantic-segmentation.

Idea (Sec. 3, Fig. 2). Predictions at different scales fail in different ways (thin posts are best at
2.0x, large regions at 0.5x). Instead of averaging them, a head predicts a dense attention a in [0, 1]
from the features of the LOWER of two adjacent scales and mixes the pair, Eq. (1):
    L(r=1) = U(L(r=0.5) * a(r=0.5)) + (1 - U(a(r=0.5))) * L(r=1).
Trained on {0.5, 1.0} only (1.25x the cost), the pair is chained over any scales at inference, lower
scales having the last word, so 0.25x or 2.0x are evaluated unseen (Table 1).

Map from the code to the paper:
    scaled_image, hierarchical_chain   Eq. (1) chained over any scales (Fig. 2 right bottom)
    prediction_head, attention_head    Sec. 3.1's semantic and attention heads
    ASPP (+ bot_aspp, bot_fine)        DeepLab V3+, Table 1's model (--decoder deeplab, ResNet)
    object_regions, ObjectContext,     HRNet-OCR, Sec. 3.1 (--decoder ocr, HRNet): OCR [9] Eq. (1),
      ContextAugmentation, OCRHead       Eqs. (2)-(3), Eq. (4), the OCR block with its aux head
    HierarchicalMultiScaleAttention    the network; ._hierarchical Eq. (1), ._explicit Chen et al. [1] and
                                       ._average (Table 1's baselines), .maps Fig. 3, .predict Sec. 5.1
    sigmoid_bce, rmi_loss, .loss       Sec. 5.1: RMI [42] on 'out', cross-entropy on 'aux'
Module names are NVIDIA's (network/mscale.py, network/ocrnet.py): its weights load without 'module.'.

forward(image, scales=None) -> dict (training: the training scales fused; eval: `scales`, default 1.0)
    'out'           (B, K, H, W) logits at the image's size
    'aux'           (B, K, H, W) training, --decoder ocr: the aux logits fused as 'out' is
    'maps'          eval, several scales: {"attn_<s>": (B, 1, H, W)} each scale's weight in 'out' (Fig. 3)
    'scale_logits'  training, scale_loss_weight > 0: {"<s>": (B, K, H, W)} each scale's own logits

Deviations and gaps, each reasoned at its NOTE(paper-gap) (the code: NVIDIA/semantic-segmentation):
- up-sampling with align_corners=False, as the code's weights were trained (_scale)
- an image at scale s is floor(s * H) x floor(s * W) (scaled_image); where the chain runs (hierarchical_chain)
- head widths (prediction_head); DeepLab V3+'s projections (__init__); OCR widths, its C'^-0.5 (OCR blocks);
  with one image per process the ASPP's pooled BN uses running statistics (galdv1.pooled_conv_bn_relu)
- the attention head also runs on the top training scale, for its BN statistics (_hierarchical)
- aux logits fused by the attention (_hierarchical, _explicit); [1]'s softmax over scales (_explicit)
- RMI's settings and its shift to >= 0 (rmi_loss); each scale's own output x scale_loss_weight (.loss)
"""
import argparse
import inspect
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (HRNET_LAYOUTS, IGNORE_INDEX, InputError, ResNet, SegModel, build_backbone, conv_bn_relu,
                    cross_entropy, hrnet_features, ranged, resize)
from galdv1 import pooled_conv_bn_relu

DEFAULT_TRAIN_SCALES = {"hierarchical": (0.5, 1.0), "explicit": (0.5, 1.0, 2.0), "average": (1.0,)}
OCR_AUX_WEIGHT = 0.4                       # NVIDIA/semantic-segmentation config.py LOSS.OCR_ALPHA
FINE_SKIP_CHANNELS = 48                    # DeepLab V3+'s stride-4 skip (network/mscale.py bot_fine)


# ----------------------------------------------------------------------------------------------
# The hierarchical chain (Sec. 3, Eq. 1)


def scaled_image(image, scale):
    """The image resized by `scale`: (B, 3, floor(s * H), floor(s * W)), each side at least 1."""
    # NOTE(paper-gap): floor as NVIDIA network/mynn.py ResizeX (F.interpolate with scale_factor and
    # recompute_scale_factor=True) because the paper gives no rounding; 1.0 returns the image itself.
    return resize(image, [max(1, math.floor(n * scale)) for n in image.shape[-2:]])


def hierarchical_chain(preds, attention, size):
    """Eq. (1) chained over scales (Fig. 2 right bottom). preds[s] (B, C, h_s, w_s) and attention[s]
    (B, 1, h_s, w_s) at scale s's input size (none for the top scale); size = the image's (H, W).
    With s1 < ... < sn: P = p_sn; for s = s(n-1) down to s1, at a size z_s,
        P = U(a_s * p_s) + (1 - U(a_s)) * U(P),  U = bilinear resize to z_s;
    returns P at the image's size, (B, C, H, W). Linear in preds."""
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
# The heads (Sec. 3.1) and DeepLab V3+'s pyramid (Table 1)


def prediction_head(in_ch, out_ch, mid_ch=256):
    """Sec. 3.1 semantic head: (3x3 conv -> BN -> ReLU) x 2 -> 1x1 conv to out_ch, one flat Sequential
    (keys 0, 1, 3, 4, 6 as NVIDIA network/mscale.py `final` and network/utils.py make_seg_head)."""
    # NOTE(paper-gap): 256 inner channels, final 1x1 conv without bias because the paper gives no
    # widths (NVIDIA/semantic-segmentation network/utils.py make_seg_head, make_attn_head).
    return nn.Sequential(*conv_bn_relu(in_ch, mid_ch, 3), *conv_bn_relu(mid_ch, mid_ch, 3),
                         nn.Conv2d(mid_ch, out_ch, 1, bias=False))


def attention_head(in_ch, out_ch, mid_ch=256):
    """Sec. 3.1: "structurally identical to the semantic head, except for the final convolutional
    output" (one channel; a sigmoid follows). Keys conv0, bn0, conv1, bn1, conv2 as make_attn_head."""
    names = ("conv0", "bn0", "re0", "conv1", "bn1", "re1", "conv2")
    return nn.Sequential(OrderedDict(zip(names, prediction_head(in_ch, out_ch, mid_ch))))


class ASPP(nn.Module):
    """DeepLab V3+'s pyramid at output stride 8 (NVIDIA network/utils.py AtrousSpatialPyramidPoolingModule):
    image pooling, a 1x1 conv, 3x3 convs of rates 12, 24, 36, each -> BN -> ReLU, concatenated in that
    order: (B, 5 * channels, h, w). Not galdv1.ASPP: NVIDIA's keys, pooling first, no projection."""

    def __init__(self, in_ch, channels=256, rates=(12, 24, 36)):
        super().__init__()
        self.img_conv = pooled_conv_bn_relu(in_ch, channels)                # trains on one image too
        self.features = nn.ModuleList([conv_bn_relu(in_ch, channels, 1)] +
                                      [conv_bn_relu(in_ch, channels, 3, dilation=r) for r in rates])

    def forward(self, x):
        pooled = self.img_conv(F.adaptive_avg_pool2d(x, 1))                  # (B, C', 1, 1)
        return torch.cat([resize(pooled, x.shape[-2:])] + [f(x) for f in self.features], 1)


# ----------------------------------------------------------------------------------------------
# HRNet-OCR (Sec. 3.1; OCR [9]: Yuan, Chen, Wang, ECCV 2020), NVIDIA network/ocrnet.py's module names


def bn_relu(channels):
    """BN -> ReLU as one module (NVIDIA network/utils.py BNReLU: the BN of `conv, bn_relu` is key 1.0)."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())


def conv1x1_bn_relu(in_ch, out_ch, depth=1):
    """depth x (1x1 conv without bias -> BN -> ReLU): OCR's transforms phi, psi, delta, rho."""
    layers = []
    for i in range(depth):
        layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 1, bias=False), bn_relu(out_ch)]
    return nn.Sequential(*layers)


def object_regions(feats, aux_logits):
    """OCR Eq. (1): f_k = sum_i m_ki x_i with m_k = the spatial softmax of class k's auxiliary logits.
    (B, C, H, W), (B, K, H, W) -> (B, C, K, 1): the K region vectors as a K x 1 map."""
    weights = aux_logits.flatten(2).softmax(-1)                              # (B, K, N)
    regions = weights @ feats.flatten(2).transpose(1, 2)                     # (B, K, C)
    return regions.transpose(1, 2).unsqueeze(-1)                             # (B, C, K, 1)


class ObjectContext(nn.Module):
    """OCR Eq. (2): w_ik = softmax_k(phi(x_i) . psi(f_k) / sqrt(C')); Eq. (3): y_i = rho(sum_k w_ik
    delta(f_k)); phi, psi: two 1x1 conv-BN-ReLU, delta, rho: one (network/ocr_utils.py ObjectAttentionBlock)."""

    def __init__(self, channels, key_channels):
        super().__init__()
        self.f_pixel = conv1x1_bn_relu(channels, key_channels, 2)            # phi
        self.f_object = conv1x1_bn_relu(channels, key_channels, 2)           # psi
        self.f_down = conv1x1_bn_relu(channels, key_channels)                # delta
        self.f_up = conv1x1_bn_relu(key_channels, channels)                  # rho

    def forward(self, x, regions):
        B, _, H, W = x.shape
        query = self.f_pixel(x).flatten(2).transpose(1, 2)                   # (B, N, C')
        key = self.f_object(regions).flatten(2)                              # (B, C', K)
        value = self.f_down(regions).flatten(2).transpose(1, 2)              # (B, K, C')
        # NOTE(paper-gap): the relation scaled by C'^-0.5 before the softmax because the paper's kappa
        # is a plain dot product (NVIDIA network/ocr_utils.py ObjectAttentionBlock).
        relation = (query @ key * key.shape[1] ** -0.5).softmax(-1)          # (B, N, K) Eq. (2)
        context = (relation @ value).transpose(1, 2)                         # (B, C', N)
        # contiguous, as the code's: a conv reads a transposed layout in another summation order
        return self.f_up(context.contiguous().view(B, -1, H, W))             # (B, C, H, W) Eq. (3)


class ContextAugmentation(nn.Module):
    """OCR Eq. (4): z_i = g([y_i, x_i]), g = 1x1 conv -> BN -> ReLU -> dropout (SpatialOCR_Module)."""

    def __init__(self, channels, key_channels, dropout=0.05):
        super().__init__()
        self.object_context_block = ObjectContext(channels, key_channels)
        self.conv_bn_dropout = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False),
                                             bn_relu(channels), nn.Dropout2d(dropout))

    def forward(self, feats, regions):
        context = self.object_context_block(feats, regions)                 # (B, C, H, W)
        return self.conv_bn_dropout(torch.cat([context, feats], 1))          # (B, C, H, W) Eq. (4)


class OCRHead(nn.Module):
    """Sec. 3.1: the auxiliary head on the trunk ((1x1 conv) -> BN -> ReLU -> (1x1 conv)), the OCR block
    on a 3x3 conv to mid_ch, the semantic head on its features: prediction_head (cls_head='paper') or a
    1x1 conv with bias ('code', which NVIDIA's weights need). -> (logits, aux logits, OCR features)."""

    def __init__(self, in_ch, num_classes, *, mid_ch=512, key_ch=256, cls_head="paper", head_ch=256):
        super().__init__()
        self.conv3x3_ocr = nn.Sequential(nn.Conv2d(in_ch, mid_ch, 3, padding=1), bn_relu(mid_ch))
        self.ocr_distri_head = ContextAugmentation(mid_ch, key_ch)
        # NOTE(paper-gap): mid 512, key 256, dropout 0.05, biases on conv3x3_ocr and the aux head's
        # convs because the paper gives no widths (NVIDIA network/ocrnet.py OCR_block, config.py MODEL.OCR).
        self.aux_head = nn.Sequential(nn.Conv2d(in_ch, in_ch, 1), bn_relu(in_ch), nn.Conv2d(in_ch, num_classes, 1))
        self.cls_head = (prediction_head(mid_ch, num_classes, head_ch) if cls_head == "paper"
                         else nn.Conv2d(mid_ch, num_classes, 1))

    def forward(self, x):
        feats = self.conv3x3_ocr(x)                                          # (B, mid_ch, h, w)
        aux = self.aux_head(x)                                               # (B, K, h, w)
        ocr_feats = self.ocr_distri_head(feats, object_regions(feats, aux))  # (B, mid_ch, h, w)
        return self.cls_head(ocr_feats), aux, ocr_feats


# ----------------------------------------------------------------------------------------------
# The model


def training_scales(ms_mode, train_scales):
    """The sorted training scales of `ms_mode` (its default when None), or InputError saying why not."""
    scales = tuple(sorted(set(train_scales or DEFAULT_TRAIN_SCALES[ms_mode])))
    if min(scales) <= 0:
        raise InputError(f"training scales must be positive, got {scales}")
    if ms_mode == "average" and scales != (1.0,):
        raise InputError(f"--ms-mode average trains at scale 1.0 only, got --train-scales {scales}")
    if ms_mode != "average" and len(scales) < 2:
        raise InputError(f"--ms-mode {ms_mode} needs at least two training scales, got {scales}")
    if ms_mode == "explicit" and 1.0 not in scales:
        raise InputError(f"--ms-mode explicit needs 1.0 among its training scales, got {scales}")
    return scales


class HierarchicalMultiScaleAttention(SegModel):
    """A trunk shared by every scale, a decoder ('deeplab' on a ResNet, 'ocr' on an HRNet, 'none': the
    trunk) and Sec. 3.1's heads, scales combined by ms_mode ('hierarchical', 'explicit', 'average').
    loss 'rmi' (Sec. 5.1) or 'ce'; aux_loss 'ce' (Sec. 5.1) or the code's 'bce'; scale_loss_weight 0.05
    as the code's Cityscapes recipe (0 in its Mapillary recipe)."""

    def __init__(self, backbone, num_classes, *, decoder="deeplab", ms_mode="hierarchical", train_scales=None,
                 head_channels=256, aspp_channels=256, ocr_channels=(512, 256), cls_head="paper",
                 loss="rmi", aux_loss="ce", scale_loss_weight=0.05):
        super().__init__()
        scales = training_scales(ms_mode, train_scales)
        if scale_loss_weight < 0:
            raise InputError(f"--scale-loss-weight must be >= 0, got {scale_loss_weight}")
        if decoder == "deeplab" and not isinstance(backbone, ResNet):
            raise InputError("--decoder deeplab (Table 1's DeepLab V3+) reads a ResNet's layer1 and layer4")
        self.decoder, self.ms_mode, self.train_scales = decoder, ms_mode, scales
        self.loss_type, self.aux_loss, self.scale_loss_weight = loss, aux_loss, scale_loss_weight
        self.backbone = backbone
        # a ResNet's last stage, or HRNetV2's four outputs concatenated (720 channels for W48)
        trunk_ch = backbone.channels[3] if isinstance(backbone, ResNet) else sum(backbone.channels)
        if decoder == "deeplab":                                             # network/mscale.py MscaleV3Plus
            # NOTE(paper-gap): plain 1x1 convs (no BN or ReLU) project the ASPP to 256 and layer1 to 48,
            # and Sec. 3.1's heads read their stride-4 concat, because Table 1 only names "DeepLab V3+"
            # (NVIDIA/semantic-segmentation network/mscale.py MscaleV3Plus, which trained Table 1).
            self.aspp = ASPP(backbone.channels[3], aspp_channels)
            self.bot_aspp = nn.Conv2d(5 * aspp_channels, aspp_channels, 1, bias=False)
            self.bot_fine = nn.Conv2d(backbone.channels[0], FINE_SKIP_CHANNELS, 1, bias=False)
            attn_ch = aspp_channels + FINE_SKIP_CHANNELS                     # 304
            self.final = prediction_head(attn_ch, num_classes, head_channels)
        elif decoder == "ocr":                                               # network/ocrnet.py MscaleOCR
            self.ocr = OCRHead(trunk_ch, num_classes, mid_ch=ocr_channels[0], key_ch=ocr_channels[1],
                               cls_head=cls_head, head_ch=head_channels)
            attn_ch = ocr_channels[0]
        else:                                                                # network/mscale.py MscaleBasic
            self.cls_head = prediction_head(trunk_ch, num_classes, head_channels)
            attn_ch = trunk_ch
        if ms_mode == "hierarchical":
            self.scale_attn = attention_head(attn_ch, 1, head_channels)
        elif ms_mode == "explicit":
            self.scale_attn = attention_head(len(scales) * attn_ch, len(scales), head_channels)

    def decode(self, features):
        """Trunk features of one scale -> (logits (B, K, h, w), aux logits or None, the attention
        head's input (B, C, h, w)) at the decoder's stride (4 for 'deeplab' and HRNet, else 8)."""
        if self.decoder == "deeplab":
            aspp = self.bot_aspp(self.aspp(features[3]))                     # (B, 256, H/8, W/8)
            fine = self.bot_fine(features[0])                                # (B, 48, H/4, W/4)
            # up to stride 4 with align_corners=False, as the code's (see the NOTE in _scale)
            feats = torch.cat([fine, resize(aspp, fine.shape[-2:])], 1)      # (B, 304, H/4, W/4)
            return self.final(feats), None, feats
        trunk = features[3] if isinstance(self.backbone, ResNet) else hrnet_features(features)
        if self.decoder == "ocr":
            return self.ocr(trunk)
        return self.cls_head(trunk), None, trunk

    def _scale(self, image, scale):
        """The image at `scale` through trunk and decoder: (its input size (h, w), logits (B, K, h, w),
        aux logits (B, K, h, w) in training with the 'ocr' decoder else None, attention input)."""
        x = scaled_image(image, scale)                                       # (B, 3, h, w)
        logits, aux, feats = self.decode(self.backbone(x))
        # NOTE(paper-gap): logits, aux logits and attention (in the callers) are up-sampled to the
        # scale's input size with align_corners=False, so that a stride-8 sample j lands on pixel
        # 8j + 3.5 (not 8j, where it was computed), because NVIDIA's released weights were trained
        # so (network/mynn.py Upsample, cfg.MODEL.ALIGN_CORNERS False); Sec. 3.1 says "bilinear".
        aux = resize(aux, x.shape[-2:]) if aux is not None and self.training else None
        return x.shape[-2:], resize(logits, x.shape[-2:]), aux, feats

    def _per_scale(self, logits, size):
        """Training with a per-scale loss: {"<scale>": (B, K, H, W)}; otherwise nothing is built."""
        if not (self.training and self.scale_loss_weight > 0 and len(logits) > 1):
            return {}
        return {"scale_logits": {str(s): resize(v, size) for s, v in logits.items()}}

    def _hierarchical(self, image, scales, with_maps):
        """Fig. 2 right: every scale's logits L_s and (all but the top scale) attention a_s at that
        scale's input size, chained by hierarchical_chain (Eq. 1); aux logits by the same attention."""
        size = image.shape[-2:]
        logits, aux, attention = {}, {}, {}
        for s in scales:
            in_size, logits[s], aux[s], feats = self._scale(image, s)
            if s != scales[-1]:
                attention[s] = resize(self.scale_attn(feats).sigmoid(), in_size)   # (B, 1, h, w)
            elif self.training:
                # NOTE(paper-gap): the attention head also runs, output unused (no grad), on the top
                # scale so that its BN statistics mix the scales as the code's do (NVIDIA network/ocrnet.py
                # two_scale_forward runs it on the 1.0x branch), because the paper is silent.
                with torch.no_grad():
                    self.scale_attn(feats)
        result = {"out": hierarchical_chain(logits, attention, size)}       # (B, K, H, W)
        if aux[scales[0]] is not None:
            # NOTE(paper-gap): the auxiliary logits fused by the same attention because the paper is
            # silent (NVIDIA network/ocrnet.py two_scale_forward, nscale_forward).
            result["aux"] = hierarchical_chain(aux, attention, size)        # (B, K, H, W)
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
        logits, aux, feats = {}, {}, []
        for s in scales:
            _, logits[s], aux[s], f = self._scale(image, s)
            logits[s] = resize(logits[s], size)                               # (B, K, H, W)
            feats.append(f)
        ref = feats[scales.index(1.0)].shape[-2:]                             # 1.0x feature size (code)
        feats = torch.cat([resize(f, ref) for f in feats], 1)                 # (B, S*C, h, w)
        # NOTE(paper-gap): softmax over the S maps as Chen et al. [1], because the code's variant
        # (NVIDIA/semantic-segmentation network/attnscale.py ASDV3P) is un-normalised.
        weights = resize(self.scale_attn(feats).softmax(1), size)             # (B, S, H, W)
        result = {"out": sum(weights[:, i:i + 1] * logits[s] for i, s in enumerate(scales))}
        if aux[scales[0]] is not None:
            # NOTE(paper-gap): OCR's aux logits weighted as the logits because neither the paper nor
            # the code combines them for [1] (network/attnscale.py has no OCR block).
            result["aux"] = sum(weights[:, i:i + 1] * resize(aux[s], size) for i, s in enumerate(scales))
        if with_maps:
            result["maps"] = {f"attn_{s}": weights[:, i:i + 1].detach() for i, s in enumerate(scales)}
        return {**result, **self._per_scale(logits, size)}

    def _average(self, image, scales):
        """Table 1 "Single Scale" (one scale) and "AvgPool": the mean of the scales' LOGITS, as the
        code's utils/trnval_utils.py (common.SegModel.predict averages probabilities instead)."""
        size, totals = image.shape[-2:], {}
        for s in scales:
            _, logits, aux, _ = self._scale(image, s)
            for name, value in (("out", logits), ("aux", aux)):
                if value is not None:
                    totals[name] = totals.get(name, 0) + resize(value, size)  # (B, K, H, W)
        return {name: total / len(scales) for name, total in totals.items()}

    def fuse(self, image, scales, with_maps=False):
        """Run `scales` through the shared trunk and combine them by ms_mode: forward's dict, 'maps'
        only with_maps."""
        scales = tuple(sorted(set(float(s) for s in scales)))
        if not scales or min(scales) <= 0:
            raise InputError(f"scales must be positive, got {scales}")
        if self.ms_mode == "average" or len(scales) == 1:
            return self._average(image, scales)
        if self.ms_mode == "explicit":
            return self._explicit(image, scales, with_maps)
        return self._hierarchical(image, scales, with_maps)

    def forward(self, image, scales=None):
        """Training: the training scales fused (Sec. 3); eval: `scales` (default 1.0 alone), with maps."""
        if scales is None:
            scales = self.train_scales if self.training else (1.0,)
        return self.fuse(image, scales, with_maps=not self.training)

    def maps(self, image, scales=(1.0,)):
        """Fig. 3: each scale's weight over the evaluation scales (the training scales if only one)."""
        scales = tuple(sorted(scales)) if len(scales) > 1 else self.train_scales
        return self.fuse(image, scales, with_maps=True).get("maps", {})

    def predict(self, image, scales=(1.0,), flip=False):
        """(B, K, H, W) logits for ANY scales (explicit mode: its training scales), averaged with the
        h-flipped view's logits (the code's)."""
        out = self.fuse(image, scales)["out"]
        if flip:
            out = 0.5 * (out + self.fuse(image.flip(-1), scales)["out"].flip(-1))
        return out

    def loss(self, outputs, target):
        """0.5 * sigmoid BCE + 0.5 * RMI on 'out' (or CE with loss='ce'), + 0.4 x CE (or sigmoid BCE,
        aux_loss='bce') on 'aux', + scale_loss_weight x the criterion without RMI on each scale's own."""
        if self.loss_type == "rmi":
            bce, rmi = rmi_loss(outputs["out"], target)
            terms = {"bce": bce, "rmi": rmi}
            total = 0.5 * bce + 0.5 * rmi
        else:
            terms = {"ce": cross_entropy(outputs["out"], target)}
            total = terms["ce"]
        if "aux" in outputs:
            # Sec. 5.1: "for the auxiliary segmentation head we use cross entropy" (the code: its
            # criterion without RMI, sigmoid BCE, with LOSS.OCR_AUX_RMI False)
            terms["aux"] = (cross_entropy if self.aux_loss == "ce" else sigmoid_bce)(outputs["aux"], target)
            total = total + OCR_AUX_WEIGHT * terms["aux"]
        # NOTE(paper-gap): each scale's own output supervised with the criterion without RMI x
        # scale_loss_weight because the paper never mentions it (NVIDIA network/ocrnet.py two_scale_forward,
        # do_rmi=False; supervised_mscale_loss_wt 0.05 in scripts/train_cityscapes.yml, unset = 0 in
        # scripts/train_mapillary.yml).
        per_scale = sigmoid_bce if self.loss_type == "rmi" else cross_entropy
        for s, logits in outputs.get("scale_logits", {}).items():
            terms[f"scale_{s}"] = per_scale(logits, target)
            total = total + self.scale_loss_weight * terms[f"scale_{s}"]
        terms["total"] = total
        return terms


# ----------------------------------------------------------------------------------------------
# The loss (Sec. 5.1): region mutual information [42] as the HMSA code runs it


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
    """Returns (bce, rmi); the paper's loss is 0.5 * bce + 0.5 * rmi. rmi, per class: labels Y and
    sigmoid probabilities P 4x4 average-pooled, each 3x3 window a D = 9-dim point; the conditional
    covariance Sigma_Y|P = Sigma_Y - Sigma_YP Sigma_P^-1 Sigma_YP^T (Sigma_P + alpha I) bounds the mutual
    information from below; rmi = 0.5 * log det(I + Sigma_Y|P / alpha) / 9, batch mean, class sum.
    Float32 to the pooled maps, float64 from the region vectors on (a Cholesky of near-singular
    matrices fails in fp16/fp32) as loss/rmi.py; autocast off."""
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
        D = radius * radius
        # every radius x radius window (no padding) as a D-dim point, centred over the N windows
        y, p = (F.unfold(m.double().flatten(0, 1).unsqueeze(1), radius).view(B, K, D, -1) for m in (label, prob))
        y, p = y - y.mean(-1, keepdim=True), p - p.mean(-1, keepdim=True)    # (B, K, D, N) float64
        eye = torch.eye(D, dtype=torch.float64, device=logits.device)
        cov_y = y @ y.transpose(-1, -2)                                      # (B, K, D, D)
        cov_yp = y @ p.transpose(-1, -2)
        cov_p = p @ p.transpose(-1, -2) + alpha * eye
        cond = cov_y - cov_yp @ torch.linalg.solve(cov_p, cov_yp.transpose(-1, -2))
        cond = 0.5 * (cond + cond.transpose(-1, -2))                         # exact symmetry for Cholesky
        chol = torch.linalg.cholesky(cond + alpha * eye)
        log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)          # (B, K)
        # NOTE(paper-gap): the code's 0.5 * log det(cond + alpha I) minus its minimum 0.5 * log det(alpha I),
        # so that rmi >= 0, because the paper gives no formula (a constant: the gradients are the code's).
        rmi = 0.5 * (log_det - D * math.log(alpha))
        return bce, (rmi.mean(0) / D).sum().float()


# ----------------------------------------------------------------------------------------------
# Command line: every flag is the model's keyword of its name


DEFAULTS = {name: p.default for name, p in inspect.signature(HierarchicalMultiScaleAttention).parameters.items()
            if p.kind is p.KEYWORD_ONLY}
# read by some models only: left out of args unless given, so that one that would change nothing is refused
ONLY_SOME = ("decoder", "train_scales", "scale_loss_weight", "aspp_channels", "ocr_channels", "cls_head", "aux_loss")


def add_args(parser):
    words = lambda values: " ".join(map(str, values))
    group = parser.add_argument_group("hier_ms_attn: Hierarchical Multi-Scale Attention",
                                      argument_default=argparse.SUPPRESS)           # the ONLY_SOME flags
    group.add_argument("--decoder", choices=("deeplab", "ocr", "none"),
                       help="what the heads read: deeplab = DeepLab V3+ (Table 1), ocr = HRNet-OCR (Sec. 3.1, "
                            "Tables 2-4), none = the trunk (Sec. 3.1) (default: deeplab on a ResNet, ocr on an HRNet)")
    group.add_argument("--ms-mode", choices=("hierarchical", "explicit", "average"), default=DEFAULTS["ms_mode"],
                       help="how scales combine (Table 1): hierarchical = Eq. (1) over any --eval-scales; explicit = "
                            "Chen et al. [1], a softmax over its training scales; average = trained at 1.0, logits "
                            "averaged ('Single Scale' with 1.0, 'AvgPool' with more)")
    group.add_argument("--train-scales", type=ranged(float, 0, low_open=True), nargs="+",
                       help=f"training scales (default: {words(DEFAULT_TRAIN_SCALES['hierarchical'])} hierarchical, "
                            f"Sec. 3; {words(DEFAULT_TRAIN_SCALES['explicit'])} explicit, Table 1; average: 1.0, "
                            "fixed)")
    group.add_argument("--loss", choices=("rmi", "ce"), default=DEFAULTS["loss"],
                       help="on the fused output: rmi = 0.5 sigmoid BCE + 0.5 RMI [42] (Sec. 5.1), ce = cross-entropy")
    group.add_argument("--scale-loss-weight", type=ranged(float, 0),
                       help="weight of the loss without RMI on each training scale's own output, not with --ms-mode "
                            f"average (default: {DEFAULTS['scale_loss_weight']}, the code's Cityscapes recipe; "
                            "its Mapillary recipe: 0)")
    group.add_argument("--head-channels", type=ranged(int, 1), default=DEFAULTS["head_channels"],
                       help="inner width of the semantic and attention heads (Sec. 3.1; the code's)")
    group.add_argument("--aspp-channels", type=ranged(int, 1),
                       help=f"--decoder deeplab: width of the ASPP's branches and of its projection "
                            f"(default: {DEFAULTS['aspp_channels']})")
    group.add_argument("--ocr-channels", type=ranged(int, 1), nargs=2, metavar=("MID", "KEY"),
                       help=f"--decoder ocr: OCR widths (default: {words(DEFAULTS['ocr_channels'])}, the code's)")
    group.add_argument("--cls-head", choices=("paper", "code"),
                       help="--decoder ocr: semantic head: paper = Sec. 3.1's; code = a 1x1 conv, which NVIDIA's "
                            f"released weights need (default: {DEFAULTS['cls_head']})")
    group.add_argument("--aux-loss", choices=("ce", "bce"),
                       help=f"--decoder ocr: aux head's loss (weight {OCR_AUX_WEIGHT}): ce = cross-entropy (Sec. "
                            f"5.1), bce = the code's sigmoid BCE (default: {DEFAULTS['aux_loss']})")


def build_model(args):
    """The command line's door to HierarchicalMultiScaleAttention (nothing else reads args)."""
    # None: what a checkpoint written when these flags defaulted to None holds for "not given"
    given = {name: getattr(args, name) for name in ONLY_SOME if getattr(args, name, None) is not None}
    hrnet = args.backbone in HRNET_LAYOUTS
    decoder = given.setdefault("decoder", "ocr" if hrnet else "deeplab")
    if decoder == "ocr" and not hrnet:
        raise InputError(f"hier_ms_attn: --decoder ocr is HRNet-OCR (Sec. 3.1): it needs --backbone "
                         f"{' | '.join(HRNET_LAYOUTS)}, got {args.backbone}")
    if decoder == "deeplab" and hrnet:
        raise InputError(f"hier_ms_attn: --decoder deeplab is Table 1's DeepLab V3+ on a ResNet; with "
                         f"--backbone {args.backbone} use --decoder ocr or none")
    idle = []                                                                # (flags, why they change nothing)
    if args.ms_mode == "average":
        idle.append((("train_scales", "scale_loss_weight"),
                     "--ms-mode average trains one scale (1.0), so there are no scales to choose or supervise"))
    if decoder != "ocr":
        idle.append((("ocr_channels", "cls_head", "aux_loss"), f"--decoder {decoder} has no OCR block"))
    if decoder != "deeplab":
        idle.append((("aspp_channels",), f"--decoder {decoder} has no ASPP"))
    for names, why in idle:
        named = [f"--{name.replace('_', '-')}" for name in names if name in given]
        if named:
            raise InputError(f"hier_ms_attn: {', '.join(named)} would change nothing: {why}")
    return HierarchicalMultiScaleAttention(build_backbone(args, hrnet=True), args.num_classes, ms_mode=args.ms_mode,
                                           head_channels=args.head_channels, loss=args.loss, **given)
