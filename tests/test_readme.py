"""The README's commands and flags against the parsers, and its Python blocks run: documentation that drifts from
the code fails."""
import contextlib
import io
import os
import re
import shlex
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import train  # noqa: E402
from tools import gpu_check  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SCRIPTS = {"train.py": []}
METHOD_PLACEHOLDERS = {"METHOD", "NAME"}                   # run with every method in its place
LAUNCHER_FLAGS = {"--nproc_per_node", "--standalone", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
                  "--index-url", "--depth", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--signal"}  # torchrun, pip, git, SLURM


def readme_text():
    with open(README) as f:
        return f.read()


def fenced_blocks(text, languages):
    """The contents of the README's fenced blocks tagged with one of `languages` ('' = untagged)."""
    return [block for language, block in re.findall(r"```([a-z]*)\n(.*?)```", text, flags=re.S)
            if language in languages]


def shell_lines(text):
    """Each command line of the README's shell blocks: continuations joined, comments dropped,
    shell variables of the block (B="...") substituted."""
    for block in fenced_blocks(text, ("bash", "")):
        variables = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("#"):
                continue
            assignment = re.fullmatch(r'(\w+)="([^"]*)"', line)
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            yield line


def script_commands(text):
    """(script, argument list) of every train.py / specialize_fuse.py call in the README."""
    for line in shell_lines(text):
        for command in line.split("&&"):
            tokens = shlex.split(command)
            scripts = [i for i, t in enumerate(tokens) if t in SCRIPTS]
            if scripts:
                yield tokens[scripts[0]], tokens[scripts[0] + 1:]


def test_the_readme_has_commands_to_check():
    commands = list(script_commands(readme_text()))
    assert len(commands) > 30 and {script for script, _ in commands} == set(SCRIPTS)


def concrete(argv):
    """The argument lists a README command stands for: none for a sketch ('...') or --help, one per
    method for --method METHOD."""
    if "..." in argv or "--help" in argv:
        return []
    if METHOD_PLACEHOLDERS & set(argv):
        return [[method if a in METHOD_PLACEHOLDERS else a for a in argv] for method in train.METHODS]
    return [argv]


def test_every_readme_command_parses():
    checked = 0
    for script, argv in script_commands(readme_text()):
        for args in concrete(argv):
            try:
                train.parse_args(SCRIPTS[script] + args)
            except SystemExit:
                pytest.fail(f"README command does not parse: {script} {' '.join(args)}")
            checked += 1
    assert checked > 35


def known_flags():
    """Every option string of the common parser, of each method's parser and of tools/gpu_check.py."""
    flags = set()
    for parser in [train.build_parser(method) for method in train.METHODS] + [gpu_check.build_parser()]:
        for action in parser._actions:
            flags.update(action.option_strings)
    return flags


def test_every_flag_the_readme_names_exists():
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", readme_text()))
    unknown = sorted(named - known_flags() - LAUNCHER_FLAGS)
    assert not unknown, f"the README names flags no parser has: {unknown}"


def test_every_split_a_readme_command_names_exists():
    """--train-split / --val-split of every README command: each part of 'a+b' a split of its dataset."""
    checked = 0
    for script, argv in script_commands(readme_text()):
        for args in concrete(argv):
            parsed = train.parse_args(SCRIPTS[script] + args)
            if parsed.dataset == "synthetic":
                continue
            splits = common.DATASETS[parsed.dataset][2]
            for split in (parsed.train_split, parsed.val_split):
                assert set(split.split("+")) <= set(splits), f"{' '.join(args)}: {split} not in {splits}"
                checked += 1
    assert checked > 10


def test_the_python_blocks_run_and_print_what_their_comments_say():
    """Every python block, in order, in one namespace (as a reader pastes them into one session); each
    `print(...)  # torch.Size(...): ...` line must print what its comment says."""
    blocks = fenced_blocks(readme_text(), ("python",))
    assert blocks, "the README has no Python snippet"
    namespace, printed = {"__name__": "readme"}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    comment = r"^print\(.*?\)\s+# (torch\.Size\(\[.*?\]\))"                  # print(x.shape)  # torch.Size([...])
    expected = [shape for block in blocks for shape in re.findall(comment, block, flags=re.M)]
    assert expected and printed.getvalue().split("\n")[:len(expected)] == expected


def test_the_readme_runs_the_tests_as_ci_does():
    """The set-up block's test command is the one .ci/run runs."""
    with open(os.path.join(os.path.dirname(README), ".ci", "run")) as f:
        ci = f.read()
    assert "\npython -m pytest -q\n" in ci
    assert any(line.endswith("python -m pytest -q") for line in shell_lines(readme_text()))


def test_the_readme_halves_camvid_as_it_says(tmp_path):
    """halve_camvid(): every file of the six folders at 240 x 180, labels by nearest (only the values
    0 and 11 of the source: a bilinear resize would make values between them)."""
    namespace = {}
    exec(next(b for b in fenced_blocks(readme_text(), ("python",)) if "def halve_camvid" in b), namespace)
    src = tmp_path / "CamVid"
    for folder in ["train", "val", "test", "trainannot", "valannot", "testannot"]:
        os.makedirs(src / folder)
        labels = folder.endswith("annot")
        rng = np.random.default_rng(0)
        values = rng.choice(np.array([0, 11], np.uint8), (360, 480)) if labels else \
            rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
        Image.fromarray(values).save(src / folder / "0001TP_000010.png")
    namespace["halve_camvid"](str(src), str(tmp_path / "camvid"))
    for folder in ["train", "trainannot"]:
        image = Image.open(tmp_path / "camvid" / folder / "0001TP_000010.png")
        assert image.size == (240, 180) and image.mode == ("L" if folder == "trainannot" else "RGB")
    label = np.asarray(Image.open(tmp_path / "camvid" / "valannot" / "0001TP_000010.png"))
    assert set(np.unique(label).tolist()) == {0, 11}
    _, counts = train.main(["--check-data", "--dataset", "camvid", "--data-root", str(tmp_path / "camvid")])
    assert counts == {"train": 1, "val": 1, "test": 1}
