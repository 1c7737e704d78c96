"""Math tests for galdv1.py: CGNL against an explicit per-group loop, the Non-local softmax, the LD
mask of Eqs. (1)-(2) and its Table 1(e) downsamplings, the arrangements of Fig. 3, the network."""
import argparse
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import FCN, InputError, ResNet, resize, upsample_strided  # noqa: E402
from galdv1 import (ASPP, CGNL, GALD, GALDBlock, HalfResolution, LocalDistribution, NonLocal,  # noqa: E402
                    PooledBatchNorm, add_args, build_ga, build_model)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: one intra-op thread


def randomise_norms(module, seed=0):
    """Non-trivial affine parameters for every BN / GN (defaults 1 and 0 hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            m.weight.data = torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype)


def cgnl_slow(block, x):
    """CGNL written out: per sample and group, a = sum over channels and positions of phi * g,
    y = a * theta; W_z by explicit per-group matrix products; GroupNorm by hand; plus x."""
    B, C, H, W = x.shape
    G = block.groups
    theta, phi, g = block.theta(x), block.phi(x), block.g(x)      # 1x1 convs
    inner = theta.shape[1]
    cin, cout = inner // G, C // G
    wz = block.z.weight[:, :, 0, 0]                               # (C, inner / G)
    out = []
    for b in range(B):
        z = []
        for k in range(G):
            a = 0
            for c in range(k * cin, (k + 1) * cin):
                a = a + (phi[b, c] * g[b, c]).sum()
            y = a * theta[b, k * cin:(k + 1) * cin]               # (inner / G, H, W)
            z.append(torch.einsum("oc,chw->ohw", wz[k * cout:(k + 1) * cout], y))
        z = torch.cat(z)                                          # (C, H, W)
        normed = []
        for k in range(G):
            part = z[k * cout:(k + 1) * cout]
            mean, var = part.mean(), part.var(unbiased=False)
            normed.append((part - mean) / torch.sqrt(var + block.norm.eps))
        normed = torch.cat(normed) * block.norm.weight[:, None, None] + block.norm.bias[:, None, None]
        out.append(x[b] + normed)
    return torch.stack(out)


def aligned_weights(size, small, stride):
    """(size, small) matrix of the linear interpolation that reads fine pixel y at source coordinate
    y / stride of a coarse axis of `small` samples, clamped at the last one, written out per pixel."""
    A = torch.zeros(size, small, dtype=torch.float64)
    for y in range(size):
        s = y / stride
        j = min(int(s), small - 1)
        t = s - j if j < small - 1 else 0.0
        A[y, j] += 1 - t
        if t:
            A[y, j + 1] += t
    return A


def test_cgnl_matches_explicit_group_loop_values_and_gradients():
    torch.manual_seed(0)
    block = CGNL(16, groups=4).double()
    randomise_norms(block)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    fast = block(x)
    grads_fast = torch.autograd.grad((fast * weights).sum(), [x] + list(block.parameters()))
    slow = cgnl_slow(block, x)
    grads_slow = torch.autograd.grad((slow * weights).sum(), [x] + list(block.parameters()))
    torch.testing.assert_close(fast, slow)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b)


def test_nonlocal_starts_as_identity_and_matches_explicit_softmax():
    torch.manual_seed(0)
    block = NonLocal(8).double()
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(block(x), x)                       # zero-initialised output BN
    randomise_norms(block)
    block.eval()
    theta, phi, g = (m(x).flatten(2) for m in (block.theta, block.phi, block.g))  # (B, C/2, N)
    y = torch.zeros_like(theta)
    for b in range(2):
        for i in range(theta.shape[-1]):
            weights = torch.softmax(theta[b, :, i] @ phi[b], 0)   # over all positions j
            y[b, :, i] = g[b] @ weights
    expected = x + block.w(y.reshape(2, 4, 4, 5))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("kind", ["cgnl", "nl", "psp", "aspp"])
def test_ga_modules_keep_odd_sizes_and_project(kind):
    x = torch.randn(2, 16, 5, 7)
    assert build_ga(kind, 16, 8)(x).shape == (2, 8, 5, 7)
    assert build_ga(kind, 16, 16)(x).shape == (2, 16, 5, 7)


def test_cgnl_runs_at_half_resolution():
    ga = build_ga("cgnl", 16, 16)
    assert isinstance(ga, HalfResolution) and isinstance(ga.ga, CGNL)
    seen = []
    ga.ga.register_forward_hook(lambda m, i, o: seen.append(o.shape[-2:]))
    ga(torch.randn(2, 16, 9, 13))
    assert tuple(seen[0]) == (5, 7)


def test_aspp_rates_scale_with_output_stride():
    dilations = lambda m: [b[0].dilation[0] for b in m.branches[1:]]
    assert dilations(build_ga("aspp", 8, 8, output_stride=8)) == [12, 24, 36]
    assert dilations(build_ga("aspp", 8, 8, output_stride=16)) == [6, 12, 18]
    assert isinstance(build_ga("aspp", 8, 8), ASPP)


def test_ld_eq1_eq2_match_a_written_out_reference():
    """Eq. (1) on the default dwconv path by hand: W_d = two (depth-wise 3x3 stride-2 conv, BN, ReLU)
    then (conv, BN), BN in eval mode with random statistics; linear interpolation to X_g's size with
    coarse sample j on fine pixel 8j (aligned_weights), then the sigmoid. Eq. (2): M * X_g + X_g;
    follow_code: ReLU after W_d, 2 X_g + M X_g."""
    torch.manual_seed(0)
    C, H, W = 6, 19, 23
    ld = LocalDistribution(C).double().eval()
    randomise_norms(ld)
    for bn in (m for m in ld.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    code = LocalDistribution(C, follow_code=True).double().eval()
    code.load_state_dict(ld.state_dict())
    x = torch.randn(2, C, H, W, dtype=torch.float64)
    convs = [m for m in ld.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in ld.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 3                          # d = 8 = 2 ** 3
    w = x
    for i, (conv, bn) in enumerate(zip(convs, norms)):
        w = F.conv2d(w, conv.weight, stride=2, padding=1, groups=C)
        w = (w - bn.running_mean.view(1, C, 1, 1)) / torch.sqrt(bn.running_var.view(1, C, 1, 1) + bn.eps)
        w = w * bn.weight.view(1, C, 1, 1) + bn.bias.view(1, C, 1, 1)
        w = w.clamp(min=0) if i < 2 else w                        # ReLU between the convs only
    assert w.shape == (2, C, 3, 3)                                # 19 -> 10 -> 5 -> 3, 23 -> 12 -> 6 -> 3
    up = lambda t: torch.einsum("yi,bcij,xj->bcyx", aligned_weights(H, 3, 8), t, aligned_weights(W, 3, 8))
    expected_m = torch.sigmoid(up(w))
    out, m = ld(x)
    torch.testing.assert_close(m, expected_m)
    torch.testing.assert_close(out, expected_m * x + x)
    expected_m = torch.sigmoid(up(w.clamp(min=0)))
    out, m = code(x)
    torch.testing.assert_close(m, expected_m)
    torch.testing.assert_close(out, 2 * x + expected_m * x)


@pytest.mark.parametrize("downsample", ["bilinear", "avgpool"])
def test_ld_output_is_eq2_of_its_mask(downsample):
    """The parameter-free downsamplings (their masks are checked in test_ld_downsamples_by_eight)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 11)
    out, m = LocalDistribution(8, downsample=downsample)(x)
    torch.testing.assert_close(out, m * x + x)                    # Eq. (2)
    out, m = LocalDistribution(8, downsample=downsample, follow_code=True)(x)
    assert (m >= 0.5).all()                                       # ReLU before the sigmoid
    torch.testing.assert_close(out, 2 * x + m * x)                # the code's double residual


