"""What the runner's stages allocate: the memory estimates the engine plans a sweep with.

:func:`patchtrace.engine.plan.plan_sweep` cuts a sweep into chunks that fit a working-memory budget and
prints its expected peak (``--dry-run``); both numbers come from here, per batch row and per recorded
run, in terms of the model's dimensions, so they follow every family the runner supports. They are
estimates written from what the stages keep alive (:mod:`patchtrace.models.stages`), tested against
the bytes a sweep really records (``tests/engine/test_plan_budget.py``).
"""

from __future__ import annotations

import torch

from patchtrace.models.adapters import Dims, Family


class Footprint:
    """Memory estimates of :class:`~patchtrace.models.stages.Stages` (mixed into it)."""

    dims: Dims
    family: Family

    def row_bytes(self, n: int, T: int, ncols: int | None, dtype: torch.dtype) -> int:
        """Peak working memory (bytes) of one batch row computing ``n`` positions of a ``T``-token
        prompt, one layer at a time (a layer's temporaries are freed before the next), plus its logits.

        Per position, the stages hold: the three residual streams (pre, mid, post) and the two
        norm outputs entering the sublayers (``5·D``), the attention output (``D``) and the MLP output
        (the post-norm outputs add ``2·D`` where the family has them), queries/keys/values and heads
        (``≈ 4·H·d``), the hidden activation with its gate, up and activated gate (``4·M``), and the
        scores, masked scores and pattern against all ``T`` keys (``3·H·T``). The cached prefix is
        shared by all rows and not counted here; logits are float32, with one temporary.
        """
        d = self.dims
        el = torch.finfo(dtype).bits // 8
        per_pos = 6 * d.d_model + 4 * d.d_mlp + 4 * d.n_heads * d.d_head + 3 * d.n_heads * T
        if self.family.post_norms:
            per_pos += 2 * d.d_model
        if self.family.moe:  # router, routing weights and every expert's output row
            per_pos += d.n_experts * (d.d_model + 3)
        logits = ncols if ncols is not None else d.vocab
        return el * n * per_pos + 4 * logits * 2

    def cache_bytes(self, n_rows: int, T: int, dtype: torch.dtype, n_pos: int | None = None, kv: bool = True) -> int:
        """Bytes one recorded run of ``n_rows`` prompts of ``T`` tokens keeps for the fast path: per
        layer, over ``n_pos`` recorded positions (default ``T``; a run recorded from ``p`` keeps ``T − p``),
        the residual streams and sublayer outputs (``4·D``) and the hidden activation (``M``), and over all
        ``T`` the keys/values (``2·K·d``) unless ``kv`` is False (a run only patched *from* keeps none)."""
        d = self.dims
        el = torch.finfo(dtype).bits // 8
        acts = (T if n_pos is None else n_pos) * (4 * d.d_model + d.d_mlp)
        kvs = T * 2 * d.n_kv_heads * d.d_head if kv else 0
        return n_rows * d.n_layers * (acts + kvs) * el
