"""The error a weight patch raises on bad input (a name, shape, base, level count, file ...)."""

from __future__ import annotations

from patchtrace.errors import PatchtraceError


class WeightPatchError(PatchtraceError, ValueError):
    """A weight patch that cannot be made, loaded or applied; the message names the item and what is wrong."""


__all__ = ["WeightPatchError"]
