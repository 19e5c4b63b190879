"""The one progress protocol every method speaks: ``on_progress(done, total)``.

Every registered method accepts a keyword-only ``on_progress`` callback and calls it as
``on_progress(done, total)`` with two ints: ``done`` units of work finished out of ``total``. The
unit is the method's natural one — patches for a sweep (activation patching, causal tracing, the QA
circuit), example groups for the gradient estimators (one forward/backward per group), optimisation
steps for DBM's mask training — and the method documents it. Within one call ``total`` is fixed,
``done`` never decreases, and the last call has ``done == total``.

Why two ints and nothing else: a callback that any progress display can take as it is — a
``lambda d, t: print(f"{d}/{t}")``, a tqdm bar's ``n``/``total``, the command line's bar
(:func:`patchtrace.cli.common.progress`) — and that a method composed of other methods can forward
by offsetting ``done``. Telemetry that only one method has (DBM's loss per step) is that method's own
extra keyword, not part of the shared protocol, so no caller has to accept arguments it ignores.

What a person sees (the command line): :func:`bar` draws one bar per long step. It appears at the
first report, not before (so an error in argument checking is never preceded by an empty ``0/?``
bar); on a terminal it redraws in place, and when the output is a file or a pipe it prints a plain
line at most every few seconds and a last one at the end (a log shows progress while it runs, not
only when it ends). A step without countable units (loading, building a task, a baseline pass)
gets :func:`step`: one line when it starts, one with its time when it ends. Third-party bars
(transformers' ``Loading weights``) are silenced by :func:`quiet_third_party` unless
``PATCHTRACE_VERBOSE=1``: they repeat on every command and say nothing about the user's work.

Example:
    >>> seen = []
    >>> tick = counter(lambda d, t: seen.append((d, t)), total=3)
    >>> tick(1); tick(2)
    >>> seen
    [(1, 3), (3, 3)]
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: ``on_progress(done, total)``: ``done`` of ``total`` units finished.
Progress = Callable[[int, int], None]


def counter(on_progress: Progress | None, total: int) -> Callable[[int], None]:
    """A ``tick(k)`` that adds ``k`` finished units and reports the running count (a no-op without a callback)."""
    done = 0

    def tick(k: int = 1) -> None:
        nonlocal done
        done += k
        if on_progress is not None:
            on_progress(done, total)

    return tick


def offset(on_progress: Progress | None, start: int, total: int) -> Progress | None:
    """Forward a sub-task's ``(done, sub_total)`` as ``(start + done, total)`` of the whole.

    For a method made of several runs (e.g. two sweeps): the second run reports after the first's
    units, against the combined total.
    """
    if on_progress is None:
        return None

    def fwd(done: int, sub_total: int) -> None:
        on_progress(start + done, total)

    return fwd


def verbose() -> bool:
    """``PATCHTRACE_VERBOSE=1``: show third-party progress bars and logs too."""
    return os.environ.get("PATCHTRACE_VERBOSE", "") not in ("", "0")


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence transformers' progress bars (``Loading weights``) inside the block, then restore them.

    Scoped, not global: a caller that wants them (a notebook, ``PATCHTRACE_VERBOSE=1``) keeps them.
    """
    if verbose():
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class Bar:
    """A progress bar for one step; :meth:`update` is an ``on_progress(done, total)`` callback.

    Nothing is drawn until the first :meth:`update`. On a terminal it is a rich bar; otherwise a
    line ``<description>: done/total (p%) · elapsed · left`` is printed at most every ``every``
    seconds, and the last state when the step ends.
    """

    def __init__(self, description: str, console: Any, *, quiet: bool = False, every: float = 5.0) -> None:
        self.description, self.console, self.quiet, self.every = description, console, quiet, every
        self.done, self.total = 0, 0
        self.note = ""
        self._rich: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()
        self._last_line = 0.0
        self._printed: tuple[int, int] | None = None
        self._closed = False

    def update(self, done: int, total: int, note: str | None = None) -> None:
        """``on_progress(done, total)``; ``note`` (optional) is shown after the count (e.g. a loss)."""
        self.done, self.total = done, total
        if note is not None:
            self.note = note
        if self.quiet:
            return
        if self.console.is_terminal:
            if self._rich is None:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
                self._rich.start()
                self._task = self._rich.add_task(self.description, total=total)
            desc = f"{self.description} · {self.note}" if self.note else self.description
            self._rich.update(self._task, completed=done, total=total, description=desc)
            return
        now = time.perf_counter()
        if self._printed is None or now - self._last_line >= self.every:
            self._line(now)

    def _line(self, now: float) -> None:
        from rich.text import Text

        el = now - self._t0
        pct = 100.0 * self.done / self.total if self.total else 0.0
        left = el * (self.total - self.done) / self.done if self.done and self.done < self.total else None
        tail = f" · {left:.0f} s left" if left is not None else ""
        note = f" · {self.note}" if self.note else ""
        self.console.print(Text(f"{self.description}: {self.done}/{self.total} ({pct:.0f}%) · {el:.1f} s{tail}{note}"),
                           soft_wrap=True)
        self._last_line = now
        self._printed = (self.done, self.total)

    def close(self) -> None:
        """End the step: stop the live bar, or print the last state if it was not printed yet.

        Closing twice is harmless (a caller may end a step early, before its ``with`` block ends)."""
        if self._closed:
            return
        self._closed = True
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif not self.quiet and self.total and self._printed != (self.done, self.total):
            self._line(time.perf_counter())


@contextmanager
def bar(description: str, console: Any, *, quiet: bool = False, every: float = 5.0) -> Iterator[Bar]:
    """A :class:`Bar` for the block; closed (last state shown) when the block ends, even on an error."""
    b = Bar(description, console, quiet=quiet, every=every)
    try:
        yield b
    finally:
        b.close()


@contextmanager
def step(description: str, console: Any, *, quiet: bool = False, min_seconds: float = 0.0) -> Iterator[None]:
    """One line when a step without countable units starts (``building the task qa …``) and one with its
    wall time when it ends (``building the task qa: 118.2 s``); nothing when ``quiet``."""
    from rich.text import Text

    t0 = time.perf_counter()
    if not quiet:
        console.print(Text(f"{description} …"), soft_wrap=True)
    yield
    dt = time.perf_counter() - t0
    if not quiet and dt >= min_seconds:
        console.print(Text(f"{description}: {dt:.1f} s"), soft_wrap=True)


__all__ = ["Bar", "Progress", "bar", "counter", "offset", "quiet_third_party", "step", "verbose"]
