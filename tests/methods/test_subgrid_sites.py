"""Sub-grid sweeps name the site that was patched (issue: silent wrong results, item 1).

A sweep over a non-contiguous layer subset and a unit subset must label every value with the model's
layer/unit indices, not the value's offset in the grid. Each value is checked against the
independent HF-hook reference patch *of the site that ``site_at`` names*, and the names against an
enumeration written here, independently of ``build_grid`` and ``site_at``.
"""

from __future__ import annotations

import pytest
import torch

from patchtrace.methods.activation_patching import PatchingConfig, run
from patchtrace.sites import Site, SiteSpec
from patchtrace.tasks import make_task
from reference import reference_patch

KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head", "q", "k", "v", "neuron", "pattern")
UNIT_KINDS = {"head", "q", "k", "v", "neuron", "pattern"}


@pytest.fixture(scope="module")
def llama(smol_tokenizer):
    from conftest import make_tiny

    return make_tiny("llama", seed=3, tokenizer=smol_tokenizer)


@pytest.fixture(scope="module")
def tok(llama):
    return make_task("ioi", n=2, seed=1).tokenize(llama.tokenizer)


def _units(model, kind):
    d = model.dims
    n = d.d_mlp if kind == "neuron" else (d.n_kv_heads if kind in ("k", "v") else d.n_heads)
    return (n - 1,) if kind in ("k", "v") else (n - 1, 1)  # a subset, out of order with the full range


@pytest.mark.parametrize("kind", KINDS)
def test_every_value_is_the_effect_of_the_site_it_names(llama, tok, kind):
    layers = (2, 0)  # non-contiguous and not starting at 0 in grid order
    units = _units(llama, kind) if kind in UNIT_KINDS else None
    diff = next(i for i, (a, b) in enumerate(zip(tok.clean[0], tok.corrupt[0], strict=True)) if a != b)
    poss = [diff, -1]
    spec = SiteSpec(kind, per_unit=units is not None, positions=poss, layers=layers, units=units)
    s = run(llama, tok, spec, PatchingConfig(sanity_check=False))
    expected = [Site(kind, L, u, p) for L in layers for u in (units or (None,)) for p in poss]
    ids_c, ids_k = tok.ids("clean", [0, 1]), tok.ids("corrupt", [0, 1])
    base = s.extras["corrupt_per_example"]
    T = len(tok.clean[0])
    moved = 0
    for flat, want in enumerate(expected):
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(flat), s.values.shape))
        got = s.site_at(idx)
        assert got == want, (idx, got, want)
        ref_site = Site(kind, want.layer, want.unit, want.pos % T)
        ref = reference_patch(llama, ids_k, ids_c, [ref_site], tok.answer, tok.wrong)
        torch.testing.assert_close(s.per_example[(slice(None), *idx)] + base, ref, atol=1e-4, rtol=0)
        moved += int((ref - base).abs().max() > 1e-4)
    assert moved > 0  # non-vacuous: some patches change the metric
    df = s.to_dataframe()
    assert sorted(set(df["layer"])) == sorted(layers)
    assert [str(x) for x in df["site"]] == [str(x) for x in expected]
    top_site, top_val = s.top_k(1, by="abs")[0]
    assert top_site in expected
    flat = expected.index(top_site)
    assert top_val == pytest.approx(float(s.values.flatten()[flat]))


def test_single_layer_single_unit_last_position(llama, tok):
    s = run(llama, tok, SiteSpec("head", per_unit=True, positions="last", layers=(2,), units=(3,)),
            PatchingConfig(sanity_check=False))
    assert s.top_k(1)[0][0] == Site("head", 2, 3, -1)
    row = s.to_dataframe().iloc[0]
    assert (row["layer"], row["head"], row["site"]) == (2, 3, "head[2].h3@-1")


def test_whole_layer_subset_and_report_labels(llama, tok, tmp_path):
    from patchtrace.report.html import _section_data
    from patchtrace.report.summary import as_matrix, top_rows

    s = run(llama, tok, SiteSpec("head", per_unit=False, positions="last", layers=(1, 2)),
            PatchingConfig(sanity_check=False))
    assert [str(s.site_at((i,))) for i in range(2)] == ["head[1]@-1", "head[2]@-1"]
    assert as_matrix(s).rows == ["L1", "L2"]
    assert {r["site"] for r in top_rows(s, 2)} == {"head[1]@-1", "head[2]@-1"}
    data = _section_data("x", s)
    (panel,) = data["panels"]
    assert panel["rows"] == ["L1", "L2"]
    assert [row[0] for row in panel["sites"]] == ["head[1]@-1", "head[2]@-1"]  # tooltips agree with row labels


def test_saved_and_loaded_keeps_the_names(llama, tok, tmp_path):
    from patchtrace.results import Scores

    s = run(llama, tok, SiteSpec("resid_pre", positions="last", layers=(0, 2)), PatchingConfig(sanity_check=False))
    s.save(tmp_path / "r")
    back = Scores.load(tmp_path / "r")
    assert [str(back.site_at((i,))) for i in range(2)] == ["resid_pre[0]@-1", "resid_pre[2]@-1"]


def test_labels_of_the_wrong_length_are_refused():
    from patchtrace.results import ResultsError, Scores

    with pytest.raises(ResultsError, match="layer_index"):
        Scores(torch.zeros(2), ("layer",), "resid_pre", labels={"layer_index": ["3"]})
