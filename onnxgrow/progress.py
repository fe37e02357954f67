"""Progress on stderr for whatever takes more than a moment: loading, analysis, writing, verifying,
calibrating, exporting weights.

    with progress.task("writing out.onnx", total=nbytes, unit="bytes") as advance:
        for tensor in tensors:
            ...
            advance(tensor.nbytes)

On a terminal a rich bar (bytes, rate and ETA when the total is known; a spinner when it is not). Elsewhere
(a log file, CI) plain lines, and only for a task still running after PLAIN_AFTER_S seconds, so quick
commands print nothing extra. `onnxgrow --quiet` silences both. stdout is never touched: it may hold --json.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

QUIET = False  # set by `onnxgrow --quiet`
PLAIN_AFTER_S = 5.0  # a plain line for a task only once it has run this long, then at most this often

Advance = Callable[..., None]


def console() -> Console:
    return Console(file=sys.stderr)  # the stderr of the moment (test runners swap it per command)


@contextlib.contextmanager
def task(description: str, total: float | None = None, unit: str = "items") -> Iterator[Advance]:
    """A progress display for one task; yields `advance(n=1)`. `unit` "bytes" shows sizes and a rate."""
    if QUIET:
        yield lambda n=1: None
        return
    out = console()
    if out.is_terminal:
        with terminal_bar(out, description, total, unit) as advance:
            yield advance
    else:
        with plain_lines(out, description, total, unit) as advance:
            yield advance


@contextlib.contextmanager
def terminal_bar(out: Console, description: str, total, unit: str) -> Iterator[Advance]:
    if total is None:
        columns = [SpinnerColumn(), TextColumn(description), TimeElapsedColumn()]
    elif unit == "bytes":
        columns = [TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn()]
    else:
        columns = [TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                   TimeRemainingColumn()]
    with Progress(*columns, console=out, transient=True) as bar:
        handle = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(handle, n)


@contextlib.contextmanager
def plain_lines(out: Console, description: str, total, unit: str) -> Iterator[Advance]:
    start = last = time.monotonic()
    done = 0

    def advance(n=1):
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= PLAIN_AFTER_S and now - start >= PLAIN_AFTER_S:
            last = now
            out.print(f"{description}: {amount(done, total, unit)}", highlight=False, soft_wrap=True)

    yield advance
    elapsed = time.monotonic() - start
    if elapsed >= PLAIN_AFTER_S:
        out.print(f"{description}: done in {elapsed:.0f} s", highlight=False, soft_wrap=True)


def amount(done: float, total, unit: str) -> str:
    from .modelio import human_bytes
    show = human_bytes if unit == "bytes" else (lambda n: f"{n:,.0f} {unit}")
    if total:
        return f"{show(done)} of {show(total)} ({100 * done / total:.0f}%)"
    return show(done)
