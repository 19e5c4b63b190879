"""Teaching a causal LM prompt → answer pairs, and measuring what else changed.

The small pieces the localized fine-tuning of language models needs, with any HF causal LM:

* :func:`answer_batches`: prompt + answer token batches whose labels score the answer tokens only
  (the prompt is context, not a target), right-padded;
* :func:`lm_loss`: the model's own shifted cross-entropy on those labels;
* :func:`exact_match`: the share of pairs whose every answer token is the model's argmax under teacher
  forcing (the same as greedy generation of the answer);
* :func:`text_logprobs` / :func:`kl_on_text`: preservation, the mean per-token
  ``KL(before ‖ after)`` of the next-token distributions on unrelated text.

Answers should start with the space they follow with (``" Rome"``): the answer tokens are the tokens of
``prompt + answer`` past the prompt's own tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from patchtrace.weights.errors import WeightPatchError

Pair = tuple[str, str]


def answer_batches(tokenizer: Any, pairs: Sequence[Pair], batch: int = 16) -> list[dict[str, Tensor]]:
    """Batches of ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the answer tokens).

    Raises:
        WeightPatchError: no pairs, or an answer that adds no token (named).
    """
    if not pairs:
        raise WeightPatchError("answer_batches: no prompt/answer pairs")
    rows = []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        full = tokenizer(prompt + answer, add_special_tokens=False).input_ids
        if len(full) <= len(p) or full[: len(p)] != p:
            raise WeightPatchError(f"answer {answer!r} after prompt {prompt!r} does not add its own tokens")
        rows.append((full, len(p)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        n = max(len(f) for f, _ in chunk)
        ids = torch.full((len(chunk), n), int(pad))
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        labels = torch.full((len(chunk), n), -100)
        for j, (f, lp) in enumerate(chunk):
            ids[j, : len(f)] = torch.tensor(f)
            mask[j, : len(f)] = 1
            labels[j, lp : len(f)] = torch.tensor(f[lp:])
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def lm_loss(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of the answer tokens (HF shifts the labels)."""
    return model(**batch).loss


@torch.no_grad()
def exact_match(model: Any, batches: Sequence[dict[str, Tensor]]) -> float:
    """Share of rows whose answer tokens are all the argmax of the previous position (teacher forcing)."""
    hit = total = 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        pred = logits[:, :-1].argmax(-1)
        gold = b["labels"][:, 1:]
        ok = ((pred == gold) | (gold == -100)).all(dim=1)
        hit += int(ok.sum())
        total += len(ok)
    return hit / max(total, 1)


@torch.no_grad()
def text_logprobs(model: Any, tokenizer: Any, texts: Sequence[str]) -> list[Tensor]:
    """Next-token log-probabilities at every position of each text (one forward per text)."""
    out = []
    for t in texts:
        ids = tokenizer(t, return_tensors="pt").input_ids
        out.append(F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1))
    return out


def kl_on_text(model: Any, tokenizer: Any, texts: Sequence[str], before: Sequence[Tensor]) -> float:
    """Mean per-token ``KL(before ‖ now)`` over ``texts`` (0: the model predicts exactly as before)."""
    now = text_logprobs(model, tokenizer, texts)
    kls = [(b.exp() * (b - a)).sum(-1) for a, b in zip(now, before)]
    return float(torch.cat(kls).mean())


__all__ = ["Pair", "answer_batches", "exact_match", "kl_on_text", "lm_loss", "text_logprobs"]
