"""Run a sweep's blocks on a Ray cluster: same job, same checkpoints, the same result bit for bit.

:func:`patchtrace.engine.job.execute` hands the blocks it still needs to an executor and saves each
one as it comes back. :class:`RayExecutor` is such an executor. With no address it starts a private
local Ray instance (and shuts it down on :meth:`close`, also after an error: no raylet or worker is
left running); with an address (``host:port``, ``ray://host:port`` or ``auto``) it joins that
cluster and leaves it running.

How a sweep runs on it:

* **one worker per slot, the model loaded once per worker**: each worker is a Ray actor
  (:class:`~patchtrace.engine.executors.worker.SweepWorker`) that loads the driver's model from its
  own disk or hub cache (:attr:`Model.source`) when it starts; the model never travels through the
  object store. The job itself travels once per sweep, model left out
  (:mod:`~patchtrace.engine.executors.shipping`).
* **checked before any block runs**: an unreachable address, a cluster without the CPUs or GPUs a
  worker needs, a worker that cannot load the model, or loads different weights than the driver's
  (its blocks would not match), is a one-line :class:`RayExecutorError` naming it.
* **blocks are the tasks**: an idle worker takes the next block; its progress ticks stream back
  and are summed into the one progress callback; finished blocks go back to ``execute``, which
  checkpoints them — so a killed driver resumes from its last saved block, as with the local
  executor.
* **a dead worker costs its block only**: when a worker process dies mid-block (killed, out of
  memory, node lost), a fresh worker replaces it and the block is run again from the start (its
  partial progress is taken back from the bar); other blocks are untouched. A block that fails
  ``max_retries`` times in a row ends the sweep with an error naming it.
* **bit for bit**: a block computes the same batches in the same order wherever it runs, and
  ``execute`` merges in block order; a worker uses the driver's torch thread count by default. On a
  cluster of different machines (other CPU instruction sets, other GPUs) the kernels themselves can
  differ in the last bits: the equality is tested on one machine.
"""

from __future__ import annotations

import collections
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from patchtrace.engine.job import Block, BlockResult, SweepJob
from patchtrace.errors import PatchtraceError

#: Seconds to wait for a TCP connection to a cluster address before calling it unreachable.
CONNECT_TIMEOUT = 5.0
#: Seconds a worker may take to start and load the model.
START_TIMEOUT = 600.0


