"""Progress on every long wait (evaluation, the label check, --benchmark, --predict, training):

    evaluating camvid val 12/101 | 3.41 it/s | 4s elapsed, ETA 26s

On a terminal the line is rewritten in place (at most every half second); in a log (stdout not a
terminal) it is a plain line after the first item, then every EVERY_S seconds, and after the last.
"""
import sys
import time

EVERY_S = 30.0                                                 # seconds between lines in a log
TERMINAL_EVERY_S = 0.5


def duration(seconds):
    """12s, 4m05s, 2h03m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """`what n/total | rate | elapsed, ETA` for a wait of `total` items; silent where not `shown`
    (every rank but 0). update() counts an item and writes the line when one is due; `what` may
    change between items (--benchmark names its phase)."""

    def __init__(self, what, total, shown=True, stream=None, every_s=EVERY_S):
        self.what, self.total, self.shown, self.n = what, total, shown, 0
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty()
        self.every_s = TERMINAL_EVERY_S if self.terminal else every_s
        self.start = self.written = time.monotonic()

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if self.shown and (self.n == n or self.n >= self.total or now - self.written >= self.every_s):
            self.written = now
            self.write(self.line(now - self.start))

    def line(self, elapsed):
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        return (f"{self.what} {self.n}/{self.total} | {rate:.2f} it/s | {duration(elapsed)} elapsed, "
                f"ETA {duration(eta)}")

    def write(self, line):
        if self.terminal:                                      # in place; the last one stays
            end = "\n" if self.n >= self.total else ""
            self.stream.write(f"\r\033[K{line}{end}")
            self.stream.flush()
        else:
            print(line, file=self.stream, flush=True)
