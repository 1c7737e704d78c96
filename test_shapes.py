"""Shape and gradient checks of every model, built from its classes with keyword arguments.

For each method and each switch combination (together covering every value of every switch): the
training forward gives (B, K, H, W) logits, the loss is finite and EVERY parameter receives a gradient
(DDP fails on unused parameters); eval-mode inference gives finite logits of the image's size. Small
trunks (ResNet-18, HRNetV2-W18-small), narrow heads, odd tiny inputs. A last test checks that the
command line's door (`build_model(args)`) builds, for each method's defaults, the model its class does.
"""
import functools

import pytest
import torch

import train
from common import FCN, HRNET_LAYOUTS, HRNet, ResNet
from denoised_nl import DenoisedNLNet
from galdv1 import GALD
from galdv2 import GALDv2
from hier_ms_attn import HierarchicalMultiScaleAttention
from specialize_fuse import SpecializeFuse

K = 5                                                                    # classes
HRNET = "hrnet18-small"                                                  # a config's "backbone" key

# method -> (model class, trunk output stride, the narrow widths every config of it starts from)
MODELS = {
    "fcn": (FCN, 8, dict(head_channels=32)),
    "galdv1": (GALD, 8, dict(channels=32)),
    "galdv2": (GALDv2, 8, dict(channels=32)),
    "denoised_nl": (DenoisedNLNet, 8, dict(channels=32, key_channels=8)),
    "specialize_fuse": (SpecializeFuse, 32, dict(decoder_channels=(8, 8, 16, 16), unity_channels=8,
                                                 semantic_channels=32)),
    "hier_ms_attn": (HierarchicalMultiScaleAttention, 8, dict(head_channels=16, aspp_channels=16)),
}
CONFIGS = {
    "fcn": [{}, dict(ohem=True, head_channels=64)],
    "galdv1": [{}, dict(ga="nl"), dict(ga="psp", arrangement="ldga"), dict(ga="aspp", arrangement="parallel"),
               dict(ga="none"), dict(ld=False), dict(ld=False, arrangement="parallel", ga="psp"),
               dict(ld_downsample="bilinear", follow_code=True), dict(ld_downsample="avgpool", ohem=False),
               dict(ga="none", ld=False)],
    "galdv2": [{}, dict(ga="psp"), dict(ga="nl", ld="v1"), dict(ga="cgnl", ld="none"), dict(ga="none"),
               dict(ga="none", ld="v1", ohem=False), dict(kernel_size=3, dilation=6), dict(kernel_size=1),
               dict(key_input="global"), dict(query_input="global"),
               dict(ga="cgnl", key_input="global", query_input="global"),
               dict(combine="local-first", key_channels=16)],
    "denoised_nl": [{}, dict(global_rectifying=False), dict(local_retention=False),
                    dict(global_rectifying=False, local_retention=False), dict(block="none"), dict(block="psp"),
                    dict(block="aspp"), dict(window_size=5), dict(class_map="conv"), dict(follow_code=True),
                    dict(follow_code=True, global_rectifying=False), dict(follow_code=True, block="none"),
                    dict(follow_code=True, block="aspp")],
    "specialize_fuse": [{}, dict(output_format="single", context="none"),
                        dict(output_format="single", context="anl"), dict(output_format="single", context="ours"),
                        dict(output_format="single", context="ours", levels=2),
                        dict(context="anl", relabel="simple"),
                        dict(context="anl-multi", relabel="naive", inference="finest"),
                        dict(context="none", levels=2, finest_target="pixels"),
                        dict(levels=2, relabel="simple", inference="finest"),
                        dict(backbone=HRNET, semantic_channels=16, unity_channels=8)],
    "hier_ms_attn": [{}, dict(ms_mode="explicit"), dict(ms_mode="average"), dict(loss="ce"),
                     dict(ms_mode="explicit", train_scales=(0.5, 1.0), loss="ce"),
                     dict(train_scales=(0.25, 0.5, 1.0), scale_loss_weight=0), dict(decoder="none"),
                     dict(aspp_channels=32, ms_mode="explicit"),
                     dict(backbone=HRNET, decoder="ocr", ocr_channels=(32, 16)),
                     dict(backbone=HRNET, decoder="ocr", ocr_channels=(32, 16), cls_head="code", aux_loss="bce",
                          ms_mode="average"),
                     dict(backbone=HRNET, decoder="ocr", ocr_channels=(32, 16), ms_mode="explicit", loss="ce"),
                     dict(backbone=HRNET, decoder="none")],
}
CASES = [(m, config) for m, configs in CONFIGS.items() for config in configs]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread, as tests/conftest.py's fixture of the same name (OpenMP's
    threads contend on a shared 2-core machine; this file alone took minutes under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def seeded_resnet18(output_stride):
    """ResNet(18, output_stride) built right after torch.manual_seed(0), and the RNG state it leaves."""
    torch.manual_seed(0)
    trunk = ResNet(18, output_stride=output_stride)
    return trunk.state_dict(), torch.get_rng_state()


