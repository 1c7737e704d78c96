"""Checks of common.py: backbone, weight loading, losses, metrics, schedule, transforms, inference, data."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common

# ----------------------------------------------------------------------------------------------
# Backbone


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("stem", ["tv", "deep"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_backbone_shapes(depth, stem, output_stride):
    net = common.ResNet(depth, output_stride, stem)
    feats = net(torch.randn(1, 3, 64, 64))
    expected_strides = [4, 8, min(16, output_stride), output_stride]
    for f, ch, s in zip(feats, net.channels, expected_strides):
        assert f.shape == (1, ch, 64 // s, 64 // s)


def test_dilations_follow_the_authors_by_default_and_torchvision_as_a_switch():
    """The authors' trunks (PSPNet convention) dilate every block of layer3 by 2 and of layer4 by 4;
    torchvision keeps the previous dilation in a stage's first block; a multi-grid multiplies all."""
    net = common.ResNet(50, 8)
    assert [b.conv2.dilation[0] for b in net.layer3] == [2] * 6
    assert [b.conv2.dilation[0] for b in net.layer4] == [4, 4, 4]
    assert [b.conv2.padding[0] for b in net.layer4] == [4, 4, 4]
    assert all(b.conv2.stride[0] == 1 for b in net.layer4)
    tv = common.ResNet(50, 8, dilation_style="torchvision")
    assert [b.conv2.dilation[0] for b in tv.layer3] == [1] + [2] * 5
    assert [b.conv2.dilation[0] for b in tv.layer4] == [2, 4, 4]
    os16 = common.ResNet(18, 16)
    assert [b.conv2.dilation[0] for b in os16.layer4] == [2, 2]
    grid = common.ResNet(50, 8, multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in grid.layer4] == [4, 8, 16]


def test_both_dilation_styles_load_the_same_pretrained_file(tmp_path):
    """Dilation changes no parameter: one torchvision-layout file loads into either style, and the
    two trunks then differ only in their outputs (not in a single weight)."""
    source = common.ResNet(18, 8)
    path = tmp_path / "resnet18.pth"
    torch.save({**source.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, path)
    styles = [common.ResNet(18, 8, dilation_style=s) for s in common.DILATION_STYLES]
    for net in styles:
        common.load_pretrained(net, str(path))
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in net.state_dict().items())
    x = torch.randn(1, 3, 64, 64)
    outs = [net.eval()(x)[3] for net in styles]
    assert outs[0].shape == outs[1].shape and not torch.allclose(outs[0], outs[1])


# ----------------------------------------------------------------------------------------------
# Weight loading: state_dicts written here from the published layouts, not from our module


def torchvision_layout(depth, with_fc=True, with_tracked=True):
    """Key -> shape of torchvision's resnet{depth} (conv1 7x7, bn1, layerK.i.convJ/bnJ, downsample.0/1, fc)."""
    bottleneck = depth >= 50
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    shapes = {"conv1.weight": (64, 3, 7, 7), **bn_shapes("bn1", 64, with_tracked)}
    return add_stages(shapes, 64, blocks, bottleneck, with_fc, with_tracked)


def bn_shapes(name, ch, with_tracked=True):
    out = {f"{name}.{p}": (ch,) for p in ("weight", "bias", "running_mean", "running_var")}
    if with_tracked:
        out[f"{name}.num_batches_tracked"] = ()
    return out


