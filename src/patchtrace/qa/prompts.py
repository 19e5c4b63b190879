"""Prompt rendering for extractive QA, and where each context sentence lands in the tokens.

Prompt format. SmolLM2-135M-Instruct is an instruct model, but asked an open question it rambles.
What makes it answer reliably is the chat template (system: "Answer the question using only the
context.") with the assistant turn *prefilled* by the answer's lead-in ("The capital of France
is"), so the next token is the answer. ``fmt="plain"`` renders ``Context: … Question: … Answer: …``
for tokenizers without a chat template. Measured on SmolLM2 (19 capitals it knows closed-book):
both formats answer 19/19 agreeing contexts; the instructed chat format follows 6/19 conflicting
contexts (plain: 7/19, chat without the system line: 1/19).

Sentence bookkeeping. :func:`render` builds the prompt string itself, so it knows the character
range of every context sentence; the tokenizer's offset mapping then assigns each token to the
sentence it overlaps most (a token like ``" The"`` that straddles the joining space goes to the
sentence it starts). Nothing is found by searching the text, so repeated or odd sentences are safe.

Example:
    >>> from patchtrace import load_model
    >>> from patchtrace.qa.generators import make_qa_items
    >>> tokenizer = load_model().tokenizer
    >>> item = make_qa_items("conflict", 1, tokenizer=tokenizer)[0]
    >>> p = render(item, tokenizer)
    >>> s, e = p.sentence_spans[item.gold]
    >>> tokenizer.decode(p.ids[s:e]).strip() == item.sentences[item.gold]
    True
    >>> tokenizer.decode(p.ids[-3:])                      # the prefilled answer lead-in ends the prompt
    ' of Poland is'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from patchtrace.qa.items import QAItem
from patchtrace.tasks.base import TaskError

Fmt = Literal["chat", "plain"]

SYSTEM = "Answer the question using only the context."


@dataclass(frozen=True)
class QAPrompt:
    """A rendered prompt and where its context sentences are, in tokens.

    Attributes:
        text: the full prompt string.
        ids: its token ids.
        sentence_spans: per context sentence, the token range ``[start, end)`` it covers.
        token_sentence: per token, the index of its context sentence, or -1 outside the context.
    """

    text: str
    ids: list[int]
    sentence_spans: list[tuple[int, int]]
    token_sentence: list[int]

    @property
    def context_range(self) -> tuple[int, int]:
        """Token range ``[start, end)`` from the first to the last context token."""
        if not self.sentence_spans:
            return (0, 0)
        return (self.sentence_spans[0][0], self.sentence_spans[-1][1])

    def token_mask(self, i: int, length: int | None = None) -> torch.Tensor:
        """Boolean mask ``[length or len(ids)]`` of the tokens of sentence ``i``."""
        n = length if length is not None else len(self.ids)
        m = torch.zeros(n, dtype=torch.bool)
        s, e = self.sentence_spans[i]
        m[s:e] = True
        return m


def _user_content(context: str | None, question: str) -> tuple[str, int]:
    """The user message and the character offset of the context inside it."""
    if context is None:
        return f"Question: {question}", -1
    head = "Context: "
    return f"{head}{context}\nQuestion: {question}", len(head)


def prompt_text(sentences: Sequence[str] | None, question: str, prefix: str, tokenizer: Any, fmt: Fmt = "chat") -> tuple[str, list[tuple[int, int]]]:
    """The prompt string and the character range of each context sentence in it.

    Args:
        sentences: the context sentences, or None for a closed-book prompt.
        question: the question.
        prefix: the answer lead-in appended after the assistant header (or ``Answer:``).
        tokenizer: used for its chat template when ``fmt="chat"``.
        fmt: ``chat`` (instructed chat template + prefilled answer) or ``plain``.

    Raises:
        TaskError: ``fmt="chat"`` with a tokenizer that has no chat template, or a template that
            does not contain the user message verbatim.
    """
    context = None if sentences is None else " ".join(sentences)
    user, ctx_off = _user_content(context, question)
    if fmt == "plain":
        pre = ""
        text = f"{user}\nAnswer:" + (f" {prefix}" if prefix else "")
    elif fmt == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise TaskError("fmt='chat' needs a tokenizer with a chat template; use fmt='plain'")
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        full = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if full.count(user) != 1:
            raise TaskError("the chat template does not contain the user message exactly once; use fmt='plain'")
        pre = full[: full.index(user)]
        text = full + prefix
    else:
        raise TaskError(f"unknown prompt format {fmt!r}; use 'chat' or 'plain'")
    spans: list[tuple[int, int]] = []
    if sentences is not None:
        at = len(pre) + ctx_off
        for s in sentences:
            spans.append((at, at + len(s)))
            at += len(s) + 1
    return text, spans


def render(item: QAItem, tokenizer: Any, fmt: Fmt = "chat", sentences: Sequence[str] | Literal["item"] | None = "item") -> QAPrompt:
    """Tokenize an item's prompt and map tokens to context sentences.

    Args:
        item: the QA item.
        tokenizer: a *fast* Hugging Face tokenizer (offsets are needed).
        fmt: prompt format (see :func:`prompt_text`).
        sentences: override the context sentences (``None`` = closed book).

    Raises:
        TaskError: the tokenizer gives no offset mapping, or a sentence gets no token.
    """
    sents = item.sentences if isinstance(sentences, str) else sentences
    text, char_spans = prompt_text(sents, item.question, item.prefix, tokenizer, fmt)
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
    except NotImplementedError:
        raise TaskError("sentence attribution needs a fast tokenizer (offset mapping)") from None
    ids = list(enc.input_ids)
    offsets = enc["offset_mapping"]
    tok_sent = [-1] * len(ids)
    for t, (a, b) in enumerate(offsets):
        best, best_ov = -1, 0
        for si, (s, e) in enumerate(char_spans):
            ov = min(b, e) - max(a, s)
            if ov > best_ov:
                best, best_ov = si, ov
        tok_sent[t] = best
    spans: list[tuple[int, int]] = []
    for si in range(len(char_spans)):
        toks = [t for t, x in enumerate(tok_sent) if x == si]
        if not toks:
            raise TaskError(f"context sentence {si} ({(sents or [''])[si]!r}) maps to no token")
        if toks != list(range(toks[0], toks[-1] + 1)):
            raise TaskError(f"context sentence {si} maps to non-contiguous tokens {toks}")
        spans.append((toks[0], toks[-1] + 1))
    return QAPrompt(text, ids, spans, tok_sent)
