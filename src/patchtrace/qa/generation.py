"""Greedy generation on patchtrace's runner, with a KV cache and attention recording.

ATTNATTRIB reads attribution off the attention of a few heads *in the forward pass that produces
the answer*. This module is that forward pass: the prompt runs once (keeping keys/values), then each
new token runs alone against the cache. A :class:`AttentionRecorder` registered as ``pattern`` hooks
on the chosen heads' layers copies, at every step, the attention row of the query position that
predicts the next token (the prompt's last position for the first generated token, the just-fed
token afterwards) over the *prompt* positions. Nothing else is run: recording costs a few explicit
attention patterns instead of fused attention on those layers.

Steering (see :mod:`patchtrace.qa.steering`) plugs in as extra hooks that run after the
recorder, so within one forward a later layer can use what an earlier layer's head attended to.

Example:
    Three greedy tokens, recording head L20.H3's attention over the prompt at each of them:

    >>> from patchtrace import load_model
    >>> m = load_model()
    >>> ids = m.tokenizer("The capital of France is").input_ids
    >>> g = generate(m, ids, max_new_tokens=3, recorder=AttentionRecorder([(20, 3)], len(ids)))
    >>> len(g.tokens), tuple(g.attention.shape) == (3, 1, len(ids))      # [steps, heads, prompt]
    (3, True)
    >>> m.tokenizer.decode(g.tokens[:1])
    ' Paris'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from patchtrace.errors import PatchtraceError
from patchtrace.models.load import Model
from patchtrace.models.runner import HookFn, RunCtx
from patchtrace.sites import HookPoint


class GenerationError(PatchtraceError, ValueError):
    """Bad generation input (empty prompt, a head that does not exist, ...)."""


Head = tuple[int, int]


@dataclass
class AttentionRecorder:
    """Records chosen heads' attention over the prompt, one row per generation step.

    Args:
        heads: ``(layer, head)`` pairs (query heads).
        prompt_len: number of prompt tokens; recorded rows cover key positions ``[0, prompt_len)``.

    Attributes:
        steps: per step, a ``[len(heads), prompt_len]`` tensor (float32).
        current: per head index, this step's row once its layer has run (cleared every step).
    """

    heads: Sequence[Head]
    prompt_len: int
    steps: list[Tensor] = field(default_factory=list)
    current: dict[int, Tensor] = field(default_factory=dict)

    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})

    def begin_step(self) -> None:
        self.current = {}

    def end_step(self) -> None:
        if len(self.current) != len(self.heads):
            raise GenerationError("attention recorder: not every recorded head's layer ran this step")
        self.steps.append(torch.stack([self.current[i] for i in range(len(self.heads))]))

    def hook(self, layer: int) -> HookFn:
        """The ``pattern`` hook for ``layer``: copies the last query row of its recorded heads."""
        mine = [(i, h) for i, (lay, h) in enumerate(self.heads) if lay == layer]

        def fn(pattern: Tensor, ctx: RunCtx) -> None:
            for i, h in mine:
                self.current[i] = pattern[0, h, -1, : self.prompt_len].detach().float().clone()

        return fn

    def current_mean(self) -> Tensor | None:
        """Mean of this step's rows recorded so far (None before any recorded layer has run)."""
        if not self.current:
            return None
        return torch.stack(list(self.current.values())).mean(0)


#: Extra hooks: built once per generation, given the recorder (may be None).
HookFactory = Callable[["AttentionRecorder | None"], dict[HookPoint, list[HookFn]]]


@dataclass
class Generation:
    """Result of :func:`generate`.

    Attributes:
        tokens: generated token ids.
        logits: ``[n_new, V]`` the logits that chose each token.
        attention: ``[n_new, n_heads, prompt_len]`` recorded attention (None without a recorder).
    """

    tokens: list[int]
    logits: Tensor
    attention: Tensor | None


def check_heads(model: Model, heads: Sequence[Head]) -> None:
    """Raise :class:`GenerationError` if a ``(layer, head)`` pair does not exist in ``model``."""
    d = model.dims
    for layer, h in heads:
        if not (0 <= layer < d.n_layers and 0 <= h < d.n_heads):
            raise GenerationError(
                f"head ({layer}, {h}) does not exist: the model has {d.n_layers} layers of {d.n_heads} heads"
            )


def generate(
    model: Model,
    ids: Sequence[int] | Tensor,
    max_new_tokens: int = 1,
    *,
    recorder: AttentionRecorder | None = None,
    extra_hooks: HookFactory | None = None,
    stop_ids: Sequence[int] = (),
) -> Generation:
    """Greedy decoding with a KV cache on ``model.runner``; batch size 1.

    Args:
        model: a loaded model.
        ids: prompt token ids (a list or a ``[T]`` / ``[1, T]`` tensor).
        max_new_tokens: how many tokens to generate (fewer if a stop id is produced; the stop token
            is included).
        recorder: records attention of its heads at every step (see :class:`AttentionRecorder`).
        extra_hooks: a factory returning hooks (e.g. steering) that run after the recorder's.
        stop_ids: token ids that end generation.

    Returns:
        :class:`Generation`.

    Raises:
        GenerationError: empty prompt, ``max_new_tokens < 1``, or a recorded head out of range.
    """
    t = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(model.device)
    T = t.shape[1]
    if T == 0:
        raise GenerationError("generate: the prompt is empty")
    if max_new_tokens < 1:
        raise GenerationError(f"generate: max_new_tokens must be >= 1 (got {max_new_tokens})")
    hooks: dict[HookPoint, list[HookFn]] = {}
    if recorder is not None:
        check_heads(model, recorder.heads)
        if recorder.prompt_len > T:
            raise GenerationError(f"recorder.prompt_len {recorder.prompt_len} exceeds the prompt length {T}")
        recorder.steps.clear()
        for layer in recorder.layers():
            hooks.setdefault(HookPoint("pattern", layer), []).append(recorder.hook(layer))
    if extra_hooks is not None:
        for k, fns in extra_hooks(recorder).items():
            hooks.setdefault(k, []).extend(fns)
    tokens: list[int] = []
    logits: list[Tensor] = []
    past: list[tuple[Tensor, Tensor]] | None = None
    pos = 0
    cur = t
    stops = set(stop_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if recorder is not None:
                recorder.begin_step()
            out = model.runner.forward(cur, pos_offset=pos, past_kv=past, hooks=hooks, keep_kv=True, last_only=True)
            if recorder is not None:
                recorder.end_step()
            assert out.logits is not None and out.kv is not None
            lg = out.logits[0, -1]
            nxt = int(lg.argmax())
            tokens.append(nxt)
            logits.append(lg.float())
            new = [kv for kv in out.kv if kv is not None]
            past = new if past is None else [
                (torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)) for (pk, pv), (k, v) in zip(past, new, strict=True)
            ]
            pos += cur.shape[1]
            cur = torch.tensor([[nxt]], device=model.device)
            if nxt in stops:
                break
    att = torch.stack(recorder.steps) if recorder is not None else None
    return Generation(tokens, torch.stack(logits), att)
