"""Math tests of denoised_nl.py: the memory-light A'' equals the authors' unfold formulation (values
and gradients, gradcheck of its backward), GR/LR off is the plain non-local block, P_class is
symmetric, no (B, N, k*k, N) tensor is ever built and the backward accumulates into one buffer,
GR's class map comes from the supervised layer3 head by default (Table V's FLOPs) and is read at
F's own samples, every up-sampling puts a strided sample on the pixel it was computed at (an
impulse through the whole model), maps and deep-supervision wiring, flags that would change
nothing, odd sizes."""
import argparse
import inspect
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import denoised_nl  # noqa: E402
import galdv1  # noqa: E402
import train  # noqa: E402
from denoised_nl import (DenoisedNLBlock, DenoisedNLNet, LocalRetention, class_agreement,  # noqa: E402
                         local_retention, local_similarity)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: one intra-op thread


D = {"dtype": torch.float64}   # the math tests compare in float64; the model tests run in float32


# ----------------------------------------------------------------------------------------------
# References: the authors' formulation with nn.Unfold, and explicit loops


def unfold_retention(a, s_l, size, window):
    """A'' as the official code: unfold each row of A' into a (B, n, k*k, N) tensor, weight, sum."""
    B, n, N = a.shape
    u = F.unfold(a.view(B, n, *size), window, padding=window // 2).view(B, n, window ** 2, N)
    return (u * s_l.unsqueeze(1)).sum(2)


def unfold_block(block, f, coarse_logits=None):
    """The whole block written as the official code (unfold for S_l and A''), reusing its weights.
    coarse_logits: the layer3 logits on X's grid, resized to F's as model.py does (align_corners=True)."""
    B, C, H, W = f.shape
    N, kk, r = H * W, block.window_size ** 2, block.window_size // 2
    q, k = block.query(f), block.key(f)
    v = block.value(f).flatten(2).transpose(1, 2)
    a = torch.softmax(q.flatten(2).transpose(1, 2) @ k.flatten(2), -1)
    if block.global_rectifying:
        logits = block.classifier(f) if coarse_logits is None else \
            F.interpolate(coarse_logits, (H, W), mode="bilinear", align_corners=True)
        p = logits.softmax(1).flatten(2)
        a = a * torch.sigmoid(p.transpose(1, 2) @ p)
    if block.local_retention:
        k_win = F.unfold(k, block.window_size, padding=r).view(B, -1, kk, N)       # k_{j+d}
        s_l = torch.sigmoid(torch.einsum("bcj,bcdj->bdj", q.flatten(2), k_win))   # (B, k*k, N)
        a = unfold_retention(a, s_l, (H, W), block.window_size)
    return block.gamma * (a @ v).transpose(1, 2).reshape(B, C, H, W) + f


def make_block(channels=8, classes=4, **kw):
    torch.manual_seed(0)
    block = DenoisedNLBlock(channels, classes, key_channels=3, **kw).double()
    with torch.no_grad():
        block.gamma.fill_(0.7)                                         # gamma = 0 would hide A'' V
    return block


def grads(tensors):
    return [t.grad.clone() for t in tensors]


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Local Retention and Global Rectifying


@pytest.mark.parametrize("window,size,rows", [(3, (5, 7), slice(None)), (5, (4, 6), slice(3, 11)), (1, (3, 5), slice(None))])
def test_local_retention_matches_unfold(window, size, rows):
    torch.manual_seed(1)
    B, N = 2, size[0] * size[1]
    a = torch.rand(B, N, N, **D)[:, rows].contiguous().requires_grad_()   # some (or all) query rows of A'
    s = torch.rand(B, window ** 2, N, requires_grad=True, **D)
    g = torch.randn(B, a.shape[1], N, **D)
    ours = local_retention(a, s, size, window)
    (ours * g).sum().backward()
    ga, gs = grads([a, s])
    a.grad = s.grad = None
    ref = unfold_retention(a, s, size, window)
    (ref * g).sum().backward()
    assert max_diff(ours, ref) < 1e-10                                 # float64: equal up to rounding
    assert max_diff(ga, a.grad) < 1e-10 and max_diff(gs, s.grad) < 1e-10


@pytest.mark.parametrize("window,size", [(3, (4, 5)), (5, (3, 4)), (7, (2, 3))])   # 7 > 2H: empty offsets
def test_local_retention_gradcheck(window, size):
    """The hand-written backward of LocalRetention against finite differences (float64)."""
    torch.manual_seed(10)
    N = size[0] * size[1]
    a = torch.rand(2, 3, N, requires_grad=True, **D)                  # 3 query rows of A'
    s = torch.rand(2, window ** 2, N, requires_grad=True, **D)
    assert torch.autograd.gradcheck(lambda a, s: LocalRetention.apply(a, s, size, window), (a, s))


class NewStorages(TorchDispatchMode):
    """Counts the storages of at least `nbytes` that ops create (views and in-place ops make none)."""

    def __init__(self, nbytes):
        super().__init__()
        self.nbytes, self.count = nbytes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.count += t.untyped_storage().nbytes() >= self.nbytes
        return out


def test_local_retention_makes_one_map_forward_and_backward():
    """Forward: one (B, n, N) output, no padded copy of A'. Backward: dA' accumulated in one buffer
    (plus the product that dS_l sums at the central offset), not a zero-filled padded gradient per
    offset of the window as autograd of k*k shifted slices makes (k*k = 9 of them here)."""
    torch.manual_seed(11)
    B, n, size = 2, 12, (7, 9)                                        # n > k*k: S_l is smaller than a map
    N = size[0] * size[1]
    a = torch.rand(B, n, N, requires_grad=True, **D)
    s = torch.rand(B, 9, N, requires_grad=True, **D)
    one_map = B * n * N * 8                                            # bytes of one float64 (B, n, N) map
    with NewStorages(one_map) as forward:
        out = local_retention(a, s, size, 3)
    g = torch.randn_like(out)
    with NewStorages(one_map) as backward:
        out.backward(g)
    assert forward.count == 1, f"{forward.count} map-sized tensors in the forward"
    assert backward.count <= 2, f"{backward.count} map-sized tensors in the backward"


def test_local_retention_index_convention():
    """A''[i, j] = sum_d A'[i, j + d] * S_l[j, d], written out with loops over pixels and offsets."""
    torch.manual_seed(2)
    H, W, window = 3, 4, 3
    N = H * W
    a, s = torch.rand(1, N, N, **D), torch.rand(1, 9, N, **D)
    expected = torch.zeros(1, N, N, **D)
    for i in range(N):
        for y in range(H):
            for x in range(W):
                for d in range(9):
                    yy, xx = y + d // 3 - 1, x + d % 3 - 1
                    if 0 <= yy < H and 0 <= xx < W:
                        expected[0, i, y * W + x] += a[0, i, yy * W + xx] * s[0, d, y * W + x]
    torch.testing.assert_close(local_retention(a, s, (H, W), window), expected)


def test_local_similarity_matches_loop():
    torch.manual_seed(3)
    H, W, window = 4, 5, 3
    q, k = torch.randn(2, 3, H, W, **D), torch.randn(2, 3, H, W, **D)
    s = local_similarity(q, k, window)
    assert s.shape == (2, 9, H * W)
    for y in range(H):
        for x in range(W):
            for d in range(9):
                yy, xx = y + d // 3 - 1, x + d % 3 - 1
                inside = 0 <= yy < H and 0 <= xx < W
                dot = (q[:, :, y, x] * k[:, :, yy, xx]).sum(1) if inside else torch.zeros(2, **D)
                torch.testing.assert_close(s[:, d, y * W + x], torch.sigmoid(dot))


def test_class_agreement_symmetric_and_bounded():
    torch.manual_seed(4)
    p = torch.randn(2, 5, 12, **D).softmax(1)                          # (B, K, N) class probabilities
    pc = class_agreement(p.transpose(1, 2), p)                         # (B, N, N)
    assert pc.shape == (2, 12, 12)
    torch.testing.assert_close(pc, pc.transpose(1, 2))
    torch.testing.assert_close(pc[1, 3, 7], torch.sigmoid((p[1, :, 3] * p[1, :, 7]).sum()))
    assert pc.min() >= 0.5 and pc.max() <= torch.sigmoid(torch.tensor(1.0, **D))   # p_i . p_j in [0, 1]


# ----------------------------------------------------------------------------------------------
# The block


@pytest.mark.parametrize("window,chunk,class_conv", [(3, 2048, False), (3, 7, False), (5, 4, False), (3, 7, True)])
def test_block_matches_unfold_reference(window, chunk, class_conv):
    """Default: GR's P from layer3 logits on X's grid at the authors' crop sizes (2H - 1 samples for
    F's H, 8k + 1 pixels): every second sample (what the model passes) equals model.py's
    align_corners=True resize, values and gradients; class_conv=True: from the block's own 1x1 conv on F."""
    block = make_block(window_size=window, query_chunk=chunk, class_conv=class_conv).train()
    assert (block.classifier is not None) == class_conv
    f = torch.randn(2, 8, 5, 7, requires_grad=True, **D)
    logits = None if class_conv else torch.randn(2, 4, 9, 13, requires_grad=True, **D)
    inputs = [f] + ([] if class_conv else [logits])
    params = inputs + list(block.parameters())
    out, _ = block(f, None if class_conv else logits[..., ::2, ::2])
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ours = grads(params)
    for t in params:
        t.grad = None
    ref = unfold_block(block, f, logits)
    (ref * g).sum().backward()
    assert max_diff(out, ref) < 1e-10
    names = ["f", "logits"][:len(inputs)] + [n for n, _ in block.named_parameters()]
    for name, a, b in zip(names, ours, grads(params)):
        assert max_diff(a, b) < 1e-10, f"gradient of {name}"
        assert b.abs().sum() > 0, f"{name} gets no gradient"


def test_block_without_class_conv_needs_coarse_logits_on_its_grid():
    block = make_block()
    with pytest.raises(ValueError):
        block(torch.randn(1, 8, 3, 3, **D))
    with pytest.raises(ValueError, match="3 x 3 grid"):
        block(torch.randn(1, 8, 3, 3, **D), torch.randn(1, 4, 5, 5, **D))   # X's grid, not F's


def test_without_gr_and_lr_is_the_non_local_block():
    block = make_block(global_rectifying=False, local_retention=False).eval()
    assert block.classifier is None
    f = torch.randn(2, 8, 3, 5, **D)
    out, _ = block(f)
    q, k = block.query.weight[:, :, 0, 0], block.key.weight[:, :, 0, 0]
    v = block.value.weight[:, :, 0, 0]
    x = f.flatten(2)                                                   # (B, C, N)
    expected = torch.empty_like(x)
    for b in range(2):
        for i in range(15):                                            # y_i = sum_j softmax_j(q_i.k_j) v_j
            logits = torch.stack([(q @ x[b, :, i]) @ (k @ x[b, :, j]) for j in range(15)])
            weights = logits.softmax(0)
            expected[b, :, i] = 0.7 * sum(weights[j] * (v @ x[b, :, j]) for j in range(15)) + x[b, :, i]
    torch.testing.assert_close(out, expected.view_as(f))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op creates."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_tensor_larger_than_a_padded_attention_map():
    block = make_block(window_size=3).train()
    B, H, W = 2, 9, 11
    N = H * W
    f, logits = torch.randn(B, 8, H, W, requires_grad=True, **D), torch.randn(B, 4, H, W, **D)
    with LargestTensor() as ours:
        block(f, logits)[0].sum().backward()
    with LargestTensor() as ref:
        unfold_block(block, f, logits).sum().backward()
    assert ours.numel <= B * N * (H + 2) * (W + 2)                     # one zero-padded (B, N, N) map
    assert ref.numel >= B * N * 9 * N                                  # the check can fail


def test_maps_are_the_rows_of_the_chosen_pixel():
    block = make_block(map_pixel=(1.0, 0.0)).eval()                    # bottom-left pixel
    f, logits = torch.randn(1, 8, 5, 7, **D), torch.randn(1, 4, 5, 7, **D)
    _, maps = block(f, logits)
    assert list(maps) == ["map1_A", "map2_A_gr", "map3_A_lr"]
    i = 4 * 7 + 0
    q, k = block.query(f).flatten(2), block.key(f).flatten(2)
    a = torch.softmax(q[0, :, i] @ k[0], -1)                           # row i of A
    p = logits.softmax(1).flatten(2)[0]
    a_gr = a * torch.sigmoid(p[:, i] @ p)                              # row i of A'
    torch.testing.assert_close(maps["map1_A"].flatten(), a.float())            # the raw rows, as float32
    torch.testing.assert_close(maps["map2_A_gr"].flatten(), a_gr.float())
    torch.testing.assert_close(maps["map1_A"].sum(), torch.tensor(1.0))        # a softmax row: not rescaled
    for m in maps.values():
        assert m.shape == (1, 1, 5, 7) and m.dtype == torch.float32 and m.min() >= 0


# ----------------------------------------------------------------------------------------------
# The model


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(6)
    return common.ResNet(18, 8)


NARROW = dict(channels=32, key_channels=8)   # the wiring tests' head widths (the defaults: 512 and 64)


def test_model_odd_size_loss_and_gr_wiring(backbone):
    """Eq. (5) with lambda1 = lambda2 = 1. By default (class_map='aux', in both modes) GR's P is the
    softmax of the supervised layer3 aux head, so the principal loss trains that head too and it runs
    in eval; with class_map='conv' P comes from a 1x1 conv on F and the head is a pure side output."""
    torch.manual_seed(7)
    image, target = torch.randn(1, 3, 33, 47), torch.randint(0, 5, (1, 33, 47))
    target[0, :4] = common.IGNORE_INDEX
    with torch.device("meta"):
        assert DenoisedNLNet(backbone, 5).p_from_aux                   # the default
    for follow_code, class_map in ((False, "aux"), (False, "conv"), (True, "aux"), (True, "conv")):
        model = DenoisedNLNet(backbone, 5, follow_code=follow_code, class_map=class_map, **NARROW).train()
        assert (model.dnl.classifier is None) == (class_map == "aux")
        seen = []
        model.aux3.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        with torch.no_grad():
            model.dnl.gamma.fill_(0.5)
        out = model(image)
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            "out": (1, 5, 33, 47), "aux_layer2": (1, 5, 33, 47), "aux_layer3": (1, 5, 33, 47)}
        losses = model.loss(out, target)
        torch.testing.assert_close(losses["total"], losses["main"] + losses["aux_layer2"] + losses["aux_layer3"])
        model.zero_grad()
        losses["main"].backward()                                      # the principal loss alone
        aux3_grad = sum(p.grad.abs().sum() for p in model.aux3.parameters() if p.grad is not None)
        assert (aux3_grad > 0) == (class_map == "aux")
        model.eval()
        seen.clear()
        with torch.no_grad():
            out = model(image)
        assert len(seen) == (class_map == "aux")                       # the layer3 head runs in eval for GR
        assert set(out) == {"out", "maps"} and out["out"].shape == (1, 5, 33, 47)
        assert all(m.shape == (1, 1, 3, 3) for m in out["maps"].values())  # 33x47 -> 1/16 grid 3x3


