"""Where a sweep job's blocks run: this process, or a Ray cluster.

:func:`patchtrace.engine.job.execute` takes any object with a ``map(job, blocks, on_progress)``
method (:class:`~patchtrace.engine.job.Executor`). Two ship with patchtrace:

* :class:`~patchtrace.engine.job.LocalExecutor` — blocks one after another in this process (default);
* :class:`~patchtrace.engine.executors.ray_executor.RayExecutor` — blocks on Ray workers that each
  load the model once (extra ``ray``; Ray is imported only when one is made).

:func:`make_executor` turns the command line's ``--executor local|ray --ray-address ADDR`` into one.
Both give the same result bit for bit and checkpoint the same way (see ``docs/scaling.md``).
"""

from __future__ import annotations

from typing import Any

from patchtrace.engine.job import Executor, LocalExecutor
from patchtrace.errors import PatchtraceError

EXECUTORS = ("local", "ray")


class ExecutorError(PatchtraceError, ValueError):
    """An unknown executor name, or an option that does not fit it."""


def make_executor(name: str = "local", address: str | None = None, **options: Any) -> Executor:
    """An executor by name.

    Args:
        name: ``local`` or ``ray``.
        address: Ray cluster address (``host:port``, ``ray://host:port`` or ``auto``); None starts a
            private local instance. Only with ``ray``.
        options: passed to :class:`~patchtrace.engine.executors.ray_executor.RayExecutor`
            (``workers``, ``threads``, ``max_retries``, ``num_cpus``).

    Raises:
        ExecutorError: an unknown name, or an address with ``local``.
        RayExecutorError: Ray missing, or the address unreachable (before any model is loaded).

    Example:
        >>> make_executor("local")                                  # doctest: +ELLIPSIS
        <patchtrace.engine.job.LocalExecutor object at ...>
        >>> make_executor("spark")
        Traceback (most recent call last):
        ...
        patchtrace.engine.executors.ExecutorError: unknown executor 'spark'; choose one of: local, ray
    """
    if name not in EXECUTORS:
        raise ExecutorError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")
    if name == "local":
        if address is not None:
            raise ExecutorError(f"--ray-address {address!r} needs --executor ray")
        return LocalExecutor()
    from patchtrace.engine.executors.ray_executor import RayExecutor

    return RayExecutor(address, **options)


def close_executor(executor: Any) -> None:
    """Close an executor that holds resources (a Ray instance); nothing for the local one."""
    close = getattr(executor, "close", None)
    if callable(close):
        close()


__all__ = ["EXECUTORS", "ExecutorError", "close_executor", "make_executor"]
