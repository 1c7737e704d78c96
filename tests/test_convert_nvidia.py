"""tools/convert_nvidia.py on files synthesized in the exact layout of NVIDIA's releases (a small HRNet,
random weights; never the real files): the checkpoint rebuilds the model from its flags alone, loads
strictly and gives the source model's outputs exactly; other layouts and unsafe pickles are refused."""
import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import common
import hier_ms_attn as hma
import train
from tools import convert_nvidia

SMALL = dict(ocr_channels=(32, 16), head_channels=16)          # hrnet18-small, narrow OCR


pytestmark = pytest.mark.usefixtures("one_thread")


def nvidia_model(classes=19, ms_mode="hierarchical"):
    """A model in NVIDIA's MscaleOCR (or OCRNet: ms_mode='average') layout, random weights and BN statistics."""
    torch.manual_seed(0)
    model = hma.HierarchicalMultiScaleAttention(common.HRNet(**common.HRNET_LAYOUTS["hrnet18-small"]), classes,
                                                decoder="ocr", cls_head="code", ms_mode=ms_mode, **SMALL)
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_(0, 0.1)
        if name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
    return model.eval()


def nvidia_file(path, model, legacy=False):
    """What NVIDIA's utils/misc.py saved: the DataParallel state dict and the run's records, 'mean_iu' a
    numpy float. legacy: torch's pre-1.6 format with numpy 1's module names, as files of 2020."""
    state = {"module." + k: v for k, v in model.state_dict().items()}
    checkpoint = {"epoch": 174, "arch": "network.ocrnet.HRNet_Mscale", "num_classes": 19, "state_dict": state,
                  "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                "param_groups": [{"lr": 0.0, "momentum": 0.9, "params": [0]}]},
                  "mean_iu": np.float64(0.8692), "command": "python -m runx.runx scripts/train_cityscapes.yml"}
    if not legacy:
        torch.save(checkpoint, path)
        return
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer, _use_new_zipfile_serialization=False)
    raw = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    with open(path, "wb") as f:
        f.write(raw)


def rebuilt(checkpoint, *extra):
    """The model train.py builds for --eval-only --checkpoint CHECKPOINT (no model flags), weights loaded."""
    args = train.parse_args(["--eval-only", "--checkpoint", str(checkpoint), *extra])
    args.num_classes = len(common.dataset_classes(args.dataset))
    model = train.METHODS[args.method][1](args)
    common.load_weights(model, str(checkpoint))
    return args, model.eval()


@pytest.mark.parametrize("legacy", [False, True])
def test_converted_mscale_ocr_gives_the_source_models_outputs_exactly(tmp_path, legacy):
    source = nvidia_model()
    nvidia_file(tmp_path / "turtle.pth", source, legacy)
    flags = convert_nvidia.convert(str(tmp_path / "turtle.pth"), str(tmp_path / "out.pt"))
    assert flags == {"method": "hier_ms_attn", "backbone": "hrnet18-small", "decoder": "ocr", "cls_head": "code",
                     "ocr_channels": [32, 16], "ms_mode": "hierarchical", "dataset": "cityscapes", "head_channels": 16}
    args, model = rebuilt(tmp_path / "out.pt")
    assert (args.method, args.dataset) == ("hier_ms_attn", "cityscapes")
    assert (model.decoder, model.ms_mode) == ("ocr", "hierarchical")
    x = torch.randn(1, 3, 45, 67)
    with torch.no_grad():
        for scales in [(1.0,), (0.5, 1.0), (0.5, 1.0, 2.0)]:
            assert torch.equal(model.predict(x, scales), source.predict(x, scales))


def test_converted_ocrnet_is_the_average_mode_model(tmp_path):
    """ocrnet.HRNet_industrious-chicken.pth: OCRNet without attention, Mapillary's 65 classes."""
    source = nvidia_model(classes=65, ms_mode="average")
    nvidia_file(tmp_path / "chicken.pth", source)
    flags = convert_nvidia.convert(str(tmp_path / "chicken.pth"), str(tmp_path / "out.pt"))
    assert (flags["ms_mode"], flags["dataset"], "head_channels" in flags) == ("average", "mapillary", False)
    _, model = rebuilt(tmp_path / "out.pt")
    assert not hasattr(model, "scale_attn")
    x = torch.randn(1, 3, 45, 67)
    with torch.no_grad():
        assert torch.equal(model.predict(x), source.predict(x))


def test_eval_only_runs_on_the_converted_file_with_no_model_flags(tmp_path):
    """End to end through train.py: the label of a one-image Cityscapes split is the source model's own
    prediction at 0.5 1.0 2.0, so the converted checkpoint must score 100 % pixel accuracy."""
    source = nvidia_model()
    nvidia_file(tmp_path / "turtle.pth", source)
    assert convert_nvidia.main([str(tmp_path / "turtle.pth"), str(tmp_path / "out.pt")]) == 0
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8))
    with torch.no_grad():
        label = source.predict(common.to_normalized_tensor(image)[None], (0.5, 1.0, 2.0)).argmax(1)[0]
    assert len(label.unique()) > 1
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        stem = root / "{}" / split / "aachen" / "aachen_000000_000019"
        os.makedirs(str(stem.parent).format("leftImg8bit"))
        os.makedirs(str(stem.parent).format("gtFine"))
        image.save(str(stem).format("leftImg8bit") + "_leftImg8bit.png")
        Image.fromarray(label.numpy().astype(np.uint8)).save(str(stem).format("gtFine") + "_gtFine_labelTrainIds.png")
    model, metrics = train.main(["--eval-only", "--checkpoint", str(tmp_path / "out.pt"), "--data-root", str(root),
                                 "--eval-scales", "0.5", "1.0", "2.0", "--workers", "0",
                                 "--out", str(tmp_path / "eval")])
    assert model.decoder == "ocr" and metrics["aAcc"] == 100.0


