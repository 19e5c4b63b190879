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

Example:
    >>> seen = []
    >>> tick = counter(lambda d, t: seen.append((d, t)), total=3)
    >>> tick(1); tick(2)
    >>> seen
    [(1, 3), (3, 3)]
"""

from __future__ import annotations

from collections.abc import Callable

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


__all__ = ["Progress", "counter", "offset"]
