"""tools/levels.py (--levels): S&F's Table 9 and Fig. 3 against slow loops over the pixels, and end to end
from a checkpoint through train.py.

Run: python -m pytest -q tests/test_levels.py
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import specialize_fuse as sf  # noqa: E402
import train  # noqa: E402
from common import IGNORE_INDEX  # noqa: E402
from tools import levels  # noqa: E402

torch.set_num_threads(1)
CLASSES = ["a", "b", "c"]


def test_level_confusion_matches_pixel_count():
    g = torch.Generator().manual_seed(6)
    B, K, L, size = 2, 3, 4, (30, 61)
    predictions = [torch.randint(0, K, (B, *size), generator=g) for _ in range(L)]
    level = torch.randint(0, L, (B, *size), generator=g)
    target = torch.randint(0, K, (B, *size), generator=g)
    target[:, :3] = IGNORE_INDEX
    confusion = levels.level_confusion(predictions, level, target, K)
    slow = torch.zeros(L, L, K, K, dtype=torch.long)
    for b, i, j in (target != IGNORE_INDEX).nonzero().tolist():
        for l_sem in range(L):
            slow[level[b, i, j], l_sem, target[b, i, j], predictions[l_sem][b, i, j]] += 1
    assert torch.equal(confusion, slow) and len(level.unique()) == L
    fused = common.confusion_matrix(predictions[2], target, K)
    table9, share, per_level, fused_iou = levels.level_tables(confusion, fused, CLASSES)
    assert table9[1][2] == common.segmentation_metrics(confusion[2, 1])["mIoU"]
    assert fused_iou == common.segmentation_metrics(fused, CLASSES)["IoU"]
    assert per_level[0] == common.segmentation_metrics(confusion[:, 0].sum(0), CLASSES)["IoU"]
    assert abs(sum(share) - 100) < 1e-9


def test_markdown_numbers_levels_as_the_paper_finest_first():
    table9 = [[10.0, 11.0], [20.0, float("nan")]]              # [l'][l], 0 = coarsest
    text = levels.markdown_tables(table9, [30.0, 70.0], [{"a": 5.0, "b": None}, {"a": 7.5, "b": 1.0}],
                                  {"a": 6.0, "b": None})
    assert "| l' \\ l | 2 | 1 |" in text and "| 2 | - | 20.00 |" in text and "| 1 | 11.00 | 10.00 |" in text
    assert "| pixels (%) | 70.00 | 30.00 |" in text
    assert "| a | 6.00 | 1.50 | -1.00 |" in text and "| b | - | - | - |" in text


def tiny_model(**kw):
    torch.manual_seed(0)
    return sf.SpecializeFuse(common.ResNet(18, 32), 3, semantic_channels=16, unity_channels=8, **kw).eval()


def analysed(model, images, labels, class_names=CLASSES):
    """The extra fed (image, label) pairs as train.evaluate feeds it: level_confusion and 'out''s, summed."""
    extra = levels.LevelTables(model, len(class_names), class_names, "off", torch.device("cpu"))
    for index, (image, label) in enumerate(zip(images, labels)):
        extra.add(index, image[None], None, label[None])
    return extra


@pytest.mark.parametrize("tau, taken", [(0.0, 0), (1.1, 3)])
def test_table9_scores_each_level_as_the_evaluated_output_is_upsampled(tau, taken):
    """Where the fusion takes level l everywhere, Table 9's level l is exactly the evaluated 'out'."""
    g = torch.Generator().manual_seed(8)
    images, labels = torch.randn(2, 3, 49, 70, generator=g), torch.randint(0, 3, (2, 49, 70), generator=g)
    labels[:, :4] = IGNORE_INDEX
    extra = analysed(tiny_model(tau=tau), images, labels)
    assert torch.equal(extra.confusion[taken, taken], extra.fused)
    assert extra.fused.sum() == (labels != IGNORE_INDEX).sum()
    assert all(extra.confusion[l].sum() == 0 for l in range(4) if l != taken)


def saved_run(tmp_path, *flags):
    """best.pt as train.py writes it ('model' and 'args', every parsed flag) of a tiny synthetic run."""
    argv = ["--method", "specialize_fuse", "--dataset", "synthetic", "--backbone", "resnet18", "--semantic-channels",
            "16", "--unity-channels", "8", "--synthetic-size", "40", "--synthetic-val-length", "2", "--device", "cpu",
            *flags]
    args = train.parse_args(argv)
    args.num_classes = len(common.SYNTHETIC_CLASSES)
    torch.manual_seed(0)
    model = sf.build_model(args)
    path = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "args": dict(vars(args))}, path)
    return model, args, str(path)


def test_eval_only_prints_table9_and_fig3_of_a_checkpoint(tmp_path, capsys):
    model, args, path = saved_run(tmp_path, "--tau", "0.5")
    out = tmp_path / "eval"
    train.main(["--eval-only", "--checkpoint", path, "--levels", "--synthetic-size", "40", "--synthetic-val-length",
                "2", "--workers", "0", "--device", "cpu", "--out", str(out)])      # the model's flags from it
    printed = capsys.readouterr().out
    val = common.build_datasets(args)[1]
    extra = analysed(model.eval(), *zip(*(val[i] for i in range(len(val)))), val.class_names)
    tables = levels.level_tables(extra.confusion, extra.fused, val.class_names)
    assert levels.markdown_tables(*tables) in printed and "| pole |" in printed
    labelled = sum((val[i][1] != IGNORE_INDEX).sum() for i in range(len(val)))
    assert extra.fused.sum() == sum(extra.confusion[l, l].sum() for l in range(4)) == labelled   # every pixel
    with open(out / "summary.json") as f:
        summary = json.load(f)["levels"]
    assert summary["table9"] == [[None if v != v else v for v in row] for row in tables[0]]   # NaN: null


@pytest.mark.parametrize("flags, named", [(["--method", "galdv1"], "--method galdv1"),
                                          (["--method", "specialize_fuse", "--output-format", "single"],
                                           "--output-format single")])
def test_levels_of_a_model_without_pyramids_is_refused_in_one_line(tmp_path, capsys, flags, named):
    argv = flags + ["--levels", "--backbone", "resnet18", "--dataset", "synthetic", "--device", "cpu", "--iters", "1",
                    "--out", str(tmp_path / "run")]
    assert train.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --levels") and named in err, err
    assert not os.path.exists(tmp_path / "run")                                # refused before any work