def add_stages(shapes, inplanes, blocks, bottleneck, with_fc, with_tracked=True):
    expansion = 4 if bottleneck else 1
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            if bottleneck:
                convs = [(inplanes, planes, 1), (planes, planes, 3), (planes, planes * 4, 1)]
            else:
                convs = [(inplanes, planes, 3), (planes, planes, 3)]
            for j, (cin, cout, k) in enumerate(convs, start=1):
                shapes[f"{p}.conv{j}.weight"] = (cout, cin, k, k)
                shapes.update(bn_shapes(f"{p}.bn{j}", cout, with_tracked))
            if i == 0 and (stage > 1 or inplanes != planes * expansion):
                shapes[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                shapes.update(bn_shapes(f"{p}.downsample.1", planes * expansion, with_tracked))
            inplanes = planes * expansion
    if with_fc:
        shapes["fc.weight"], shapes["fc.bias"] = (1000, 512 * expansion), (1000,)
    return shapes


def deep_stem_layout(depth, sequential):
    """CSAIL names (conv1,bn1,conv2,bn2,conv3,bn3) or the GALD/Encoding names (conv1.0/.1/.3/.4/.6, bn1)."""
    bottleneck = depth >= 50
    blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    convs = [(64, 3), (64, 64), (128, 64)]
    if sequential:
        names = [("conv1.0", "conv1.1"), ("conv1.3", "conv1.4"), ("conv1.6", "bn1")]
    else:
        names = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    shapes = {}
    for (conv, bn), (cout, cin) in zip(names, convs):
        shapes[f"{conv}.weight"] = (cout, cin, 3, 3)
        shapes.update(bn_shapes(bn, cout))
    return add_stages(shapes, 128, blocks, bottleneck, with_fc=True)


def write_state(path, shapes, prefix=""):
    gen = torch.Generator().manual_seed(0)
    state = {prefix + k: (torch.tensor(7) if s == () else torch.randn(s, generator=gen)) for k, s in shapes.items()}
    torch.save(state, path)
    return state


@pytest.mark.parametrize("depth", [50, 101])
def test_torchvision_layout_loads_into_tv_stem(tmp_path, depth):
    path = tmp_path / f"resnet{depth}.pth"
    state = write_state(path, torchvision_layout(depth, with_tracked=False))   # old files lack the counter
    assert len(torchvision_layout(depth)) == {50: 320, 101: 626}[depth]       # torchvision's key counts
    net = common.ResNet(depth, 8, "tv")
    common.load_pretrained(net, str(path))
    assert torch.equal(net.conv1.weight, state["conv1.weight"])
    assert torch.equal(net.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])


@pytest.mark.parametrize("sequential", [False, True])
def test_deep_stem_layouts_load(tmp_path, sequential):
    path = tmp_path / "deep.pth"
    state = write_state(path, deep_stem_layout(50, sequential), prefix="module.")
    net = common.ResNet(50, 8, "deep")
    common.load_pretrained(net, str(path))
    last_stem_bn = "module.bn1.weight" if sequential else "module.bn3.weight"
    assert torch.equal(net.bn3.weight, state[last_stem_bn])
    assert torch.equal(net.conv2.weight, state["module.conv1.3.weight" if sequential else "module.conv2.weight"])
    assert torch.equal(net.layer1[0].conv1.weight, state["module.layer1.0.conv1.weight"])


@pytest.mark.parametrize("file_layout,stem", [("tv", "deep"), ("deep", "tv")])
def test_wrong_layout_fails_listing_keys(tmp_path, file_layout, stem):
    path = tmp_path / "w.pth"
    write_state(path, torchvision_layout(50) if file_layout == "tv" else deep_stem_layout(50, False))
    net = common.ResNet(50, 8, stem)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(common.InputError) as err:
        common.load_pretrained(net, str(path))
    assert "layer1.0.conv1.weight" in str(err.value)                        # the 64- vs 128-channel input
    kind = "missing keys" if stem == "deep" else "unexpected keys"          # the deep stem's conv2/conv3
    assert kind in str(err.value) and "conv2.weight" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing half-loaded


def test_missing_key_is_an_error(tmp_path):
    shapes = torchvision_layout(18)
    del shapes["layer2.1.bn2.running_mean"]
    write_state(tmp_path / "r18.pth", shapes)
    with pytest.raises(common.InputError, match="layer2.1.bn2.running_mean"):
        common.load_pretrained(common.ResNet(18, 8), str(tmp_path / "r18.pth"))


# ----------------------------------------------------------------------------------------------
# Losses


