"""Math tests for hier_ms_attn.py: Eq. (1), the n-scale chain, the Table 1 baselines, the flags (their
defaults, --help, refusals), the decoders (DeepLab V3+, HRNet-OCR: OCR Eqs. 1-3, the aux logits' fusion
and loss), NVIDIA's parameter counts and key names, where a strided logit lands, RMI, the per-scale loss
and what evaluation builds."""
import argparse
import functools
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import hier_ms_attn as hma  # noqa: E402
from common import InputError, resize  # noqa: E402
from hier_ms_attn import scaled_image  # noqa: E402

K = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def small_trunk(decoder):
    """HRNet W18-small-v1 for the OCR decoder, else a ResNet-18 (output stride 8)."""
    return common.HRNet(**common.HRNET_LAYOUTS["hrnet18-small"]) if decoder == "ocr" else common.ResNet(18, 8)


@functools.lru_cache(maxsize=None)
def first_seeded_trunk(ocr):
    """The trunk built right after torch.manual_seed(0): its state and the RNG state it leaves."""
    torch.manual_seed(0)
    return small_trunk("ocr" if ocr else "none").state_dict(), torch.get_rng_state()


def seeded_trunk(decoder):
    """What `torch.manual_seed(0); small_trunk(decoder)` gives, weights and RNG state alike, without
    drawing the trunk's random init again (a quarter of this file's time): built on the meta device,
    the first build's tensors copied in."""
    state, rng = first_seeded_trunk(decoder == "ocr")
    with torch.device("meta"):
        trunk = small_trunk(decoder)
    trunk.to_empty(device="cpu").load_state_dict(state)
    torch.set_rng_state(rng)
    return trunk


def make_model(ms_mode="hierarchical", decoder="none", **kw):
    """Small widths: heads 16, ASPP 16, OCR 32 / 16. The chain and baseline tests use the plain
    Sec. 3.1 heads ('none'); the decoders have their own tests below."""
    widths = {"deeplab": dict(aspp_channels=16), "ocr": dict(ocr_channels=(32, 16)), "none": {}}[decoder]
    return hma.HierarchicalMultiScaleAttention(seeded_trunk(decoder), K, ms_mode=ms_mode, decoder=decoder,
                                               head_channels=16, **widths, **kw)


def image(h=33, w=47, b=2):
    torch.manual_seed(1)
    return torch.randn(b, 3, h, w)


def scale_outputs(model, x, s):
    """By hand: L_s and a_s at the scale's input size (code _fwd)."""
    xs = scaled_image(x, s)
    logits, _, feats = model.decode(model.backbone(xs))
    logits = resize(logits, xs.shape[-2:])
    attn = resize(model.scale_attn(feats).sigmoid(), xs.shape[-2:])
    return logits, attn