def test_bad_options_raise_input_error():
    with pytest.raises(InputError, match="LD downsampling 'max'"):
        LocalDistribution(8, downsample="max")
    with pytest.raises(InputError, match="arrangement 'serial'"):
        GALDBlock(8, arrangement="serial")
    with pytest.raises(InputError, match="GA module 'ocr'"):
        build_ga("ocr", 8, 8)


def test_ld_with_zero_mask_reduces_to_x_g():
    ld = LocalDistribution(8)
    last_bn = ld.w_d[-1]
    last_bn.weight.data.zero_()
    last_bn.bias.data.fill_(-1e4)                                  # W_d X_g = -1e4 -> M = 0
    x = torch.randn(2, 8, 9, 11)
    out, m = ld(x)
    assert (m == 0).all()
    torch.testing.assert_close(out, x)


@pytest.mark.parametrize("downsample", ["dwconv", "bilinear", "avgpool"])
def test_ld_mask_is_per_channel(downsample):
    """"For each pattern c ... a spatial operator is learned" (Sec. 3.2): M[:, c] depends on X_g[:, c] only."""
    torch.manual_seed(0)
    ld = LocalDistribution(8, downsample=downsample).eval()
    x = torch.randn(1, 8, 17, 19)
    x2 = x.clone()
    x2[:, 3] += torch.randn(17, 19)
    changed = (ld(x)[1] - ld(x2)[1]).abs().amax((0, 2, 3)) > 0
    assert changed.tolist() == [c == 3 for c in range(8)]