def logits_with_true_prob(p):
    """2-class logits whose softmax gives probability p to class 0 (the target)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()])[None, :, None, :].float()   # (1, 2, 1, N)


def test_ohem_keeps_pixels_below_threshold():
    probs = [0.1, 0.2, 0.5, 0.69, 0.8, 0.9, 0.95, 0.99]
    logits, target = logits_with_true_prob(probs), torch.zeros(1, 1, 8, dtype=torch.long)
    loss = common.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=2)
    expected = -torch.tensor(probs[:4]).log().mean()                         # 4 pixels below 0.7 > min_kept
    assert torch.allclose(loss, expected, atol=1e-5)


def test_ohem_keeps_at_least_min_kept_hardest_and_skips_ignore():
    probs = [0.9, 0.1, 0.8, 0.99, 0.95, 0.85, 0.3, 0.97]
    logits, target = logits_with_true_prob(probs), torch.zeros(1, 1, 8, dtype=torch.long)
    target[0, 0, 1] = common.IGNORE_INDEX                                    # the hardest pixel is ignored
    loss = common.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=3)
    expected = -torch.tensor([0.3, 0.8, 0.85]).log().mean()                  # the 3 hardest valid pixels
    assert torch.allclose(loss, expected, atol=1e-5)
    all_kept = common.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=7)
    assert torch.allclose(all_kept, common.cross_entropy(logits, target), atol=1e-6)


def test_cross_entropy_all_ignored_is_zero_with_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = common.cross_entropy(logits, torch.full((1, 4, 4), common.IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None


# ----------------------------------------------------------------------------------------------
# Metrics


def test_metrics_against_hand_counts():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])                        # class 3 only under ignore
    cm = common.confusion_matrix(pred, label, num_classes=5)
    # class 0: tp 1, gt 2, pred 2 -> IoU 1/3; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: tp 1, gt 2, pred 1 -> 1/2
    # classes 3 and 4 appear in neither ground truth nor (non-ignored) prediction -> NaN, left out
    assert cm.sum() == 6 and cm[0, 1] == 1 and cm[2, 0] == 1
    m = common.segmentation_metrics(cm)
    assert m["aAcc"] == round(100 * 4 / 6, 2)
    assert m["mIoU"] == round(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3, 2)
    assert m["mAcc"] == round(100 * (1 / 2 + 1 + 1 / 2) / 3, 2)
    assert m["IoU"]["3"] is None and m["IoU"]["4"] is None


def test_predicted_but_absent_class_counts_as_zero_iou():
    label = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 1, 1])
    m = common.segmentation_metrics(common.confusion_matrix(pred, label, 2))
    assert m["IoU"] == {"0": 50.0, "1": 0.0} and m["mIoU"] == 25.0


# ----------------------------------------------------------------------------------------------
# Schedule


def test_poly_lr_endpoints_and_warmup():
    assert common.poly_lr(0.01, 0, 100) == 0.01
    assert common.poly_lr(0.01, 100, 100) == 0.0
    assert common.poly_lr(0.01, 50, 100, power=2.0) == pytest.approx(0.01 * 0.25)
    assert common.poly_lr(0.01, 0, 100, warmup_iters=10) == pytest.approx(0.001)


def test_warmup_is_composed_with_poly_so_the_lr_never_jumps():
    # mmseg: lr = poly(it) * warm-up factor; at the last warm-up step the factor is 1 and poly(9) < base
    assert common.poly_lr(0.01, 4, 100, warmup_iters=10) == pytest.approx(0.01 * 0.96 ** 0.9 * 0.5)
    assert common.poly_lr(0.01, 9, 100, warmup_iters=10) == pytest.approx(0.01 * 0.91 ** 0.9)
    lrs = [common.poly_lr(0.01, it, 100, warmup_iters=10) for it in range(100)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and all(a > b for a, b in zip(lrs[9:], lrs[10:]))


# ----------------------------------------------------------------------------------------------
# Transforms


def coded_pair(h=37, w=53, seed=0, block=8):
    """An image whose red channel encodes the label (value * 20) and a block label with ignore."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 6, (h // block + 1, w // block + 1))
    label = np.kron(grid, np.ones((block, block)))[:h, :w].astype(np.uint8)
    label[:3, :3] = common.IGNORE_INDEX
    rgb = np.stack([label.astype(np.int64) * 20 % 256, np.full_like(label, 90), np.full_like(label, 30)], -1).astype(np.uint8)
    return common.Image.fromarray(rgb), label


