"""HRNetV2 (common.HRNet): the authors' sizes and key layout, the fuse layers and the stride-4 feature,
the ImageNet file's strict loading, and the flags and methods that refuse it."""
import argparse
import hashlib
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import train


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: one intra-op thread

SMALL = common.HRNET_LAYOUTS["hrnet18-small"]


def small_hrnet(seed=0):
    torch.manual_seed(seed)
    return common.HRNet(**SMALL)


def layout_digest(state):
    """sha256 of the sorted lines 'key (shape)': one number for a whole key layout."""
    text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(state.items()))
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Structure: the authors' counts and key names (built on the meta device: no memory, no time)


# HRNet/HRNet-Image-Classification cls_hrnet.HighResolutionNet without its classification head
# (= NVIDIA/semantic-segmentation network/hrnetv2.py), counted with the authors' classes.
AUTHORS_TRUNK_PARAMETERS = {"hrnet48": 65_325_120, "hrnet32": 29_305_536, "hrnet18": 9_562_260,
                            "hrnet18-small": 1_477_920}


@pytest.mark.parametrize("name", list(AUTHORS_TRUNK_PARAMETERS))
def test_parameter_counts_equal_the_authors(name):
    with torch.device("meta"):
        net = common.HRNet(**common.HRNET_LAYOUTS[name])
    assert sum(p.numel() for p in net.parameters()) == AUTHORS_TRUNK_PARAMETERS[name]
    assert len(net.state_dict()) == (426 if name == "hrnet18-small" else 1830)


# The digests of the authors' trunks: hrnetv2_w48_imagenet_pretrained.pth's 1,830 trunk entries, and
# cls_hrnet.py built with experiments/cls_hrnet_w18_small_v1_*.yaml (the head's entries left out).
AUTHORS_LAYOUT_DIGEST = {"hrnet48": "a15582e4b1c873d8ddff11c19c4ed2f615ea2e042db996854e1fe5d843f7fab8",
                         "hrnet18-small": "3dc8980516c8b07d34bc18954545295ba98b0a6de435c0c6e9238df8bfd1f2a1"}


@pytest.mark.parametrize("name", list(AUTHORS_LAYOUT_DIGEST))
def test_every_key_and_shape_is_the_authors(name):
    with torch.device("meta"):
        state = common.HRNet(**common.HRNET_LAYOUTS[name]).state_dict()
    assert layout_digest(state) == AUTHORS_LAYOUT_DIGEST[name]


