"""``CellPatches``: one plain patch per grid cell, built when read (issue 15: a 46,080-neuron sweep
held ~14 MB of patch objects for its whole run).

The reference is the obvious eager list, ``[Patch((resolve(s),)) for s in grid.sites()]``.
"""

from __future__ import annotations

import gc
import pickle
import tracemalloc

import pytest

from conftest import make_tiny
from patchtrace import PatchingConfig, SiteSpec
from patchtrace.engine.patch import CellPatches, EngineError, Patch, resolve
from patchtrace.grid import Grid
from patchtrace.methods import activation_patching as ap
from patchtrace.tasks import make_task
from patchtrace.tasks.base import Example, Task


def _key(pt: Patch) -> tuple:
    return tuple((iv.target, iv.op, iv.source) for iv in pt.interventions)


@pytest.mark.parametrize("spec", [
    SiteSpec("head", per_unit=True, positions="all", layers=(0, 2)),
    SiteSpec("neuron", per_unit=True, positions=[-1, -3], layers=(1,), units=(0, 5, 7)),
    SiteSpec("resid_pre", positions="last"),
])
def test_every_read_equals_the_eager_list(spec):
    model = make_tiny("llama")
    T = 6
    grid = Grid.from_spec(spec, model.dims, T)
    eager = [Patch((resolve(s, model, T),)) for s in grid.sites()]
    lazy = CellPatches(grid, model, T)
    assert len(lazy) == len(eager) > 1
    assert [_key(p) for p in lazy] == [_key(p) for p in eager]  # iteration, row-major
    assert _key(lazy[-1]) == _key(eager[-1]) and _key(lazy[1]) == _key(eager[1])
    assert [_key(p) for p in lazy[1:7:2]] == [_key(p) for p in eager[1:7:2]]
    with pytest.raises(IndexError):
        lazy[len(eager)]
    with pytest.raises(IndexError):
        lazy[-len(eager) - 1]
    back = pickle.loads(pickle.dumps(CellPatches(grid, None, T)))  # type: ignore[arg-type]
    assert len(back) == len(eager)  # a job ships to Ray workers by pickle


def test_a_position_one_group_lacks_is_refused_when_the_job_is_built(smol_tokenizer, monkeypatch):
    """Prompts of two lengths: the grid cannot check position -5 (no single length), the per-group
    patches do, when the job is built and before any run is recorded."""
    model = make_tiny("llama", tokenizer=smol_tokenizer)
    task = Task("two-lengths", [Example("The cat sat on the mat and", "The dog sat on the mat and", " slept", " ran"),
                                Example("Paris is in", "Rome is in", " France", " Italy")])
    tok = task.tokenize(smol_tokenizer)
    assert len(tok.groups()) == 2 and min(tok.lengths) < 5 <= max(tok.lengths)
    calls = []
    monkeypatch.setattr(ap, "collect", lambda *a, **k: calls.append(1))
    spec = SiteSpec("resid_pre", positions=[-1, -5], layers=(0,))
    with pytest.raises(EngineError, match=rf"resid_pre\[0\]@-5: position -5 out of range for prompts of {min(tok.lengths)} tokens"):
        ap.PatchingJob(model, tok, spec, PatchingConfig())
    assert calls == []


def test_a_job_over_many_cells_does_not_hold_a_patch_per_cell(smol_tokenizer):
    """~4,000 cells: the eager list of patches took ~300 B a cell (the test fails on it); the job
    now holds the grid and a few per-block records only."""
    model = make_tiny("llama", tokenizer=smol_tokenizer)
    tok = make_task("ioi", n=2, seed=0).tokenize(smol_tokenizer)
    spec = SiteSpec("neuron", per_unit=True, positions="all")
    n = len(ap.build_grid(model, spec, tok))
    assert n >= 1500
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        job = ap.PatchingJob(model, tok, spec, PatchingConfig())
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(job.patches[0]) == n
    assert held < 60 * n, f"the job holds {held} B for {n} cells"