def red_channel_value(x):
    return (x[0] * common.IMAGENET_STD[0] + common.IMAGENET_MEAN[0]) * 255


@pytest.mark.parametrize("seed", range(4))
def test_crop_flip_pad_keep_alignment(seed):
    image, label = coded_pair()
    t = common.TrainTransform((48, 64), scale_range=(1.0, 1.0), jitter=0)   # crop larger than image: pads
    x, y = t(image, label, np.random.default_rng(seed))
    assert x.shape == (3, 48, 64) and y.shape == (48, 64)
    valid = (y != common.IGNORE_INDEX)
    assert torch.allclose(red_channel_value(x)[valid], (y[valid] * 20).float(), atol=0.6)
    pad = (x.abs().sum(0) == 0)
    assert (y[pad] == common.IGNORE_INDEX).all() and pad.sum() == 48 * 64 - 37 * 53


def test_scaled_crop_stays_aligned():
    image, label = coded_pair(96, 96, block=16)
    t = common.TrainTransform(40, scale_range=(0.5, 2.0), jitter=0)
    for seed in range(6):
        x, y = t(image, label, np.random.default_rng(seed))
        lab = y.float()[None, None]
        flat = (nn.functional.max_pool2d(lab, 7, 1, 3) == -nn.functional.max_pool2d(-lab, 7, 1, 3))[0, 0]
        inside = flat & (y != common.IGNORE_INDEX)                           # away from block borders
        inside[:3], inside[-3:], inside[:, :3], inside[:, -3:] = False, False, False, False  # and crop edges
        assert torch.allclose(red_channel_value(x)[inside], (y[inside] * 20).float(), atol=2)


def test_center_stays_inside_the_crop():
    label = np.zeros((100, 100), np.uint8)
    label[68:73, 8:13] = 4                                                   # the only class-4 pixels
    image = common.Image.fromarray(np.zeros((100, 100, 3), np.uint8))
    t = common.TrainTransform(24, scale_range=(0.5, 2.0), jitter=0, flip=False)
    for seed in range(20):
        _, y = t(image, label, np.random.default_rng(seed), center=(70, 10))
        assert y.shape == (24, 24) and (y == 4).any()
    hits = [(t(image, label, np.random.default_rng(s))[1] == 4).any().item() for s in range(20)]
    assert not all(hits)                                                     # uniform crops often miss it


# ----------------------------------------------------------------------------------------------
# Inference helpers


class Pointwise(common.SegModel):
    """A per-pixel model: its logits at a pixel depend on that pixel only."""

    def __init__(self, k=4):
        super().__init__()
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, image):
        return {"out": self.conv(image)}


class Convolutional(Pointwise):
    def __init__(self, k=4):
        super().__init__(k)
        self.conv = nn.Conv2d(3, k, 5, padding=2)


def test_slide_equals_whole_for_a_pointwise_model():
    model, image = Pointwise().eval(), torch.randn(1, 3, 41, 67)
    whole = common.infer(model, image, (41, 67))
    slide = common.infer(model, image, (41, 67), mode="slide", crop=24, stride=16)
    assert torch.allclose(whole, slide, atol=1e-6)


def test_slide_with_crop_covering_the_image_equals_whole():
    model, image = Convolutional().eval(), torch.randn(1, 3, 30, 45)
    whole = common.infer(model, image, (30, 45))
    assert torch.allclose(whole, common.infer(model, image, (30, 45), mode="slide", crop=64, stride=40))
    windowed = common.infer(model, image, (30, 45), mode="slide", crop=20, stride=12)
    assert not torch.allclose(whole, windowed, atol=1e-4)                    # borders differ: a real test


def test_slide_averages_overlapping_windows():
    calls = []

    def predict(x):
        calls.append(x.shape[-2:])
        return torch.ones(1, 1, *x.shape[-2:]) * len(calls)

    out = common.slide_inference(predict, torch.zeros(1, 3, 10, 16), crop=10, stride=4)
    assert calls == [(10, 10)] * 3                                           # x = 0, 4, 6 (clamped)
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 0, 5] == 1.5 and out[0, 0, 0, 15] == 3
    assert torch.allclose(out[0, 0, 0, 6:8], torch.tensor([2.0, 2.0]))       # windows 1, 2 and 3 average 2