def test_ld_downsamples_by_eight():
    ld = LocalDistribution(4)
    for size, small in [(5, 1), (9, 2), (33, 5), (97, 13)]:
        assert ld.w_d(torch.randn(2, 4, size, size)).shape[-1] == small
    x = torch.randn(2, 4, 16, 24)
    blocks = x.reshape(2, 4, 2, 8, 3, 8).mean((3, 5))              # 8x8 block means
    _, m = LocalDistribution(4, downsample="avgpool")(x)
    torch.testing.assert_close(m, torch.sigmoid(resize(blocks, (16, 24))))
    const = torch.randn(1, 4, 1, 1).expand(1, 4, 13, 21)
    _, m = LocalDistribution(4, downsample="bilinear")(const)
    torch.testing.assert_close(m, torch.sigmoid(const))


def test_arrangements_compose_ga_and_ld_as_fig3():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 11)
    blocks = {a: GALDBlock(8, ga="psp", arrangement=a).eval() for a in ("gald", "ldga", "parallel")}
    ga, ld = blocks["gald"].ga, blocks["gald"].ld
    y, m = blocks["gald"](x)
    torch.testing.assert_close(y, ld(ga(x))[0])
    torch.testing.assert_close(m, ld(ga(x))[1])
    ga, ld = blocks["ldga"].ga, blocks["ldga"].ld
    torch.testing.assert_close(blocks["ldga"](x)[0], ga(ld(x)[0]))
    ga, ld = blocks["parallel"].ga, blocks["parallel"].ld
    torch.testing.assert_close(blocks["parallel"](x)[0], torch.cat([ga(x), ld(x)[0]], 1))
    assert blocks["parallel"].out_channels == 16
    y, m = GALDBlock(8, ga="none", ld=False)(x)
    assert m is None and torch.equal(y, x)


