"""The Ray worker: one long-lived process that loads the model once and runs sweep blocks.

:class:`SweepWorker` is a plain class; :mod:`patchtrace.engine.executors.ray_executor` turns it into
a Ray actor (``ray.remote(SweepWorker)``) so this module imports without Ray. The actor's life:

1. ``__init__`` loads the model from the driver's :attr:`~patchtrace.models.load.Model.source`
   (bundled name, local folder or hub id; from this node's own cache). A failure is kept, not
   raised, so :meth:`ready` can report it with the node's address and the driver can name it in
   one line before any block is sent.
2. :meth:`ready` reports the process id, the node and the loaded weights' hash (the driver refuses a
   worker whose weights differ from its own: its blocks would not match).
3. :meth:`run_block` unpickles the job once per sweep (:func:`~patchtrace.engine.executors.shipping.load_job`
   plugs this worker's model in), runs one block in a thread and *streams* its progress ticks to the
   driver, then the block's tensors last. The driver adds the ticks of every worker into one bar.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import Any


class SweepWorker:
    """Holds one loaded model and runs blocks of sweep jobs on it (see the module docstring).

    Args:
        source: :attr:`Model.source` of the driver's model.
        threads: torch threads in this worker (the driver's count by default, so blocks compute
            with the same kernels' thread split as a local run).
    """

    def __init__(self, source: dict[str, Any], threads: int) -> None:
        import torch

        from patchtrace.models.load import load_model

        torch.set_num_threads(threads)
        self.error: str | None = None
        self.model: Any = None
        self.jobs: dict[str, Any] = {}
        try:
            self.model = load_model(
                source["spec"], dtype=source["dtype"], device=source["device"],
                trust_remote_code=source.get("trust_remote_code", False), revision=source.get("revision"),
            )
        except Exception as e:  # reported by ready(), with the node named, before any block is sent
            self.error = f"{type(e).__name__}: {e}"

    def ready(self) -> dict[str, Any]:
        """``{"pid", "node", "hash", "error"}`` of this worker."""
        import ray

        return {
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "hash": None if self.model is None else self.model.weights_hash(),
            "error": self.error,
        }

    def _job(self, token: str, data: list[Any]) -> Any:
        from patchtrace.engine.executors.shipping import load_job

        job = self.jobs.get(token)
        if job is None:  # first block of this sweep here: fetch and unpickle the job once
            import ray

            self.jobs = {token: load_job(ray.get(data[0]), self.model)}  # one sweep at a time
            job = self.jobs[token]
        return job

    def run_block(self, token: str, data: list[Any], index: int) -> Iterator[Any]:
        """Run block ``index`` of the job; yield progress ticks (ints), then the block's tensors.

        ``data`` is ``[ObjectRef of the pickled job]``: wrapped in a list so that Ray does not fetch
        it for every block; it is fetched once per sweep by :meth:`_job`."""
        job = self._job(token, data)
        block = job.blocks()[index]
        ticks: queue.Queue[tuple[str, Any]] = queue.Queue()

        def work() -> None:
            try:
                ticks.put(("done", job.run_block(block, lambda k: ticks.put(("tick", k)))))
            except BaseException as e:  # re-raised in the actor's own thread below
                ticks.put(("error", e))

        t = threading.Thread(target=work, name=f"patchtrace-block-{index}", daemon=True)
        t.start()
        while True:
            kind, value = ticks.get()
            if kind == "tick":
                yield int(value)
            elif kind == "error":
                t.join()
                raise value
            else:
                t.join()
                yield value
                return


__all__ = ["SweepWorker"]
