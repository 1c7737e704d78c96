"""Math tests for galdv2.py: LDv2 (Eqs. 6-8) against the explicit unfold formulation, borders, k=1,
the Fig. 9 affinity map, and the network's outputs. CPU, tiny inputs."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import common
import galdv1
import galdv2
import train


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: one intra-op thread


def ldv2_unfold(ld, x_g, x_l):
    """The readable reference of Eqs. (6)-(8): sample the k*k zero-padded neighbours s(n) of every
    position from x with F.unfold (a (B, 2C, k*k, H, W) tensor), apply the 1x1 convs to the samples,
    softmax over n, weighted sum of the values."""
    B, C, H, W = x_g.shape
    k, r = ld.kernel_size, ld.dilation
    x = torch.cat([x_g, x_l], 1)
    sample = lambda t: F.unfold(t, k, dilation=r, padding=r * (k // 2)).view(B, t.shape[1], k * k, H, W)
    s_key = sample(x if ld.key_input == "concat" else x_g)                    # Eqs. (6)-(7)
    s = sample(x)
    q = ld.query(x if ld.query_input == "concat" else x_g)                     # (B, D, H, W)
    keys = torch.einsum("dc,bcnhw->bdnhw", ld.key.weight[:, :, 0, 0], s_key)
    values = torch.einsum("dc,bcnhw->bdnhw", ld.value.weight[:, :, 0, 0], s) + ld.value.bias.view(1, -1, 1, 1, 1)
    affinity = torch.einsum("bdhw,bdnhw->bnhw", q, keys).softmax(1)            # Eq. (8)
    return torch.einsum("bnhw,bcnhw->bchw", affinity, values), affinity


def make_ld(channels=6, **kw):
    torch.manual_seed(0)
    ld = galdv2.DynamicLocalDistribution(channels, key_channels=4, **kw).double()
    with torch.no_grad():                                      # non-zero biases so padding order matters
        ld.query.bias.normal_()
        ld.value.bias.normal_()
    return ld


def inputs(B=2, C=6, H=7, W=11):
    torch.manual_seed(1)
    return (torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True),
            torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("k, r, key_input, query_input", [
    (5, 3, "concat", "concat"), (3, 1, "concat", "concat"), (3, 2, "global", "concat"),
    (5, 2, "concat", "global"), (7, 6, "global", "global")])
def test_ldv2_equals_unfold_reference_values_and_gradients(k, r, key_input, query_input):
    ld = make_ld(kernel_size=k, dilation=r, key_input=key_input, query_input=query_input)
    x_g, x_l = inputs()
    out, aff = ld(x_g, x_l)
    ref, ref_aff = ldv2_unfold(ld, x_g, x_l)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aff, ref_aff, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(out)                            # a generic upstream gradient
    leaves = [x_g, x_l, *ld.parameters()]
    grads = torch.autograd.grad((out * weights).sum() + aff.sum() * 0.3, leaves)
    ref_grads = torch.autograd.grad((ref * weights).sum() + ref_aff.sum() * 0.3, leaves)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-10)


def test_border_samples_are_zero_padded_x_not_masked():
    """At a corner, an explicit loop over the k*k offsets with s(n) = 0 off the image (the paper's
    zero padding of x): the key is W_phi 0 = 0 (logit 0), the value W_g 0 + b_g = b_g."""
    ld = make_ld(kernel_size=5, dilation=2)
    x_g, x_l = inputs(B=1, H=5, W=6)
    x = torch.cat([x_g, x_l], 1)[0].detach()
    out, aff = ld(x_g, x_l)
    Wq, bq = ld.query.weight[:, :, 0, 0], ld.query.bias
    Wk, Wv, bv = ld.key.weight[:, :, 0, 0], ld.value.weight[:, :, 0, 0], ld.value.bias
    for y, xx in [(0, 0), (4, 5), (2, 3)]:
        q = Wq @ x[:, y, xx] + bq
        samples = [x[:, y + dy, xx + dx] if 0 <= y + dy < 5 and 0 <= xx + dx < 6 else torch.zeros_like(x[:, 0, 0])
                   for dy, dx in ld.offsets()]
        logits = torch.stack([q @ (Wk @ s) for s in samples])
        a = logits.softmax(0)
        expected = sum(a_n * (Wv @ s + bv) for a_n, s in zip(a, samples))
        torch.testing.assert_close(out[0, :, y, xx], expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(aff[0, :, y, xx], a, rtol=1e-10, atol=1e-10)
    outside = [n for n, (dy, dx) in enumerate(ld.offsets()) if dy < 0 or dx < 0]   # off-image at (0, 0)
    corner = aff[0, :, 0, 0]
    assert (corner[outside] > 0).all(), "padded samples take part in the softmax"
    torch.testing.assert_close(corner[outside], corner[outside[0]].expand(len(outside)))  # all logits 0


def test_kernel_one_is_the_value_projection():
    """k = 1: the softmax over one sample is 1, so X_gald = W_g x exactly."""
    ld = make_ld(kernel_size=1, dilation=3)
    x_g, x_l = inputs()
    out, aff = ld(x_g, x_l)
    assert torch.equal(aff, torch.ones_like(aff))
    torch.testing.assert_close(out, ld.value(torch.cat([x_g, x_l], 1)), rtol=0, atol=1e-13)


def largest_saved_storage(fn, *args):
    """Elements of the largest storage that autograd saves for backward while fn runs."""
    sizes = []
    def pack(t):
        sizes.append(t.untyped_storage().nbytes() // t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return max(sizes)


def test_no_sampled_feature_tensor_is_kept_for_backward():
    """Nothing of the size of the (B, C, k*k, H, W) samples is saved for backward: the largest saved
    storage is the padded value projection (B, C, H+2p, W+2p); the unfold reference saves the samples."""
    ld = make_ld(channels=8, kernel_size=5, dilation=3)       # p = 6
    x_g, x_l = inputs(B=1, C=8, H=9, W=10)
    assert largest_saved_storage(ld, x_g, x_l) == 8 * (9 + 12) * (10 + 12)
    assert largest_saved_storage(lambda a, b: ldv2_unfold(ld, a, b), x_g, x_l) >= 2 * 8 * 25 * 9 * 10


def test_bad_key_or_query_input_raises_input_error():
    with pytest.raises(common.InputError, match="key_input must be concat or global, got 'local'"):
        galdv2.DynamicLocalDistribution(4, key_input="local")
    with pytest.raises(common.InputError, match="query_input must be concat or global, got 'X_l'"):
        galdv2.DynamicLocalDistribution(4, query_input="X_l")


def test_odd_sizes_and_maps_smaller_than_the_window():
    ld = galdv2.DynamicLocalDistribution(4, kernel_size=5, dilation=3, key_channels=2)
    out, aff = ld(torch.randn(1, 4, 3, 5), torch.randn(1, 4, 3, 5))   # the 13x13 span exceeds the map
    assert out.shape == (1, 4, 3, 5) and aff.shape == (1, 25, 3, 5)
    torch.testing.assert_close(aff.sum(1), torch.ones(1, 3, 5))


def test_affinity_map_lays_out_the_weights_of_the_chosen_pixel():
    ld = galdv2.DynamicLocalDistribution(4, kernel_size=3, dilation=2, key_channels=2)
    aff = torch.rand(2, 9, 9, 13).softmax(1)
    canvas = ld.affinity_map(aff, pixel=(0.5, 0.25))           # pixel (4, 3)
    assert canvas.shape == (2, 1, 9, 13)
    for n, (dy, dx) in enumerate(ld.offsets()):
        torch.testing.assert_close(canvas[:, 0, 4 + dy, 3 + dx], aff[:, n, 4, 3])
    torch.testing.assert_close(canvas.sum((1, 2, 3)), torch.ones(2))   # all 9 samples inside the map
    corner = ld.affinity_map(aff, pixel=(0.0, 0.0))
    torch.testing.assert_close(corner.sum((1, 2, 3)), aff[:, [4, 5, 7, 8], 0, 0].sum(1))


def small_model(**kw):
    torch.manual_seed(0)
    return galdv2.GALDv2(common.ResNet(18, 8), 5, channels=32, **kw)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_ld_switch_swaps_only_the_ld_module():
    """ld=v1 / none are GALD v1 with the same GA (galdv1.GALD, ld on / off). ld=v2 with the default
    combine='eq3' adds exactly the LDv2 convs (Table IV's rows differ in the LD module alone);
    'local-first' also widens convb to read concat(X_gald, X_l): 2C -> C instead of C -> C."""
    with torch.device("meta"):                                         # counts and widths only
        none, v1, v2 = (small_model(ld=ld) for ld in ("none", "v1", "v2"))
        references = {ld: galdv1.GALD(common.ResNet(18, 8), 5, ga="aspp", ld=ld, channels=32) for ld in (False, True)}
        wide = small_model(combine="local-first")
    for model, ld in ((none, False), (v1, True)):
        assert n_params(model) == n_params(references[ld])
    assert v2.combine == "eq3" and v2.decoder.convb[0].in_channels == 32
    assert n_params(v2) - n_params(none) == n_params(v2.ld)
    assert n_params(v1) - n_params(none) == n_params(v1.ld)
    assert n_params(wide) - n_params(none) == n_params(wide.ld) + 32 * 32 * 9


@pytest.mark.parametrize("combine", ["eq3", "local-first"])
def test_combine_decides_what_reaches_eq3(combine):
    """eq3: convb reads X_gald itself; local-first: concat(X_gald, X_l). Either way Eq. (3) then
    concatenates convb's output with layer4 (2C + 512 channels into the head's 3x3 conv)."""
    model = small_model(combine=combine, kernel_size=3, dilation=2).eval()
    seen = {}
    model.ld.register_forward_hook(lambda m, i, o: seen.update(x_gald=o[0], x_l=i[1]))
    model.decoder.convb.register_forward_hook(lambda m, i, o: seen.update(convb_in=i[0]))
    model.decoder.head.register_forward_hook(lambda m, i, o: seen.update(head_in=i[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 41, 49))
    expected = seen["x_gald"] if combine == "eq3" else torch.cat([seen["x_gald"], seen["x_l"]], 1)
    assert torch.equal(seen["convb_in"], expected)
    assert seen["head_in"].shape[1] == 32 + 512                 # Eq. (3): convb(.) ++ layer4 (ResNet-18)


def test_head_flops_of_the_two_readings():
    """FlopCounterMode: local-first costs exactly the widened convb more than eq3, 2 (2C - C) C 9 h w,
    and the GA (ASPP) reads the C-channel X_l, not layer4."""
    from torch.utils.flop_counter import FlopCounterMode
    flops = {}
    for combine in ("eq3", "local-first"):
        model = small_model(combine=combine, kernel_size=3, dilation=2).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, 33, 41))                    # 5 x 6 features
        flops[combine] = counter.get_total_flops()
    assert flops["local-first"] - flops["eq3"] == 2 * 32 * 32 * 9 * 5 * 6
    assert all(b[0].in_channels == 32 for b in model.ga.branches) and model.ga.image_pool[1][0].in_channels == 32


class StubTrunk(torch.nn.Module):
    """Stands in for a ResNet-50/101 (stage widths and strides; zero features) to count the head's
    parameters and FLOPs fast."""
    channels = (256, 512, 1024, 2048)
    strides = (4, 8, 8, 8)

    def forward(self, image):
        B, _, H, W = image.shape
        return [image.new_zeros(B, c, -(-H // s), -(-W // s)) for c, s in zip(self.channels, self.strides)]


def head_params(model):
    """Parameters outside the backbone and the training-only aux head."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("backbone.", "decoder.aux_head.")))


