"""Maps a person can read (tools/predict.py): a heat map's colour bar says the map's own range and its
colours read back as values through the bar, the legend names every class beside its colour, the
image under a map is the evaluated image, and files are named after their image."""
import argparse
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
from tools import predict  # noqa: E402


def text_at(image, x, y, text):
    """Whether `text` in the default font is what `image` (an array) shows with its corner at (x, y)."""
    width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text))
    ref = Image.new("RGB", (width, 12), "white")
    ImageDraw.Draw(ref).text((0, 0), text, fill="black")
    shown = np.asarray(image)[y:y + 12, x:x + width]
    return np.array_equal(shown, np.asarray(ref)[:len(shown)])


def bar_value(colour, bar, lo, hi):
    """The value a colour reads as: the bar's row of the nearest colour (top = hi, bottom = lo)."""
    row = np.abs(bar.astype(int) - np.asarray(colour, int)).sum(-1).argmin()
    return hi - row / (len(bar) - 1) * (hi - lo)


def test_bar_labels_are_the_maps_min_and_max_and_its_colours_read_back_as_values():
    H, W = 64, 48
    yy, xx = np.mgrid[:H, :W] / np.array([H, W])[:, None, None]
    values = (0.47 + 0.06 * (0.5 + 0.5 * np.sin(6 * yy) * np.cos(4 * xx))).astype(np.float32)   # GALD's flat mask
    lo, hi = float(values.min()), float(values.max())
    saved = np.asarray(predict.with_colour_bar(values))
    assert predict.bar_labels(lo, hi) == (f"{hi:.3g}", f"{lo:.3g}") == ("0.53", "0.47")
    x = W + 3 + predict.COLOUR_BAR
    assert text_at(saved, x, 0, "0.53") and text_at(saved, x, H - 11, "0.47")
    assert not text_at(saved, x, 0, "1")                               # not the fixed 0-1 bar
    bar = saved[:, W + 2 + predict.COLOUR_BAR // 2]                    # (H, 3): top = hi
    read = np.array([[bar_value(saved[i, j], bar, lo, hi) for j in range(0, W, 3)] for i in range(0, H, 3)])
    error = np.abs(read - values[::3, ::3]).max()
    assert error <= (hi - lo) / (H - 1), f"colours read back through the bar {error:.4f} off"
    assert len({tuple(c) for c in saved[:, :W].reshape(-1, 3)}) > 50  # the structure shows (not one flat green)


def test_a_given_range_is_used_and_labelled_and_a_constant_map_is_dark_blue():
    values = np.full((30, 20), 0.5, np.float32)
    saved = np.asarray(predict.with_colour_bar(values))
    assert (saved[:, :20] == [0, 0, 128]).all()                        # no division by zero
    assert predict.bar_labels(0.5, 0.5) == ("0.5", "0.5")
    assert predict.bar_labels(1.234e-5, 3.1e-3) == ("0.0031", "1.23e-05")
    assert predict.bar_labels(0.49987602, 0.50004423) == ("0.50004", "0.49988")   # a digit past the first that differs
    saved = np.asarray(predict.with_colour_bar(values, 0.0, 1.0))
    assert (saved[:, :20] == [128, 255, 128]).all()                    # 0.5 of [0, 1]: the middle green
    assert text_at(saved, 20 + 3 + predict.COLOUR_BAR, 0, "1") and text_at(saved, 23 + predict.COLOUR_BAR, 19, "0")


def test_the_map_is_blended_over_its_image_beside_the_bar():
    values = np.random.default_rng(0).random((24, 32)).astype(np.float32)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    saved = np.asarray(predict.with_colour_bar(values, image=image))
    heat = predict.heatmap((values - values.min()) / (values.max() - values.min()))
    np.testing.assert_array_equal(saved[:, :32], np.asarray(heat))
    np.testing.assert_array_equal(saved[:, -32:], np.asarray(Image.blend(image, heat, 0.5)))


def test_denormalized_gives_back_the_image():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (9, 13, 3), dtype=np.uint8))
    back = predict.denormalized(common.to_normalized_tensor(image))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(image))


@pytest.mark.parametrize("name", sorted(predict.PALETTES))
def test_the_legend_shows_every_class_name_beside_its_colour(name):
    classes, palette = common.dataset_classes(name), predict.PALETTES[name]
    shown = np.asarray(predict.legend(classes, palette))
    rows = list(zip(classes, palette)) + [("ignore", (0, 0, 0))]
    R, (w, h) = predict.LEGEND_ROW, predict.SWATCH
    assert shown.shape[0] == R * len(rows)
    for k, (label, colour) in enumerate(rows):
        top = k * R + (R - h) // 2
        assert (shown[top:top + h, 2:2 + w] == colour).all(), f"{name}: the swatch of {label}"
        if name in ("synthetic", "cityscapes"):                       # the name, drawn beside it
            assert text_at(shown, w + 6, k * R, label), f"{name}: row {k} does not read {label}"


def test_datasets_name_an_index_by_its_image_stem():
    ds = common.SegDataset([("/data/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png", "x")],
                           ["road"])
    assert ds.image_stem(0) == "frankfurt_000000_000294_leftImg8bit"
    assert common.SyntheticDataset(3, (8, 8), 0).image_stem(2) == "synthetic_0002"


class RampModel:
    """A stand-in model: its one map rises from 0.47 (left) to 0.53 (right) on an 8 x 8 grid."""

    def maps(self, image, scales):
        return {"ramp": torch.linspace(0.47, 0.53, 8).expand(1, 1, 8, 8)}

    def query_pixels(self):
        return {}


def test_map_saver_names_files_after_the_image_blends_over_it_and_writes_one_legend(tmp_path):
    ds = common.SyntheticDataset(3, (24, 24), 0)
    args = argparse.Namespace(dataset="synthetic", out=str(tmp_path), save_maps=2, amp="off", eval_scales=[1.0])
    saver = predict.MapSaver(RampModel(), ds, args)                      # the evaluated dataset itself
    for index in (1, 2, 0):                             # as DDP's rank 1 then rank 0 see them; 2 is past N = 2
        image, label = ds[index]
        saver.add(index, image[None], label[None], label[None])
        if index == 1:
            assert "legend.png" not in os.listdir(tmp_path / "maps")   # image 0's rank alone writes it
    assert sorted(os.listdir(tmp_path / "maps")) == ["legend.png", "synthetic_0000_pred.png",
        "synthetic_0000_ramp_0.png", "synthetic_0001_pred.png", "synthetic_0001_ramp_0.png"]
    saved = np.asarray(Image.open(tmp_path / "maps" / "synthetic_0001_ramp_0.png"))
    x = 24 + 3 + predict.COLOUR_BAR
    assert text_at(saved, x, 0, "0.53") and text_at(saved, x, 24 - 11, "0.47")
    heat = Image.fromarray(saved[:, :24])
    np.testing.assert_array_equal(saved[:, -24:], np.asarray(Image.blend(ds.load(1)[0], heat, 0.5)))