def test_every_parameter_learns_and_every_branch_reaches_the_output(backbone):
    """With gamma moved off its initial 0, every parameter gets a non-zero gradient (both modes),
    and the output depends on F' (through gamma) and, in paper mode, on the GAP branch."""
    torch.manual_seed(8)
    image, target = torch.randn(2, 3, 33, 47), torch.randint(0, 5, (2, 33, 47))
    for follow_code, class_map in ((False, "aux"), (True, "aux"), (False, "conv")):
        model = DenoisedNLNet(backbone, 5, follow_code=follow_code, class_map=class_map, **NARROW).train()
        with torch.no_grad():
            model.dnl.gamma.fill_(0.5)
        model.zero_grad()
        model.loss(model(image), target)["total"].backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not dead, f"no gradient for {dead}"
        model.eval()
        with torch.no_grad():
            before = model(image)["out"]
            model.dnl.gamma.fill_(-1.0)                                 # F' changes
            assert not torch.allclose(model(image)["out"], before)
            if not follow_code:
                model.dnl.gamma.fill_(0.5)
                model.context.bias.add_(1.0)                            # the GAP branch changes
                assert not torch.allclose(model(image)["out"], before)


def test_table3_blocks_replace_the_denoised_nl(backbone):
    """Table III: '+PPM' / '+ASPP' put galdv1's modules on F (stride 16 = 2 x the backbone's 8):
    ASPP's rates become DeepLabv3's (6, 12, 18); F' = M(F) feeds the head."""
    torch.manual_seed(9)
    for block, kind in (("psp", galdv1.PSP), ("aspp", galdv1.ASPP)):
        model = DenoisedNLNet(backbone, 5, block=block, output_stride=8).eval()
        assert model.dnl is None and isinstance(model.multiscale, kind)
        if block == "aspp":
            assert [b[0].dilation[0] for b in model.multiscale.branches[1:]] == [6, 12, 18]
        seen = []
        model.multiscale.register_forward_hook(lambda m, i, o: seen.append((i[0].shape, o.shape)))
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 64))
        assert set(out) == {"out"} and out["out"].shape == (1, 5, 64, 64)
        assert seen == [((1, 512, 4, 4), (1, 512, 4, 4))]               # F at 1/16, width C kept
    with pytest.raises(common.InputError):
        DenoisedNLNet(backbone, 5, block="ocnet")