def ldv2_params(C, key_width):
    """LDv2's parameters: W_theta 2C -> C' with a bias, W_phi 2C -> C' without, W_g 2C -> C with a bias."""
    return (2 * C * key_width + key_width) + 2 * C * key_width + (2 * C * C + C)


def test_head_parameter_counts_of_tables_iv_and_vi():
    """The heads behind the README's Table IV / VI rows (512 channels, 19 classes): a deep-stem
    ResNet-50 adds 23.632M, a ResNet-101 42.624M. GA (ASPP) 28.066M; + LDv1 16.9k; + LDv2 1.574M
    at the default Q/K width C' = C = 512 (0.656M at 64) with eq3, 3.933M with local-first (its
    widened convb alone 2.359M); GALD v1 (CGNL) 24.039M."""
    with torch.device("meta"):
        build = lambda **kw: head_params(galdv2.GALDv2(StubTrunk(), 19, **kw))
        ga, v1, eq3, wide = build(ld="none"), build(ld="v1"), build(), build(combine="local-first")
        gald1 = head_params(galdv1.GALD(StubTrunk(), 19))
        narrow_keys = build(key_channels=64)
    widened_convb = (2 * 512 - 512) * 512 * 9
    assert (eq3 - ga, narrow_keys - ga) == (ldv2_params(512, 512), ldv2_params(512, 64)) == (1573888, 655936)
    assert wide - eq3 == widened_convb == 2359296
    assert (ga, v1 - ga, wide - ga) == (28065811, 16896, 3933184)
    assert gald1 == 24038931


