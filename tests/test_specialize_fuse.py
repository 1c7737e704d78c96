"""Math tests for specialize_fuse.py: each vectorised step against a slow explicit loop over cells.

Run: python -m pytest -q tests/test_specialize_fuse.py
"""
import argparse
import ast
import copy
import functools
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import specialize_fuse as sf  # noqa: E402
from common import IGNORE_INDEX  # noqa: E402

torch.set_num_threads(1)


def blocky_labels(B, H, W, classes=3, seed=0):
    """Labels constant on 32x32 cells (about half of them) or on 8x8 blocks with a few noisy pixels,
    plus scattered ignore pixels, one all-ignored 32x32 cell and one all-ignored 4x4 cell: every kind
    of cell (unity, mix, all-ignored) occurs at every level."""
    g = torch.Generator().manual_seed(seed)
    coarse = sf.nearest_up(torch.randint(0, classes, (B, H // 32, W // 32), generator=g), 32)
    fine = sf.nearest_up(torch.randint(0, classes, (B, H // 8, W // 8), generator=g), 8)
    noise = torch.rand(B, H, W, generator=g)
    fine = torch.where(noise < 0.02, torch.randint(0, classes, (B, H, W), generator=g), fine)
    use_coarse = sf.nearest_up(torch.rand(B, H // 32, W // 32, generator=g) < 0.5, 32)
    target = torch.where(use_coarse, coarse, fine)
    target[noise > 0.97] = IGNORE_INDEX
    target[0, :32, 32:64] = IGNORE_INDEX
    target[1, 4:8, 8:12] = IGNORE_INDEX
    return target


def slow_pyramid(target, strides):
    B, H, W = target.shape
    semantic = [torch.full((B, H // s, W // s), IGNORE_INDEX, dtype=torch.long) for s in strides]
    unity = [torch.full((B, H // s, W // s), IGNORE_INDEX, dtype=torch.long) for s in strides]
    for l, s in enumerate(strides):
        for b in range(B):
            for i in range(H // s):
                for j in range(W // s):
                    cell = target[b, i * s:(i + 1) * s, j * s:(j + 1) * s]
                    labels = cell[cell != IGNORE_INDEX].unique()
                    if len(labels) == 1:
                        semantic[l][b, i, j], unity[l][b, i, j] = labels[0], 1
                    elif len(labels) > 1:
                        unity[l][b, i, j] = 0
    return semantic, unity


@pytest.mark.parametrize("levels", [2, 4])
def test_pyramid_ground_truth_matches_cell_loop(levels):
    strides = sf.STRIDES[levels]
    target = blocky_labels(2, 64, 96)
    semantic, unity = sf.pyramid_ground_truth(target, strides)
    slow_semantic, slow_unity = slow_pyramid(target, strides)
    for l in range(levels):
        assert torch.equal(semantic[l], slow_semantic[l]), f"semantic level {l}"
        assert torch.equal(unity[l], slow_unity[l]), f"unity level {l}"
    finest = unity[-1]
    assert (finest == 1).any() and (finest == 0).any() and (finest == IGNORE_INDEX).any()
    assert (unity[0] == 1).any() and (unity[0] == 0).any()


def slow_done(unity, prob, strides, policy, tau):
    """Done-by-coarser masks by a loop over every cell and every coarser ancestor."""
    done = [torch.zeros(u.shape, dtype=torch.bool) for u in unity]
    for l in range(1, len(strides)):
        B, h, w = unity[l].shape
        for b in range(B):
            for i in range(h):
                for j in range(w):
                    for k in range(l):
                        ai, aj = i * strides[l] // strides[k], j * strides[l] // strides[k]
                        is_unity = bool(unity[k][b, ai, aj] == 1)
                        settled = {"naive": False, "simple": is_unity,
                                   "true-positive": is_unity and bool(prob[k][b, ai, aj] >= tau)}[policy]
                        done[l][b, i, j] |= settled
    return done


def slow_relabel(semantic, unity, prob, strides, policy, tau):
    done = slow_done(unity, prob, strides, policy, tau)
    semantic, unity = [t.clone() for t in semantic], [t.clone() for t in unity]
    for t, d in zip(semantic + unity, done + done):
        t[d] = IGNORE_INDEX
    return semantic, unity, done


@pytest.mark.parametrize("levels", [2, 4])
@pytest.mark.parametrize("policy", ["naive", "simple", "true-positive"])
def test_done_by_coarser_matches_ancestor_loop(policy, levels):
    strides, tau = sf.STRIDES[levels], 0.9
    target = blocky_labels(2, 64, 64, classes=2, seed=1)
    _, unity = sf.pyramid_ground_truth(target, strides)
    g = torch.Generator().manual_seed(2)
    prob = [torch.where(torch.rand(t.shape, generator=g) < 0.5, 0.95, 0.3) for t in unity[:-1]]
    done = sf.done_by_coarser(unity, prob, strides, policy, tau)
    slow = slow_done(unity, prob, strides, policy, tau)
    for l in range(levels):
        assert torch.equal(done[l], slow[l]), f"done level {l}"
    assert (policy == "naive") != done[-1].any()           # the test exercises the relabelling


@pytest.mark.parametrize("levels", [2, 4])
def test_fuse_matches_pixel_loop(levels):
    strides, tau = sf.STRIDES[levels], 0.9
    B, K, H, W = 2, 5, 64, 96
    g = torch.Generator().manual_seed(3)
    semantic = [torch.randn(B, K, H // s, W // s, generator=g) for s in strides]
    prob = [torch.rand(B, H // s, W // s, generator=g) ** 0.3 for s in strides[:-1]]   # many >= tau
    fused, level = sf.fuse(semantic, prob, strides, tau)
    finest = strides[-1]
    for b in range(B):
        for i in range(H // finest):
            for j in range(W // finest):
                taken = levels - 1                         # the finest level fills what is left
                for l in range(levels - 1):
                    r = strides[l] // finest
                    if prob[l][b, i // r, j // r] >= tau:
                        taken = l
                        break
                r = strides[taken] // finest
                assert level[b, i, j] == taken
                assert torch.equal(fused[b, :, i, j], semantic[taken][b, :, i // r, j // r])
    assert len(level.unique()) == levels


@pytest.mark.parametrize("levels", [2, 4])
def test_one_class_map_is_done_at_the_coarsest_level(levels):
    strides = sf.STRIDES[levels]
    target = torch.full((2, 64, 96), 3, dtype=torch.long)
    target[:, ::5, ::3] = IGNORE_INDEX                     # scattered ignore pixels keep cells unity
    semantic, unity = sf.pyramid_ground_truth(target, strides)
    assert all((u == 1).all() for u in unity) and all((y == 3).all() for y in semantic)
    confident = [torch.full_like(u, 0.95, dtype=torch.float) for u in unity[:-1]]
    unsure = [torch.full_like(u, 0.5, dtype=torch.float) for u in unity[:-1]]
    for policy, prob in (("simple", unsure), ("true-positive", confident)):
        done = sf.done_by_coarser(unity, prob, strides, policy)
        assert not done[0].any() and all(d.all() for d in done[1:]), policy   # all below level 1 done
    done = sf.done_by_coarser(unity, unsure, strides, "true-positive")
    assert not any(d.any() for d in done)                  # no true positive yet
    logits = [torch.randn(2, 4, 64 // s, 96 // s) for s in strides]
    _, level = sf.fuse(logits, confident, strides)
    assert (level == 0).all()


def test_unity_head_matches_cell_loop():
    torch.manual_seed(0)
    strides = sf.STRIDES[4]
    head = sf.UnityHead(6, channels=4, strides=strides)
    x = torch.randn(1, 6, 8, 8, requires_grad=True)
    fast = head(x)
    lin = lambda conv, v: v @ conv.weight[:, :, 0, 0].T + (0 if conv.bias is None else conv.bias)   # 1x1 conv
    x_u = lin(head.reduce, x[0].permute(1, 2, 0))           # (8, 8, Du)
    slow = []
    for s in strides[:-1]:
        r = s // strides[-1]
        cells = torch.empty(8 // r, 8 // r)
        for i in range(8 // r):
            for j in range(8 // r):
                block = x_u[i * r:(i + 1) * r, j * r:(j + 1) * r]                     # (r, r, Du)
                centroid = lin(head.centroid, block.mean((0, 1)))                     # pooled side's Conv1x1
                prob = torch.sigmoid(lin(head.classify, lin(head.pixel, block) - centroid))   # pixel side's
                cells[i, j] = prob.min()                                              # min pooling
        slow.append(cells)
    for f, s_ in zip(fast, slow):
        assert torch.allclose(f[0].sigmoid(), s_, atol=1e-6)
    weights = [torch.randn_like(s_) for s_ in slow]
    grad_fast = torch.autograd.grad(sum((f[0].sigmoid() * c).sum() for f, c in zip(fast, weights)), x)[0]
    grad_slow = torch.autograd.grad(sum((s_ * c).sum() for s_, c in zip(slow, weights)), x)[0]
    assert torch.allclose(grad_fast, grad_slow, atol=1e-6)


def test_unity_head_pooled_and_pixel_sides_have_their_own_conv():
    """Sec. 4.1: a Conv1x1 on the pooled X_u shared by the levels, another on X_u ("subtract it from
    Conv1x1(X_u)"): with one conv on both sides average pooling would cancel it."""
    head = sf.UnityHead(6, channels=4)
    names = [n for n, _ in head.named_parameters()]
    assert names == ["reduce.weight", "centroid.weight", "pixel.weight", "classify.weight", "classify.bias"]
    assert head.centroid.weight.data_ptr() != head.pixel.weight.data_ptr()
    assert not torch.equal(head.centroid.weight, head.pixel.weight)


def unity_logit_ascent(head, x):
    """x (B, D, h, w) plus the uniform feature vector of length 10 that raises the summed unity logits
    of `head` fastest (their gradient with respect to a vector added at every position)."""
    d = torch.zeros(1, x.shape[1], 1, 1, dtype=x.dtype, requires_grad=True)
    grad = torch.autograd.grad(sum(u.sum() for u in head(x + d)), d)[0]
    return x + 10 * grad / grad.norm()


def test_a_unity_logit_above_the_classifier_bias_is_reachable():
    """With one conv on both sides every logit is v . (x - cell mean) + b <= b (a cell cannot say
    "unity" until training raises b above logit(tau)); with two convs a uniform cell scores
    (a - c) . x + b, above b along a - c."""
    torch.manual_seed(0)
    head = sf.UnityHead(6, channels=4).double()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    b = head.classify.bias.item()
    for logits in head(unity_logit_ascent(head, x)):
        assert (logits > b + 1).all()
    a = (head.classify.weight[0, :, 0, 0] @ head.pixel.weight[:, :, 0, 0] @ head.reduce.weight[:, :, 0, 0])   # (D,)
    c = (head.classify.weight[0, :, 0, 0] @ head.centroid.weight[:, :, 0, 0] @ head.reduce.weight[:, :, 0, 0])
    for f, logits in zip(head.factors, head(x)):            # the head as one linear map, then min pooling
        mean = sf.nearest_up(F.avg_pool2d(x, f), f)                                 # (B, D, 8, 8)
        entry = torch.einsum("d,bdhw->bhw", a, x) - torch.einsum("d,bdhw->bhw", c, mean) + b
        assert (logits - sf.min_pool(entry[:, None], f)[:, 0]).abs().max() < 1e-12


def literal_context_aggregation(ca, x, theta):
    """Eqs. (8)-(9) as written: per-cell query conv, attention, concat(X_att, X) -> Conv1x1_agg."""
    B, C, H, W = x.shape
    q = F.conv2d(x, ca.query.weight, ca.query.bias).flatten(2).transpose(1, 2)        # (B, N, Ck)
    k = F.conv2d(theta, ca.key.weight, ca.key.bias).flatten(2)                        # (B, Ck, S)
    v = F.conv2d(theta, ca.value.weight, ca.value.bias).flatten(2).transpose(1, 2)    # (B, S, C)
    att = ((q @ k / ca.key_channels ** 0.5).softmax(-1) @ v).transpose(1, 2).reshape(B, C, H, W)
    return ca.aggregate(torch.cat([att, x], 1))


@pytest.mark.parametrize("train_mode", [True, False])
def test_folded_context_aggregation_equals_the_concat_conv_form(train_mode):
    torch.manual_seed(0)
    ca = sf.ContextAggregation(16).double().train(train_mode)
    for p in ca.parameters():                                  # non-trivial biases and BN affine too
        p.data = torch.randn_like(p) * 0.5
    ca.aggregate[1].running_mean.normal_()
    ca.aggregate[1].running_var.uniform_(0.5, 2)
    literal = copy.deepcopy(ca)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64, requires_grad=True)
    theta = sf.pyramid_pool(torch.randn(2, 16, 9, 8, dtype=torch.float64)).requires_grad_()
    fast, slow = ca(x, theta), literal_context_aggregation(literal, x, theta)
    assert (fast - slow).abs().max() < 1e-10
    weight = torch.randn_like(fast)
    inputs_fast, inputs_slow = [x, theta, *ca.parameters()], [x, theta, *literal.parameters()]
    grads_fast = torch.autograd.grad((fast * weight).sum(), inputs_fast)
    grads_slow = torch.autograd.grad((slow * weight).sum(), inputs_slow)
    for (name, _), a, b in zip([("x", 0), ("theta", 0), *ca.named_parameters()], grads_fast, grads_slow):
        assert (a - b).abs().max() < 1e-10, name
    assert list(ca.state_dict()) == ["query.weight", "query.bias", "key.weight", "key.bias", "value.weight",
                                     "value.bias", "aggregate.0.weight", "aggregate.1.weight", "aggregate.1.bias",
                                     "aggregate.1.running_mean", "aggregate.1.running_var",
                                     "aggregate.1.num_batches_tracked"]
    assert ca.aggregate[0].weight.shape == (16, 32, 1, 1)


def test_context_aggregation_costs_c_s_plus_s_c_plus_c_c_per_cell():
    """The folded Eq. (9): each extra cell costs 2 (C*S + S*C + C*C) FLOPs (the literal form's
    2 (C*Ck + Ck*S + S*C + 2 C*C) is 14 % more at C = 64, twice as much at the paper's C = 512)."""
    C, S = 64, 110
    ca = sf.ContextAggregation(C).eval()
    theta = torch.randn(1, C, S, 1)

    def flops(h, w):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            ca(torch.randn(1, C, h, w), theta)
        return counter.get_total_flops()

    assert (flops(8, 4) - flops(4, 4)) / 16 == 2 * (C * S + S * C + C * C)


def test_context_aggregation_matches_position_loop():
    torch.manual_seed(0)
    ca = sf.ContextAggregation(8).eval()
    x = torch.randn(2, 8, 3, 5)
    theta = sf.pyramid_pool(torch.randn(2, 8, 7, 6))
    assert theta.shape == (2, 8, 110, 1)
    assert torch.allclose(sf.pyramid_pool(x)[:, :, 0, 0], x.mean((2, 3)), atol=1e-6)   # the 1x1 bin
    out = ca(x, theta)
    q = F.conv2d(x, ca.query.weight, ca.query.bias)
    k = F.conv2d(theta, ca.key.weight, ca.key.bias)[..., 0]
    v = F.conv2d(theta, ca.value.weight, ca.value.bias)[..., 0]
    att = torch.empty_like(x)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                score = torch.stack([q[b, :, i, j] @ k[b, :, t] for t in range(110)]) / 2.0  # sqrt(Ck = 4)
                att[b, :, i, j] = (score.softmax(0) * v[b]).sum(1)
    assert torch.allclose(out, ca.aggregate(torch.cat([att, x], 1)), atol=1e-5)


@functools.lru_cache(maxsize=None)
def first_seeded_resnet18():
    """ResNet(18, 32) built right after torch.manual_seed(0): its state and the RNG state it leaves."""
    torch.manual_seed(0)
    return common.ResNet(18, 32).state_dict(), torch.get_rng_state()


def seeded_resnet18():
    """What `torch.manual_seed(0); common.ResNet(18, 32)` gives, weights and RNG state alike, without
    drawing its 11M random weights again: built on the meta device, the first build's tensors copied in."""
    state, rng = first_seeded_resnet18()
    with torch.device("meta"):
        trunk = common.ResNet(18, 32)
    trunk.to_empty(device="cpu").load_state_dict(state)
    torch.set_rng_state(rng)
    return trunk


def tiny_model(**kw):
    return sf.SpecializeFuse(seeded_resnet18(), 4, semantic_channels=16, unity_channels=8, **kw)


def aligned_up(x, stride):
    """(B, C, h, w) -> (B, C, stride*h, stride*w), sample j on pixel stride*j, bilinear between samples and
    the last one repeated: align_corners=True over one appended copy of the last row and column."""
    h, w = x.shape[-2:]
    x = F.interpolate(F.pad(x, (0, 1, 0, 1), mode="replicate"), size=(stride * h + 1, stride * w + 1),
                      mode="bilinear", align_corners=True)
    return x[..., :stride * h, :stride * w]


def mean_ce(logits, target):
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum") / \
        (target != IGNORE_INDEX).sum().clamp(min=1)


@pytest.mark.parametrize("finest_target", ["pixels", "cells"])
@pytest.mark.parametrize("policy", ["naive", "true-positive"])
def test_loss_is_eq1_over_relabelled_cells(policy, finest_target):
    model = tiny_model(relabel=policy, finest_target=finest_target)
    strides, B, K = model.strides, 2, 4
    target = blocky_labels(B, 64, 64, classes=K, seed=4)
    g = torch.Generator().manual_seed(5)
    semantic = [torch.randn(B, K, 64 // s, 64 // s, generator=g) for s in strides]
    unity = [torch.randn(B, 64 // s, 64 // s, generator=g) * 4 for s in strides[:-1]]
    losses = model.loss({"semantic": semantic, "unity": unity}, target)
    y, u, done = slow_relabel(*slow_pyramid(target, strides), [t.sigmoid() for t in unity], strides, policy, 0.9)
    ce = [mean_ce(s_, t) for s_, t in zip(semantic, y)]
    if finest_target == "pixels":                          # every pixel of a finest cell not done by coarser,
        pixel_target = target.clone()                      # against its own cell's logits
        for b, i, j in done[-1].nonzero().tolist():
            pixel_target[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = IGNORE_INDEX
        replicated = semantic[-1].repeat_interleave(4, 2).repeat_interleave(4, 3)          # (B, K, 64, 64)
        ce[-1] = mean_ce(replicated, pixel_target)
    bce = [F.binary_cross_entropy(p.sigmoid()[t != IGNORE_INDEX], t[t != IGNORE_INDEX].float(), reduction="sum")
           / (t != IGNORE_INDEX).sum().clamp(min=1) for p, t in zip(unity, u)]
    assert torch.allclose(losses["semantic"], sum(ce) / 4, atol=1e-5)
    assert torch.allclose(losses["unity"], sum(bce) / 3, atol=1e-5)
    assert torch.allclose(losses["total"], losses["semantic"] + losses["unity"])
    assert policy == "naive" or done[-1].any()


@pytest.mark.parametrize("finest_target", ["cells", "pixels"])
def test_cells_done_by_coarser_get_no_gradient(finest_target):
    """Sec. 3.2: a cell done by coarser is "don't care" at its level, in both finest-level targets."""
    model = tiny_model(finest_target=finest_target)
    strides, B, K = model.strides, 2, 4
    target = blocky_labels(B, 64, 64, classes=K, seed=4)
    g = torch.Generator().manual_seed(5)
    semantic = [torch.randn(B, K, 64 // s, 64 // s, generator=g, requires_grad=True) for s in strides]
    unity = [torch.randn(B, 64 // s, 64 // s, generator=g) * 4 for s in strides[:-1]]
    grads = torch.autograd.grad(model.loss({"semantic": semantic, "unity": unity}, target)["total"], semantic)
    _, unity_gt = sf.pyramid_ground_truth(target, strides)
    done = sf.done_by_coarser(unity_gt, [u.sigmoid() for u in unity], strides)
    for l, (grad, d) in enumerate(zip(grads, done)):
        assert (grad.abs().sum(1)[d] == 0).all(), f"level {l}"
        assert (grad.abs().sum(1)[~d] > 0).any(), f"level {l}"
    beside_play = F.max_pool2d((~done[-1]).float()[:, None], 3, 1, 1)[:, 0] > 0   # (B, 16, 16)
    assert (done[-1] & beside_play).any()                  # done cells bordering cells in play are covered


def test_the_finest_level_is_supervised_per_cell_by_default():
    parser = argparse.ArgumentParser()
    sf.add_args(parser)
    assert sf.SpecializeFuse.__init__.__kwdefaults__["finest_target"] == "cells"
    assert parser.parse_args([]).finest_target == "cells"
    model = tiny_model()
    target = blocky_labels(2, 64, 64, classes=4, seed=4)
    g = torch.Generator().manual_seed(5)
    semantic = [torch.randn(2, 4, 64 // s, 64 // s, generator=g) for s in model.strides]
    unity = [torch.full((2, 64 // s, 64 // s), -9.0) for s in model.strides[:-1]]   # nothing done by coarser
    y, _ = sf.pyramid_ground_truth(target, model.strides)
    ce = sum(mean_ce(s_, t) for s_, t in zip(semantic, y)) / 4
    assert torch.allclose(model.loss({"semantic": semantic, "unity": unity}, target)["semantic"], ce, atol=1e-6)


def test_odd_input_sizes_follow_sec_3_1():
    assert sf.working_size((33, 47), 32) == (32, 32)
    assert sf.working_size((48, 80), 32) == (64, 96)
    assert sf.working_size((10, 700), 32) == (32, 704)
    model = tiny_model()
    image, target = torch.randn(2, 3, 33, 47), torch.randint(0, 4, (2, 33, 47))
    out = model(image)                                     # training mode: the pyramids alone
    assert set(out) == {"semantic", "unity"}
    assert [tuple(y.shape[-2:]) for y in out["semantic"]] == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert torch.isfinite(model.loss(out, target)["total"])
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 49, 80))
    assert out["out"].shape == (1, 4, 49, 80) and out["semantic"][-1].shape[-2:] == (16, 24)
    assert out["level"].shape == (1, 49, 80)
    assert out["maps"]["level"].shape == (1, 1, 16, 24) and out["maps"]["unity"].shape == (1, 3, 16, 24)


class AvgPoolKernels(TorchDispatchMode):
    """The kernel sizes of every avg_pool2d that runs while active."""

    def __init__(self):
        super().__init__()
        self.kernels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket == torch.ops.aten.avg_pool2d:
            self.kernels.append(tuple(args[1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kw", [{}, {"output_format": "single", "context": "none"}, {"context": "anl-multi"}])
def test_training_builds_no_output_that_no_loss_reads(kw, monkeypatch):
    """No fused full-size 'out' in training, no Eq. (2) fusion, no copy of X^(L) by a kernel-1 pool."""
    model = tiny_model(**kw)
    image, target = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    monkeypatch.setattr(sf, "fuse", lambda *a, **k: pytest.fail("Eq. (2) fusion run in training"))
    with AvgPoolKernels() as pools:
        out = model(image)
    assert "out" not in out and torch.isfinite(model.loss(out, target)["total"])
    assert (1, 1) not in pools.kernels and (pools.kernels or kw.get("output_format") == "single")
    monkeypatch.undo()
    with AvgPoolKernels() as pools, torch.no_grad():
        assert model.eval()(image)["out"].shape == (2, 4, 64, 64)
    assert (1, 1) not in pools.kernels


def test_single_output_is_trained_at_the_working_size_as_the_finest_level():
    model = tiny_model(output_format="single", context="none")
    image, target = torch.randn(2, 3, 33, 47), torch.randint(0, 4, (2, 33, 47))
    out = model(image)
    logits = aligned_up(out["semantic"][-1], 4)             # at the positions 'out' gives them
    working = F.interpolate(target[:, None].float(), size=(32, 32), mode="nearest")[:, 0].long()
    assert torch.allclose(model.loss(out, target)["total"], mean_ce(logits, working), atol=1e-6)


@pytest.mark.parametrize("tau, level", [(0.0, 0), (1.1, 3)])
def test_eval_output_is_the_fused_pyramid(tau, level):
    model = tiny_model(tau=tau).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(image)
    expected = out["semantic"][level] if level == 3 else sf.nearest_up(out["semantic"][0], 8)
    assert (out["level"] == level).all()
    assert torch.allclose(out["out"], aligned_up(expected, 4))


def test_finest_inference_takes_the_finest_level_everywhere():
    fuse, finest = tiny_model(tau=0.0).eval(), tiny_model(tau=0.0, inference="finest").eval()
    with torch.no_grad():
        a, b = fuse(torch.randn(1, 3, 64, 64)), finest(torch.randn(1, 3, 64, 64))
    assert (a["level"] == 0).all() and (b["level"] == 3).all()
    assert torch.allclose(b["out"], aligned_up(b["semantic"][-1], 4))


def hat(n, stride, j, size):
    """Bilinear weight of sample j of an n-sample map at each of `size` fine pixels, sample i on pixel
    stride * i and the last sample's value repeated past it: (size,)."""
    position = (torch.arange(size, dtype=torch.float64) / stride).clamp(max=n - 1)
    return (1 - (position - j).abs()).clamp(min=0)


def test_decoder_puts_each_coarse_sample_on_the_c1_sample_it_was_computed_at():
    """Stage i's sample (j, k) was computed at input pixel s_i (j, k), which is c1's sample r (j, k),
    r = s_i / 4: an impulse there must peak on it, bilinear around it (resize put it 0.5, 1.5, 3.5 cells off)."""
    decoder = sf.LightDecoder((2, 2, 2, 2), (4, 8, 16, 32), channels=(1, 1, 1, 1)).double().eval()
    for lateral in decoder.lateral:                        # output channel i = input channel 0 of stage i
        lateral[0].weight.data = torch.tensor([[[[1.0]], [[0.0]]]], dtype=torch.float64)
        lateral[1].eps = 0.0                               # BN with its initial statistics: the identity
    features = [torch.zeros(1, 2, 32 // r, 32 // r, dtype=torch.float64) for r in (1, 2, 4, 8)]
    for f in features:
        f[0, 0, 1, -1] = 1.0                               # an inner row, the last column
    with torch.no_grad():
        out = decoder(features)                                               # (1, 4, 32, 32)
    for i, (f, r) in enumerate(zip(features, (1, 2, 4, 8))):
        n = f.shape[-1]
        expected = torch.outer(hat(n, r, 1, 32), hat(n, r, n - 1, 32))
        assert (out[0, i] - expected).abs().max() < 1e-12, f"stage {i + 1}"
        assert out[0, i, r, r * (n - 1)] == 1.0


def sampler_model(**kw):
    """A tiny S&F model (context none, float64) whose ResNet-18 trunk is an exact sampler: every conv keeps
    its centre tap only, so a change at an input pixel of the stride-32 grid reaches each stride-s stage
    at the one sample j with s * j on that pixel. Every weight is non-negative and every bias zero, so a
    zero image gives zero logits and a positive impulse passes every ReLU: the model is linear in it."""
    model = sf.SpecializeFuse(seeded_resnet18(), 3, context="none", semantic_channels=8, unity_channels=4,
                              **kw).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.abs_()
                if m.bias is not None:
                    m.bias.zero_()
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.Conv2d):
                ky, kx = m.kernel_size[0] // 2, m.kernel_size[1] // 2
                centre = m.weight[:, :, ky, kx].clone()
                m.weight.zero_()[:, :, ky, kx] = centre
    return model


@pytest.mark.parametrize("kw", [{"output_format": "single"}, {"inference": "finest"}])
def test_a_one_pixel_input_change_peaks_at_that_pixel_in_the_logits(kw):
    """End to end: a change at input pixel (96, 64), on every stage's sampling grid, changes 'out' most at
    (96, 64), symmetrically around it (with `resize` in the decoder and at the output it peaked at (110, 78))."""
    model = sampler_model(**kw)
    image = torch.zeros(1, 3, 192, 160, dtype=torch.float64)
    with torch.no_grad():
        base = model(image)["out"]
        image[0, :, 96, 64] = 1.0
        change = model(image)["out"] - base                                   # (1, K, 192, 160)
    assert base.abs().max() == 0 and change.min() >= 0
    for k in range(3):
        peak = divmod(change[0, k].argmax().item(), 160)
        assert peak == (96, 64), f"class {k}: peak at {peak}"
        column, row = change[0, k, :, 64], change[0, k, 96, :]
        for d in range(1, 32):                             # within the widest (stride-32) branch's reach
            assert torch.allclose(column[96 - d], column[96 + d], rtol=1e-12, atol=0), d
            assert torch.allclose(row[64 - d], row[64 + d], rtol=1e-12, atol=0), d
        assert change[0, k, 96, 64] > change[0, k, 96, 65] > 0


@pytest.mark.parametrize("levels", [2, 4])
def test_coarse_to_fine_follows_eqs_3_to_11(levels):
    """theta^(0) -> CA^(1) -> CU^(1) -> ... -> CA^(L), built by hand from the head's own modules."""
    torch.manual_seed(0)
    strides = sf.STRIDES[levels]
    head = sf.SemanticHead(6, 3, channels=8, strides=strides).eval()
    x = torch.randn(2, 6, 8, 16)
    with torch.no_grad():
        fast = head(x)
        x_fine = head.project(x)                           # X^(L)
        theta = sf.pyramid_pool(x_fine)                    # Eq. (6): theta^(0)
        slow = []
        for l, s in enumerate(strides):
            refined = head.aggregate[l](F.avg_pool2d(x_fine, s // strides[-1]), theta)   # Eqs. (3), (4)
            if l < levels - 1:                             # Eqs. (5), (10), (11): theta^(l) from X'^(l)
                theta = head.update[l].update(torch.cat([sf.pyramid_pool(refined), theta], 1))
            slow.append(head.blocks[l](refined))           # Eq. (7)
    assert len(head.update) == levels - 1 and len(fast) == levels
    for l, (a, b) in enumerate(zip(fast, slow)):
        assert torch.allclose(a, b, atol=1e-6), f"level {l}"


def level_inputs(B=2, K=3, size=(30, 61), seed=6):
    """Pyramid logits of the working size of `size` (32 x 64), random targets of `size`."""
    strides, g = sf.STRIDES[4], torch.Generator().manual_seed(seed)
    h, w = sf.working_size(size, 32)
    semantic = [torch.randn(B, K, h // s, w // s, generator=g) for s in strides]
    prob = [torch.rand(B, h // s, w // s, generator=g) for s in strides[:-1]]
    target = torch.randint(0, K, (B, *size), generator=g)
    target[:, :3] = IGNORE_INDEX
    return strides, semantic, prob, target


def evaluated(semantic, prob, strides, size, tau):
    """'out' and 'level' as SpecializeFuse.forward returns them in eval mode."""
    fused, level = sf.fuse(semantic, prob, strides, tau)
    return sf.to_image(fused, size), sf.level_to_image(level, size, len(strides))


def test_to_image_puts_finest_sample_j_on_pixel_4j():
    grid = torch.zeros(1, 1, 4, 6, dtype=torch.float64)
    grid[0, 0, 2, 5] = 1.0                                  # an inner row, the last column
    out = sf.to_image(grid, (16, 24))
    assert torch.equal(out[0, 0], torch.outer(hat(4, 4, 2, 16), hat(6, 4, 5, 24)))
    assert out[0, 0, 8, 20] == 1 and out[0, 0, 8, 23] == 1   # past the last sample its value repeats
    image = sf.to_image(grid, (15, 22))                     # a working size that differs: resized back
    assert torch.allclose(image, common.resize(out, (15, 22)))


def test_level_map_is_the_level_that_weighs_most_in_each_pixel():
    """'level' at each working pixel: the level with the largest bilinear weight among the finest samples
    around it (as in 'out'; ties to the coarser level), by a loop over the pixels."""
    g = torch.Generator().manual_seed(7)
    level = torch.randint(0, 4, (2, 4, 6), generator=g)
    fast = sf.level_to_image(level, (16, 24), 4)
    rows, columns = [hat(4, 4, i, 16).tolist() for i in range(4)], [hat(6, 4, j, 24).tolist() for j in range(6)]
    for b in range(2):
        for y in range(16):
            for x in range(24):
                weight = [0.0] * 4
                for i in range(4):
                    for j in range(6):
                        weight[level[b, i, j]] += rows[i][y] * columns[j][x]
                assert fast[b, y, x] == weight.index(max(weight)), (b, y, x)   # the first (coarser) on a tie
    assert torch.equal(fast[:, ::4, ::4], level)           # sample j on pixel 4j


def test_level_outputs_are_each_level_brought_to_the_pixels_as_out_is():
    """Sec. 5.5's per-level predictions: Eq. (2)'s nearest Up to the finest cells, finest sample j on pixel
    4j, bilinear between samples, then resized to the image (by aligned_up and F.interpolate here)."""
    strides, semantic, _, target = level_inputs()
    size = tuple(target.shape[-2:])
    fast = list(sf.SpecializeFuse.level_outputs(semantic, size))
    assert len(fast) == 4
    for l, (y, s) in enumerate(zip(semantic, strides)):
        slow = F.interpolate(aligned_up(sf.nearest_up(y, s // 4), 4), size=size, mode="bilinear", align_corners=False)
        assert torch.allclose(fast[l], slow, atol=1e-6), f"level {l}"
        assert torch.equal(fast[l].argmax(1), slow.argmax(1)), f"level {l}"


@pytest.mark.parametrize("taken", [0, 1, 2, 3])
def test_a_level_that_the_fusion_takes_everywhere_is_out(taken):
    """Where the fusion takes level l everywhere, level_outputs' level l is exactly the evaluated 'out'."""
    strides, semantic, prob, target = level_inputs()
    prob = [torch.full_like(p, float(l == taken)) for l, p in enumerate(prob)]   # level `taken` is unity
    out, level = evaluated(semantic, prob, strides, target.shape[-2:], tau=0.9)
    assert (level == taken).all()
    assert torch.equal(list(sf.SpecializeFuse.level_outputs(semantic, target.shape[-2:]))[taken], out)


def test_the_file_does_not_import_train():
    with open(sf.__file__) as f:
        tree = ast.parse(f.read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "train" not in imported


def parsed(*argv):
    """The flags of add_args alone, parsed."""
    parser = argparse.ArgumentParser()
    sf.add_args(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("flags", [{"output_format": "single", "relabel": "simple"},
                                   {"output_format": "single", "tau": 0.5},
                                   {"output_format": "single", "unity_channels": 32},
                                   {"output_format": "single", "finest_target": "pixels"},
                                   {"output_format": "single", "inference": "finest"},
                                   {"output_format": "single", "context": "none", "pyramid_levels": 2},
                                   {"inference": "finest", "relabel": "simple", "tau": 0.5}])
def test_flags_that_change_nothing_are_errors(flags):
    args = vars(parsed())
    with pytest.raises(common.InputError, match="would change nothing"):
        sf.build_model(argparse.Namespace(**{**args, **flags}))


def test_every_flag_defaults_to_the_constructors_keyword():
    """--help shows what will be used: the paper's setting, the constructor's keyword defaults."""
    defaults = vars(parsed())
    keyword = sf.SpecializeFuse.__init__.__kwdefaults__
    assert None not in defaults.values()
    assert {dest: keyword["levels" if dest == "pyramid_levels" else dest] for dest in defaults} == defaults
    assert defaults["tau"] == 0.9 and defaults["relabel"] == "true-positive" and defaults["inference"] == "fuse"


def test_a_unity_flag_given_at_its_default_passes_with_the_single_output():
    import train                                           # only to produce every flag build_model reads
    args = train.parse_args(["--method", "specialize_fuse", "--backbone", "resnet18", "--output-format", "single",
                             "--context", "none", "--tau", "0.9", "--relabel", "true-positive", "--pyramid-levels",
                             "4", "--unity-channels", "64", "--semantic-channels", "16"])
    args.num_classes = 4
    with torch.device("meta"):                             # what is built, not its values
        model = sf.build_model(args)
    assert model.unity_head is None and model.strides == sf.STRIDES[4]


def test_single_output_with_anl_multi_is_refused():
    """Table 6 has no single-output ANL-multi ("-"): ANL-multi is ANL at each level of the pyramidal output."""
    import train                                           # only to produce every flag build_model reads
    flags = ["--method", "specialize_fuse", "--backbone", "resnet18", "--semantic-channels", "16",
             "--context", "anl-multi"]
    args = train.parse_args(flags)
    args.num_classes = 4
    with torch.device("meta"):                             # what is built, not its values
        assert isinstance(sf.build_model(args), sf.SpecializeFuse)
    args = train.parse_args(flags + ["--output-format", "single"])
    args.num_classes = 4
    with pytest.raises(common.InputError, match="no paper row"):
        sf.build_model(args)


def test_hrnet_heads_read_its_stride_4_concat():
    """Sec. 5.1.2: on HRNetV2 the heads read hrnet_features directly (D = the sum of the branch widths:
    720 for W48, 480 for W32, 240 for W18-small), with no light decoder; on a ResNet, D = 720 from it."""
    import train
    base = ["--method", "specialize_fuse", "--dataset", "synthetic", "--num-classes", "4"]
    narrow = ["--semantic-channels", "16", "--unity-channels", "8"]         # D is what is read here
    model = sf.build_model(train.parse_args(base + ["--backbone", "hrnet18-small"] + narrow))
    assert model.decoder is None and model.semantic_head.project.in_channels == 240
    assert model.unity_head.reduce.in_channels == 240
    model.train()
    out = model(torch.randn(2, 3, 64, 96))
    assert [tuple(s.shape) for s in out["semantic"]] == [(2, 4, 64 // s, 96 // s) for s in (32, 16, 8, 4)]
    model.loss(out, torch.randint(0, 4, (2, 64, 96)))["total"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters()), "a parameter got no gradient"
    with torch.device("meta"):
        for name, width in (("hrnet48", 720), ("hrnet32", 480)):
            m = sf.build_model(train.parse_args(base + ["--backbone", name]))
            assert m.decoder is None and m.semantic_head.project.in_channels == width
        r = sf.build_model(train.parse_args(base + ["--backbone", "resnet101"]))
        assert r.decoder is not None and r.semantic_head.project.in_channels == 720