def test_a_few_of_the_authors_keys_read_as_they_do():
    """The same layout in words: the new branch's transition nests once more; a 3-step strided path
    from branch 0 to branch 3 ends in a conv to the coarse width; the up path is a 1x1 conv."""
    with torch.device("meta"):
        state = common.HRNet().state_dict()
    shapes = {"layer1.0.downsample.0.weight": (256, 64, 1, 1), "transition1.0.0.weight": (48, 256, 3, 3),
              "transition1.1.0.0.weight": (96, 256, 3, 3), "transition3.3.0.0.weight": (384, 192, 3, 3),
              "stage3.3.branches.2.3.conv2.weight": (192, 192, 3, 3),
              "stage4.2.fuse_layers.3.0.1.0.weight": (48, 48, 3, 3),
              "stage4.2.fuse_layers.3.0.2.0.weight": (384, 48, 3, 3),
              "stage4.2.fuse_layers.0.3.0.weight": (48, 384, 1, 1)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert not any(k.startswith("transition2.0") or k.startswith("transition2.1") for k in state)


# ----------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("size", [(64, 64), (70, 50)])
def test_four_branches_at_strides_4_to_32_and_the_concat_at_stride_4(size):
    net = small_hrnet().eval()
    H, W = size
    with torch.no_grad():
        feats = net(torch.randn(2, 3, H, W))
    assert net.channels == (16, 32, 64, 128) and net.strides == (4, 8, 16, 32)
    for f, c, s in zip(feats, net.channels, net.strides):
        assert f.shape == (2, c, -(-H // s), -(-W // s))
    assert common.hrnet_features(feats).shape == (2, 240, -(-H // 4), -(-W // 4))


def test_the_concat_is_b1_and_the_others_bilinear_without_aligned_corners():
    """NVIDIA network/hrnetv2.py's head: its released weights need exactly this up-sampling."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, c, 16 // 2 ** i, 12 // 2 ** i, generator=g) for i, c in enumerate((3, 4, 5, 6))]
    out = common.hrnet_features(feats)
    assert torch.equal(out[:, :3], feats[0])
    bounds = (3, 7, 12, 18)
    for f, start, end in zip(feats[1:], bounds, bounds[1:]):
        expected = F.interpolate(f, size=(16, 12), mode="bilinear", align_corners=False)
        assert torch.allclose(out[:, start:end], expected, atol=1e-6)


def test_a_fuse_layer_sums_every_branch_brought_to_each_resolution_then_relu():
    """Branch 0 gets the others 1x1-convolved and bilinearly up-sampled (align_corners=False, to its
    exact size); branch 2 gets branch 0 through two stride-2 3x3 convs (BN and ReLU between, none
    after the last) and branch 1 through one."""
    module = common.HRModule((4, 6, 8), blocks=1).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        xs = [torch.randn(1, c, h, w, generator=g) for c, (h, w) in zip((4, 6, 8), ((13, 11), (7, 6), (4, 3)))]
        out = module.fuse(xs)
        paths = module.fuse_layers
        up = lambda y, x: F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        assert torch.allclose(out[0], F.relu(xs[0] + up(paths[0][1](xs[1]), xs[0]) + up(paths[0][2](xs[2]), xs[0])))
        assert torch.allclose(out[2], F.relu(paths[2][0](xs[0]) + paths[2][1](xs[1]) + xs[2]))
    down = paths[2][0]
    assert [type(m) for m in down[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert [type(m) for m in down[1]] == [nn.Conv2d, nn.BatchNorm2d]
    assert down[0][0].stride == down[1][0].stride == (2, 2) and down[1][0].out_channels == 8
    assert [type(m) for m in paths[0][2]] == [nn.Conv2d, nn.BatchNorm2d] and paths[0][2][0].kernel_size == (1, 1)


def test_every_parameter_gets_a_gradient():
    net = small_hrnet()
    common.hrnet_features(net(torch.randn(2, 3, 64, 64))).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"No gradient for {name}"


# ----------------------------------------------------------------------------------------------
# The ImageNet file: a state dict in the authors' layout, written here


def imagenet_head_names():
    """The 126 entries of cls_hrnet.py's classification head: per branch an incre_modules Bottleneck
    with a downsample, three downsamp_modules (conv with bias, BN), final_layer (the same), the
    classifier (Linear). They are dropped by name, so a placeholder value stands for each."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = []
    for i in range(4):
        for conv, norm in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("downsample.0", "downsample.1")):
            names += [f"incre_modules.{i}.0.{conv}.weight"] + [f"incre_modules.{i}.0.{norm}.{b}" for b in bn]
    for layer in [f"downsamp_modules.{i}" for i in range(3)] + ["final_layer"]:
        names += [f"{layer}.0.weight", f"{layer}.0.bias"] + [f"{layer}.1.{b}" for b in bn]
    return names + ["classifier.weight", "classifier.bias"]


def imagenet_file(path, trunk, drop=None, rename=None):
    """Write an ImageNet file of `trunk`'s keys (random values) plus the head; returns the trunk's part."""
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3
             for k, v in trunk.state_dict().items()}
    written = {**state, **{name: torch.zeros(1) for name in imagenet_head_names()}}
    if drop:
        del written[drop]
    if rename:
        written[rename + "_renamed"] = written.pop(rename)
    torch.save(written, path)
    return state


def hrnet_args(backbone="hrnet18-small", pretrained=None, method="specialize_fuse"):
    return argparse.Namespace(backbone=backbone, pretrained=pretrained, method=method)


def test_the_imagenet_file_loads_strictly_and_names_what_it_drops(tmp_path, capsys):
    assert len(imagenet_head_names()) == 126
    path = str(tmp_path / "hrnet_w18_small_v1_imagenet.pth")
    state = imagenet_file(path, small_hrnet(1))
    net = common.build_backbone(hrnet_args(pretrained=path), hrnet=True)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "426 trunk entries loaded" in printed[0] and "126 entries" in printed[0]
    assert "incre_modules, downsamp_modules, final_layer, classifier" in printed[0]


@pytest.mark.parametrize("damage", ["drop", "rename", "other width"])
def test_a_wrong_file_fails_in_one_line_and_loads_nothing(tmp_path, damage):
    key = "stage4.0.fuse_layers.3.0.2.1.running_var"
    path = str(tmp_path / "w.pth")
    imagenet_file(path, small_hrnet(1), drop=key if damage == "drop" else None,
                  rename=key if damage == "rename" else None)
    net = small_hrnet() if damage != "other width" else common.HRNet(**{**SMALL, "widths": (8, 16, 32, 64)})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(common.InputError) as err:
        common.load_pretrained(net, path)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and path in message and "HRNetV2" in message
    expected = {"drop": "1 missing key", "rename": "1 unexpected key", "other width": "mis-shaped keys"}[damage]
    assert expected in message and (key in message or damage == "other width")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ----------------------------------------------------------------------------------------------
# Flags and methods that refuse HRNet


def fails(capsys, argv, *expected):
    """train.cli: exit code 2 and one `error:` line holding every string of `expected`."""
    assert train.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"


TINY = ["--dataset", "synthetic", "--backbone", "hrnet18-small", "--crop-size", "32", "--batch-size", "2",
        "--synthetic-size", "40", "--synthetic-length", "4", "--synthetic-val-length", "2", "--workers", "0",
        "--device", "cpu", "--iters", "1"]


@pytest.mark.parametrize("flag", [["--stem", "deep"], ["--output-stride", "16"], ["--multi-grid", "1", "2", "4"],
                                  ["--dilation-style", "torchvision"]])
def test_resnet_flags_are_refused_with_hrnet(tmp_path, capsys, flag):
    fails(capsys, TINY + ["--out", str(tmp_path)] + flag, flag[0], "--backbone hrnet18-small")
    assert not os.listdir(tmp_path)                                       # refused before any work


def test_resnet_flags_at_their_defaults_pass_with_hrnet():
    args = train.parse_args(TINY + ["--stem", "tv", "--output-stride", "8", "--dilation-style", "pspnet"])
    assert args.backbone == "hrnet18-small"


@pytest.mark.parametrize("method", ["fcn", "galdv1", "galdv2", "denoised_nl"])
def test_methods_on_stride_8_features_refuse_hrnet(tmp_path, capsys, method):
    fails(capsys, ["--method", method] + TINY + ["--out", str(tmp_path)], f"--method {method}",
          "--backbone hrnet18-small")


def test_a_caller_that_takes_hrnet_gets_it_and_a_resnet_stays_a_resnet():
    assert isinstance(common.build_backbone(hrnet_args(), hrnet=True), common.HRNet)
    with pytest.raises(common.InputError, match="--method galdv1"):
        common.build_backbone(hrnet_args(method="galdv1"))
    args = train.parse_args(["--backbone", "resnet18"])
    assert isinstance(common.build_backbone(args, hrnet=True), common.ResNet)