def test_ldv2_flops_are_its_three_1x1_convs_alone():
    """Table IV's input (512 x 512, a 64 x 64 map, C = 512): the FLOP counter sees LDv2 as W_theta,
    W_phi and W_g, 2 N 2C (C' + C' + C) = 4 N C (2 C' + C): +12.88 GFLOPs at C' = 512, +5.37 at 64.
    The k*k logits and weighted sums (element-wise products) are not counted (tools/costs.py).
    local-first adds its widened convb, 2 N (2C - C) C 9 = 19.33 GFLOPs: +32.21 in all."""
    from torch.utils.flop_counter import FlopCounterMode

    def gflops(**kw):
        model = galdv2.GALDv2(StubTrunk(), 19, **kw).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, 512, 512, device="meta"))
        return counter.get_total_flops()

    with torch.device("meta"):
        ga, eq3, narrow, wide = gflops(ld="none"), gflops(), gflops(key_channels=64), gflops(combine="local-first")
    N, C = 64 * 64, 512
    assert (eq3 - ga, narrow - ga) == (4 * N * C * (2 * 512 + C), 4 * N * C * (2 * 64 + C))
    assert wide - eq3 == 2 * N * C * C * 9
    assert [round((f - ga) / 1e9, 2) for f in (eq3, narrow, wide)] == [12.88, 5.37, 32.21]


