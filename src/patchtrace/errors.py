"""The root of patchtrace's exceptions.

Every error the library raises on bad input (an unknown site, a task whose prompts do not align, a
model that is not supported, a memory budget too small, ...) derives from :class:`PatchtraceError`
and also from the matching built-in (``ValueError`` or ``RuntimeError``), and its message names the
offending item. Catch ``PatchtraceError`` to handle them all::

    try:
        scores = activation_patching(model, task, spec)
    except patchtrace.PatchtraceError as e:
        print(f"cannot run: {e}")
"""

from __future__ import annotations


class PatchtraceError(Exception):
    """Base class of every error patchtrace raises about its inputs or state."""


class PatchtraceWarning(UserWarning):
    """Base class of patchtrace's warnings: something was recomputed, or a result may mean less than it seems.

    The command line prints each as one yellow ``warning:`` line; in Python they are ordinary
    :mod:`warnings` (turn them into errors with ``warnings.simplefilter("error", PatchtraceWarning)``).
    """
