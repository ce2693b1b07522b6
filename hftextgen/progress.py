"""How a command shows its progress: bars on a terminal, plain lines in a log, or nothing.

`--progress auto` (the default) draws bars when stderr is a terminal and writes plain lines
otherwise: a bar redraws itself with carriage returns, which a CI log or a Slurm output file
keeps as one ever-growing line. `quiet` shows no progress at all, only the few lines that say
what a command is doing and what it got.

The mode is process-wide (one command per process), set once by the command line with
`configure`; library code asks `mode()`.
"""

from __future__ import annotations

import contextlib
import sys
import time

MODES = ("auto", "bars", "plain", "quiet")
# A plain progress line at most this often (seconds), so a long stage stays visibly alive
# without filling the log.
PLAIN_INTERVAL = 30.0

_mode: str | None = None
_library_bars_off = False  # whether configure() turned datasets' and transformers' bars off


def resolve(requested: str, no_bars: bool = False) -> str:
    """auto -> bars on a terminal, plain otherwise; `no_bars` (train.disable_tqdm) turns an
    automatic choice of bars into plain lines."""
    if requested not in MODES:
        raise ValueError(f"progress: expected one of {', '.join(MODES)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "plain" if no_bars or not _is_terminal() else "bars"


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def configure(requested: str = "auto", no_bars: bool = False) -> str:
    """Set the mode for this process, and the progress bars of datasets, transformers and
    huggingface_hub (tokenizing, loading and writing weights, downloads) to match."""
    global _mode, _library_bars_off
    import datasets
    from transformers.utils import logging as hf_logging

    _mode = resolve(requested, no_bars)
    if _mode == "bars":
        if _library_bars_off:  # only undo what we did: a user's HF_*_DISABLE_PROGRESS_BARS stays
            datasets.enable_progress_bars()
            hf_logging.enable_progress_bar()
            _library_bars_off = False
    else:
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
        _library_bars_off = True
    return _mode


def mode() -> str:
    """The configured mode; unconfigured (hftextgen used as a library): what auto would pick."""
    return _mode or resolve("auto")


@contextlib.contextmanager
def silenced():
    """No progress shown inside (work that is not the command's own, e.g. validate's probes)."""
    global _mode
    before = _mode
    _mode = "quiet"
    try:
        yield
    finally:
        _mode = before


def write(text: str) -> None:
    """A message that belongs to the progress display (samples during training): printed above
    any bar, not at all when quiet."""
    current = mode()
    if current == "quiet":
        return
    if current == "bars":
        from tqdm.auto import tqdm

        tqdm.write(text)
    else:
        print(text, flush=True)


def duration(seconds: float) -> str:
    """3725 -> 1:02:05; 65 -> 1:05."""
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def size(n: float) -> str:
    """16301 -> 16.3 kB (powers of 1000, as disks are sold)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def spoken(seconds: float) -> str:
    """3725 -> 1 h 2 min; 230 -> 3 min 50 s; 42.3 -> 42 s."""
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PlainBar(_Silent):
    """A progress bar for logs: a line when it starts, one at most every PLAIN_INTERVAL seconds
    while it runs, and one when it ends if it ran that long (for a short stage, what is printed
    next says it is over); never a carriage return."""

    def __init__(self, total: int | None, desc: str, unit: str, scale: bool = False):
        self.total, self.desc, self.unit, self.scale = total, desc, unit, scale
        self.n = 0
        self.started = self.shown = time.monotonic()
        print(f"{desc}: {self._amount(total)} ..." if total is not None else f"{desc} ...", flush=True)

    def _amount(self, n: int) -> str:
        return size(n) if self.scale else f"{n:,} {self.unit}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.shown >= PLAIN_INTERVAL and self.total is None:
            self.shown = now
            print(f"{self.desc}: {self._amount(self.n)} so far, {duration(now - self.started)} elapsed", flush=True)
        elif now - self.shown >= PLAIN_INTERVAL and self.n < self.total:
            self.shown = now
            rate = self.n / (now - self.started)
            eta = duration((self.total - self.n) / rate) if rate > 0 else "?"
            done = f"{size(self.n)} of {size(self.total)}" if self.scale else f"{self.n:,}/{self.total:,} {self.unit}"
            print(f"{self.desc}: {done}, ETA {eta}", flush=True)

    def close(self) -> None:
        if self.started is not None and time.monotonic() - self.started >= PLAIN_INTERVAL:
            took = duration(time.monotonic() - self.started)
            print(f"{self.desc}: done, {self._amount(self.total or self.n)} in {took}", flush=True)
        self.started = None


def bar(total: int | None, desc: str, unit: str = "it", show: bool = True, scale: bool = False):
    """A progress bar in the current mode: tqdm, plain lines, or nothing (also when not `show`).
    Call update(n) as work is done, and close() (or use it as a context manager). `scale`:
    amounts are bytes, shown as kB, MB, GB. `total` None: not known (a stream)."""
    current = mode() if show else "quiet"
    if current == "bars":
        from tqdm.auto import tqdm

        options = {"unit": unit, "unit_scale": True, "unit_divisor": 1000} if scale else {"unit": f" {unit}"}
        return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, **options)
    if current == "plain":
        return _PlainBar(total, desc, unit, scale)
    return _Silent()


@contextlib.contextmanager
def transformers_bars_off():
    """No transformers bars for a while (loading or writing a few tensors, a probe), whatever the
    mode; the earlier setting comes back afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