def averaging_taps(model):
    """Every conv 1 / fan-in at its centre tap alone (a strided conv samples pixel s * j; a map that is
    the same in every channel stays so), no biases, every BN the identity (eval), LDv2's query 0
    (uniform affinity) and ASPP's image pooling 0: on a non-negative image the network is then
    linear and each output sample sees only the input pixels it was computed at (and LDv2's samples)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            kh, kw = m.kernel_size
            m.weight.data.zero_()
            m.weight.data[:, :, kh // 2, kw // 2] = 1 / m.weight.shape[1]
            if m.bias is not None:
                m.bias.data.zero_()
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.zero_()
            m.running_var.fill_(1 - m.eps)
    model.ld.query.weight.data.zero_()
    for p in model.ga.image_pool.parameters():
        p.data.zero_()
    return model.double().eval()


def test_an_input_impulse_peaks_at_its_own_pixel_in_the_logits():
    """End to end through forward (ResNet, ASPP, LDv2 k = 5, r = 6, Eq. 3 head, up-sampling): an
    impulse at input pixel (8 jy, 8 jx) reaches stride-8 sample (jy, jx) alone (LDv2's other samples,
    6 and 12 cells away, are off this 9 x 7 map), and 'out' is the bilinear hat centred on the pixel
    itself: peak * (1 - |y - 8 jy| / 8) * (1 - |x - 8 jx| / 8). align_corners=False put it at +3.5 px."""
    model = averaging_taps(small_model())
    H, W, pixels = 65, 50, [(24, 40), (32, 16)]                # 9 x 7 samples: 65 = 8 * 8 + 1, 50 is not 8k + 1
    image = torch.zeros(len(pixels), 3, H, W, dtype=torch.float64)
    for b, (y, x) in enumerate(pixels):
        image[b, :, y, x] = 1
    with torch.no_grad():
        out = model(image)["out"]                              # (2, 5, H, W)
    hat = lambda n, centre: (1 - (torch.arange(n, dtype=torch.float64) - centre).abs() / 8).clamp(min=0)
    for b, (y, x) in enumerate(pixels):
        peak = out[b, :, y, x]                                 # (5,)
        assert (peak > 0).all()
        torch.testing.assert_close(out[b], peak.view(-1, 1, 1) * hat(H, y).view(H, 1) * hat(W, x),
                                   rtol=1e-12, atol=1e-12)
        assert divmod(out[b, 0].argmax().item(), W) == (y, x)


def test_default_network_trains_on_one_image():
    """ASPP's image pooling at one image per process (single GPU --batch-size 1, CPU DDP): used to die
    with "Expected more than 1 value per channel"."""
    model = small_model().train()
    out = model(torch.randn(1, 3, 72, 88))
    model.loss(out, torch.randint(0, 5, (1, 72, 88)))["total"].backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("ld, maps", [("v2", {"affinity"}), ("v1", {"ld_mask"}), ("none", set())])
def test_network_odd_size_outputs_and_maps(ld, maps):
    model = small_model(ld=ld, kernel_size=3, dilation=2, affinity_pixel=(0.0, 1.0)).train()
    image = torch.randn(2, 3, 33, 47)
    out = model(image)
    assert set(out) == {"out", "aux"}                          # no 'maps' in training
    assert out["out"].shape == out["aux"].shape == (2, 5, 33, 47)
    target = torch.randint(0, 5, (2, 33, 47))
    target[1, :, :3] = 255
    losses = model.loss(out, target)
    # 3003 valid pixels < OHEM's min_kept = 100k: OHEM keeps all, i.e. mean CE over the valid ones
    ce = lambda logits: F.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(losses["total"], ce(out["out"]) + 0.4 * ce(out["aux"]))
    with torch.no_grad():
        out = model.eval()(image)
    assert set(out) == {"out"} | ({"maps"} if maps else set())
    assert set(out.get("maps", {})) == maps
    for m in out.get("maps", {}).values():
        assert m.shape == (2, 1, 5, 6) and 0 <= m.min() and m.max() <= 1
    if ld == "v2":                                             # top-right pixel: 4 of its 9 samples are inside
        assert (out["maps"]["affinity"] > 0).sum() == 2 * 4 and out["maps"]["affinity"][:, 0, 0, 5].gt(0).all()


def parse(argv):
    """galdv2's flags as given, plus the common ones build_backbone reads."""
    parser = argparse.ArgumentParser()
    galdv2.add_args(parser)
    args = parser.parse_args(argv)
    return argparse.Namespace(**vars(args), num_classes=3, backbone="resnet18", stem="tv", output_stride=8,
                              multi_grid=None, pretrained=None, dilation_style="pspnet")


