"""Shape and gradient checks of every model, built through train.py's own command line.

For each method and each switch combination (together covering every value of every switch):
the training forward gives (B, K, H, W) logits, the loss is finite and EVERY parameter receives a
gradient (DDP fails on unused parameters); eval-mode inference gives finite logits of the image's size.
Small ResNet-18 trunks, odd tiny inputs.
"""
import pytest
import torch

import train

NUM_CLASSES = 5
CONFIGS = {
    "fcn": [[], ["--ohem", "--head-channels", "64"]],
    "galdv1": [[], ["--ga", "nl"], ["--ga", "psp", "--arrangement", "ldga"],
               ["--ga", "aspp", "--arrangement", "parallel"], ["--ga", "none"], ["--no-ld"],
               ["--no-ld", "--arrangement", "parallel", "--ga", "psp"],
               ["--ld-downsample", "bilinear", "--follow-code"], ["--ld-downsample", "avgpool", "--no-ohem"],
               ["--ga", "none", "--no-ld"]],
    "galdv2": [[], ["--ga", "psp"], ["--ga", "nl", "--ld", "v1"], ["--ga", "cgnl", "--ld", "none"], ["--ga", "none"],
               ["--ga", "none", "--ld", "v1", "--no-ohem"], ["--ld-kernel", "3", "--ld-dilation", "6"],
               ["--ld-kernel", "1"], ["--key-input", "global"], ["--query-input", "global"],
               ["--ga", "cgnl", "--key-input", "global", "--query-input", "global"],
               ["--ld-combine", "local-first", "--ld-key-channels", "16"]],
    "denoised_nl": [[], ["--no-global-rectifying"], ["--no-local-retention"],
                    ["--no-global-rectifying", "--no-local-retention"], ["--block", "none"],
                    ["--block", "psp"], ["--block", "aspp"],
                    ["--window-size", "5"], ["--follow-code"], ["--follow-code", "--no-global-rectifying"],
                    ["--follow-code", "--block", "none"], ["--follow-code", "--block", "aspp"]],
    "specialize_fuse": [[], ["--output-format", "single", "--context", "none"],
                        ["--output-format", "single", "--context", "anl"],
                        ["--output-format", "single", "--context", "ours"],
                        ["--output-format", "single", "--context", "ours", "--pyramid-levels", "2"],
                        ["--context", "anl", "--relabel", "simple"],
                        ["--context", "anl-multi", "--relabel", "naive", "--inference", "finest"],
                        ["--context", "none", "--pyramid-levels", "2", "--finest-target", "pixels"],
                        ["--pyramid-levels", "2", "--relabel", "simple", "--inference", "finest"],
                        ["--backbone", "hrnet18-small", "--semantic-channels", "16", "--unity-channels", "8"]],
    "hier_ms_attn": [[], ["--ms-mode", "explicit"], ["--ms-mode", "average"], ["--loss", "ce"],
                     ["--ms-mode", "explicit", "--train-scales", "0.5", "1.0", "--loss", "ce"],
                     ["--train-scales", "0.25", "0.5", "1.0", "--scale-loss-weight", "0"],
                     ["--decoder", "none"], ["--aspp-channels", "32", "--ms-mode", "explicit"],
                     ["--backbone", "hrnet18-small", "--ocr-channels", "32", "16", "--head-channels", "16"],
                     ["--backbone", "hrnet18-small", "--ocr-channels", "32", "16", "--cls-head", "code",
                      "--aux-loss", "bce", "--ms-mode", "average"],
                     ["--backbone", "hrnet18-small", "--ocr-channels", "32", "16", "--ms-mode", "explicit",
                      "--loss", "ce"],
                     ["--backbone", "hrnet18-small", "--decoder", "none"]],
}
CASES = [(m, flags) for m, configs in CONFIGS.items() for flags in configs]


def build(method, flags):
    args = train.parse_args(["--method", method, "--backbone", "resnet18"] + flags)
    args.num_classes = NUM_CLASSES
    torch.manual_seed(0)
    return train.METHODS[method][1](args)


def test_every_method_is_covered():
    assert set(CONFIGS) == set(train.METHODS)


@pytest.mark.parametrize("method,flags", CASES, ids=[f"{m}:{' '.join(f) or 'default'}" for m, f in CASES])
def test_shapes_and_gradients(method, flags):
    model = build(method, flags).train()
    image = torch.randn(2, 3, 49, 39)                                        # odd sizes
    target = torch.randint(0, NUM_CLASSES, (2, 49, 39))
    target[:, :5] = 255                                                      # some ignore
    outputs = model(image)
    if "out" in outputs:                                                     # S&F's pyramids build it in eval only
        assert outputs["out"].shape == (2, NUM_CLASSES, 49, 39)
    losses = model.loss(outputs, target)
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"No gradient for {missing}"
    model.eval()
    with torch.no_grad():
        logits = model.predict(torch.randn(1, 3, 57, 71))
        evaluated = model(torch.randn(1, 3, 57, 71))
    assert logits.shape == (1, NUM_CLASSES, 57, 71) and torch.isfinite(logits).all()
    assert evaluated["out"].shape == (1, NUM_CLASSES, 57, 71)
