"""Ask the model what it answers, in batches: the one helper every task generator filters with.

Generators that keep only what a model gets right (``factual``, ``variable_binding``, the
extractive-QA data and patching task) need the model's next-token logits at the last position of
many prompts. They all go through this module, which runs them on the model's public runner
(:meth:`patchtrace.models.runner.Runner.forward`) in as few forwards as is *exact*:

* **Equal-length batches.** Prompts are grouped by token length and each group runs as one batch
  (chunks of ``batch_size`` rows). Rows of a batch never see each other, and no padding is involved,
  so there is no attention mask or position-id bookkeeping to get wrong.
* **A shared prefix runs once.** When every prompt starts with the same tokens (a few-shot prefix, a
  chat template's header), that longest common prefix is run once with its keys/values kept, and each
  batch runs only the suffixes at ``pos_offset = len(prefix)`` attending to it — the same positions
  and the same attention as the full prompt.

Both are the same computation as one greedy forward per prompt; ``tests/tasks/test_filtering.py``
checks the results against one-at-a-time Hugging Face forwards on a tiny model.

Example:
    Two prompts of different lengths: two batches, one greedy next token each.

    >>> from patchtrace import load_model
    >>> m = load_model()
    >>> tok = m.tokenizer
    >>> top = greedy_next_tokens(m, [tok(p).input_ids for p in ("The capital of France is", "The capital of Japan is the city of")])
    >>> [tok.decode(t) for t in top]
    [' Paris', ' Tokyo']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from patchtrace.tasks.base import TaskError

if TYPE_CHECKING:
    from patchtrace.models.load import Model


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all prompts, kept shorter than the shortest prompt
    (every prompt keeps at least one token of its own to predict from)."""
    if not prompts:
        return 0
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for i in range(max(n, 0)):
        t = first[i]
        if any(p[i] != t for p in prompts):
            return i
    return max(n, 0)


def _for_each_batch(
    model: Model, prompts: Sequence[Sequence[int]], batch_size: int, use: Callable[[list[int], Tensor], None]
) -> None:
    """Run every prompt once and call ``use(indices, logits)`` per batch with ``[B, V]`` last-position logits."""
    if any(len(p) == 0 for p in prompts):
        raise TaskError("a prompt to filter with is empty")
    if batch_size < 1:
        raise TaskError(f"batch_size must be at least 1 (got {batch_size})")
    dev = model.device
    P = common_prefix(prompts)
    past = None
    if P > 0:
        with torch.no_grad():
            past = model.runner.forward(torch.tensor([list(prompts[0][:P])], device=dev), keep_kv=True).kv
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    with torch.no_grad():
        for n in sorted(by_len):
            idx = by_len[n]
            for c0 in range(0, len(idx), batch_size):
                chunk = idx[c0 : c0 + batch_size]
                ids = torch.tensor([list(prompts[i][P:]) for i in chunk], device=dev)
                out = model.runner.forward(ids, pos_offset=P, past_kv=past, last_only=True)
                assert out.logits is not None
                use(chunk, out.logits[:, -1].float())


def greedy_next_tokens(model: Model, prompts: Sequence[Sequence[int]], *, batch_size: int = 64) -> list[int]:
    """The model's greedy (argmax) next token after each prompt.

    Args:
        model: a loaded model.
        prompts: token ids per prompt (any lengths).
        batch_size: most rows per forward.

    Returns:
        One token id per prompt, in order.

    Raises:
        TaskError: an empty prompt or ``batch_size < 1``.
    """
    out = [0] * len(prompts)

    def take(idx: list[int], logits: Tensor) -> None:
        for i, t in zip(idx, logits.argmax(-1).tolist(), strict=True):
            out[i] = int(t)

    _for_each_batch(model, prompts, batch_size, take)
    return out


def logit_differences(
    model: Model, prompts: Sequence[Sequence[int]], plus: Sequence[int], minus: Sequence[int], *, batch_size: int = 64
) -> list[float]:
    """``logit[plus_i] − logit[minus_i]`` at the last position of each prompt ``i``.

    For filters that need a preference between two answers, not only the top token (the QA patching
    task keeps pairs whose clean run prefers the context answer and whose corrupt run the memory one).

    Raises:
        TaskError: ``plus``/``minus`` not one token per prompt, an empty prompt or ``batch_size < 1``.
    """
    if len(plus) != len(prompts) or len(minus) != len(prompts):
        raise TaskError(f"need one plus and one minus token per prompt ({len(prompts)} prompts, "
                        f"{len(plus)} plus, {len(minus)} minus)")
    out = [0.0] * len(prompts)

    def take(idx: list[int], logits: Tensor) -> None:
        a = logits.gather(1, torch.tensor([plus[i] for i in idx], device=logits.device)[:, None])
        b = logits.gather(1, torch.tensor([minus[i] for i in idx], device=logits.device)[:, None])
        for i, v in zip(idx, (a - b).squeeze(1).tolist(), strict=True):
            out[i] = float(v)

    _for_each_batch(model, prompts, batch_size, take)
    return out


__all__ = ["common_prefix", "greedy_next_tokens", "logit_differences"]