def test_cli_defaults_are_the_papers_and_build_model():
    """train.py's parser with --method galdv2 holds the values that will be used (--help shows them,
    none is None), and build_model builds them: ASPP + LDv2, eq3, k = 5, r = 6 (Table II b's row behind
    every Cityscapes figure; the other datasets pass 3), one width C' = C = 512 for Q, K and V (Eq. 4),
    key and query from concat(X_g, X_l), OHEM on."""
    args = train.parse_args(["--method", "galdv2", "--backbone", "resnet18"])
    assert (args.ga, args.ld, args.ohem) == ("aspp", "v2", True)
    assert [getattr(args, flag) for flag in galdv2.LDV2_FLAGS] == \
        ["eq3", 5, 6, 512, "concat", "concat", (0.5, 0.5)]
    parser = argparse.ArgumentParser()
    galdv2.add_args(parser)
    assert all(a.default is not None for a in parser._actions), "a galdv2 flag whose --help says None"
    with torch.device("meta"):                                         # what is built, not its values
        model = galdv2.build_model(parse([]))
    assert isinstance(model.ga, galdv1.ASPP) and [b[0].dilation[0] for b in model.ga.branches[1:]] == [12, 24, 36]
    ld = model.ld
    assert isinstance(ld, galdv2.DynamicLocalDistribution) and model.ohem and model.aux_weight == 0.4
    assert (model.combine, ld.kernel_size, ld.dilation, ld.key_input, ld.query_input) == \
        ("eq3", 5, 6, "concat", "concat")
    assert ld.query.out_channels == ld.key.out_channels == ld.value.out_channels == 512
    assert model.affinity_pixel == (0.5, 0.5)
    with torch.device("meta"):
        model = galdv2.build_model(parse(["--ld-combine", "local-first", "--ld-kernel", "3", "--ld-dilation", "3",
                                          "--ld-key-channels", "16", "--key-input", "global", "--affinity-pixel",
                                          "0", "1"]))
    ld = model.ld
    assert (model.combine, ld.kernel_size, ld.dilation, ld.key_input, ld.key.out_channels, model.affinity_pixel) == \
        ("local-first", 3, 3, "global", 16, (0.0, 1.0))
    assert model.decoder.convb[0].in_channels == 1024


