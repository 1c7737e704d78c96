"""What a user sees at the edges of a run: --check-data on a dataset folder, a failed start that leaves
no empty folder, evaluations of one checkpoint kept apart by what they evaluated, the line that says
what a run wrote."""
import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

TINY = ["--method", "fcn", "--dataset", "synthetic", "--backbone", "resnet18", "--head-channels", "16",
        "--crop-size", "32", "--batch-size", "2", "--synthetic-size", "32", "--synthetic-length", "8",
        "--synthetic-val-length", "2", "--workers", "0", "--device", "cpu", "--log-every", "100"]


def camvid_tree(root, counts, label_values=(0, 3, 11)):
    """The SegNet layout: SPLIT/NAME.png and SPLITannot/NAME.png, 12 x 8 images, labels cycling
    through `label_values` (11 = void)."""
    for split, n in counts.items():
        for folder in (split, split + "annot"):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        for i in range(n):
            Image.new("RGB", (12, 8), (i, 2 * i, 3)).save(os.path.join(root, split, f"f{i:03d}.png"))
            label = np.full((8, 12), label_values[i % len(label_values)], np.uint8)
            Image.fromarray(label).save(os.path.join(root, split + "annot", f"f{i:03d}.png"))


def one_error_line(capsys, argv):
    assert train.cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_check_data_counts_each_split_and_says_which_it_did_not_find(tmp_path, capsys):
    root = str(tmp_path / "camvid")
    camvid_tree(root, {"train": 5, "val": 2})
    _, counts = train.main(["--check-data", "--dataset", "camvid", "--data-root", root])
    out = capsys.readouterr().out
    assert counts == {"train": 5, "val": 2}
    # train holds labels 0, 3 and void; val (2 images) 0 and 3
    assert "camvid train: 5 images and labels read, 2 of 11 classes present, some pixels ignored" in out
    assert "camvid val: 2 images and labels read, 2 of 11 classes present\n" in out
    assert "camvid test: not checked (" in out and "checking camvid train 5/5 |" in out


def test_check_data_stops_at_the_first_bad_file_naming_it(tmp_path, capsys):
    root = str(tmp_path / "camvid")
    camvid_tree(root, {"train": 4, "val": 2}, label_values=(0, 1, 12))     # 12: past CamVid's 11 classes
    err = one_error_line(capsys, ["--check-data", "--dataset", "camvid", "--data-root", root])
    assert os.path.join(root, "trainannot", "f002.png") in err and "12" in err
    camvid_tree(root, {"train": 4, "val": 2})
    Image.new("RGB", (10, 8)).save(os.path.join(root, "val", "f001.png"))   # not its label's size
    err = one_error_line(capsys, ["--check-data", "--dataset", "camvid", "--data-root", root])
    assert os.path.join(root, "val", "f001.png") in err and "10x8" in err and "12x8" in err


def test_a_dataset_without_data_root_says_the_flag_is_missing(tmp_path, capsys):
    err = one_error_line(capsys, ["--dataset", "camvid", "--out", str(tmp_path / "run")])
    assert err == "error: --dataset camvid needs --data-root, the folder of its layout (README.md, Datasets)"


def test_a_run_that_fails_at_its_start_leaves_no_folder_and_says_nothing_was_written(tmp_path, capsys):
    out = tmp_path / "deep" / "run"
    one_error_line(capsys, ["--dataset", "camvid", "--data-root", str(tmp_path / "nowhere"), "--out", str(out)])
    assert not out.exists()
    train.main(TINY + ["--iters", "1", "--out", str(tmp_path / "trained")])
    one_error_line(capsys, TINY + ["--eval-only", "--checkpoint", str(tmp_path / "trained" / "missing.pt")])
    assert sorted(os.listdir(tmp_path / "trained")) == [".lock", "best.pt", "last.pt", "metrics.jsonl",
                                                        "summary.json"]


def test_evaluations_in_other_ways_keep_their_own_folders(tmp_path, capsys):
    train.main(TINY + ["--iters", "1", "--out", str(tmp_path / "run")])
    checkpoint = str(tmp_path / "run" / "best.pt")
    capsys.readouterr()
    _, single = train.main(["--eval-only", "--checkpoint", checkpoint])
    assert capsys.readouterr().out.rstrip().endswith(f"wrote summary.json in {tmp_path / 'run' / 'eval-val'}")
    train.main(["--eval-only", "--checkpoint", checkpoint, "--eval-scales", "0.75", "1.0", "--flip"])
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "best.pt", "eval-val", "eval-val-scales0.75,1-flip",
                                                    "last.pt", "metrics.jsonl", "summary.json"]
    with open(tmp_path / "run" / "eval-val" / "summary.json") as f:
        assert json.load(f)["mIoU"] == single["mIoU"]