def test_a_stride_larger_than_the_window_is_an_input_error_naming_the_flags():
    model, image = Pointwise().eval(), torch.randn(1, 3, 30, 45)
    with pytest.raises(common.InputError, match=r"--eval-stride 21 must be between 1 and --eval-crop \(20\)"):
        common.infer(model, image, (30, 45), mode="slide", crop=20, stride=21)   # columns 20 and 41-44 unseen
    assert torch.isfinite(common.infer(model, image, (30, 45), mode="slide", crop=20, stride=20)).all()


class Recording(Convolutional):
    """Records the size of every input its forward sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, image):
        self.seen.append(tuple(image.shape[-2:]))
        return super().forward(image)


def hand_slide(model, x, ys, xs, crop, flip):
    """Windows at the given corners, each the log of its (and its mirror's) mean softmax, averaged."""
    total, count = torch.zeros(1, 4, *x.shape[-2:]), torch.zeros(1, 1, *x.shape[-2:])
    for y in ys:
        for x0 in xs:
            window = x[:, :, y:y + crop, x0:x0 + crop]
            logits = model(window)["out"]
            if flip:
                mirror = model(window.flip(-1))["out"].flip(-1)
                logits = ((logits.softmax(1) + mirror.softmax(1)) / 2).log()
            total[:, :, y:y + crop, x0:x0 + crop] += logits
            count[:, :, y:y + crop, x0:x0 + crop] += 1
    return total / count


@pytest.mark.parametrize("flip", [False, True])
def test_multiscale_slide_resizes_the_image_and_slides_crop_windows_over_it(flip):
    torch.manual_seed(0)
    model, image = Recording().eval(), torch.randn(1, 3, 20, 28)
    got = common.infer(model, image, (20, 28), mode="slide", crop=16, stride=10, scales=(1.0, 2.0), flip=flip)
    assert set(model.seen) == {(16, 16)}                                     # at 2x too: never bigger than the crop
    assert len(model.seen) == (2 * 3 + 4 * 5) * (1 + flip)                   # 20x28: 2x3 windows; 40x56: 4x5
    with torch.no_grad():
        # corners by hand, stride 10 clamped to the image: 20 -> 0, 4; 28 -> 0, 10, 12; 40 -> 0, 10, 20, 24;
        # 56 -> 0, 10, 20, 30, 40
        one = hand_slide(model, image, [0, 4], [0, 10, 12], 16, flip)
        two = hand_slide(model, common.resize(image, (40, 56)), [0, 10, 20, 24], [0, 10, 20, 30, 40], 16, flip)
        expected = ((one.softmax(1) + common.resize(two, (20, 28)).softmax(1)) / 2).log()
    assert torch.allclose(got, expected, atol=1e-5)


class OwnScales(Pointwise):
    """A model whose predict takes the scales itself (as HMSA's): records what it is given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def predict(self, image, scales=(1.0,), flip=False):
        self.calls.append((tuple(image.shape[-2:]), tuple(scales)))
        return self(image)["out"]


def test_whole_mode_hands_the_scales_to_predict_and_slide_mode_one_scale_per_window():
    model, image = OwnScales().eval(), torch.randn(1, 3, 20, 28)
    common.infer(model, image, (20, 28), scales=(0.5, 1.0))
    assert model.calls == [((20, 28), (0.5, 1.0))]
    model.calls.clear()
    common.infer(model, image, (20, 28), mode="slide", crop=16, stride=16, scales=(0.5, 1.0))
    assert model.calls == [((10, 14), (1.0,))] + [((16, 16), (1.0,))] * 4   # 10x14: one window; 20x28: 2x2


def test_multiscale_flip_averages_probabilities():
    torch.manual_seed(0)
    model, image = Convolutional().eval(), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = model.predict(image, scales=(0.5, 1.0), flip=True).exp()
        views = []
        for s in (0.5, 1.0):
            x = common.resize(image, common.scaled_size((32, 32), s))
            for flip in (False, True):
                logits = model(x.flip(-1) if flip else x)["out"]
                views.append(common.resize(logits.flip(-1) if flip else logits, (32, 32)).softmax(1))
    assert torch.allclose(got, sum(views) / 4, atol=1e-5)
    assert torch.equal(model.predict(image), model(image)["out"])            # one view: raw logits


# ----------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_is_deterministic_and_varied():
    a, la = common.synthetic_sample(3, 0, (40, 56))
    b, lb = common.synthetic_sample(3, 0, (40, 56))
    c, lc = common.synthetic_sample(4, 0, (40, 56))
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(la, lc)
    labels = np.stack([common.synthetic_sample(i, 0, (96, 96))[1] for i in range(20)])
    counts = np.bincount(labels.ravel(), minlength=6)
    assert (counts > 0).all() and len(counts) == 6
    assert counts[:2].sum() > 0.5 * labels.size and counts[4] < 0.05 * labels.size   # stuff vs small


def linear_probe_miou(train_ids, val_ids, size=64):
    """mIoU of a per-pixel linear classifier on RGB (logistic regression), fitted on train images to
    convergence (L-BFGS: a convex problem, so no under-fitted probe passes the test by accident)."""
    def pixels(ids):
        pairs = [common.synthetic_sample(i, 0, (size, size)) for i in ids]
        x = torch.from_numpy(np.concatenate([p[0].reshape(-1, 3) for p in pairs])).float() / 255
        return x, torch.from_numpy(np.concatenate([p[1].ravel() for p in pairs])).long()

    x, y = pixels(train_ids)
    x, y = x[::4], y[::4]                                      # every 4th pixel: plenty for 3 inputs
    linear = nn.Linear(3, 6)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(linear(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert linear.weight.grad.abs().max() < 1e-3                # converged
    xv, yv = pixels(val_ids)
    with torch.no_grad():
        cm = common.confusion_matrix(linear(xv).argmax(1), yv, 6)
    return common.segmentation_metrics(cm)["mIoU"]


def test_colour_alone_does_not_give_the_class():
    torch.manual_seed(0)
    miou = linear_probe_miou(range(20), range(1000, 1010))
    assert miou < 50, f"a per-pixel linear classifier on RGB reaches {miou} mIoU"


def test_blur_blurs_every_crop_with_the_codes_sigma_range(monkeypatch):
    """--blur as the HMSA code: every crop, sigma = 0.15 + U(0, 1) * 1.15 (not half the crops)."""
    from PIL import ImageFilter
    radii = []
    real = ImageFilter.GaussianBlur
    monkeypatch.setattr(common.ImageFilter, "GaussianBlur", lambda radius: radii.append(radius) or real(radius))
    transform = common.TrainTransform(16, (1.0, 1.0), jitter=0, blur=True)
    image, label = Image.fromarray(np.zeros((20, 20, 3), np.uint8)), np.zeros((20, 20), np.uint8)
    for seed in range(40):
        transform(image, label, np.random.default_rng(seed))
    assert len(radii) == 40 and 0.15 <= min(radii) and max(radii) <= 1.30 and max(radii) > 1.15


def test_confusion_matrix_refuses_predictions_and_labels_outside_the_classes():
    label = torch.tensor([[0, 1, 255], [2, 1, 0]])
    for pred, bad in ((torch.tensor([[0, 3, 0], [2, 1, 0]]), r"predictions \[3\]"),
                      (torch.tensor([[0, -1, 0], [2, 1, 0]]), r"predictions \[-1\]")):
        with pytest.raises(ValueError, match=rf"must lie in \[0, 3\).*{bad}"):
            common.confusion_matrix(pred, label, 3)
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        common.confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[0, 7, 255], [2, 1, 0]]), 3)
    pred = torch.tensor([[0, 1, 9], [2, 1, 0]])                          # an ignored pixel's prediction is not counted
    assert common.confusion_matrix(pred, label, 3).sum() == 5
