"""Desiderata-based masking (DBM; Davies et al. 2023): learn a sparse set of components.

The idea. Instead of scoring components one at a time, learn a mask ``m ∈ [0, 1]^C`` over ``C``
components (heads, attention/MLP outputs per layer, neurons, at chosen positions) such that mixing the
*alternate* run's activations into the *original* run,

    ĥ_c = m_c · h_c(alternate) + (1 − m_c) · h_c(original),

makes the model output each desideratum's target (:mod:`patchtrace.desiderata`), while as few
components as possible are patched. The relaxed mask is then binarized and evaluated **exactly**:
the kept components form one multi-site :class:`~patchtrace.engine.sweep.Patch`, run by the sweep
engine on held-out tuples, and compared with the top-k components of exact activation patching at
equal k.

One module per job:

* :mod:`~patchtrace.methods.dbm.config` — :class:`DBMConfig`, :class:`DBMError`;
* :mod:`~patchtrace.methods.dbm.data` — :func:`as_desiderata`: desiderata from a task or a list;
* :mod:`~patchtrace.methods.dbm.components` — the components, the mixing hook and the fast masked
  forward (all of DBM's site-kind logic);
* :mod:`~patchtrace.methods.dbm.cache` — :class:`RunStore`, the run cache shared by one call;
* :mod:`~patchtrace.methods.dbm.train` — parametrizations, loss and training (mask semantics there);
* :mod:`~patchtrace.methods.dbm.evaluate` — exact evaluation and the exact-patching ranking;
* :mod:`~patchtrace.methods.dbm.result` — :class:`Mask`, the saveable result;
* :mod:`~patchtrace.methods.dbm.api` — :func:`run`.

Example:
    A task is one desideratum (value dependence: the clean prompt's answer). Over the nine heads of
    layer 23 of the IOI circuit, the mask settles on one head, the name mover L23.H3; the mask is
    saved as safetensors + JSON and loads back:

    >>> import tempfile
    >>> from patchtrace import load_model, make_task, SiteSpec
    >>> m = load_model()
    >>> heads = SiteSpec("head", per_unit=True, layers=(23,))
    >>> mask = run(m, make_task("ioi", n=4), heads, DBMConfig(lam=0.1, lr=0.1, steps=10))
    >>> [str(s) for s in mask.kept], len(mask.sites)
    (['head[23].h3@-1'], 9)
    >>> 0.0 <= mask.evaluation["accuracy"] <= 1.0             # exact, on the held-out half
    True
    >>> d = tempfile.mkdtemp()
    >>> _ = mask.save(d)
    >>> [str(s) for s in Mask.load(d).kept]
    ['head[23].h3@-1']
"""

from __future__ import annotations

from patchtrace.methods.dbm.api import run
from patchtrace.methods.dbm.cache import RunStore
from patchtrace.methods.dbm.components import (
    MASKABLE_KINDS,
    MaskedGroup,
    components,
    kind_grid,
    masked_logits,
    parse_specs,
    prepare,
)
from patchtrace.methods.dbm.config import DBMConfig, DBMError, Parametrization
from patchtrace.methods.dbm.data import ProvidesDesiderata, as_desiderata
from patchtrace.methods.dbm.evaluate import (
    TargetMarginScorer,
    evaluate_site_sets,
    exact_patching_ranking,
    site_set_margins,
    target_margin,
)
from patchtrace.methods.dbm.result import Mask, load_mask, mask_from_scores
from patchtrace.methods.dbm.train import TrainedMask, train_mask

__all__ = [
    "MASKABLE_KINDS",
    "DBMConfig",
    "DBMError",
    "Mask",
    "MaskedGroup",
    "Parametrization",
    "ProvidesDesiderata",
    "RunStore",
    "TargetMarginScorer",
    "TrainedMask",
    "as_desiderata",
    "components",
    "evaluate_site_sets",
    "exact_patching_ranking",
    "kind_grid",
    "load_mask",
    "mask_from_scores",
    "masked_logits",
    "parse_specs",
    "prepare",
    "run",
    "site_set_margins",
    "target_margin",
    "train_mask",
]