class RayExecutorError(PatchtraceError, RuntimeError):
    """The Ray cluster cannot run the sweep: unreachable, too small, or its workers lack the model."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayExecutorError("--executor ray needs Ray: pip install 'patchtrace[ray]'") from None
    return ray


def check_address(address: str) -> None:
    """Refuse an address whose host:port does not accept a TCP connection within :data:`CONNECT_TIMEOUT`.

    Ray itself would retry for a minute or more; this says at once which address failed.

    Raises:
        RayExecutorError: a malformed or unreachable address.
    """
    if address == "auto":  # Ray finds the cluster (RAY_ADDRESS, or one started on this node)
        return
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayExecutorError(f"Ray address {address!r}: use host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as e:
        raise RayExecutorError(f"Ray address {address!r} is unreachable ({e.strerror or e}); is the cluster running?") from None


class RayExecutor:
    """Runs sweep blocks on Ray workers (see the module docstring).

    Args:
        address: a cluster to join; None starts a private local instance (shut down by :meth:`close`).
        workers: number of workers (default: the cluster's free CPUs / ``threads``, or its free
            GPUs for a CUDA model).
        threads: torch threads per worker (default: this process's count).
        max_retries: runs of one block that may die with their worker before the sweep fails.
        num_cpus: CPUs of a private local instance (default: all).

    Raises:
        RayExecutorError: Ray is not installed or the address is unreachable (checked here, before
            any model is loaded).

    Use it as a context manager (or call :meth:`close`), so a local instance is always shut down::

        with RayExecutor() as ex:
            scores = activation_patching.run(model, task, sites, executor=ex)
    """

    def __init__(self, address: str | None = None, *, workers: int | None = None, threads: int | None = None,
                 max_retries: int = 3, num_cpus: int | None = None) -> None:
        import torch

        self.ray = _ray()
        self.address, self.workers, self.max_retries = address, workers, max_retries
        self.threads = threads or torch.get_num_threads()
        self.retries = 0  #: blocks re-run because their worker died (for tests and reports)
        self._owns = False  # this executor called ray.init: close() calls ray.shutdown (a local
        # instance stops; a joined cluster keeps running, this driver disconnects)
        self._actors: list[Any] = []
        self._info: list[dict[str, Any]] = []
        self._source: dict[str, Any] | None = None
        if address == "local":
            address = None  # Ray's spelling of "start a new local instance"
        if address is not None:
            check_address(address)
        if self.ray.is_initialized():
            return  # the caller's Ray session: use it, leave it running
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if address is None:
                self.ray.init(num_cpus=num_cpus, **kwargs)
            else:
                self.ray.init(address=address, **kwargs)
            self._owns = True
        except Exception as e:
            with _suppress():
                self.ray.shutdown()  # whatever part of a local instance had started
            what = "start a local Ray instance" if address is None else f"join the Ray cluster at {address!r}"
            raise RayExecutorError(f"cannot {what}: {type(e).__name__}: {str(e)[:300]}") from None

    # -- workers -------------------------------------------------------------------------------------

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for tests and monitoring)."""
        return [i["pid"] for i in self._info]

    def _n_workers(self, cuda: bool) -> int:
        res = self.ray.cluster_resources()
        if cuda:
            have = int(res.get("GPU", 0))
            if have < 1:
                raise RayExecutorError("the model is on CUDA but the Ray cluster has no GPU (resources: "
                                       f"{int(res.get('CPU', 0))} CPU, 0 GPU); load it with --device cpu")
            return self.workers or max(1, int(self.ray.available_resources().get("GPU", 0)))
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        biggest = max((int(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=0)
        if biggest < self.threads:
            raise RayExecutorError(f"a worker needs {self.threads} CPU(s) (--threads) but the largest Ray node has {biggest}")
        free = int(self.ray.available_resources().get("CPU", 0))  # a shared cluster: what is free now
        return self.workers or max(1, free // self.threads)

    def _spawn(self, source: dict[str, Any]) -> Any:
        from patchtrace.engine.executors.worker import SweepWorker

        cuda = source["device"] == "cuda"
        cls = self.ray.remote(num_cpus=0 if cuda else self.threads, num_gpus=1 if cuda else 0, max_restarts=0)(SweepWorker)
        return cls.remote(source, self.threads)

    def _check_ready(self, actors: list[Any], source: dict[str, Any], want_hash: str) -> list[dict[str, Any]]:
        refs = [a.ready.remote() for a in actors]
        _, pending = self.ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT)
        if pending:
            raise RayExecutorError(f"{len(pending)} Ray worker(s) did not start within {START_TIMEOUT:.0f} s "
                                   "(the cluster may lack free CPUs/GPUs for them)")
        infos = self.ray.get(refs)
        for info in infos:
            if info["error"]:
                raise RayExecutorError(f"the Ray worker on node {info['node']} cannot load model {source['spec']!r}: "
                                       f"{info['error'].splitlines()[0][:300]}")
            if info["hash"] != want_hash:
                raise RayExecutorError(
                    f"the Ray worker on node {info['node']} loaded model {source['spec']!r} with weights "
                    f"{info['hash']}, but this process has {want_hash} (another version on that node, or weights "
                    "edited here after loading); its blocks would not match")
        return list(infos)

    def start(self, model: Any) -> None:
        """Start the workers for ``model`` now (each loads it and is checked); :meth:`map` does this
        itself on first use, so calling it is only needed to time or check the start separately.

        Raises:
            RayExecutorError: the model was built in memory, the cluster is too small, or a worker
                cannot load the model or loads different weights.
        """
        source = getattr(model, "source", None)
        if source is None:
            raise RayExecutorError(
                f"model {model.name!r} was built in memory, so Ray workers cannot load it themselves; "
                "save it (model.hf.save_pretrained(DIR), tokenizer too) and load_model(DIR), or use --executor local")
        want = model.weights_hash()
        if self._actors and self._source == source and all(i["hash"] == want for i in self._info):
            return
        self._kill_actors()
        n = self._n_workers(source["device"] == "cuda")
        self._actors = [self._spawn(source) for _ in range(n)]
        try:
            self._info = self._check_ready(self._actors, source, want)
        except BaseException:
            self._kill_actors()
            raise
        self._source = source

    def _replace(self, slot: int) -> None:
        """A fresh worker in ``slot`` (its predecessor died)."""
        assert self._source is not None
        with _suppress():
            self.ray.kill(self._actors[slot])
        actor = self._spawn(self._source)
        self._actors[slot] = actor
        self._info[slot] = self._check_ready([actor], self._source, self._info[slot]["hash"])[0]

    def _kill_actors(self) -> None:
        for a in self._actors:
            with _suppress():
                self.ray.kill(a)
        self._actors, self._info, self._source = [], [], None

    # -- the executor protocol -----------------------------------------------------------------------

    def map(
        self, job: SweepJob[Any], blocks: Sequence[Block], on_progress: Callable[[int], None]
    ) -> Iterable[tuple[Block, BlockResult]]:
        """Run ``blocks`` of ``job`` on the workers; yield ``(block, tensors)`` as each finishes."""
        if not blocks:
            return iter(())
        model = getattr(job, "model", None)
        if model is None:
            raise RayExecutorError(f"sweep job {type(job).__name__} has no .model attribute; Ray workers need it")
        from patchtrace.engine.executors.shipping import dump_job

        data = dump_job(job, model)  # before starting workers: an unpicklable job fails at once
        self.start(model)
        return self._run(data, blocks, on_progress)

    def _run(self, data: bytes, blocks: Sequence[Block], on_progress: Callable[[int], None]) -> Iterator[tuple[Block, BlockResult]]:
        ray = self.ray
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        token, ref = uuid.uuid4().hex, ray.put(data)
        todo = collections.deque(blocks)
        idle = list(range(len(self._actors)))
        fails: collections.Counter[int] = collections.Counter()
        running: dict[Any, list[Any]] = {}  # generator -> [slot, block, ticks reported]
        try:
            while todo or running:
                while idle and todo:
                    slot, b = idle.pop(), todo.popleft()
                    gen = self._actors[slot].run_block.options(num_returns="streaming").remote(token, [ref], b.index)
                    running[gen] = [slot, b, 0]
                ready, _ = ray.wait(list(running), num_returns=1)
                for gen in ready:
                    slot, b, seen = running[gen]
                    try:
                        item = ray.get(next(gen))
                    except StopIteration:  # cannot happen: the tensors are the last item
                        raise RayExecutorError(f"internal: block {b.index} ended without a result") from None
                    except RayTaskError as e:  # the block itself raised: that error, as if local
                        raise e.as_instanceof_cause() from None
                    except (RayActorError, WorkerCrashedError):
                        del running[gen]
                        on_progress(-seen)
                        fails[b.index] += 1
                        self.retries += 1
                        if fails[b.index] > self.max_retries:
                            raise RayExecutorError(f"block {b.index} ({b.label}) lost its worker {fails[b.index]} times; "
                                                   "giving up (see the Ray logs of the node)") from None
                        self._replace(slot)
                        todo.appendleft(b)
                        idle.append(slot)
                        continue
                    if isinstance(item, int):
                        running[gen][2] += item
                        on_progress(item)
                        continue
                    del running[gen]
                    if seen < b.size:  # a block that reports nothing (or less) still finishes its share
                        on_progress(b.size - seen)
                    idle.append(slot)
                    yield b, item
        finally:
            for gen in running:  # an error or an abandoned sweep: stop what is still computing
                with _suppress():
                    ray.cancel(gen)
            if running:
                self._kill_actors()

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers; shut down the local instance this executor started (nothing left
        running), or disconnect from the cluster it joined (the cluster keeps running)."""
        if self.ray.is_initialized():
            self._kill_actors()
            if self._owns:
                ours = _ray_children()
                self.ray.shutdown()
                _reap(ours)
        self._owns = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ray_children() -> list[Any]:
    """This process's descendants that Ray started (raylet, GCS, workers): ours to stop."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        with _suppress():
            line = " ".join(p.cmdline()[:3])
            if "ray" in line or p.name().startswith("ray"):
                found.append(p)
    return found


def _reap(procs: list[Any], grace: float = 10.0) -> None:
    """Wait for ``procs`` to exit after ``ray.shutdown``; kill the ones still running after ``grace`` s.

    ``ray.shutdown`` stops the raylet, and the workers notice that and exit on their own, but on a
    loaded machine that can take many seconds: a local instance this executor started must leave
    nothing running when it is closed, so stragglers are killed.
    """
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with _suppress():
            p.kill()
    psutil.wait_procs(alive, timeout=5.0)


class _suppress:
    """``contextlib.suppress(Exception)`` (Ray raises many kinds when a cluster is going away)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
        return typ is not None and issubclass(typ, Exception)


__all__ = ["RayExecutor", "RayExecutorError", "check_address"]