def test_gald_network_outputs_loss_and_gradients_on_odd_input():
    torch.manual_seed(0)
    model = GALD(ResNet(18, 8), 5).train()
    image = torch.randn(2, 3, 33, 47)
    target = torch.randint(0, 5, (2, 33, 47))
    target[0, :4] = 255
    out = model(image)
    assert set(out) == {"out", "aux"}                             # no 'maps' in training
    assert out["out"].shape == (2, 5, 33, 47) and out["aux"].shape == (2, 5, 33, 47)
    losses = model.loss(out, target)
    assert set(losses) == {"main", "aux", "total"} and torch.isfinite(losses["total"])
    # 2914 valid pixels < OHEM's min_kept = 100k: OHEM keeps all, i.e. mean CE over the valid ones
    ce = lambda logits: F.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(losses["total"], ce(out["out"]) + 0.4 * ce(out["aux"]))
    losses["total"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"No gradient for {name}"
    model.eval()
    with torch.no_grad():
        out = model(image)
    assert set(out) == {"out", "maps"} and out["out"].shape == (2, 5, 33, 47)
    mask = out["maps"]["ld_mask"]
    assert mask.shape == (2, 1, 5, 6) and (mask >= 0).all() and (mask <= 1).all()


@pytest.mark.parametrize("size", [97, 104, 128])
@pytest.mark.parametrize("stride", [8, 2])
def test_upsampled_impulse_peaks_at_its_own_fine_pixel(size, stride):
    """An impulse at coarse sample j (of ceil(size / stride)) peaks at fine pixel stride * j, for every
    j: LD's mask (stride 8, 97 / 104 / 128-px maps: 769 and 832 crops, 1024 x 2048 images) and
    HalfResolution (stride 2). Inside, the response is the linear hat 1 - |y - stride j| / stride.
    Border tolerance: none for the peak; the first sample's hat is cut at pixel 0, and the last sample
    is repeated over the size - 1 - stride * (h - 1) pixels past it (0 for 97 at stride 8, 7 for 104
    and 128). common.resize put the peaks at stride * j + 3.5 (stride 8, 104 / 128 px)."""
    h = -(-size // stride)
    impulses = torch.eye(h, dtype=torch.float64).view(1, h, h, 1)      # channel j: impulse at row j
    response = upsample_strided(impulses, (size, 1), stride)[0, :, :, 0]  # (h, size)
    assert response.shape == (h, size)
    assert response.argmax(1).tolist() == [stride * j for j in range(h)]
    y = torch.arange(size, dtype=torch.float64)
    for j in range(h - 1):
        hat = (1 - (y - stride * j).abs() / stride).clamp(min=0)
        torch.testing.assert_close(response[j], hat)
    past = size - 1 - stride * (h - 1)
    assert torch.equal(response[-1, stride * (h - 1):], torch.ones(past + 1, dtype=torch.float64))


@pytest.mark.parametrize("size", [64, 65, 97])
def test_upsampling_allocates_one_map_as_resize_does(size):
    """The pad-one-sample-and-crop form allocates one full-size map (the first form interpolated onto
    the span and replicate-padded a second one: 1.2x the block's peak). Live tensor bytes, not time:
    equal to resize at 8k + 1 sizes (no padding needed), at most (8h + 1)^2 / H^2 of it otherwise."""
    from tools.costs import peak_memory
    x = torch.randn(2, 16, -(-size // 8), -(-size // 8))
    cost = lambda fn: peak_memory(lambda: fn(x, (size, size)), torch.device("cpu"), [x])
    aligned, plain = cost(lambda v, s: upsample_strided(v, s, 8)), cost(resize)
    h = x.shape[-1]
    bound = plain * ((size if (size - 1) % 8 == 0 else 8 * h + 1) / size) ** 2
    assert plain <= aligned <= bound + x.numel() * 4 * 1.5          # + the padded coarse map


def as_sampler(model):
    """Every conv reads its centre tap only, averaging its input channels, biases and BNs off (eval):
    a network of such layers passes a non-negative image through ReLUs and residual sums unchanged in
    sign, so a stride-s map's sample j is a positive multiple of input pixel s * j and nothing else."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data.zero_()
            m.weight.data[:, :, m.kernel_size[0] // 2, m.kernel_size[1] // 2] = 1 / m.weight.shape[1]
            if m.bias is not None:
                m.bias.data.zero_()
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_parameters()
            m.running_var.fill_(1 - m.eps)
    return model.double().eval()


@pytest.mark.parametrize("size", [(64, 64), (65, 97), (72, 60)])
@pytest.mark.parametrize("build", [lambda: FCN(ResNet(18, 8), 3, head_channels=8),
                                   lambda: GALD(ResNet(18, 8), 3, ga="none", channels=8)],
                         ids=["fcn", "gald"])
def test_logits_of_a_one_pixel_input_peak_at_that_pixel(build, size):
    """End to end: a one-pixel input at (8i, 8j) changes the logits most at (8i, 8j) itself, with a
    symmetric hat around it (the strided trunk computed sample (i, j) there). common.resize put the peak
    3.5 px down and right. GA is off: a global module spreads the impulse everywhere by design."""
    torch.manual_seed(0)
    model = as_sampler(build())
    H, W = size
    y, x = 8 * ((H - 1) // 16), 8 * ((W - 1) // 16)
    image = torch.zeros(1, 3, H, W, dtype=torch.float64)
    image[..., y, x] = 1
    with torch.no_grad():
        out = model(image)["out"][0, 0]                                  # (H, W)
    assert out.shape == (H, W) and out.max() > 0
    assert divmod(out.argmax().item(), W) == (y, x)
    for d in range(1, 8):
        assert out[y - d, x] == out[y + d, x] > out[y + d + 1, x]       # the hat 1 - d / 8 along y
        assert out[y, x - d] == out[y, x + d] > out[y, x + d + 1]


def identity_taps(module):
    """Every depth-wise conv a centre tap of 1 and every BN the identity (eval): a strided conv then
    just samples pixel 2j."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data.zero_()
            m.weight.data[:, :, 1, 1] = 1
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.zero_()
            m.running_var.fill_(1 - m.eps)
    return module.double().eval()


@pytest.mark.parametrize("size", [(97, 104), (128, 65)])
def test_ld_mask_and_half_resolution_keep_a_ramp_in_place(size):
    """End to end: W_d (or HalfResolution's conv) samples pixel 8j (2j), the up-sampling puts it back
    there, so a positive linear ramp comes back unchanged up to the last sample (past it, the last
    sample repeats): M = sigmoid(ramp) exactly, with no shift."""
    H, W = size
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    ramp = (0.01 * yy + 0.02 * xx + 0.1).expand(1, 2, H, W)
    for stride, run in [(8, lambda x: identity_taps(LocalDistribution(2))(x)[1]),
                        (2, lambda x: identity_taps(HalfResolution(torch.nn.Identity(), 2))(x))]:
        out = run(ramp)
        expected = torch.sigmoid(ramp) if stride == 8 else ramp
        last_y, last_x = stride * ((H - 1) // stride), stride * ((W - 1) // stride)
        torch.testing.assert_close(out[..., :last_y + 1, :last_x + 1], expected[..., :last_y + 1, :last_x + 1])


@pytest.mark.parametrize("kind", ["aspp", "psp"])
def test_pooled_branches_train_on_one_image_per_process(kind):
    """ASPP's image pooling and PSP's 1x1 bin: with one image and plain BN they used to die with
    "Expected more than 1 value per channel". Their PooledBatchNorm then uses its running
    statistics (left unchanged), so training and eval agree; at two images it is plain BN."""
    torch.manual_seed(0)
    ga = build_ga(kind, 8, 8).train()
    pooled = [m for m in ga.modules() if isinstance(m, PooledBatchNorm)]
    assert len(pooled) == (1 if kind == "aspp" else 4)
    x = torch.randn(1, 8, 7, 9, requires_grad=True)
    ga(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in ga.parameters())
    one = [m for m in pooled if m.num_batches_tracked == 0]   # the 1x1 maps: statistics untouched
    assert len(one) == 1
    bn = one[0]
    assert torch.equal(bn.running_mean, torch.zeros(bn.num_features)) and torch.equal(bn.running_var, torch.ones(bn.num_features))
    v = torch.randn(1, bn.num_features, 1, 1)
    torch.testing.assert_close(bn(v), bn.eval()(v))
    bn.train()
    v = torch.randn(2, bn.num_features, 1, 1)
    plain = torch.nn.BatchNorm2d(bn.num_features)
    plain.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(v), plain(v))


def test_gald_with_aspp_trains_on_one_image():
    """One image, ASPP (LD off here: W_d's own BN needs a coarse map above 1 x 1, i.e. an image above 64 px)."""
    model = GALD(ResNet(18, 8), 3, ga="aspp", ld=False, channels=16).train()
    out = model(torch.randn(1, 3, 33, 41))                    # 5 x 6 features, 1 x 1 image pooling
    model.loss(out, torch.randint(0, 3, (1, 33, 41)))["total"].backward()


def parse(argv, **common):
    """galdv1's flags as given, plus the common ones build_backbone reads."""
    parser = argparse.ArgumentParser()
    add_args(parser)
    args = parser.parse_args(argv)
    defaults = dict(num_classes=3, backbone="resnet18", stem="tv", output_stride=8, multi_grid=None,
                    pretrained=None, dilation_style="pspnet")
    return argparse.Namespace(**vars(args), **{**defaults, **common})


@pytest.mark.parametrize("argv, message", [
    (["--no-ld", "--follow-code"], "--follow-code change(s) only LD, which --no-ld turns off"),
    (["--no-ld", "--ld-downsample", "bilinear"], "--ld-downsample change(s) only LD"),
    (["--no-ld", "--ld-downsample", "avgpool", "--follow-code"], "--ld-downsample and --follow-code change"),
    (["--ga", "none", "--arrangement", "ldga"], "--arrangement ldga with --ga none is --arrangement gald"),
    (["--no-ld", "--arrangement", "ldga", "--ga", "psp"], "--arrangement ldga with --no-ld is"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_flags_that_change_nothing_are_refused(argv, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(parse(argv))


def test_ld_flags_at_their_defaults_pass_with_no_ld():
    """A refusal compares with the default: an LD flag written at its default value changes nothing either."""
    model = build_model(parse(["--no-ld", "--no-follow-code", "--ld-downsample", "dwconv"]))
    assert model.block.ld is None


def test_cli_defaults_are_the_papers_best_and_build_model():
    parser = argparse.ArgumentParser()
    add_args(parser)
    args = parser.parse_args([])
    assert (args.ga, args.ld, args.arrangement, args.ohem) == ("cgnl", True, "gald", True)
    assert (args.ld_downsample, args.follow_code) == ("dwconv", False)
    assert not [a.dest for a in parser._actions if a.default is None]  # --help shows every real default
    with torch.device("meta"):                                         # what is built, not its values
        model = build_model(parse([]))
        assert (model.block.ld.downsample, model.block.ld.follow_code) == ("dwconv", False)
        model = build_model(parse(["--ga", "aspp", "--no-ld", "--no-ohem"], output_stride=16))
        assert model.block.ld is None and not model.ohem
        assert [b[0].dilation[0] for b in model.block.ga.branches[1:]] == [6, 12, 18]
        model = build_model(parse(["--ld-downsample", "avgpool", "--follow-code", "--arrangement", "parallel",
                                   "--ga", "none"]))
        assert (model.block.ld.downsample, model.block.ld.follow_code, model.block.arrangement) == \
            ("avgpool", True, "parallel")
        assert build_model(parse(["--ga", "none", "--no-ld"])).block.ld is None
