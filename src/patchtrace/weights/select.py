"""Which tensors a patch covers: a selector turned into a list of names.

A selector is one of

* ``None``: every floating-point tensor;
* a string: comma-separated ``fnmatch`` globs over tensor names (``"features.0.*,features.3.*"``,
  ``"model.layers.1[0-2].mlp.*"``), or a regular expression after ``re:`` (``"re:^conv[12]\\."``);
* a sequence of ints: transformer-style layer indices; a name is in layer ``i`` when it has a path
  component ``<blocks>.i.`` where ``<blocks>`` is one of ``layers``, ``layer``, ``h``, ``blocks``,
  ``block`` (``model.layers.3.mlp.up_proj.weight``, ``transformer.h.3.attn.c_attn.weight``,
  ``down_blocks.1.attentions.0...``);
* a callable ``name -> bool``.

Integer tensors (``num_batches_tracked``, position ids) are never selected: a delta of a counter is
not a weight change. A selector that matches nothing is an error naming it, never an empty patch.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Union

from patchtrace.weights.errors import WeightPatchError

#: What :func:`select_names` accepts.
Selector = Union[None, str, Sequence[int], Callable[[str], bool]]  # noqa: UP007 (a runtime alias on py3.10)

_BLOCKS = ("layers", "layer", "h", "blocks", "block")


def layer_of(name: str) -> int | None:
    """The layer index of a tensor name (``model.layers.3.mlp.up_proj.weight`` → 3), or None."""
    parts = name.split(".")
    for a, b in itertools.pairwise(parts):
        if a in _BLOCKS and b.isdigit():
            return int(b)
    return None


def _matcher(selector: Selector) -> Callable[[str], bool]:
    if selector is None:
        return lambda n: True
    if callable(selector):
        return selector
    if isinstance(selector, str):
        text = selector.strip()
        if not text:
            raise WeightPatchError("selector: empty pattern; give globs like 'features.0.*' or 're:<regex>'")
        if text.startswith("re:"):
            try:
                rx = re.compile(text[3:])
            except re.error as e:
                raise WeightPatchError(f"selector {selector!r}: not a regular expression ({e})") from None
            return lambda n: rx.search(n) is not None
        globs = [g.strip() for g in text.split(",") if g.strip()]
        return lambda n: any(fnmatch.fnmatchcase(n, g) for g in globs)
    layers = list(selector)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise WeightPatchError(f"selector {selector!r}: layer indices must be ints")
    wanted = set(layers)
    return lambda n: layer_of(n) in wanted


def select_names(names: Iterable[str], selector: Selector, floating: Callable[[str], bool] = lambda n: True) -> list[str]:
    """The names (in the given order) that ``selector`` matches and ``floating`` accepts.

    Raises:
        WeightPatchError: the selector is malformed or matches no tensor (the message names it).
    """
    match = _matcher(selector)
    names = list(names)
    out = [n for n in names if floating(n) and match(n)]
    if not out:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise WeightPatchError(f"selector {selector!r} matches no floating-point tensor (names look like: {shown})")
    return out


__all__ = ["Selector", "layer_of", "select_names"]
