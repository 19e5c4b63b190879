"""Cross-prompt, cross-layer patching: a site of one prompt written into a site of another.

Patchscopes-style readouts and back-patching move a hidden state somewhere it was not computed: from
another layer, another position, another prompt (of another length). In patchtrace that is an
ordinary :class:`~patchtrace.interventions.Intervention` whose :class:`~patchtrace.interventions.SourceRef`
names the source prompt's run and site; this module records the source run, checks every position
and layer against *its own* prompt before anything runs, and applies the writes to the target prompt
through the engine's hooks (:func:`patchtrace.engine.apply.base_interventions_hooks`).

:func:`write_resid_suffix` is the fast path of the most common readout: a ``resid_post`` write at one
position needs only that position and the later ones, through the layers above the write, attending
to the target prompt's cached keys/values of the earlier positions (exact, as in the sweep engine).

Example:
    >>> from patchtrace.models.load import load_model
    >>> from patchtrace.interventions import Intervention, Replace, SourceRef
    >>> from patchtrace.sites import Site
    >>> m = load_model()
    >>> iv = Intervention(Site("resid_post", 3, pos=-1), Replace(), SourceRef("source", Site("resid_post", 20, pos=1)))
    >>> r = cross_patch(m, "Paris is in France", "Syria: Syria; x", [iv], max_new=2)
    >>> r.logits.shape[0], len(r.texts)
    (1, 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from patchtrace.engine.apply import base_interventions_hooks
from patchtrace.engine.cache import RunCache, collect
from patchtrace.errors import PatchtraceError
from patchtrace.interventions import Intervention
from patchtrace.kinds import kind_info
from patchtrace.models.load import Model
from patchtrace.sites import Site


class CrossPatchError(PatchtraceError, ValueError):
    """A cross-prompt write whose site does not fit its prompt or the model (names it)."""


@dataclass(frozen=True)
class CrossPatchResult:
    """The target prompt's patched run.

    Attributes:
        logits: last-position logits ``[1, V]``.
        texts: greedy continuations (patch on the prefill only); empty when ``max_new == 0``.
        ids: the generated ids ``[1, max_new]`` (None when not generating).
    """

    logits: Tensor
    texts: list[str]
    ids: Tensor | None


def _tokens(model: Model, prompt: str | Sequence[int], what: str) -> Tensor:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise CrossPatchError(f"{what}: a text prompt needs the model's tokenizer")
        ids = list(model.tokenizer(prompt).input_ids)
    else:
        ids = [int(x) for x in prompt]
    if not ids:
        raise CrossPatchError(f"{what}: empty prompt")
    return torch.tensor([ids], device=model.device)


def check_site(model: Model, site: Site, length: int, what: str) -> None:
    """Refuse a site outside the model's layers or outside a prompt of ``length`` tokens."""
    L = model.dims.n_layers
    if site.layer is not None and not 0 <= site.layer < L:
        raise CrossPatchError(f"{what} {site}: layer {site.layer} is outside the model's 0..{L - 1}")
    n = kind_info(site.kind).units(model.dims)
    if site.unit is not None and n is not None and not 0 <= site.unit < n:
        raise CrossPatchError(f"{what} {site}: {kind_info(site.kind).unit_axis} {site.unit} is outside the model's 0..{n - 1}")
    if site.pos is not None and not -length <= site.pos < length:
        raise CrossPatchError(f"{what} {site}: position {site.pos} is outside the prompt's {length} tokens")


def cross_patch(
    model: Model,
    source: str | Sequence[int],
    target: str | Sequence[int],
    interventions: Sequence[Intervention],
    *,
    max_new: int = 0,
) -> CrossPatchResult:
    """Run ``target`` with ``interventions`` whose sources are sites of the ``source`` prompt's run.

    Sources must name the run ``"source"`` (the default of :class:`SourceRef`); interventions without
    a source (zero, add ...) act on the target alone. Positions are explicit per prompt (negative
    counts from each prompt's own end), so the prompts may differ in length.

    Raises:
        CrossPatchError: a layer or position outside its model/prompt, or another run name — before compute.
    """
    src_ids = _tokens(model, source, "source prompt")
    tgt_ids = _tokens(model, target, "target prompt")
    for iv in interventions:
        check_site(model, iv.target, tgt_ids.shape[1], "target site")
        if iv.source is not None:
            if iv.source.run != "source":
                raise CrossPatchError(f"{iv}: cross_patch reads the run named 'source', not {iv.source.run!r}")
            assert iv.source_site is not None
            check_site(model, iv.source_site, src_ids.shape[1], "source site")
    points = [iv.source_site.point for iv in interventions if iv.source_site is not None]
    with torch.no_grad():
        run = collect(model, src_ids, points)
        hooks = base_interventions_hooks(interventions, {"source": run}, 1)
        out = model.runner.forward(tgt_ids, hooks=hooks, keep_kv=max_new > 0, last_only=True)
    assert out.logits is not None
    logits = out.logits[:, -1]
    if max_new <= 0:
        return CrossPatchResult(logits, [], None)
    from patchtrace.multihop.generate import decode_from, to_text

    assert out.kv is not None
    gen = decode_from(model, logits, [kv for kv in out.kv if kv is not None], tgt_ids.shape[1], max_new)
    return CrossPatchResult(logits, to_text(model, gen), gen)


def write_resid_suffix(
    model: Model, run: RunCache, post: Tensor, layer: int, pos: int, values: Tensor, *, keep_kv: bool = False
) -> tuple[Tensor, list[tuple[Tensor, Tensor]] | None]:
    """Each row of ``values`` ``[R, D]`` written into block ``layer``'s output at ``pos`` of one prompt.

    Args:
        run: the prompt's clean run (one example: keys/values ``[1, K, T, d]`` per layer).
        post: the prompt's ``resid_post[layer]`` ``[1, T, D]`` (the stream at positions ``≥ pos``).
        layer, pos: where to write (``pos ≥ 0``).
        values: ``[R, D]``, one patched row each.
        keep_kv: also return every row's full keys/values after the patched prefill (for decoding).

    Returns:
        last-position logits ``[R, V]`` and, with ``keep_kv``, per layer ``[R, K, T, d]``.
    """
    R = values.shape[0]
    h = post[:, pos:].expand(R, -1, -1).clone()
    h[:, 0] = values.to(h.dtype)
    prefix = [(k[:, :, :pos], v[:, :, :pos]) for k, v in run.kv]
    with torch.no_grad():
        out = model.runner.forward(resid=h, start_layer=layer + 1, pos_offset=pos, past_kv=prefix, keep_kv=keep_kv,
                                   last_only=True)
    assert out.logits is not None
    if not keep_kv:
        return out.logits[:, -1], None
    assert out.kv is not None
    full = []
    for li, (k, v) in enumerate(run.kv):
        new = out.kv[li]
        if new is None:  # layers ≤ the written one: the clean keys/values
            full.append((k.expand(R, -1, -1, -1), v.expand(R, -1, -1, -1)))
        else:
            full.append((torch.cat((prefix[li][0].expand(R, -1, -1, -1), new[0]), 2),
                         torch.cat((prefix[li][1].expand(R, -1, -1, -1), new[1]), 2)))
    return out.logits[:, -1], full


__all__ = ["CrossPatchError", "CrossPatchResult", "check_site", "cross_patch", "write_resid_suffix"]