def test_baseline_without_attention(backbone):
    model = DenoisedNLNet(backbone, 5, block="none").eval()
    assert model.dnl is None
    with torch.no_grad():
        out = model(torch.randn(1, 3, 17, 17))
    assert set(out) == {"out"} and out["out"].shape == (1, 5, 17, 17)


# ----------------------------------------------------------------------------------------------
# Alignment: every strided sample lands on the pixel it was computed at


def make_local(model):
    """Every conv's centre tap averages its inputs (other taps and biases 0), BN and dropout in eval
    (BN then only scales by 1/sqrt(1 + eps)), gamma stays 0: a zero image gives zero everywhere, and
    an impulse at pixel s * j reaches sample j of each stride-s map (a max pool's window included)
    and no other, with a positive value; in training mode, so that every output is there."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                m.weight[:, :, m.kernel_size[0] // 2, m.kernel_size[1] // 2] = 1 / m.weight.shape[1]
                if m.bias is not None:
                    m.bias.zero_()
    model.double().train()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.Dropout2d)):
            m.eval()
    return model


@pytest.fixture(scope="module")
def local_resnet():
    """Output stride -> a ResNet-18 made local (make_local), built once."""
    return {s: make_local(common.ResNet(18, s)) for s in (8, 16)}


IMPULSE, SIZE = (32, 32), (56, 60)      # on every map's grid (strides 4 to 32), not on a last sample


def impulse_peaks(model, names=("out", "aux_layer2", "aux_layer3")):
    """Where each output's response to a one-pixel impulse at IMPULSE on a zero image peaks: name ->
    (y, x), asserting that the peak is one pixel (the zero image gives zero: no biases)."""
    image = torch.zeros(1, 3, *SIZE, **D)
    image[0, :, IMPULSE[0], IMPULSE[1]] = 1.0
    with torch.no_grad():
        out = model(image)
    peaks = {}
    for name in names:
        response = out[name][0, 0]                                     # (H, W)
        assert (response == response.max()).sum() == 1, f"{name}: the peak is not one pixel"
        peaks[name] = divmod(int(response.argmax()), SIZE[1])
    return peaks


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("follow_code", [False, True])
def test_impulse_peaks_at_its_pixel_end_to_end(local_resnet, output_stride, follow_code):
    """A one-pixel change at (32, 32) peaks at (32, 32) in the logits and both deep-supervision
    outputs, as model.py's align_corners=True does at its 8k+1 crops. A resize (align_corners=False)
    put it 3.5 px off where the side is a multiple of the stride (56 = 8 x 7), and elsewhere by an
    amount that depends on the side (60 pixels onto 8 samples)."""
    model = make_local(DenoisedNLNet(local_resnet[output_stride], 3, channels=8, follow_code=follow_code,
                                     output_stride=output_stride))
    assert impulse_peaks(model) == {name: IMPULSE for name in ("out", "aux_layer2", "aux_layer3")}


@pytest.mark.parametrize("block", ["denoised", "aspp", "none"])
@pytest.mark.parametrize("follow_code", [False, True])
def test_f_prime_lands_on_the_x_sample_it_was_computed_at(local_resnet, block, follow_code):
    """F' alone (the head's weights on X and on the GAP branch zeroed): F's sample i, computed by the
    stride-2 Reduction at X's sample 2i, is up-sampled back onto X's sample 2i, so an impulse at
    pixel 16i peaks there; a resize puts it between X's samples 2i and 2i + 1 (a flat top)."""
    model = make_local(DenoisedNLNet(local_resnet[8], 3, channels=8, block=block, follow_code=follow_code))
    with torch.no_grad():
        conv = model.head[0][0]                                        # the head's 3x3 conv on the concat
        c4, channels = model.backbone.channels[3], model.reduction[0][0].out_channels
        conv.weight[:, :c4] = 0                                        # X
        conv.weight[:, c4 + channels:] = 0                             # GAP(X) (paper mode)
    assert impulse_peaks(model, ["out"]) == {"out": IMPULSE}


