"""Metrics of the final-position logits, and normalization against the clean/corrupt baselines.

Every metric maps logits at the last position to one number per example (higher = more clean-like,
except ``kl`` which is a distance to the clean run). Metrics that only need a few vocabulary columns
say so (:attr:`Metric.needs_full_vocab` is False); the engine then computes only those columns of
the unembedding.

==================  ========================================================  ============
name                per example                                               full vocab?
==================  ========================================================  ============
``logit_diff``      mean logit of the answers − mean logit of the wrong ones  no
``prob``            total probability of the answer tokens                    yes
``logprob``         log of that                                               yes
``kl``              KL(P_clean ‖ P_run) at the last position                  yes
==================  ========================================================  ============

Normalized recovery: ``(M − M_corrupt) / (M_clean − M_corrupt)``: 0 = corrupt baseline, 1 = clean.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from patchtrace.errors import PatchtraceError, PatchtraceWarning

METRICS = ("logit_diff", "prob", "logprob", "kl")


class MetricError(PatchtraceError, ValueError):
    """Unknown metric name or missing reference."""


@dataclass(frozen=True)
class Metric:
    """A named metric.

    Example:
        >>> m = Metric("logit_diff")
        >>> logits = torch.tensor([[0.0, 2.0, 1.0]])
        >>> m.score(logits, torch.tensor([[1]]), torch.tensor([[2]])).tolist()
        [1.0]
    """

    name: str = "logit_diff"

    def __post_init__(self) -> None:
        if self.name not in METRICS:
            raise MetricError(f"unknown metric {self.name!r}; choose one of: {', '.join(METRICS)}")

    @property
    def needs_full_vocab(self) -> bool:
        return self.name != "logit_diff"

    @property
    def higher_is_clean(self) -> bool:
        return self.name != "kl"

    def columns(self, answer: Tensor, wrong: Tensor) -> Tensor | None:
        """Sorted unique vocabulary columns the metric reads, or None if it needs all of them."""
        if self.needs_full_vocab:
            return None
        return torch.unique(torch.cat([answer.flatten(), wrong.flatten()]))

    def score(
        self,
        logits: Tensor,
        answer: Tensor,
        wrong: Tensor,
        ref_logprobs: Tensor | None = None,
        cols: Tensor | None = None,
    ) -> Tensor:
        """Per-example metric.

        Args:
            logits: ``[N, V]`` last-position logits, or ``[N, len(cols)]`` when ``cols`` is given.
            answer: ``[N, A]`` answer token ids; wrong: ``[N, W]``.
            ref_logprobs: ``[N, V]`` clean-run log-probabilities (``kl`` only).
            cols: the vocabulary columns ``logits`` holds (sorted), from :meth:`columns`.

        Returns:
            ``[N]`` float tensor.
        """
        logits = logits.float()
        if cols is not None:
            answer = torch.searchsorted(cols, answer)
            wrong = torch.searchsorted(cols, wrong)
        if self.name == "logit_diff":
            return logits.gather(1, answer).mean(1) - logits.gather(1, wrong).mean(1)
        logp = torch.log_softmax(logits, dim=-1)
        if self.name == "prob":
            return logp.gather(1, answer).exp().sum(1)
        if self.name == "logprob":
            return torch.logsumexp(logp.gather(1, answer), dim=1)
        if ref_logprobs is None:
            raise MetricError("metric 'kl' needs the clean run's log-probabilities")
        return (ref_logprobs.exp() * (ref_logprobs - logp)).sum(-1)


def normalize(value: Tensor | float, clean: float, corrupt: float) -> Tensor | float:
    """Normalized recovery ``(value − corrupt) / (clean − corrupt)``; raises if the baselines coincide."""
    gap = clean - corrupt
    if abs(gap) < 1e-12:
        raise MetricError(
            f"clean and corrupt baselines are equal ({clean:.4g}); the task shows no behaviour to recover"
        )
    return (value - corrupt) / gap


class BaselineWarning(PatchtraceWarning):
    """Examples whose clean and corrupt baselines coincide: their effects are zero by construction."""


def warn_zero_gap(clean: Tensor, corrupt: Tensor, what: str = "task", tol: float = 1e-6) -> list[int]:
    """Warn (naming them) about examples whose clean and corrupt metric are equal; return their indices.

    Such examples contribute effects that are zero by construction, and their normalized recovery
    divides by zero, so a result that averages over them understates every site.
    """
    bad = ((clean.float() - corrupt.float()).abs() <= tol).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(str(i) for i in bad[:8]) + ("" if len(bad) <= 8 else f", ... ({len(bad)} in all)")
        warnings.warn(
            f"{what}: example(s) {shown} have a zero baseline gap (clean = corrupt metric "
            f"{float(clean[bad[0]]):+.4g}): their effects are zero by construction and their recovery is undefined",
            BaselineWarning,
            stacklevel=2,
        )
    return bad
