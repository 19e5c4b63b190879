"""Shipping a sweep job to remote workers without its model.

A sweep job (:class:`~patchtrace.engine.job.SweepJob`) holds everything a block needs: the tokenized
task, the resolved patches, the memory plan — and the model. Shipping the model with every task
would copy hundreds of megabytes (gigabytes for a 7B model) through the object store per block. So
the job is pickled with its model *left out*: every reference to the model, its Hugging Face
module, its runner, its tokenizer or any of its parameters and buffers is written as a small
placeholder (pickle's ``persistent_id``), and a worker that loaded the same model itself (once, from
its local cache or the hub, see :attr:`patchtrace.models.load.Model.source`) plugs its own objects
back in when it unpickles the job (``persistent_load``).

What travels is therefore the job *description* (ids, plans, a few small tensors such as causal
tracing's noise), a few kilobytes to megabytes, once per sweep per worker. A tensor on the driver's
GPU travels through host memory and lands on the worker's own device (``cuda:1`` on the driver may
be a worker's ``cuda:0``).

This is Ray's own transport (the driver and the workers are the user's processes): nothing is read
back from disk, so the rule that results and weights are never unpickled is kept.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from patchtrace.errors import PatchtraceError
from patchtrace.models.load import Model


class ShippingError(PatchtraceError, RuntimeError):
    """A job cannot be shipped to remote workers (the message says why and what to do)."""


def _model_parts(model: Model) -> dict[int, tuple[str, str]]:
    """``id(obj) → placeholder`` for the model and every large object it owns."""
    parts: dict[int, tuple[str, str]] = {id(model): ("model", ""), id(model.hf): ("hf", ""),
                                         id(model.runner): ("runner", "")}
    if model.tokenizer is not None:
        parts[id(model.tokenizer)] = ("tokenizer", "")
    for name, p in model.hf.named_parameters(remove_duplicate=False):
        parts.setdefault(id(p), ("param", name))
    for name, b in model.hf.named_buffers(remove_duplicate=False):
        parts.setdefault(id(b), ("buffer", name))
    return parts


def dump_job(job: Any, model: Model) -> bytes:
    """Pickle ``job`` with ``model`` (and everything in it) replaced by placeholders.

    Raises:
        ShippingError: the job holds something that cannot be pickled (named in the message).
    """
    from ray import cloudpickle

    parts = _model_parts(model)

    class _Pickler(cloudpickle.CloudPickler):  # type: ignore[misc,name-defined]
        def persistent_id(self, obj: Any) -> Any:
            pid = parts.get(id(obj))
            if pid is None and isinstance(obj, torch.Tensor) and obj.device.type not in ("cpu", "meta"):
                # a tensor on the driver's accelerator (causal tracing's noise ...): sent via the host and
                # put on the worker's own device, whichever index the driver used
                return ("to_device", obj.detach().cpu())
            return pid

    buf = io.BytesIO()
    try:
        _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(job)
    except Exception as e:
        raise ShippingError(
            f"the sweep job {type(job).__name__} cannot be sent to Ray workers: {type(e).__name__}: {str(e)[:300]}"
        ) from None
    return buf.getvalue()


def load_job(data: bytes, model: Model) -> Any:
    """Unpickle a job written by :func:`dump_job`, plugging in this process's ``model``."""

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            kind, name = pid
            if kind == "to_device":
                return name.to(model.device)
            if kind == "model":
                return model
            if kind == "hf":
                return model.hf
            if kind == "runner":
                return model.runner
            if kind == "tokenizer":
                return model.tokenizer
            if kind == "param":
                return model.hf.get_parameter(name)
            if kind == "buffer":
                return model.hf.get_buffer(name)
            raise pickle.UnpicklingError(f"unknown placeholder {pid!r}")

    return _Unpickler(io.BytesIO(data)).load()


__all__ = ["ShippingError", "dump_job", "load_job"]