@pytest.mark.parametrize("output_stride,step", [(8, 2), (16, 2), (32, 4)])
def test_gr_reads_p_at_f_own_samples(output_stride, step):
    """GR's P is the layer3 logits at F's samples: F's sample i was computed at X's sample 2i, i.e.
    at layer3's sample (2 s4 / s3) * i; at a 64k + 1 crop that equals model.py's align_corners=True
    resize of those logits onto F's grid (a resize with align_corners=False does not)."""
    torch.manual_seed(14)
    model = DenoisedNLNet(common.ResNet(18, output_stride), 5, channels=8).double().eval()
    assert model.class_map_step == step
    seen = {}
    model.aux3.register_forward_hook(lambda m, i, o: seen.update(aux3=o))
    model.dnl.register_forward_hook(lambda m, i, o: seen.update(f=i[0], p_logits=i[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 65, 129, **D))                         # 64k + 1 pixels
    aux3, f = seen["aux3"], seen["f"]
    assert torch.equal(seen["p_logits"], aux3[..., ::step, ::step])
    aligned = F.interpolate(aux3, f.shape[-2:], mode="bilinear", align_corners=True)
    torch.testing.assert_close(seen["p_logits"], aligned, rtol=0, atol=1e-12)
    assert max_diff(seen["p_logits"], common.resize(aux3, f.shape[-2:])) > 1e-3


class Strides(nn.Module):
    """A stand-in backbone that only declares its channels and strides."""

    def __init__(self, strides):
        super().__init__()
        self.channels, self.strides = (4, 4, 4, 4), strides


def test_p_on_a_grid_that_misses_f_samples_is_refused():
    """Layer3 at stride 12 and F at 16: F's samples are not layer3 samples, so P cannot be read
    there: refused with class_map='aux', accepted with class_map='conv' (P from F itself)."""
    assert denoised_nl.class_map_step((4, 8, 16, 32)) == 4
    with pytest.raises(common.InputError, match="not a multiple"):
        DenoisedNLNet(Strides((4, 8, 12, 8)), 5, channels=8)
    assert DenoisedNLNet(Strides((4, 8, 12, 8)), 5, channels=8, class_map="conv").class_map_step is None


def test_window_size_must_be_odd():
    with pytest.raises(common.InputError):
        DenoisedNLBlock(8, 4, window_size=4)


def block_gflops(class_map):
    """GFLOPs of the model's Denoised NL block at Table V's input (1 x 3 x 768 x 768 -> F of
    1 x 512 x 48 x 48, layer3 logits read at F's 48 x 48 samples, 19 classes), counted on meta tensors."""
    with torch.device("meta"):
        model = DenoisedNLNet(common.ResNet(18, 8), 19, **({} if class_map is None else {"class_map": class_map}))
        f, logits = torch.empty(1, 512, 48, 48), torch.empty(1, 19, 48, 48)
        with FlopCounterMode(display=False) as counter:
            model.dnl.train()(f, logits if model.p_from_aux else None)
    return counter.get_total_flops() / 1e9


def test_default_class_map_gives_table5_flops():
    """Table V: +NL 7.63, +Denoised NL 7.83 GFLOPs. The non-local block plus P^T P with P supplied
    from outside (the layer3 aux head, the default) is 7.83; a 1x1 conv on F would make it 7.87."""
    N, K = 48 * 48, 19
    nl = 2 * N * 512 * (64 + 64 + 512) + 2 * N * N * (64 + 512)        # Q, K, V convs; Q K^T; A'' V
    assert block_gflops(None) == pytest.approx((nl + 2 * N * N * K) / 1e9, abs=1e-9)   # + P^T P
    assert round(block_gflops(None), 2) == 7.83 and round(nl / 1e9, 2) == 7.63
    assert round(block_gflops("conv"), 2) == 7.87                      # + the 1x1 conv 512 -> 19 on F


def parse(flags):
    parser = argparse.ArgumentParser()
    denoised_nl.add_args(parser)
    return parser.parse_args(flags)


@pytest.mark.parametrize("flags", [["--class-map", "conv", "--no-global-rectifying"],
                                   ["--class-map", "conv", "--block", "none"],
                                   ["--window-size", "5", "--no-local-retention"],
                                   ["--no-global-rectifying", "--block", "psp"],
                                   ["--map-pixel", "0", "0", "--block", "aspp"]])
def test_flags_that_change_nothing_are_rejected(flags):
    with pytest.raises(common.InputError, match="would change nothing"):
        denoised_nl.build_model(parse(flags))


def test_flags_default_to_the_model_defaults():
    """--help shows the value that will be used: each flag's default is the constructor's, none None."""
    defaults = {name: p.default for name, p in inspect.signature(DenoisedNLNet).parameters.items()}
    args = vars(parse([]))
    assert None not in args.values()
    for name, value in args.items():
        assert value == defaults[name], f"--{name.replace('_', '-')}"


def test_build_model_defaults():
    """Through the command line: GR's P from the layer3 aux head, --follow-code leaves it alone."""
    for flags, class_conv in (([], False), (["--follow-code"], False), (["--class-map", "conv"], True),
                              (["--follow-code", "--class-map", "conv"], True)):
        args = train.parse_args(["--method", "denoised_nl", "--backbone", "resnet18"] + flags)
        args.num_classes = 5
        with torch.device("meta"):                                     # what is built, not its values
            model = denoised_nl.build_model(args)
        assert (model.dnl.classifier is not None) == class_conv and model.p_from_aux == (not class_conv)
        assert model.follow_code == ("--follow-code" in flags)
        assert (model.dnl.window_size, model.dnl.map_pixel) == (3, (0.5, 0.5))
