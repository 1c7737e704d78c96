"""Progress on every long wait: the line's rule (first, last, every few seconds; in place on a
terminal), and that training, evaluation, the label check and --benchmark show one within their
first step."""
import io
import os
import re
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from tools import progress  # noqa: E402

TINY = ["--method", "fcn", "--dataset", "synthetic", "--backbone", "resnet18", "--head-channels", "32",
        "--crop-size", "32", "--batch-size", "2", "--synthetic-size", "40", "--synthetic-length", "16",
        "--synthetic-val-length", "3", "--workers", "0", "--device", "cpu"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_the_first_and_the_last_line_and_one_per_interval():
    log = io.StringIO()
    bar = progress.Progress("evaluating x", 5, stream=log, every_s=1e9)
    for _ in range(5):
        bar.update()
    lines = log.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["evaluating x 1/5", "evaluating x 5/5"]
    assert re.fullmatch(r"evaluating x 5/5 \| [\d.]+ it/s \| \d+s elapsed, ETA 0s", lines[1])
    log = io.StringIO()
    bar = progress.Progress("x", 4, stream=log, every_s=0)
    for _ in range(4):
        bar.update()
    assert len(log.getvalue().splitlines()) == 4


def test_a_terminal_line_is_rewritten_in_place_and_kept_at_the_end():
    screen = Terminal()
    bar = progress.Progress("x", 3, stream=screen)
    for _ in range(3):
        bar.update()
    text = screen.getvalue()
    assert text.startswith("\r\033[Kx 1/3") and text.endswith("\n") and text.count("\n") == 1
    assert "\r\033[Kx 3/3" in text


def test_a_silent_rank_writes_nothing_and_durations_read_as_a_clock():
    log = io.StringIO()
    bar = progress.Progress("x", 2, shown=False, stream=log, every_s=0)
    bar.update(2)
    assert log.getvalue() == ""
    assert [progress.duration(s) for s in (4.4, 65, 3600 + 180)] == ["4s", "1m05s", "1h03m"]


def test_training_evaluation_and_the_label_check_say_so_from_their_first_item(tmp_path, capsys):
    train.main(TINY + ["--iters", "3", "--log-every", "100", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out.splitlines()
    first = lambda prefix: next(i for i, line in enumerate(out) if line.startswith(prefix))
    assert first("checking synthetic evaluation labels 1/3") < first("it 1/3 |") < first("it 3/3 |")
    assert first("it 3/3 |") < first("evaluating synthetic (scales 1.0, whole) 1/3 |")
    assert re.match(r"it 1/3 \| main [\d.]+ aux [\d.]+ total [\d.]+ \| lr .* \| ETA \d+s$", out[first("it 1/3")])


def test_benchmark_names_each_phase_and_counts_every_call(capsys):
    train.main(["--benchmark", "--method", "fcn", "--backbone", "resnet18", "--head-channels", "16",
                "--crop-size", "32", "--batch-size", "2", "--benchmark-iters", "2", "--benchmark-warmup", "1",
                "--device", "cpu"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("benchmark fcn")]
    # two phases (forward, training step), each: FLOPs, peak memory, 1 warm-up + 2 timed calls
    assert lines[0].startswith("benchmark fcn: forward FLOPs 1/10 |")
    assert lines[-1].startswith("benchmark fcn: train step time 10/10 |")


def test_predict_counts_the_images_it_labels(tmp_path, capsys):
    train.main(TINY + ["--iters", "1", "--out", str(tmp_path / "run")])
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 16), (90, 120, 30)).save(tmp_path / name)
    capsys.readouterr()
    train.main(["--predict", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--checkpoint",
                str(tmp_path / "run" / "best.pt")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("labelling 1/2 |") and any(line.startswith("labelling 2/2 |") for line in lines)