def resnet18_after_seed_0(output_stride):
    """What `torch.manual_seed(0); ResNet(18, output_stride)` gives, weights and RNG state alike, without
    drawing its 11M random weights again (the random init was a third of this file's time): the trunk
    is built on the meta device and the first build's tensors are copied in."""
    state, rng = seeded_resnet18(output_stride)
    with torch.device("meta"):
        trunk = ResNet(18, output_stride=output_stride)
    trunk.to_empty(device="cpu").load_state_dict(state)
    torch.set_rng_state(rng)
    return trunk


def build(method, config):
    """The method's class on a ResNet-18 (or the config's HRNet), narrow widths, then the config."""
    model_class, output_stride, widths = MODELS[method]
    config = dict(config)
    torch.manual_seed(0)
    if config.pop("backbone", None) == HRNET:
        backbone = HRNet(**HRNET_LAYOUTS[HRNET])
    else:
        backbone = resnet18_after_seed_0(output_stride)
    return model_class(backbone, K, **{**widths, **config})


def case_id(method, config):
    return f"{method}:{' '.join(f'{k}={v}' for k, v in config.items()) or 'default'}"


def test_every_method_is_covered():
    assert set(CONFIGS) == set(MODELS) == set(train.METHODS)


@pytest.mark.parametrize("method,config", CASES, ids=[case_id(m, c) for m, c in CASES])
def test_shapes_and_gradients(method, config):
    model = build(method, config).train()
    image = torch.randn(2, 3, 49, 39)                                        # odd sizes
    target = torch.randint(0, K, (2, 49, 39))
    target[:, :5] = 255                                                      # some ignore
    outputs = model(image)
    if "out" in outputs:                                                     # S&F's pyramids build it in eval only
        assert outputs["out"].shape == (2, K, 49, 39)
    losses = model.loss(outputs, target)
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"No gradient for {missing}"
    model.eval()
    with torch.no_grad():
        logits = model.predict(torch.randn(1, 3, 57, 71))
        evaluated = model(torch.randn(1, 3, 57, 71))
    assert logits.shape == (1, K, 57, 71) and torch.isfinite(logits).all()
    assert evaluated["out"].shape == (1, K, 57, 71)


@pytest.mark.parametrize("method", list(MODELS))
def test_the_command_line_builds_what_the_class_builds(method):
    """build_model(args) of the method's default flags against its class with default keywords (same
    trunk): the same parameters, shape for shape, and the same loss on the same outputs."""
    model_class, output_stride, _ = MODELS[method]
    args = train.parse_args(["--method", method, "--backbone", "resnet18"])
    args.num_classes = K
    from_cli = train.METHODS[method][1](args)
    with torch.device("meta"):                                   # its values are from_cli's: no random init
        from_class = model_class(ResNet(18, output_stride=output_stride), K)
    shapes = lambda model: {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes(from_cli) == shapes(from_class)
    from_class.to_empty(device="cpu").load_state_dict(from_cli.state_dict())
    image, target = torch.randn(2, 3, 49, 39), torch.randint(0, K, (2, 49, 39))
    torch.manual_seed(0)
    cli_loss = from_cli.train().loss(from_cli(image), target)["total"]
    torch.manual_seed(0)
    class_loss = from_class.train().loss(from_class(image), target)["total"]
    torch.testing.assert_close(cli_loss, class_loss)
