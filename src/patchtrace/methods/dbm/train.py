"""Learning the relaxed mask: parametrizations, the loss, and the optimisation loop.

Mask semantics (read carefully; the paper's code uses the opposite convention). Here ``m_c = 1``
means *patch* component ``c`` (take the alternate's value), ``m_c = 0`` means leave the original's
value; a component is *kept* in the found set when its binarized mask is 1. The authors' code
(Nix07/binding-circuit-discovery) writes ``m·orig + (1−m)·alt``, initialises ``m = 1`` (nothing
patched) and penalises ``λ·Σ(1.001 − m)^0.5``: an L0.5 quasi-norm of the *patch amount* ``1 − m``,
which rewards leaving components unpatched. With ``m_ours = 1 − m_paper`` the same objective reads

    loss = Σ_d w_d · CE_d(patched logits, target_d) + λ · Σ_c (m_c + 0.001)^0.5,

initialised at ``m = 0`` (nothing patched), projected onto ``[0, 1]`` by clamping before every
step, Adam with lr 1e-2 for ~100 steps. The 0.001 keeps the gradient finite at ``m = 0`` (there it
is ``λ·0.5/√0.001 ≈ 15.8·λ`` per component: a component moves off zero only if the task loss pulls
harder than that, which is what makes the result sparse).

Loss (a documented departure). The paper drives a logit difference (value desideratum, unbounded)
and penalises its squared change (invariance desideratum). We use one rule for every desideratum:
cross-entropy toward its target token at the last position, averaged over its tuples and weighted
by :attr:`~patchtrace.desiderata.Desideratum.weight` (the built-in variable-binding desiderata use
the paper's 5 : 1). CE is bounded below, needs no contrast token, and treats "move to the
alternate's answer" and "stay at the original's answer" alike. We take one joint Adam step per
iteration (the paper alternates one step per desideratum).

Parametrizations (:attr:`~patchtrace.methods.dbm.config.DBMConfig.parametrization`):

- ``clamp`` (the paper's): the mask is the parameter, clamped to ``[0, 1]``; L0.5 penalty.
- ``sigmoid``: ``m = sigmoid(θ)``, θ initialised at −3; same L0.5 penalty. Its gradient through
  the sigmoid shrinks like ``√m`` near 0, so this needs a larger λ than ``clamp`` for equal sparsity.
- ``hard_concrete`` (Louizos et al. 2018): stochastic gates ``m = clamp(sigmoid((log u − log(1−u) +
  log α)/β)·(ζ−γ)+γ, 0, 1)`` with β=2/3, γ=−0.1, ζ=1.1 during training, the expected-L0 penalty
  ``λ·Σ sigmoid(log α − β·log(−γ/ζ))``, and the deterministic gate at evaluation.

Binarization: component kept iff its (deterministic) mask is ``> threshold`` (0.5 = the paper's round).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from patchtrace.desiderata import TokenizedDesideratum
from patchtrace.methods.dbm.components import MaskedGroup, masked_logits, prepare
from patchtrace.methods.dbm.config import DBMConfig, DBMError, Parametrization
from patchtrace.models.load import Model
from patchtrace.sites import Site

_HC_BETA, _HC_GAMMA, _HC_ZETA = 2.0 / 3.0, -0.1, 1.1


class MaskParam:
    """The trainable tensor behind a mask and the rules turning it into ``m`` and a penalty."""

    def __init__(self, n: int, kind: Parametrization, device: torch.device, gen: torch.Generator) -> None:
        self.kind = kind
        self.gen = gen
        init = {"clamp": 0.0, "sigmoid": -3.0, "hard_concrete": -3.0}[kind]
        self.theta = torch.full((n,), init, device=device, requires_grad=True)

    def project(self) -> None:
        """Clamp the ``clamp`` parametrization back onto ``[0, 1]`` (the others need no projection)."""
        if self.kind == "clamp":
            with torch.no_grad():
                self.theta.clamp_(0.0, 1.0)

    def train_mask(self) -> Tensor:
        """The mask used in a training step (stochastic for ``hard_concrete``)."""
        if self.kind == "clamp":
            return self.theta
        if self.kind == "sigmoid":
            return torch.sigmoid(self.theta)
        u = torch.rand(self.theta.shape, generator=self.gen).clamp(1e-6, 1 - 1e-6).to(self.theta.device)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.theta) / _HC_BETA)
        return (s * (_HC_ZETA - _HC_GAMMA) + _HC_GAMMA).clamp(0.0, 1.0)

    def eval_mask(self) -> Tensor:
        """The deterministic mask (what is binarized and saved)."""
        with torch.no_grad():
            if self.kind == "clamp":
                return self.theta.clamp(0.0, 1.0).detach().clone()
            if self.kind == "sigmoid":
                return torch.sigmoid(self.theta).detach()
            return (torch.sigmoid(self.theta) * (_HC_ZETA - _HC_GAMMA) + _HC_GAMMA).clamp(0.0, 1.0).detach()

    def penalty(self, m: Tensor) -> Tensor:
        """L0.5 of ``m`` (``clamp``, ``sigmoid``) or the expected L0 of the gates (``hard_concrete``)."""
        if self.kind == "hard_concrete":
            return torch.sigmoid(self.theta - _HC_BETA * math.log(-_HC_GAMMA / _HC_ZETA)).sum()
        return (m + 0.001).pow(0.5).sum()


@dataclass
class TrainedMask:
    """A learned mask before evaluation.

    Attributes:
        sites: the components, in mask order.
        mask: the relaxed (deterministic) mask ``[C]`` in ``[0, 1]``; 1 = patched from the alternate.
        kept: components whose mask exceeds the threshold.
        history: per step ``{"loss", "task", "penalty", "n_above"}``.
    """

    sites: list[Site]
    mask: Tensor
    kept: list[Site]
    history: list[dict[str, float]] = field(default_factory=list)


def train_mask(
    model: Model,
    train: Sequence[TokenizedDesideratum],
    comps: Sequence[Site],
    config: DBMConfig,
    *,
    on_step: Callable[[int, float, int], None] | None = None,
    prepared: list[MaskedGroup] | None = None,
) -> TrainedMask:
    """Learn a relaxed mask over ``comps`` on the training tuples (see the module docstring).

    Args:
        model: the model (its parameters are not updated).
        train: tokenized training desiderata.
        comps: components (from :func:`~patchtrace.methods.dbm.components.components`).
        config: :class:`~patchtrace.methods.dbm.config.DBMConfig`.
        on_step: called as ``on_step(step, loss, n_above_threshold)`` after each step.
        prepared: the cached runs from :func:`~patchtrace.methods.dbm.components.prepare` for these
            tuples and components (a λ sweep reuses them); computed here when None.

    Returns:
        :class:`TrainedMask`.

    Raises:
        DBMError: no components.
    """
    if not comps:
        raise DBMError("no components to mask")
    groups = prepared if prepared is not None else prepare(model, train, comps)
    n_tuples: dict[str, int] = defaultdict(int)
    for g in groups:
        n_tuples[g.name] += g.target.shape[0]
    param = MaskParam(len(comps), config.parametrization, model.device, torch.Generator().manual_seed(config.seed))
    opt = torch.optim.Adam([param.theta], lr=config.lr)
    history: list[dict[str, float]] = []
    for step in range(config.steps):
        param.project()
        opt.zero_grad()
        m = param.train_mask()
        task_loss = torch.zeros((), device=model.device)
        for g in groups:
            ce = F.cross_entropy(masked_logits(model, g, m), g.target, reduction="sum") / n_tuples[g.name]
            task_loss = task_loss + g.weight * ce
        pen = param.penalty(m)
        loss = task_loss + config.lam * pen
        loss.backward()
        opt.step()
        n_above = int((param.eval_mask() > config.threshold).sum())
        history.append({"loss": loss.item(), "task": task_loss.item(), "penalty": pen.item(), "n_above": n_above})
        if on_step is not None:
            on_step(step, history[-1]["loss"], n_above)
    param.project()
    mask = param.eval_mask().cpu()
    kept = [s for s, v in zip(comps, mask.tolist(), strict=True) if v > config.threshold]
    return TrainedMask(list(comps), mask, kept, history)