class Constant(nn.Module):
    """Stands in for the attention head's last conv: a constant pre-sigmoid value."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x.new_full((x.shape[0], 1, *x.shape[-2:]), self.value)


# ----------------------------------------------------------------------------------------------
# Eq. (1) and the hierarchical chain


def test_two_scale_training_output_is_eq1_by_hand_values_and_gradients():
    model = make_model().train()
    x = image().requires_grad_(True)
    out = model(x)["out"]
    g_model = torch.autograd.grad(out.square().sum(), x)[0]
    L05, a05 = scale_outputs(model, x, 0.5)
    L1, _ = scale_outputs(model, x, 1.0)
    U = lambda t: resize(t, x.shape[-2:])
    by_hand = U(L05 * a05) + (1 - U(a05)) * L1                          # Eq. (1)
    g_hand = torch.autograd.grad(by_hand.square().sum(), x)[0]
    assert torch.allclose(out, by_hand, atol=1e-5)
    assert torch.allclose(g_model, g_hand, atol=1e-5, rtol=1e-4)


def nested_chain(L, x, order):
    """Eq. (1) chained by hand in the order of NVIDIA's nscale_forward: from the largest scale down,
    a scale >= 1.0 fused at its own input size (the running result resized to it first), a scale
    < 1.0 at the image's size; the result at the image's size."""
    P = L[order[0]][0]                                                  # top scale, its own size
    for s in order[1:]:
        p, a = L[s]
        if s >= 1.0:
            P = a * p + (1 - a) * resize(P, p.shape[-2:])
        else:
            U = lambda t: resize(t, x.shape[-2:])
            P = U(a * p) + (1 - U(a)) * resize(P, x.shape[-2:])
    return resize(P, x.shape[-2:])


@pytest.mark.parametrize("scales", [(0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 2.0)])
def test_n_scale_chain_equals_nested_formula(scales):
    model = make_model().eval()
    x = image()
    U = lambda t: resize(t, x.shape[-2:])
    with torch.no_grad():
        L = {s: scale_outputs(model, x, s) for s in scales}
        pair = lambda s, finer: U(L[s][0] * L[s][1]) + (1 - U(L[s][1])) * finer
        if len(scales) == 3:
            expected = pair(0.5, pair(1.0, U(L[2.0][0])))
        else:
            expected = pair(0.25, pair(0.5, pair(1.0, U(L[2.0][0]))))
        got = model.predict(x, scales=tuple(reversed(scales)))          # order of the list is irrelevant
    assert got.shape == (2, K, 33, 47)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("scales", [(0.5, 1.0, 1.5, 2.0), (1.0, 1.5, 2.0), (1.5, 2.0)])
def test_scales_above_one_are_fused_at_their_own_size(scales):
    """Written out for (0.5, 1.0, 1.5, 2.0):
    P = L_2.0;  P = a_1.5 L_1.5 + (1 - a_1.5) D(P)   at 1.5x;  P = a_1 L_1 + (1 - a_1) D(P)   at 1.0x;
    P = U(a_0.5 L_0.5) + (1 - U(a_0.5)) P   at 1.0x (D, U: bilinear down / up)."""
    model = make_model().eval()
    with torch.no_grad():                                              # logits ~10, attention 0.1..0.95
        model.cls_head[-1].weight.mul_(100)
        model.scale_attn.conv2.weight.mul_(30)
    x = image()
    with torch.no_grad():
        L = {s: scale_outputs(model, x, s) for s in scales}
        if scales == (0.5, 1.0, 1.5, 2.0):                              # the case, spelt out
            D = lambda t, s: resize(t, L[s][0].shape[-2:])
            U = lambda t: resize(t, x.shape[-2:])
            P = L[2.0][0]
            P = L[1.5][1] * L[1.5][0] + (1 - L[1.5][1]) * D(P, 1.5)
            P = L[1.0][1] * L[1.0][0] + (1 - L[1.0][1]) * D(P, 1.0)
            expected = U(L[0.5][1] * L[0.5][0]) + (1 - U(L[0.5][1])) * P
            assert torch.allclose(expected, nested_chain(L, x, scales[::-1]), atol=1e-6)
        else:
            expected = nested_chain(L, x, scales[::-1])
        got = model.predict(x, scales=scales)
        # fusing everything at the image's size instead (the order before) gives another result
        at_image = resize(L[2.0][0], x.shape[-2:])
        for s in scales[-2::-1]:
            U = lambda t: resize(t, x.shape[-2:])
            at_image = U(L[s][0] * L[s][1]) + (1 - U(L[s][1])) * at_image
    assert got.shape == (2, K, 33, 47)
    assert torch.allclose(got, expected, atol=1e-4)
    assert (got - at_image).abs().max() > 1e-2                          # 0.04 .. 0.12 here


@pytest.mark.parametrize("value, picked", [(1e4, 0.25), (-1e4, 2.0)])
def test_attention_one_keeps_lowest_scale_zero_keeps_highest(value, picked):
    model = make_model().eval()
    model.scale_attn.conv2 = Constant(value)                               # sigmoid -> exactly 1 or 0
    x = image()
    with torch.no_grad():
        chained = model.predict(x, scales=(0.25, 0.5, 1.0, 2.0))
        single = model.predict(x, scales=(picked,))
        maps = model(x, scales=(0.25, 0.5, 1.0, 2.0))["maps"]
    assert torch.allclose(chained, single, atol=1e-6)
    assert torch.allclose(maps[f"attn_{picked}"], torch.ones_like(maps[f"attn_{picked}"]))


def test_attention_maps_are_weights_that_sum_to_one():
    model = make_model().eval()
    with torch.no_grad():
        maps = model(image(), scales=(0.25, 0.5, 1.0, 2.0))["maps"]
    assert sorted(maps) == ["attn_0.25", "attn_0.5", "attn_1.0", "attn_2.0"]
    stacked = torch.cat(list(maps.values()), 1)                         # (B, S, H, W)
    assert stacked.shape == (2, 4, 33, 47) and stacked.min() >= 0 and stacked.max() <= 1
    assert torch.allclose(stacked.sum(1), torch.ones(2, 33, 47), atol=1e-6)
    assert stacked.std() > 0                                            # not a constant split


def test_saved_maps_are_the_evaluation_scales_attention():
    model = make_model().eval()
    with torch.no_grad():
        maps = model.maps(image(), (1.0, 0.5, 2.0))                     # what --save-maps writes
        by_forward = model(image(), scales=(0.5, 1.0, 2.0))["maps"]
        single = model.maps(image(), (1.0,))                            # one scale: the training pair
    assert sorted(maps) == ["attn_0.5", "attn_1.0", "attn_2.0"]
    assert all(torch.equal(maps[k], by_forward[k]) for k in maps)
    assert sorted(single) == ["attn_0.5", "attn_1.0"]
    assert make_model("average").eval().maps(image(), (0.5, 1.0)) == {}   # no attention head


def test_eval_forward_is_single_scale_and_flip_averages_logits():
    model = make_model().eval()
    x = image()
    with torch.no_grad():
        L1, _ = scale_outputs(model, x, 1.0)
        assert torch.allclose(model(x)["out"], L1, atol=1e-6)
        scales = (0.5, 1.0)
        plain, with_flip = model.predict(x, scales), model.predict(x, scales, flip=True)
        assert not torch.allclose(plain, with_flip, atol=1e-4)               # the flipped view counts
        # averaging a view with its mirror makes the prediction mirror-equivariant (flipped back right)
        assert torch.allclose(model.predict(x.flip(-1), scales, flip=True).flip(-1), with_flip, atol=1e-5)


@pytest.mark.parametrize("size", [(33, 47), (65, 41), (17, 23)])
def test_odd_sizes_and_quarter_scale(size):
    model = make_model().eval()
    x = image(*size, b=1)
    with torch.no_grad():
        for scales in [(0.25,), (0.25, 0.5), (0.25, 0.5, 1.0, 2.0), (0.5, 2.0)]:
            out = model.predict(x, scales=scales, flip=True)
            assert out.shape == (1, K, *size) and torch.isfinite(out).all()


def test_training_step_on_odd_size_gives_every_parameter_a_gradient():
    for mode in ("hierarchical", "explicit"):
        model = make_model(mode).train()
        target = torch.randint(0, K, (2, 33, 47))
        target[:, :5] = common.IGNORE_INDEX
        outputs = model(image())
        terms = model.loss(outputs, target)
        terms["total"].backward()
        scales = [f"scale_{s}" for s in model.train_scales]
        assert set(terms) == {"bce", "rmi", "total", *scales}
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"no gradient for {missing}"


# ----------------------------------------------------------------------------------------------
# Table 1 baselines


def test_explicit_attention_is_softmax_over_scales_of_concatenated_features():
    model = make_model("explicit").eval()
    x = image()
    with torch.no_grad():
        got = model(x, scales=(0.5, 1.0, 2.0))
        feats, logits = [], []
        for s in (0.5, 1.0, 2.0):
            xs = scaled_image(x, s)
            c4 = model.backbone(xs)[3]
            feats.append(c4)
            logits.append(resize(resize(model.cls_head(c4), xs.shape[-2:]), x.shape[-2:]))
        ref = feats[1].shape[-2:]
        w = model.scale_attn(torch.cat([resize(f, ref) for f in feats], 1)).softmax(1)
        w = resize(w, x.shape[-2:])
        expected = w[:, 0:1] * logits[0] + w[:, 1:2] * logits[1] + w[:, 2:3] * logits[2]
    assert torch.allclose(got["out"], expected, atol=1e-5)
    assert torch.allclose(sum(got["maps"].values()), torch.ones(2, 1, 33, 47), atol=1e-6)
    with pytest.raises(InputError):
        model.predict(x, scales=(0.25, 0.5, 1.0, 2.0))                  # not its training scales


def test_average_mode_averages_logits_and_has_no_attention_head():
    model = make_model("average").eval()
    assert not hasattr(model, "scale_attn")
    x = image()
    with torch.no_grad():
        per_scale = [model.predict(x, scales=(s,)) for s in (0.5, 1.0, 2.0)]
        assert torch.allclose(model.predict(x, scales=(0.5, 1.0, 2.0)), sum(per_scale) / 3, atol=1e-6)


def test_bad_scale_configurations_are_refused():
    with pytest.raises(InputError):
        make_model("hierarchical", train_scales=(1.0,))
    with pytest.raises(InputError):
        make_model("explicit", train_scales=(0.5, 2.0))
    with pytest.raises(InputError):
        make_model("average", train_scales=(0.5, 1.0))


def cli_model(*flags, backbone="resnet18", device="cpu", classes=K):
    parser = argparse.ArgumentParser()
    hma.add_args(parser)
    args = parser.parse_args(list(flags))
    args.num_classes, args.backbone, args.stem, args.dilation_style = classes, backbone, "tv", "pspnet"
    args.output_stride, args.multi_grid, args.pretrained, args.method = 8, None, None, "hier_ms_attn"
    with torch.device(device):
        return hma.build_model(args)


def test_add_args_defaults_build_the_paper_model():
    model = cli_model(device="meta")                                    # what was built, not its values
    assert (model.ms_mode, model.train_scales, model.loss_type, model.scale_loss_weight) == \
        ("hierarchical", (0.5, 1.0), "rmi", 0.05)                      # Cityscapes recipe weight
    assert cli_model("--ms-mode", "explicit", device="meta").train_scales == (0.5, 1.0, 2.0)
    assert cli_model("--scale-loss-weight", "0", device="meta").scale_loss_weight == 0      # Mapillary recipe
    assert cli_model("--ms-mode", "average", device="meta").train_scales == (1.0,)


def test_help_shows_the_default_every_flag_takes():
    """--help (train.py's formatter adds argparse's defaults) names no None: a flag that only some models
    read says in its help what it takes when left out, and is then absent from args."""
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hma.add_args(parser)
    text = " ".join(parser.format_help().split())
    flags = [a for a in parser._actions if a.dest != "help"]
    assert "None" not in text and text.count("(default: ") == len(flags) == 10
    for shown in ("deeplab on a ResNet, ocr on an HRNet", "0.5 1.0 hierarchical", "0.5 1.0 2.0 explicit",
                  "(default: 0.05,", "(default: 256)", "(default: 512 256,", "(default: paper)", "(default: ce)"):
        assert shown in text, shown
    assert set(vars(parser.parse_args([]))) == {"ms_mode", "loss", "head_channels"}


def test_flags_saved_as_none_by_earlier_checkpoints_mean_left_out():
    """Checkpoints written while these flags defaulted to None rebuild the default model."""
    parser = argparse.ArgumentParser()
    hma.add_args(parser)
    args = parser.parse_args(["--ms-mode", "average"])
    for name in hma.ONLY_SOME:
        setattr(args, name, None)
    args.num_classes, args.backbone, args.stem, args.dilation_style = K, "resnet18", "tv", "pspnet"
    args.output_stride, args.multi_grid, args.pretrained, args.method = 8, None, None, "hier_ms_attn"
    with torch.device("meta"):
        model = hma.build_model(args)
    assert (model.decoder, model.train_scales, model.scale_loss_weight) == ("deeplab", (1.0,), 0.05)


@pytest.mark.parametrize("flags", [["--scale-loss-weight", "0.05"], ["--scale-loss-weight", "0"],
                                   ["--train-scales", "1.0"]])
def test_flags_that_change_nothing_in_average_mode_are_refused(flags):
    with pytest.raises(InputError, match="would change nothing"):
        cli_model("--ms-mode", "average", *flags)


def test_defaults_pick_the_papers_decoder_for_each_trunk():
    """Table 1's caption: DeepLab V3+ on ResNet-50; Sec. 3.1: HRNet-OCR, the paper's semantic head, CE aux."""
    resnet = cli_model(device="meta")
    assert resnet.decoder == "deeplab" and isinstance(resnet.final, nn.Sequential)
    hrnet = cli_model("--ocr-channels", "32", "16", backbone="hrnet18-small", device="meta")
    assert (hrnet.decoder, hrnet.aux_loss) == ("ocr", "ce")
    assert isinstance(hrnet.ocr.cls_head, nn.Sequential) and hrnet.ocr.cls_head[-1].bias is None
    code = cli_model("--cls-head", "code", "--ocr-channels", "32", "16", backbone="hrnet18-small", device="meta")
    assert isinstance(code.ocr.cls_head, nn.Conv2d) and code.ocr.cls_head.bias is not None
    assert cli_model("--decoder", "none", device="meta").cls_head[0].in_channels == 512   # layer4


@pytest.mark.parametrize("flags, backbone, match", [
    (["--decoder", "ocr"], "resnet18", "needs --backbone"),
    (["--decoder", "deeplab"], "hrnet18-small", "DeepLab V3\\+ on a ResNet"),
    (["--cls-head", "code"], "resnet18", "--cls-head would change nothing"),
    (["--aux-loss", "bce"], "resnet18", "--aux-loss would change nothing"),
    (["--decoder", "none", "--ocr-channels", "8", "8"], "hrnet18-small", "--ocr-channels would change nothing"),
    (["--aspp-channels", "64"], "hrnet18-small", "--aspp-channels would change nothing"),
    (["--decoder", "none", "--aspp-channels", "64"], "resnet18", "--aspp-channels would change nothing")])
def test_decoder_flags_that_cannot_apply_are_refused(flags, backbone, match):
    with pytest.raises(InputError, match=match):
        cli_model(*flags, backbone=backbone, device="meta")


def parameters(model):
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def nvidia_mscale_ocr_w48():
    """MscaleOCR as NVIDIA releases it (HRNet-W48, 19 classes, its 1x1 cls_head), on the meta device:
    built once for the two tests below, which only read its structure."""
    return cli_model("--cls-head", "code", backbone="hrnet48", device="meta", classes=19)


def test_parameter_counts_equal_the_authors_models():
    """NVIDIA/semantic-segmentation network/ocrnet.py MscaleOCR and OCRNet (HRNet-W48, 19 classes, its
    1x1 cls_head) and network/mscale.py MscaleV3Plus (ResNet-50, 19 classes), counted on their classes."""
    ocr = nvidia_mscale_ocr_w48()
    assert parameters(ocr) == 72_143_430
    ocrnet = cli_model("--cls-head", "code", "--ms-mode", "average", backbone="hrnet48", device="meta", classes=19)
    assert parameters(ocrnet) == 70_372_678
    assert parameters(ocr.scale_attn) == 1_770_752 and parameters(ocrnet.backbone) == 65_325_120
    assert parameters(cli_model(backbone="resnet50", device="meta", classes=19)) == 41_642_560


def test_module_names_are_nvidias_state_dict_keys():
    """A released file loads after dropping 'module.': NVIDIA's MscaleOCR W48 holds 1,830 backbone,
    60 ocr and 13 scale_attn entries; a few of them with their shapes."""
    state = nvidia_mscale_ocr_w48().state_dict()
    heads = [k.split(".")[0] for k in state]
    assert (len(state), heads.count("backbone"), heads.count("ocr"), heads.count("scale_attn")) == (1903, 1830, 60, 13)
    expected = {"ocr.conv3x3_ocr.0.bias": (512,), "ocr.conv3x3_ocr.1.0.running_var": (512,),
                "ocr.ocr_distri_head.object_context_block.f_pixel.2.weight": (256, 256, 1, 1),
                "ocr.ocr_distri_head.object_context_block.f_up.1.0.weight": (512,),
                "ocr.ocr_distri_head.conv_bn_dropout.0.weight": (512, 1024, 1, 1),
                "ocr.cls_head.weight": (19, 512, 1, 1), "ocr.aux_head.0.weight": (720, 720, 1, 1),
                "ocr.aux_head.2.bias": (19,), "scale_attn.conv0.weight": (256, 512, 3, 3),
                "scale_attn.bn1.running_mean": (256,), "scale_attn.conv2.weight": (1, 256, 1, 1)}
    assert {k: tuple(state[k].shape) for k in expected} == expected
    deeplab = cli_model(backbone="resnet50", device="meta", classes=19).state_dict()
    convs = {k: tuple(v.shape) for k, v in deeplab.items() if k.endswith("weight") and v.dim() == 4
             and not k.startswith("backbone.")}
    assert convs == {"aspp.img_conv.0.weight": (256, 2048, 1, 1), "aspp.features.0.0.weight": (256, 2048, 1, 1),
                     **{f"aspp.features.{i}.0.weight": (256, 2048, 3, 3) for i in (1, 2, 3)},
                     "bot_aspp.weight": (256, 1280, 1, 1), "bot_fine.weight": (48, 256, 1, 1),
                     "final.0.weight": (256, 304, 3, 3), "final.3.weight": (256, 256, 3, 3),
                     "final.6.weight": (19, 256, 1, 1), "scale_attn.conv0.weight": (256, 304, 3, 3),
                     "scale_attn.conv1.weight": (256, 256, 3, 3), "scale_attn.conv2.weight": (1, 256, 1, 1)}


class Impulse(nn.Module):
    """Stands in for the semantic head: logits 1 at stride-s sample (j, i) of every class, else 0."""

    def __init__(self, j, i):
        super().__init__()
        self.j, self.i = j, i

    def forward(self, x):
        out = x.new_zeros(x.shape[0], K, *x.shape[-2:])
        out[:, :, self.j, self.i] = 1
        return out


@pytest.mark.parametrize("decoder, stride", [("none", 8), ("deeplab", 4), ("ocr", 4)])
def test_a_strided_logit_lands_where_nvidias_upsampling_puts_it(decoder, stride):
    """Issue of alignment: a stride-s sample j is computed at input pixel s*j, but HMSA keeps NVIDIA's
    align_corners=False so that its weights give its outputs: the sample lands centred on s*j + (s-1)/2
    (8j + 3.5 at stride 8), a bilinear hat of half-width s, 1 - 0.5/s at the two pixels beside the
    centre and 1 - (s-1)/(2s) on pixel s*j itself."""
    model = make_model("average", decoder=decoder).eval()
    j, i = 3, 5
    impulse = Impulse(j, i)
    if decoder == "none":
        model.cls_head = impulse
    elif decoder == "deeplab":
        model.final = impulse
    else:
        model.ocr.cls_head = impulse
    with torch.no_grad():
        out = model.predict(torch.randn(1, 3, 64, 96))[0, 0]           # (64, 96)
    centre = stride * j + (stride - 1) / 2, stride * i + (stride - 1) / 2
    rows, cols = (out == out.max()).nonzero().T
    assert rows.float().mean().item() == centre[0] and cols.float().mean().item() == centre[1]
    assert out.max().item() == (1 - 0.5 / stride) ** 2
    assert out[stride * j, stride * i].item() == (1 - (stride - 1) / (2 * stride)) ** 2   # not the peak


def test_images_at_a_scale_are_floored_as_nvidias_resizex():
    x = torch.randn(1, 3, 33, 47)
    assert scaled_image(x, 0.5).shape[-2:] == (16, 23)                  # round() would give 24
    assert scaled_image(x, 1.0) is x and scaled_image(x, 0.01).shape[-2:] == (1, 1)


# ----------------------------------------------------------------------------------------------
# DeepLab V3+ (Table 1) and HRNet-OCR (Sec. 3.1)


def test_deeplab_decoder_trains_on_one_image_per_process():
    """Sec. 5.1 trains one image per GPU: without SyncBN the ASPP's pooled 1x1 map has one value per
    channel, and its BN (galdv1.pooled_conv_bn_relu) normalises with the running statistics."""
    model = make_model(decoder="deeplab").train()
    outputs = model(image(b=1))
    model.loss(outputs, labels(b=1))["total"].backward()
    assert torch.isfinite(outputs["out"]).all() and model.aspp.img_conv[0].weight.grad.abs().sum() > 0
    assert model.aspp.img_conv[1].num_batches_tracked.item() == 0        # one value: statistics kept


def test_deeplab_decoder_is_the_304_channel_stride_4_feature():
    model = make_model(decoder="deeplab").eval()
    x = image()
    with torch.no_grad():
        c1, _, _, c4 = model.backbone(x)
        logits, aux, feats = model.decode([c1, None, None, c4])
        pooled = model.aspp.img_conv(c4.mean((2, 3), keepdim=True))      # (B, 16, 1, 1)
        pyramid = torch.cat([pooled.expand(-1, -1, *c4.shape[-2:])] + [f(c4) for f in model.aspp.features], 1)
        by_hand = torch.cat([model.bot_fine(c1), resize(model.bot_aspp(pyramid), c1.shape[-2:])], 1)
    assert aux is None and feats.shape == (2, 48 + 16, 9, 12)           # stride 4 of 33 x 47
    assert torch.allclose(feats, by_hand, atol=1e-5)
    assert torch.allclose(logits, model.final(by_hand), atol=1e-5)


def test_object_regions_are_softmax_weighted_sums_of_pixels():
    """OCR Eq. (1), one region at a time: f_k = sum_i softmax_i(m_k)_i x_i."""
    torch.manual_seed(6)
    feats, aux = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(2, K, 3, 4, dtype=torch.float64)
    got = hma.object_regions(feats, aux)                                # (2, 5, K, 1)
    for b in range(2):
        for k in range(K):
            m = aux[b, k].flatten().softmax(0)                          # (12,)
            expected = sum(m[n] * feats[b, :, n // 4, n % 4] for n in range(12))
            assert torch.allclose(got[b, :, k, 0], expected)


def test_object_context_is_eqs_2_and_3_pixel_by_pixel():
    """OCR Eq. (2): w_ik = softmax_k(phi(x_i) . psi(f_k) / sqrt(C')); Eq. (3): y_i = rho(sum_k w_ik
    delta(f_k)), written with explicit loops over pixels and regions."""
    torch.manual_seed(7)
    block = hma.ObjectContext(6, 4).double().eval()
    for m in block.modules():                                           # BN not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    x, regions = torch.randn(1, 6, 2, 3, dtype=torch.float64), torch.randn(1, 6, K, 1, dtype=torch.float64)
    with torch.no_grad():
        got = block(x, regions)
        phi, psi, delta = block.f_pixel(x)[0], block.f_object(regions)[0, :, :, 0], block.f_down(regions)[0, :, :, 0]
        context = torch.zeros(1, 4, 2, 3, dtype=torch.float64)
        for r in range(2):
            for c in range(3):
                w = torch.stack([phi[:, r, c] @ psi[:, k] / 2 for k in range(K)]).softmax(0)
                context[0, :, r, c] = sum(w[k] * delta[:, k] for k in range(K))
        expected = block.f_up(context)
    assert torch.allclose(got, expected)


def test_ocr_aux_logits_are_fused_by_the_same_attention_and_weighted_04():
    """Training (dropout off for the by-hand pass): 'aux' = Eq. (1) on the aux logits with the 0.5x
    attention; the loss adds 0.4 x CE(aux) (Sec. 5.1), or 0.4 x sigmoid BCE with aux_loss='bce'."""
    for aux_loss in ("ce", "bce"):
        model = make_model(decoder="ocr", aux_loss=aux_loss).train()
        model.ocr.ocr_distri_head.conv_bn_dropout[2].p = 0
        x, target = image(), labels()
        outputs = model(x)
        U = lambda t: resize(t, x.shape[-2:])
        per_scale = {}
        for s in (0.5, 1.0):
            xs = scaled_image(x, s)
            logits, aux, feats = model.decode(model.backbone(xs))
            per_scale[s] = resize(aux, xs.shape[-2:]), resize(model.scale_attn(feats).sigmoid(), xs.shape[-2:])
        (aux05, a05), (aux1, _) = per_scale[0.5], per_scale[1.0]
        assert torch.allclose(outputs["aux"], U(aux05 * a05) + (1 - U(a05)) * aux1, atol=1e-5)
        terms = model.loss(outputs, target)
        aux_expected = (nn.functional.cross_entropy(outputs["aux"].double(), target, ignore_index=255)
                        if aux_loss == "ce" else bce_by_hand(outputs["aux"], target))
        assert torch.allclose(terms["aux"].double(), aux_expected, rtol=1e-5)
        main = 0.5 * terms["bce"] + 0.5 * terms["rmi"]
        per_scale = terms["scale_0.5"] + terms["scale_1.0"]
        assert torch.allclose(terms["total"], main + 0.4 * terms["aux"] + 0.05 * per_scale)


@pytest.mark.parametrize("decoder, mode, kw", [("ocr", "hierarchical", {}), ("ocr", "explicit", {"cls_head": "code"}),
                                               ("ocr", "average", {}), ("deeplab", "hierarchical", {}),
                                               ("deeplab", "explicit", {}), ("deeplab", "average", {})])
def test_every_decoder_trains_every_parameter_and_evaluates_any_scales(decoder, mode, kw):
    model = make_model(mode, decoder=decoder, **kw).train()
    outputs = model(image())
    assert ("aux" in outputs) == (decoder == "ocr")
    model.loss(outputs, labels())["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    model.eval()
    scales = model.train_scales if mode == "explicit" else (0.25, 0.5, 1.0, 2.0)
    with torch.no_grad():
        out = model(image(), scales=scales)
    assert set(out) == ({"out"} if mode == "average" else {"out", "maps"})
    assert out["out"].shape == (2, K, 33, 47) and torch.isfinite(out["out"]).all()


# ----------------------------------------------------------------------------------------------
# Per-scale supervision, attention-head statistics, what evaluation builds


def bce_by_hand(logits, target):
    """-(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))), summed over classes and valid pixels,
    / (#valid + 1), in float64."""
    valid = (target != 255).double()[:, None]                           # (B, 1, H, W)
    y = torch.stack([(target == k).double() for k in range(logits.shape[1])], 1)
    sig = logits.double().sigmoid()
    return (-(y * sig.log() + (1 - y) * (1 - sig).log()) * valid).sum() / (valid.sum() + 1)


@pytest.mark.parametrize("loss", ["rmi", "ce"])
def test_each_scale_is_supervised_with_the_criterion_without_rmi(loss):
    model = make_model(loss=loss).train()
    x, target = image(), labels()
    outputs = model(x)
    assert sorted(outputs["scale_logits"]) == ["0.5", "1.0"]
    L05, _ = scale_outputs(model, x, 0.5)
    L1, _ = scale_outputs(model, x, 1.0)
    own = {"0.5": resize(L05, x.shape[-2:]), "1.0": L1}                 # each at the image's size
    terms = model.loss(outputs, target)
    main = 0.5 * terms["bce"] + 0.5 * terms["rmi"] if loss == "rmi" else terms["ce"]
    for s, logits in own.items():
        assert torch.allclose(outputs["scale_logits"][s], logits, atol=1e-5)
        if loss == "rmi":                                               # sigmoid BCE, as do_rmi=False
            expected = bce_by_hand(logits, target)
        else:                                                           # plain CE with --loss ce
            expected = nn.functional.cross_entropy(logits.double(), target, ignore_index=255)
        assert torch.allclose(terms[f"scale_{s}"].double(), expected, rtol=1e-5)
    expected_total = main + 0.05 * (terms["scale_0.5"] + terms["scale_1.0"])
    assert torch.allclose(terms["total"], expected_total)


def test_scale_loss_weight_zero_builds_no_per_scale_outputs():
    model = make_model(scale_loss_weight=0).train()
    outputs = model(image())
    assert "scale_logits" not in outputs
    assert set(model.loss(outputs, labels())) == {"bce", "rmi", "total"}


def test_attention_head_bn_statistics_see_both_training_scales():
    """The attention head runs on the 1.0x training branch too (its output unused), so its running
    statistics are updated by the 0.5x features, then the 1.0x ones (momentum 0.1)."""
    model = make_model().train()
    x = image()
    bn = model.scale_attn.bn0
    model(x)
    assert bn.num_batches_tracked.item() == 2
    conv = model.scale_attn.conv0
    with torch.no_grad():
        mean = {s: conv(model.backbone(scaled_image(x, s))[3]).mean((0, 2, 3))
                for s in (0.5, 1.0)}                                   # (C,) batch means of the BN input
    expected = 0.9 * (0.1 * mean[0.5]) + 0.1 * mean[1.0]
    assert torch.allclose(bn.running_mean, expected, atol=1e-5)
    model.eval()
    with torch.no_grad():
        model.predict(x, scales=(0.5, 1.0, 2.0))
    assert bn.num_batches_tracked.item() == 2                           # eval leaves them alone


class InterpolateCalls:
    """Records the output shape of every F.interpolate call."""

    def __init__(self, monkeypatch):
        self.shapes, original = [], F.interpolate

        def counted(*args, **kwargs):
            out = original(*args, **kwargs)
            self.shapes.append(tuple(out.shape))
            return out
        monkeypatch.setattr(F, "interpolate", counted)


def test_evaluation_builds_no_per_scale_full_size_logits(monkeypatch):
    """In eval, predict resizes logits to the image's size only where the chain needs them: the
    running result from 2.0x down to 1.0x and a_0.5 * L_0.5 up to 1.0x. Training (with a per-scale
    loss) also resizes each scale's own logits to the image's size."""
    model = make_model().eval()
    x = image()
    calls = InterpolateCalls(monkeypatch)
    with torch.no_grad():
        model.predict(x, scales=(0.5, 1.0, 2.0))
        assert set(model.fuse(x, (0.5, 1.0, 2.0))) == {"out"}
    full_size_logits = [s for s in calls.shapes if s == (2, K, 33, 47)]
    # per call: L_1.0 up to its (the image's) size, the 2.0x result down, a_0.5 * L_0.5 up
    assert len(full_size_logits) == 2 * 3                               # predict + fuse
    calls.shapes.clear()
    model.train()
    outputs = model(x)
    assert sorted(outputs["scale_logits"]) == ["0.5", "1.0"]
    # L_1.0 up, Eq. (1)'s a_0.5 * L_0.5 up, and L_0.5 itself for its own loss
    assert len([s for s in calls.shapes if s == (2, K, 33, 47)]) == 3


# ----------------------------------------------------------------------------------------------
# RMI


def slow_avg_pool(m, pool):
    """(H, W) -> (H', W'): mean of each pool x pool window of the zero-padded map (pad pool // 2)."""
    H, W = m.shape
    pad = pool // 2
    padded = torch.zeros(H + 2 * pad, W + 2 * pad, dtype=torch.float64)
    padded[pad:pad + H, pad:pad + W] = m
    rows = range((H + 2 * pad - pool) // pool + 1)
    cols = range((W + 2 * pad - pool) // pool + 1)
    return torch.stack([torch.stack([padded[i * pool:(i + 1) * pool, j * pool:(j + 1) * pool].mean()
                                     for j in cols]) for i in rows])


def slow_windows(m, radius):
    """(H, W) -> (N, radius^2): every radius x radius window, row by row."""
    H, W = m.shape
    return torch.stack([m[i:i + radius, j:j + radius].reshape(-1)
                        for i in range(H - radius + 1) for j in range(W - radius + 1)])


def rmi_reference(logits, target, radius=3, pool=4, alpha=5e-4):
    """Slow RMI: one (image, class) at a time, explicit pooling windows and neighbourhoods,
    torch.logdet; the code's 0.5 * log det(Sigma_Y|P + alpha I) minus its value for Sigma_Y|P = 0."""
    B, C, H, W = logits.shape
    D = radius * radius
    eye = torch.eye(D, dtype=torch.float64)
    valid = (target != 255).double()
    total = 0.0
    for k in range(C):
        per_image = []
        for b in range(B):
            y = (target[b] == k).double() * valid[b]
            p = logits[b, k].double().sigmoid() * valid[b] + 1e-6
            Y, P = (slow_windows(slow_avg_pool(m, pool), radius) for m in (y, p))   # (N, D)
            Y, P = Y - Y.mean(0), P - P.mean(0)
            cond = Y.T @ Y - (Y.T @ P) @ torch.linalg.inv(P.T @ P + alpha * eye) @ (P.T @ Y)
            per_image.append(0.5 * torch.logdet(cond + alpha * eye) - 0.5 * D * math.log(alpha))
        total = total + torch.stack(per_image).mean() / D
    onehot = torch.stack([(target == k).double() for k in range(C)], 1)
    sig = logits.double().sigmoid()
    bce = -(onehot * sig.log() + (1 - onehot) * (1 - sig).log()) * valid[:, None]
    return bce.sum() / (valid.sum() + 1), total


def labels(h=33, w=47, b=2):
    torch.manual_seed(2)
    t = torch.zeros(b, h, w, dtype=torch.long)
    t[:, :, 20:] = 1
    t[:, 10:25, 5:15] = 2
    t[-1, 25:] = 3
    t[0, :4, :9] = 255
    return t


def test_rmi_matches_slow_per_class_reference_values_and_gradients():
    torch.manual_seed(3)
    logits = (2 * torch.randn(2, K, 33, 47)).requires_grad_(True)
    target = labels()
    bce, rmi = hma.rmi_loss(logits, target)
    g = torch.autograd.grad(0.5 * bce + 0.5 * rmi, logits)[0]
    ref_bce, ref_rmi = rmi_reference(logits, target)
    g_ref = torch.autograd.grad(0.5 * ref_bce + 0.5 * ref_rmi, logits)[0]
    assert torch.allclose(bce.double(), ref_bce, rtol=1e-5)
    assert torch.allclose(rmi.double(), ref_rmi, rtol=1e-5)
    assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())


def test_rmi_finite_non_negative_and_small_only_for_a_perfect_prediction():
    target = labels()
    onehot = torch.nn.functional.one_hot(target.clamp(max=K - 1), K).permute(0, 3, 1, 2).float()
    perfect = 20 * (2 * onehot - 1)
    wrong = perfect.roll(1, dims=1)                                     # every pixel given another class
    torch.manual_seed(4)
    noisy = torch.randn(2, K, 33, 47)
    values = {}
    for name, logits in [("perfect", perfect), ("wrong", wrong), ("noisy", noisy)]:
        bce, rmi = hma.rmi_loss(logits, target)
        assert torch.isfinite(bce) and torch.isfinite(rmi) and rmi >= 0 and bce >= 0
        values[name] = rmi.item()
    # perfect: Sigma_Y|P = Sigma_Y alpha (Sigma_Y + alpha)^-1 <= alpha I, so at most 0.5 log 2 per class
    assert values["perfect"] <= K * 0.5 * math.log(2)
    assert values["wrong"] > 5 * values["perfect"] and values["noisy"] > 5 * values["perfect"]


@pytest.mark.parametrize("case", ["flat_prediction", "flat_labels", "all_ignored"])
def test_rmi_has_no_nan_on_degenerate_inputs(case):
    logits = torch.zeros(2, K, 33, 47, requires_grad=True)              # flat prediction
    target = labels()
    if case == "flat_labels":
        target = torch.ones_like(target)
    if case == "all_ignored":
        target = torch.full_like(target, 255)
    bce, rmi = hma.rmi_loss(logits, target)
    (grad,) = torch.autograd.grad(bce + rmi, logits)
    assert torch.isfinite(bce) and torch.isfinite(rmi) and rmi >= 0 and torch.isfinite(grad).all()


def test_rmi_ignores_autocast():
    torch.manual_seed(5)
    logits = torch.randn(1, K, 33, 47)
    target = labels(b=1)
    plain = hma.rmi_loss(logits, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = hma.rmi_loss(logits, target)
    for a, b in zip(plain, under_autocast):
        assert b.dtype == torch.float32 and torch.allclose(a, b)


class Float64Outputs(TorchFunctionMode):
    """Records the shape of every float64 tensor a torch function returns (the forward; the backward
    of each op runs in its forward's dtypes)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.shapes.append(tuple(t.shape))
        return out


def test_rmi_is_float64_only_from_the_pooled_region_vectors_on():
    """Sigmoid, mask and 4x4 pooling run in float32 on the (B, K, H, W) map; float64 starts at the
    pooled maps / region vectors (values and gradients against float64: the reference test above)."""
    torch.manual_seed(3)
    logits = torch.randn(1, K, 33, 47, requires_grad=True)
    mode = Float64Outputs()
    with mode:
        bce, rmi = hma.rmi_loss(logits, labels(b=1))
        (0.5 * bce + 0.5 * rmi).backward()
    assert mode.shapes, "no float64 at all: the covariances and the Cholesky must stay float64"
    pooled = (33 + 2 * 2 - 4) // 4 + 1, (47 + 2 * 2 - 4) // 4 + 1       # (9, 12)
    biggest = max(math.prod(shape) for shape in mode.shapes)
    assert biggest <= K * 9 * (pooled[0] - 2) * (pooled[1] - 2)          # the (B, K, 9, N) region vectors
    assert not any(shape[-2:] == (33, 47) for shape in mode.shapes)
    assert logits.grad.dtype == torch.float32
