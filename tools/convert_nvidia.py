"""NVIDIA's released Hierarchical Multi-Scale Attention weights -> checkpoints of this project (the
convention of mmsegmentation's tools/model_converters/: one command per file, nothing downloaded).

    python tools/convert_nvidia.py cityscapes_ocrnet.HRNet_Mscale_outstanding-turtle.pth hmsa_cityscapes.pt
    python train.py --eval-only --checkpoint hmsa_cityscapes.pt --data-root data/cityscapes --eval-scales 0.5 1.0 2.0

The files of NVIDIA/semantic-segmentation (its README lists them) and what they become:
    cityscapes_ocrnet.HRNet_Mscale_outstanding-turtle.pth  network/ocrnet.py MscaleOCR, 19 classes
                                                           -> HRNet-OCR with attention, --dataset cityscapes
    mapillary_ocrnet.HRNet_Mscale_fast-rattlesnake.pth     MscaleOCR, 65 classes -> --dataset mapillary
    ocrnet.HRNet_industrious-chicken.pth                   OCRNet (no attention), 65 classes -> --ms-mode
                                                           average, --dataset mapillary
Each is a dict {'epoch', 'arch', 'num_classes', 'state_dict', 'optimizer', 'mean_iu', 'command'} saved
from a DataParallel model, so every key of 'state_dict' starts with 'module.'. hier_ms_attn.py names its
modules as NVIDIA's classes do (backbone.*, ocr.*, scale_attn.*), so converting drops that prefix and
writes the flags that rebuild the model: --backbone hrnet48 --decoder ocr --cls-head code (NVIDIA's 1x1
semantic head), the OCR and head widths read from the tensors, and the dataset of the class count.
A checkpoint holds {'model': state_dict, 'args': flags}, as train.py writes; --eval-only takes the flags.

The files are read with an unpickler that builds tensors, containers and numpy scalars ('mean_iu' is
a numpy float) and nothing else, so a file cannot run code; torch.load(weights_only=True) itself
refuses the numpy scalars of files written under numpy 1.
"""
import argparse
import codecs
import collections
import os
import pickle
import sys

import numpy as np
import torch

if __package__ in (None, ""):                                  # run as a script: python tools/convert_nvidia.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import HRNET_LAYOUTS, InputError, describe  # noqa: E402

try:
    from numpy._core.multiarray import scalar as numpy_scalar
except ImportError:                                            # numpy 1
    from numpy.core.multiarray import scalar as numpy_scalar

# What a checkpoint's pickle may name: torch's own tensor rebuilding (the storages are resolved by
# torch.load itself), containers, and numpy scalars under the module names numpy 1 and 2 write.
SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("numpy.core.multiarray", "scalar"): numpy_scalar,
    ("numpy._core.multiarray", "scalar"): numpy_scalar,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}
DATASET_OF_CLASSES = {19: "cityscapes", 65: "mapillary"}
TRUNK_OF_WIDTH = {sum(layout["widths"]): name for name, layout in HRNET_LAYOUTS.items()}   # 720: hrnet48
PARTS = {("backbone", "ocr", "scale_attn"): "hierarchical", ("backbone", "ocr"): "average"}


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return SAFE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a weights file has no need of") from None


def safe_load(file, **kwargs):
    return SafeUnpickler(file, **kwargs).load()


class SafePickle:
    """The pickle module torch.load is given: its Unpickler and load, restricted to SAFE_GLOBALS."""
    Unpickler, load = SafeUnpickler, staticmethod(safe_load)


def read_nvidia(path):
    """The dict saved in PATH; InputError (one line) if it is missing, unreadable or names other code."""
    if not os.path.isfile(path):
        raise InputError(f"NVIDIA checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", pickle_module=SafePickle, weights_only=False)
    except Exception as e:                                     # truncated, random bytes, a pickle of code
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InputError(f"{path} cannot be read as a checkpoint ({reason})") from None


def refuse(path, found):
    return InputError(f"{path} is not one of NVIDIA's HRNet-OCR checkpoints (network/ocrnet.py MscaleOCR or "
                      f"OCRNet, keys module.backbone.*, module.ocr.*[, module.scale_attn.*]): found {found}")


def strip_module(path, checkpoint):
    """checkpoint['state_dict'] without the 'module.' prefix, or the refusal naming what the file holds."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        keys = f" with keys {', '.join(map(str, list(checkpoint)[:5]))}" if isinstance(checkpoint, dict) else ""
        raise refuse(path, f"{describe(checkpoint)}{keys} and no 'state_dict'")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise refuse(path, f"a 'state_dict' that is not a dict of tensors ({describe(state)})")
    plain = [k for k in state if not k.startswith("module.")]
    if plain:
        raise refuse(path, f"{len(plain)} keys without the 'module.' prefix (e.g. {plain[0]})")
    return {k[len("module."):]: v for k, v in state.items()}


def model_flags(path, state):
    """The flags of hier_ms_attn that rebuild NVIDIA's model of `state` (keys without 'module.')."""
    parts = tuple(sorted({k.split(".")[0] for k in state}))
    cls = state.get("ocr.cls_head.weight")
    if parts not in PARTS or cls is None or cls.dim() != 4 or tuple(cls.shape[-2:]) != (1, 1):
        head = "no ocr.cls_head" if cls is None else f"ocr.cls_head of shape {tuple(cls.shape)}"
        raise refuse(path, f"the modules {', '.join(parts)} and {head}")
    classes, mid = cls.shape[0], cls.shape[1]
    trunk_width = state["ocr.aux_head.0.weight"].shape[1]
    if trunk_width not in TRUNK_OF_WIDTH or classes not in DATASET_OF_CLASSES:
        raise refuse(path, f"an HRNet of {trunk_width} channels and {classes} classes (known: "
                           f"{sorted(TRUNK_OF_WIDTH)} channels; 19 classes: Cityscapes, 65: Mapillary)")
    key = state["ocr.ocr_distri_head.object_context_block.f_pixel.0.weight"].shape[0]
    flags = {"method": "hier_ms_attn", "backbone": TRUNK_OF_WIDTH[trunk_width], "decoder": "ocr",
             "cls_head": "code", "ocr_channels": [mid, key], "ms_mode": PARTS[parts],
             "dataset": DATASET_OF_CLASSES[classes]}
    if "scale_attn.conv0.weight" in state:
        flags["head_channels"] = state["scale_attn.conv0.weight"].shape[0]
    return flags


def convert(source, target):
    """Read NVIDIA's SOURCE, write this project's checkpoint TARGET; returns the flags written."""
    state = strip_module(source, read_nvidia(source))
    flags = model_flags(source, state)
    torch.save({"model": state, "args": flags}, target)
    return flags


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="NVIDIA's .pth file (one of the three above)")
    parser.add_argument("target", help="the checkpoint to write, for train.py --checkpoint")
    args = parser.parse_args(argv)
    try:
        flags = convert(args.source, args.target)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    words = [f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in flags.items()]
    print(f"wrote {args.target}: {' '.join(words)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
