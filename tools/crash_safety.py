"""What keeps a run's files whole when it crashes, fills the disk, shares its folder or is stopped:

    check_out_folder   --out is a folder this process can write, checked before any work starts
    out_folder         --out made for the run, and removed again if a failed start left it empty
    claim_out_folder   one training run per folder: a running run's folder is refused, and so is a
                       finished one's unless --resume (continue it) or --overwrite (start afresh)
    temporary_path     a temporary name beside a file that no other process uses
    atomic_save        a checkpoint written to a temporary file, then renamed (never half a file)
    write_json         summary.json, the same way, as strict JSON (an empty split's NaN is null)
    append_json_line   one metrics.jsonl record; resume_log drops what a resumed run logs again
    die_with_parent    DataLoader workers that exit with their parent, even after SIGKILL, and leave
                       SIGTERM and SIGINT to it
    Health             a loss, weight or buffer that is not finite stops training before it reaches
                       a checkpoint
    Stop, Stopped      SIGTERM (a time limit, scancel, pre-emption) and SIGINT (Ctrl-C): the training
                       step finishes, every rank stops after the same one, last.pt is written
"""
import contextlib
import json
import math
import os
import re
import signal
import socket
import threading
import uuid

import torch
import torch.distributed as dist

from common import IGNORE_INDEX, InputError

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json")
TEMPORARY = r"\.\d+\.[0-9a-f]{8}\.tmp$"                       # what temporary_path appends to a name


def check_out_folder(path):
    """--out must be a folder this process can write, or one it can make (nothing is made here)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--out {path} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {path} is not a writable folder ({existing} cannot be written)")


@contextlib.contextmanager
def out_folder(path, master):
    """--out made for the run; made by this run and left empty by a run that fails or is stopped
    before writing anything (a bad --data-root, a wrong --checkpoint), it is removed again."""
    made = not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {path} is not a writable folder ({e.strerror})") from None
    try:
        yield
    except BaseException:
        if made and master and os.path.isdir(path) and set(os.listdir(path)) <= {".lock"}:
            with contextlib.suppress(OSError):
                for name in os.listdir(path):
                    os.remove(os.path.join(path, name))
                os.rmdir(path)
        raise


def locked(file):
    """An exclusive advisory lock on the open `file` (released when it is closed, or the process
    dies); False if another process holds it. Where the system or the file system has no locks
    (Windows; Lustre without its flock option) the folder is taken unchecked."""
    try:
        import fcntl
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    except (ImportError, OSError):
        pass
    return True


@contextlib.contextmanager
def claim_out_folder(path, resume, overwrite, master):
    """A training run's hold on --out, for its whole duration: refused if another run holds it (a
    lock on OUT/.lock, which the system drops when that run ends, even killed), or if it holds a run's
    files and neither --resume nor --overwrite was given (--overwrite removes them). Only rank 0 locks
    and removes; every rank checks. Temporary files a killed run left are removed."""
    present = [name for name in RUN_FILES[:3] if os.path.isfile(os.path.join(path, name))]
    if present and not (resume or overwrite):
        raise InputError(f"--out {path} already holds a run ({', '.join(present)}): --resume continues it, "
                         f"--overwrite starts afresh (replacing its files), or choose another --out")
    if not master:
        yield
        return
    with open(os.path.join(path, ".lock"), "a+") as lock:
        if not locked(lock):
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise InputError(f"--out {path} is in use by a running run ({holder}): wait for it to end, "
                             f"or choose another --out")
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        for name in os.listdir(path):
            if re.search(TEMPORARY, name) or (overwrite and name in RUN_FILES):
                os.remove(os.path.join(path, name))
        yield


def temporary_path(path):
    """PATH.<pid>.<random>.tmp: two processes writing the same file (two runs, two ranks, two
    hosts on a shared disk) never share a temporary file."""
    return f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def write_failed(path, error, kept):
    """The one-line InputError of a write that failed (a full disk, a removed folder)."""
    reason = getattr(error, "strerror", None) or str(error).strip()[:120]
    gone = "" if os.path.isdir(os.path.dirname(path) or ".") else "; its folder is gone (was --out removed?)"
    return InputError(f"cannot write {path} ({reason}){gone}: {kept}")


@contextlib.contextmanager
def replacing(path, kept="the previous file is kept"):
    """Yields a temporary path to write; it then replaces PATH in one rename. A failed write (a full
    disk surfaces as OSError or RuntimeError) removes the temporary file, keeps PATH, and is an
    InputError naming it."""
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise write_failed(path, e, kept) from None


def atomic_save(state, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint,
    and a failed write keeps the previous checkpoint."""
    kept = "the previous one is kept" if os.path.isfile(path) else "none was written before"
    with replacing(path, kept) as tmp:
        torch.save(state, tmp)


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
    with replacing(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(strict_json(value), f, indent=1, allow_nan=False)


def append_json_line(path, record):
    """One strict JSON record as a line of PATH (metrics.jsonl)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
    except OSError as e:
        raise write_failed(path, e, "the lines before it are kept") from None


def resume_log(path, iteration, rewrite=True):
    """Before a resumed run appends to metrics.jsonl (PATH): drop the line a kill cut short and every
    record past `iteration` (last.pt's), which the resumed run logs again, so that no iteration is
    logged twice (rank 0 rewrites: `rewrite`). Returns, on every rank, whether an evaluation at
    `iteration` is recorded."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        text = f.read()
    lines = [line for line in text.split(b"\n")[:-1] if line.strip()]     # the last piece: b"" or a cut line
    try:
        records = [json.loads(line) for line in lines]
    except ValueError as e:
        raise InputError(f"{path} is not JSON lines ({e}): move it away to resume") from None
    kept = [(line, r) for line, r in zip(lines, records) if r.get("iter", 0) <= iteration]
    if rewrite and (len(kept) < len(records) or not text.endswith(b"\n")):
        with replacing(path) as tmp:
            with open(tmp, "wb") as f:
                f.writelines(line + b"\n" for line, _ in kept)
    return any(r.get("iter") == iteration and "mIoU" in r for _, r in kept)


def die_with_parent(worker_id):
    """A DataLoader worker_init_fn: the worker exits with its parent, even when that is killed with
    SIGKILL (Linux; elsewhere the workers' own watchdog), and ignores SIGTERM and SIGINT, which a
    cluster or a terminal sends to every process: its parent finishes the step and stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def non_finite_entries(model):
    """The names of the model's weights and buffers that hold a NaN or an infinity (one sync)."""
    entries = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in entries])
    return [] if finite.all() else [name for (name, _), ok in zip(entries, finite.tolist()) if not ok]