def other_layouts(tmp_path):
    """(file, what the refusal must name) for files that are not NVIDIA's HRNet-OCR checkpoints."""
    ocr = {"module." + k: v for k, v in nvidia_model().state_dict().items()}
    deeplab = hma.HierarchicalMultiScaleAttention(common.ResNet(18, 8), 19, aspp_channels=8, head_channels=8)
    cases = {"ours.pt": ({"model": {k[7:]: v for k, v in ocr.items()}, "args": {}}, "keys model, args"),
             "plain.pt": ({k[7:]: v for k, v in ocr.items()}, "no 'state_dict'"),
             "prefix.pt": ({"state_dict": {k[7:]: v for k, v in ocr.items()}}, "without the 'module.' prefix"),
             "v3plus.pt": ({"state_dict": {"module." + k: v for k, v in deeplab.state_dict().items()}},
                           "the modules aspp, backbone, bot_aspp, bot_fine, final, scale_attn"),
             "ocr_aspp.pt": ({"state_dict": {**ocr, "module.aspp.img_conv.0.weight": torch.zeros(8, 720, 1, 1)}},
                             "the modules aspp, backbone, ocr, scale_attn"),       # network/ocrnet.py OCRNetASPP
             "classes.pt": ({"state_dict": {"module." + k: v for k, v in
                                            nvidia_model(classes=7).state_dict().items()}}, "and 7 classes"),
             "list.pt": ([1, 2], "a list")}
    for name, (content, found) in cases.items():
        torch.save(content, tmp_path / name)
        yield tmp_path / name, found


def test_other_layouts_are_refused_in_one_line_naming_what_was_found(tmp_path, capsys):
    for path, found in other_layouts(tmp_path):
        with pytest.raises(common.InputError) as error:
            convert_nvidia.convert(str(path), str(tmp_path / "out.pt"))
        message = str(error.value)
        assert "not one of NVIDIA's HRNet-OCR checkpoints" in message and found in message, message
        assert "\n" not in message and not os.path.exists(tmp_path / "out.pt")
    assert convert_nvidia.main([str(tmp_path / "v3plus.pt"), str(tmp_path / "out.pt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


class WritesAFile:
    """A pickle that would create a file when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": {}, "x": WritesAFile(str(marker))}, f)
    torch.save({"state_dict": {}, "x": WritesAFile(str(marker))}, tmp_path / "evil_zip.pth")
    for name in ("evil.pth", "evil_zip.pth"):
        with pytest.raises(common.InputError, match="names .*open"):
            convert_nvidia.convert(str(tmp_path / name), str(tmp_path / "out.pt"))
    assert not marker.exists()
    with pytest.raises(common.InputError, match="not found"):
        convert_nvidia.convert(str(tmp_path / "missing.pth"), str(tmp_path / "out.pt"))


def test_the_mapillary_ocrnet_starts_the_cityscapes_recipe_with_finetune(tmp_path, capsys):
    """The code's Cityscapes recipe starts from ocrnet.HRNet_industrious-chicken.pth: with --finetune
    the 65-class classifiers and the attention head (which OCRNet never had) start fresh, the rest is
    the file's; the semantic head must be the code's 1x1 (--cls-head code) for its weights to fit."""
    nvidia_file(tmp_path / "chicken.pth", nvidia_model(classes=65, ms_mode="average"))
    convert_nvidia.convert(str(tmp_path / "chicken.pth"), str(tmp_path / "chicken.pt"))
    torch.manual_seed(1)
    model = hma.HierarchicalMultiScaleAttention(common.HRNet(**common.HRNET_LAYOUTS["hrnet18-small"]), 19,
                                                decoder="ocr", cls_head="code", **SMALL)
    common.load_weights(model, str(tmp_path / "chicken.pt"), finetune=True)
    fresh = capsys.readouterr().out.split("initialised: ")[1].strip().split(", ")
    assert {k.rsplit(".", 1)[0] for k in fresh} == {"ocr.cls_head", "ocr.aux_head.2", "scale_attn.conv0",
                                                    "scale_attn.bn0", "scale_attn.conv1", "scale_attn.bn1",
                                                    "scale_attn.conv2"}
    saved = torch.load(tmp_path / "chicken.pt", weights_only=True)["model"]
    assert torch.equal(model.state_dict()["ocr.conv3x3_ocr.0.weight"], saved["ocr.conv3x3_ocr.0.weight"])
    paper_head = hma.HierarchicalMultiScaleAttention(common.HRNet(**common.HRNET_LAYOUTS["hrnet18-small"]), 19,
                                                     decoder="ocr", **SMALL)
    with pytest.raises(common.InputError, match="unexpected keys"):
        common.load_weights(paper_head, str(tmp_path / "chicken.pt"), finetune=True)