LDV2_ARGV = [["--ld-combine", "local-first"], ["--ld-kernel", "3"], ["--ld-dilation", "3"],
             ["--ld-key-channels", "32"], ["--key-input", "global"], ["--query-input", "global"], ["--affinity-pixel", "0.2", "0.8"]]


@pytest.mark.parametrize("ld", ["v1", "none"])
@pytest.mark.parametrize("flag", LDV2_ARGV, ids=[a[0] for a in LDV2_ARGV])
def test_ldv2_flags_without_ldv2_are_refused(flag, ld):
    """An LDv2 flag set to anything but its default changes nothing without LDv2: an error that says why."""
    with pytest.raises(common.InputError, match=f"^{flag[0]}: LDv2 options, which --ld {ld} does not use$"):
        galdv2.build_model(parse(["--ld", ld] + flag))
    with pytest.raises(common.InputError, match="--ld-kernel, --key-input: LDv2 options"):
        galdv2.build_model(parse(["--ld", ld, "--key-input", "global", "--ld-kernel", "3"]))


def test_no_ga_and_no_ld_is_refused():
    """--ga none --ld none is a model that no table has: one line naming both flags."""
    with pytest.raises(common.InputError, match="^--ga none --ld none: neither GA nor LD, a model that no table"):
        galdv2.build_model(parse(["--ga", "none", "--ld", "none"]))
    with torch.device("meta"):                                         # what is built, not its values
        assert isinstance(galdv2.build_model(parse(["--ga", "none"])).ld, galdv2.DynamicLocalDistribution)
        assert isinstance(galdv2.build_model(parse(["--ld", "none"])).ga, galdv1.ASPP)