class Health:
    """What train.py's loop checks at logging and saving, accumulated on the device without a sync:
    the first iteration whose loss was not finite, and the labelled pixels seen since the last check;
    at a save, also every weight and buffer (a BatchNorm's running_var can turn infinite while the
    loss is still finite)."""

    def __init__(self, device):
        self.bad_iter = torch.tensor(-1, device=device)
        self.labelled = torch.tensor(0, device=device)

    def add(self, it, total, labels):
        first_bad = (self.bad_iter < 0) & ~torch.isfinite(total)
        self.bad_iter = torch.where(first_bad, torch.full_like(self.bad_iter, it + 1), self.bad_iter)
        self.labelled = self.labelled + (labels != IGNORE_INDEX).sum()

    def check(self, args, world, iteration, model=None):
        """Stops the run (InputError) if a loss was not finite, or, with `model` (before a save), a
        weight or buffer; returns the labelled pixel count since the last check (summed over ranks)
        and resets it."""
        bad_weights = non_finite_entries(model) if model is not None else []
        state = torch.stack([self.bad_iter, self.labelled, torch.full_like(self.labelled, len(bad_weights))])
        if world > 1:
            dist.all_reduce(state)                             # any rank's bad step stops every rank
        bad_iter, labelled, bad_count = state.tolist()
        last = os.path.join(args.out, "last.pt")
        kept = f"the last good checkpoint is {last}" if os.path.isfile(last) else \
            f"no checkpoint was written yet (--save-every {args.save_every})"
        if bad_iter != -world:                                 # every rank's 'none yet' is -1
            at = f" at iteration {bad_iter}" if world == 1 else ""
            raise InputError(f"the loss is not finite{at}: training stopped; {kept}")
        if bad_count:
            named = f": {', '.join(bad_weights[:3])}{', ...' if len(bad_weights) > 3 else ''}" if bad_weights else ""
            raise InputError(f"{bad_count} weights or buffers are not finite after iteration {iteration}{named} "
                             f"(the learning rate too high?): training stopped, none saved; {kept}")
        self.labelled.zero_()
        return labelled


# ----------------------------------------------------------------------------------------------
# SIGTERM and SIGINT


class Stopped(Exception):
    """A run stopped by a signal; train.py prints `stopped by SIG...<detail>` and exits with 128 + its
    number (143 for SIGTERM, 130 for SIGINT), as a process killed by it would."""

    def __init__(self, signum, detail=""):
        self.signum, self.detail, self.code = signum, detail, 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}{detail}")


class Stop:
    """SIGTERM and SIGINT, caught while a run lasts (`with Stop(...) as stop:`, main thread only).
    Inside a training step (`deferring`) a signal is only noted: the step finishes, and `agreed()`,
    which every rank calls after every step, returns its number on every rank after the same step,
    so that rank 0 writes last.pt of a step every rank took. Elsewhere (`at_once`: an evaluation, or
    loading data) it stops the run at once: nothing there is lost."""

    def __init__(self, device, distributed):
        self.device, self.distributed = device, distributed
        self.signum, self.deferred, self.pending, self.previous = 0, False, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.previous[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        self.signum = self.signum or signum
        if not self.deferred:
            raise Stopped(signum)

    @contextlib.contextmanager
    def deferring(self):
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False

    @contextlib.contextmanager
    def at_once(self, detail=""):
        """A signal inside the block (or one noted before it) stops the run at once, saying `detail`."""
        deferred, self.deferred = self.deferred, False
        try:
            if self.signum:
                raise Stopped(self.signum)
            yield
        except Stopped as e:                                   # a detail said closer to the stop stays
            raise Stopped(e.signum, e.detail or detail) from None
        finally:
            self.deferred = deferred

    def agreed(self, now=False):
        """The signal every rank acts on after this step (0: none). Under DDP each rank's number is
        all-reduced (MAX) every step; on CUDA the result is read one step later from pinned memory,
        so that the host never waits for the GPU, except with `now` (a step that saves, which waits
        anyway). Every rank passes the same `now`, so every rank stops after the same step."""
        if not self.distributed:
            return self.signum
        flag = torch.full((1,), self.signum, dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if now or self.device.type != "cuda":
            self.pending = None
            return int(flag.item())
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        earlier, self.pending = self.pending, (host, event)
        if earlier is None:
            return 0
        earlier[1].synchronize()
        return int(earlier[0].item())
