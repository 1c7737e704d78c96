"""What keeps a run's files whole when it crashes, fills the disk or is killed (train.py's outputs):

    check_out_folder   --out is a folder this process can write, checked before any work starts
    atomic_save        a checkpoint written to a temporary file, then renamed (never half a file)
    write_json         summary.json, the same way, as strict JSON (an empty split's NaN is null)
    append_json_line   one metrics.jsonl record; drop_cut_line removes the line a kill cut short
    die_with_parent    DataLoader workers that exit with their parent, even after SIGKILL
    Health             a loss that is not finite stops training before it reaches a checkpoint
"""
import json
import math
import os

import torch
import torch.distributed as dist

from common import IGNORE_INDEX, InputError


def check_out_folder(path):
    """--out must be (or become) a folder this process can write."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--out {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--out {path} is not a writable folder ({e.strerror})") from None


def atomic_save(state, path):
    """torch.save to PATH.tmp, then rename: a crash never leaves a half-written checkpoint, and a
    failed write (a full disk) removes the temporary file and keeps the previous checkpoint."""
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:                       # a full disk surfaces as either
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = "the previous one is kept" if os.path.isfile(path) else "none was written before"
        raise InputError(f"cannot write checkpoint {path} ({str(e).strip()[:120]}): {kept}") from None


def strict_json(value):
    """value with every non-finite float (an empty split's NaN mIoU) as None: valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path, value):
    """PATH as indented strict JSON, written to a temporary file and renamed."""
    with open(path + ".tmp", "w") as f:
        json.dump(strict_json(value), f, indent=1, allow_nan=False)
    os.replace(path + ".tmp", path)


def append_json_line(path, record):
    """One strict JSON record as a line of PATH (metrics.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")


def drop_cut_line(path):
    """A run killed while appending to a JSON-lines file may leave a last line without its newline:
    remove it, so that the file stays valid JSON lines."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        text = f.read()
        if text and not text.endswith(b"\n"):
            f.truncate(text.rfind(b"\n") + 1)


def die_with_parent(worker_id):
    """A DataLoader worker_init_fn: the worker exits with its parent, even when that is killed with
    SIGKILL (Linux; elsewhere the workers' own watchdog)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Health:
    """What train.py's loop checks at logging and saving, accumulated on the device without a sync:
    the first iteration whose loss was not finite, and the labelled pixels seen since the last check."""

    def __init__(self, device):
        self.bad_iter = torch.tensor(-1, device=device)
        self.labelled = torch.tensor(0, device=device)

    def add(self, it, total, labels):
        first_bad = (self.bad_iter < 0) & ~torch.isfinite(total)
        self.bad_iter = torch.where(first_bad, torch.full_like(self.bad_iter, it + 1), self.bad_iter)
        self.labelled = self.labelled + (labels != IGNORE_INDEX).sum()

    def check(self, args, world):
        """Stops the run (InputError) if a loss was not finite; returns the labelled pixel count
        since the last check (summed over ranks) and resets it."""
        state = torch.stack([self.bad_iter, self.labelled])
        if world > 1:
            dist.all_reduce(state)                             # any rank's bad step stops every rank
        bad_iter, labelled = state.tolist()
        if bad_iter != -world:                                 # every rank's 'none yet' is -1
            last = os.path.join(args.out, "last.pt")
            kept = f"the last good checkpoint is {last}" if os.path.isfile(last) else \
                f"no checkpoint was written yet (--save-every {args.save_every})"
            at = f" at iteration {bad_iter}" if world == 1 else ""
            raise InputError(f"the loss is not finite{at}: training stopped; {kept}")
        self.labelled.zero_()
        return labelled
